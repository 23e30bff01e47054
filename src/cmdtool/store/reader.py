"""The out-of-core primitive: consecutive row blocks of the store, read ahead in a background thread."""

from __future__ import annotations

import queue
import threading
from typing import Callable, Iterator

import numpy as np

_DONE = object()


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
