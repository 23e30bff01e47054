"""The out-of-core primitive: consecutive row blocks of the store, read ahead in a background thread."""

from __future__ import annotations

import functools
import queue
import threading
from typing import Callable, Iterator

import numpy as np

class RowBlock:
    """Rows ``start:stop`` of W (over the requested columns) as ``data`` (numpy array or torch tensor).

    A block read with ``iter_blocks(reuse_arrays=True)`` lends its memory: :meth:`release` (or the end of a
    ``with block:``) gives it back to the reader, which may then read a later block into it; ``data`` is None
    from then on. A block never released keeps its memory for itself."""

    __slots__ = ("start", "stop", "data", "_give_back")

    def __init__(self, start: int, stop: int, data, give_back=None):
        self.start, self.stop, self.data = start, stop, data
        self._give_back = give_back

    def release(self) -> None:
        """Done with ``data``: the reader may read into its memory again (with ``reuse_arrays``)."""
        give_back, self._give_back, self.data = self._give_back, None, None
        if give_back is not None:
            give_back()

    def __enter__(self) -> "RowBlock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __iter__(self):  # allows ``for start, stop, data in store.iter_blocks()``
        return iter((self.start, self.stop, self.data))


_DONE = object()


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


class BlockArrays:
    """Block arrays for one iteration, each handed out again only after its consumer gave it back.

    A fresh block array is fresh memory, and the decompression that fills it first page-faults it in: the
    kernel zeroes every page first, on the reader's thread. Reading into an array the consumer is done with
    skips that.

    Ownership is explicit: :meth:`empty` lends an array, and only :meth:`give_back` (called by
    :meth:`~cmdtool.store.store.RowBlock.release`) returns it to the pool; an array never given back is never
    reused, however long its consumer keeps it. At most ``limit`` arrays are kept; the pool is dropped with the
    iteration.

    Memory: a pooled array stays resident while it waits to be reused, where a freed one went back to the system
    at once; so only the pass engine asks for it (``iter_blocks(reuse_arrays=True)``).
    """

    def __init__(self, limit: int):
        self._free: list[np.ndarray] = []
        self._lent: dict[int, np.ndarray] = {}  # id of the view handed out -> its pooled array
        self._pooled = 0
        self._limit = limit
        self._lock = threading.Lock()

    def empty(self, shape: tuple[int, ...], dtype) -> np.ndarray:
        """An uninitialised C-contiguous array of ``shape``: a view of a pooled array given back and large
        enough, else a new one (pooled while the pool is under its limit)."""
        dtype, size = np.dtype(dtype), int(np.prod(shape))
        with self._lock:
            array = next((a for a in self._free if a.dtype == dtype and a.size >= size), None)
            if array is not None:
                self._free.remove(array)
            elif self._pooled < self._limit:
                array = np.empty(size, dtype=dtype)
                self._pooled += 1
            else:
                return np.empty(shape, dtype=dtype)
            view = array[:size].reshape(shape)
            self._lent[id(view)] = array
            return view

    def give_back(self, view: np.ndarray) -> None:
        """The consumer is done with ``view`` (an array :meth:`empty` returned): its memory may be read into
        again. Anything else is ignored."""
        with self._lock:
            array = self._lent.pop(id(view), None)
            if array is not None:
                self._free.append(array)


# Bytes a reader may hold ahead of the consumer (at least one block), counted from the moment a block's read
# starts: a store whose chunk rows are tall (a big model, blocks of 100 MB or more) reads one block ahead, not two.
READ_AHEAD_BYTES = 128 * 1024**2


def iter_row_blocks(read: Callable[..., np.ndarray], rows: slice, columns: slice, block_rows: int,
                    device=None, dtype=None, prefetch: int = 2, reuse_arrays: bool = False) -> Iterator:
    """Yield :class:`~cmdtool.store.store.RowBlock` objects for ``rows`` in steps of ``block_rows``.

    ``read(rows, columns)`` returns a block; with ``reuse_arrays`` it is called as ``read(rows, columns,
    empty=...)`` and allocates its result with ``empty(shape, dtype)`` (:class:`BlockArrays`), and a block's
    array is read into again only after the consumer called :meth:`~cmdtool.store.store.RowBlock.release`.

    A producer thread reads (and decompresses) up to ``prefetch`` blocks ahead, fewer where they would hold more
    than :data:`READ_AHEAD_BYTES` (one at least); errors raised there are re-raised in the consumer. Stopping the
    iteration early stops the producer.

    Memory: the consumer's block plus the blocks read ahead, counted from the moment a read starts. (A queue of
    ``prefetch`` alone bounded only the finished blocks waiting in it: memray found 5 blocks alive in a CMD pass
    with ``prefetch=2``.)
    """

    block_bytes = 4 * block_rows * max(columns.stop - columns.start, 1)
    prefetch = prefetch if prefetch <= 0 else max(1, min(prefetch, READ_AHEAD_BYTES // block_bytes))
    pool = None
    if reuse_arrays and (device is None or _device_type(device) in ("cpu", "cuda")):
        # (a CPU tensor shares the array: given back by the consumer; a CUDA block is copied into pinned memory
        # at once: given back here; other devices' copies may run after the call returns: not pooled.)
        # Pool size: the consumer's block, those read ahead, and one more.
        pool = BlockArrays(max(prefetch, 0) + 2)
        read = functools.partial(read, empty=pool.empty)
        copied = device is not None and _device_type(device) == "cuda"

    def block_of(start: int, stop: int, data: np.ndarray):
        if device is None:
            return RowBlock(start, stop, data, pool and functools.partial(pool.give_back, data))
        tensor = _to_device(data, device, dtype)
        if pool is not None and copied:
            pool.give_back(data)
            return RowBlock(start, stop, tensor)
        return RowBlock(start, stop, tensor, pool and functools.partial(pool.give_back, data))

    starts = list(range(rows.start, rows.stop, block_rows))
    if prefetch <= 0:
        for start in starts:
            stop = min(start + block_rows, rows.stop)
            yield block_of(start, stop, read(slice(start, stop), columns))
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
            block = block_of(start, stop, data)
            data = None
            yield block
            block = None
            slots.release()  # the consumer asks for the next block, done with this one: the next read may start
    finally:
        stop_event.set()
        slots.release()  # a producer waiting for a slot sees the event
        thread.join()
