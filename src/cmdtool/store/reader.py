"""The out-of-core primitive: consecutive row blocks of the store, read ahead in a background thread."""

from __future__ import annotations

import functools
import queue
import sys
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


def _device_type(device) -> str:
    import torch

    return torch.device(device).type


def _to_device(block: np.ndarray, device, dtype):
    import torch

    tensor = torch.from_numpy(block)
    device = torch.device(device)
    if device.type == "cuda":
        tensor = tensor.pin_memory().to(device, non_blocking=True)
    elif device.type != "cpu":
        tensor = tensor.to(device)
    return tensor.to(dtype) if dtype is not None else tensor


class ReusedBlockArrays:
    """Block arrays for one iteration, handed out again once nobody holds them any more.

    A fresh block array is a fresh mapping (the mmap threshold above), and the decompression that fills it first
    page-faults it in: the kernel zeroing those pages was 12% of a DMD pass's CPU samples (perf), all on the
    reader's thread. Reading into an array that nobody holds any more skips that (docs/performance.md,
    "Round 6": on 1M x 150, DMD, KGA and PCA 13-28% faster, CMD cold unchanged).

    Whether an array is free is its reference count: the block's consumers hold it through the array itself, its
    views (``base``) or the tensors made from it (``torch.from_numpy`` keeps a reference), so an array counted by
    this pool alone cannot be reached by anyone else. The pool grows only when every pooled array is in use, up
    to ``limit`` arrays, and is dropped with the iteration.

    Memory: a pooled array stays resident while it waits to be reused, where a freed one went back to the system
    at once. A pass's peak grows by up to two blocks (+19-69 MB measured at the passes' 32 MiB blocks), so only
    the pass engine asks for it (``iter_blocks(reuse_arrays=True)``); ``iter_blocks``'s 128 MiB blocks do not.
    """

    def __init__(self, limit: int):
        self._arrays: list[np.ndarray] = []
        self._limit = limit
        probe = [np.empty(1)]
        self._idle_refs = sys.getrefcount(probe[0])  # the count of an array only the list holds, read as below

    def empty(self, shape: tuple[int, ...], dtype) -> np.ndarray:
        """An uninitialised C-contiguous array: a view of a pooled one when one is free and large enough, else
        a new one (pooled while the pool is under its limit)."""
        dtype, size = np.dtype(dtype), int(np.prod(shape))
        for k in range(len(self._arrays)):
            if sys.getrefcount(self._arrays[k]) <= self._idle_refs:
                array = self._arrays[k]
                if array.dtype == dtype and array.size >= size:
                    return array[:size].reshape(shape)
        array = np.empty(size, dtype=dtype)
        if len(self._arrays) < self._limit:
            self._arrays.append(array)
        return array.reshape(shape)


# Bytes a reader may hold ahead of the consumer (at least one block): a store whose chunk rows are tall (a big
# model: 114 MB blocks at ResNet-18 size) then reads one block ahead, not two (docs/performance.md, "Round 3").
READ_AHEAD_BYTES = 128 * 1024**2


def iter_row_blocks(read: Callable[..., np.ndarray], rows: slice, columns: slice, block_rows: int,
                    device=None, dtype=None, prefetch: int = 2, reuse_arrays: bool = False) -> Iterator:
    """Yield :class:`~cmdtool.store.store.RowBlock` objects for ``rows`` in steps of ``block_rows``.

    ``read(rows, columns)`` returns a block; with ``reuse_arrays`` it is called as ``read(rows, columns,
    empty=...)`` and allocates its result with ``empty(shape, dtype)`` (:class:`ReusedBlockArrays`).

    A producer thread reads (and decompresses) up to ``prefetch`` blocks ahead, fewer where they would hold more
    than :data:`READ_AHEAD_BYTES` (one at least); errors raised there are re-raised in the consumer. Stopping the
    iteration early stops the producer.

    Memory: the consumer's block plus the blocks read ahead, counted from the moment a read starts. (A queue of
    ``prefetch`` alone bounded only the finished blocks waiting in it: memray found 5 blocks alive in a CMD pass
    with ``prefetch=2``.)
    """
    from .store import RowBlock

    fix_mmap_threshold()
    block_bytes = 4 * block_rows * max(columns.stop - columns.start, 1)
    prefetch = prefetch if prefetch <= 0 else max(1, min(prefetch, READ_AHEAD_BYTES // block_bytes))
    if reuse_arrays and (device is None or _device_type(device) in ("cpu", "cuda")):
        # (CPU tensors share the array and count as its references; a CUDA block is copied into pinned memory
        # while the consumer still holds the array; other devices' copies may run after it is released.)
        # Pool size: the consumer's block, those read ahead, and one more, as the consumer's loop variable still
        # holds its last block when the next read starts.
        read = functools.partial(read, empty=ReusedBlockArrays(max(prefetch, 0) + 2).empty)
    starts = list(range(rows.start, rows.stop, block_rows))
    if prefetch <= 0:
        for start in starts:
            stop = min(start + block_rows, rows.stop)
            data = read(slice(start, stop), columns)
            yield RowBlock(start, stop, data if device is None else _to_device(data, device, dtype))
        return

    # blocks alive at once: the consumer's and those read ahead; a slot is taken before a read starts and given
    # back when the consumer asks for the block after the one it holds
    slots = threading.Semaphore(prefetch + 1)
    buffer: queue.Queue = queue.Queue()
    stop_event = threading.Event()

    def produce():
        try:
            for start in starts:
                while not slots.acquire(timeout=0.1):
                    if stop_event.is_set():
                        return
                if stop_event.is_set():
                    return
                stop = min(start + block_rows, rows.stop)
                buffer.put((start, stop, read(slice(start, stop), columns)))
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
            item = None  # the block lives in the consumer's hands only
            block = RowBlock(start, stop, data if device is None else _to_device(data, device, dtype))
            data = None
            yield block
            block = None
            slots.release()  # the consumer asks for the next block, done with this one: the next read may start
    finally:
        stop_event.set()
        slots.release()  # a producer waiting for a slot sees the event
        thread.join()
