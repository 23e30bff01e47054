"""The out-of-core primitive: consecutive row blocks of the store, read ahead in a background thread."""

from __future__ import annotations

import functools
import queue
import threading
from typing import Callable, Iterator

import numpy as np

_DONE = object()

# glibc's malloc raises its mmap threshold to the size of each large block freed (up to 32 MiB), after which the
# blocks come from the heap; blocks allocated by the reader thread and freed by the consumer then fragment it, and
# the peak RSS of a pass grew with N: +16 MB for the bare read of 3M x 6 rows against 250k (2 MiB blocks), +26 MB
# for a Gram pass, +115 MB from 4M to 16M x 10 rows at 128 MiB blocks (bench/scale.py). A fixed threshold (which
# also turns the dynamic one off) keeps every large buffer in its own mapping, returned to the system when freed:
# the same runs grew by 2.4 and 2.6 MB. See docs/performance.md, "Peak memory in N".
MMAP_THRESHOLD_BYTES = 1024**2
_M_MMAP_THRESHOLD = -3  # mallopt parameter number in glibc's malloc.h


@functools.cache
def fix_mmap_threshold() -> bool:
    """Fix glibc's mmap threshold at :data:`MMAP_THRESHOLD_BYTES` for this process (once); False where the C
    library is not glibc (nothing to do: other allocators do not carry this dynamic threshold)."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    except (OSError, AttributeError):
        return False


def _to_device(block: np.ndarray, device, dtype):
    import torch

    tensor = torch.from_numpy(block)
    device = torch.device(device)
    if device.type == "cuda":
        tensor = tensor.pin_memory().to(device, non_blocking=True)
    elif device.type != "cpu":
        tensor = tensor.to(device)
    return tensor.to(dtype) if dtype is not None else tensor


def iter_row_blocks(read: Callable[[slice, slice], np.ndarray], rows: slice, columns: slice, block_rows: int,
                    device=None, dtype=None, prefetch: int = 2) -> Iterator:
    """Yield :class:`~cmdtool.store.store.RowBlock` objects for ``rows`` in steps of ``block_rows``.

    A producer thread reads (and decompresses) up to ``prefetch`` blocks ahead; errors raised there are
    re-raised in the consumer. Stopping the iteration early stops the producer.
    """
    from .store import RowBlock

    fix_mmap_threshold()
    starts = list(range(rows.start, rows.stop, block_rows))
    if prefetch <= 0:
        for start in starts:
            stop = min(start + block_rows, rows.stop)
            data = read(slice(start, stop), columns)
            yield RowBlock(start, stop, data if device is None else _to_device(data, device, dtype))
        return

    buffer: queue.Queue = queue.Queue(maxsize=prefetch)
    stop_event = threading.Event()

    def produce():
        try:
            for start in starts:
                stop = min(start + block_rows, rows.stop)
                item = (start, stop, read(slice(start, stop), columns))
                while not stop_event.is_set():
                    try:
                        buffer.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop_event.is_set():
                    return
            buffer.put(_DONE)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            buffer.put(exc)

    thread = threading.Thread(target=produce, name="cmdtool-block-reader", daemon=True)
    thread.start()
    try:
        while True:
            item = buffer.get()
            if item is _DONE:
                break
            if isinstance(item, BaseException):
                raise item
            start, stop, data = item
            yield RowBlock(start, stop, data if device is None else _to_device(data, device, dtype))
    finally:
        stop_event.set()
        # drain so a producer blocked on put() sees the event
        while thread.is_alive():
            try:
                buffer.get(timeout=0.05)
            except queue.Empty:
                pass
        thread.join()
