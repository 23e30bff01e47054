"""Streaming passes over the store: several accumulators share one read of W (docs/design sec. 3 and 5.1).

A pass reads row blocks ``W[r0:r1, window]`` (read ahead in a background thread), moves each to the compute
device, flags the rows holding NaN/Inf (zeroed, so that no non-finite value leaks into a reduction) and hands the
same :class:`Block` to every accumulator.

**The accumulator contract** (one code for the in-process loop, a thread pool and a Dask graph):

- ``start(ctx)`` runs once, before any block, where the pass is driven: it creates the per-row output arrays in
  the staged result (chunked by ``ctx.block_rows``, so that every block owns whole chunks) and zeroes the
  reductions. From then on the accumulator is picklable, and a pickled copy is an *empty partial* of the same
  pass (:meth:`Accumulator.partial`).
- ``update(block)`` adds one row block to the partial state. Per-row outputs for rows ``block.start:block.stop``
  are written to those rows of their arrays by this call: never gathered, so memory does not grow with N.
- ``merge(other)`` adds another partial's reductions; it is associative (and commutative up to float64
  rounding), so blocks may be split among workers in any way.
- ``finish()`` turns the merged reductions into results (device tensors to numpy).

Reductions accumulate in float64; :func:`run_blocks` and :func:`~.contract.merged` are the in-process engine's
pieces that a test (or another engine) reuses. On the CPU a pass is numpy throughout and imports no torch (blocks
are read as numpy arrays, :class:`~.contract.Block`); torch is imported where a GPU pass runs, not with the module,
so that importing an analyzer stays cheap.
"""

from __future__ import annotations

import io
import itertools
import os
import pickle
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from ..utils.device import (available_cores, compute_threads, computes_in_numpy, device_type,
                            resolve_device)
from ..errors import UsageError
from ..utils.progress import NullProgress
from .contract import Accumulator, Block, BlockBuffers, PassContext, PassStats, add_reductions
from .host_float64 import to_numpy

# float32 bytes of W per block: 4 blocks in flight (read-ahead of 2) plus a float64 copy stay well under 1 GB,
# whatever N is, and a block still spans several chunks for zarr's parallel decoding
DEFAULT_BLOCK_BYTES = 32 * 1024**2
# CPU passes run this many blocks side by side (threads) at most; more cores go to each block's BLAS/torch threads
MAX_PASS_WORKERS = 4
PASS_WORKERS_ENV = "CMDTOOL_PASS_WORKERS"


def iter_pass_blocks(store, columns: slice, device, block_rows: int, rows: slice | None = None):
    """The pass's :class:`Block` objects over ``rows`` (default all), read ahead in a background thread, sharing
    one set of reused buffers. Each block's memory is the reader's again once the consumer calls
    :meth:`Block.release` (:func:`run_blocks` does, after every accumulator saw the block)."""
    buffers = BlockBuffers()
    for raw in store.iter_blocks(columns=columns, rows=rows, block_rows=block_rows, device=reader_device(device),
                                 reuse_arrays=True):
        yield Block(raw.start, raw.stop, raw.data, buffers, release=raw.release)


def reader_device(device):
    """What the pass asks :meth:`~cmdtool.store.store.TrajectoryStore.iter_blocks` for: numpy blocks (None) on
    the CPU, torch tensors on a torch device."""
    return None if computes_in_numpy(device) else device


def pass_workers(device) -> int:
    """Blocks a pass runs side by side in this process: one per core on the CPU (at most
    :data:`MAX_PASS_WORKERS`; ``$CMDTOOL_PASS_WORKERS`` sets it), one on a GPU (its kernels queue anyway)."""
    if device_type(device) != "cpu":
        return 1
    configured = os.environ.get(PASS_WORKERS_ENV, "").strip()
    if configured:
        if not configured.isdigit() or int(configured) < 1:
            raise UsageError(f"${PASS_WORKERS_ENV} must be a whole number of at least 1, not {configured!r}")
        return int(configured)
    return max(1, min(available_cores(), MAX_PASS_WORKERS))


class _SharingPickler(pickle.Pickler):
    """Pickles by value, except the given objects, which are passed by reference (see :func:`thread_partials`)."""

    def __init__(self, file, shared: list):
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.shared = {id(obj): k for k, obj in enumerate(shared)}

    def persistent_id(self, obj):
        return self.shared.get(id(obj))


class _SharingUnpickler(pickle.Unpickler):
    def __init__(self, file, shared: list):
        super().__init__(file)
        self.shared_objects = shared

    def persistent_load(self, pid):
        return self.shared_objects[pid]


def thread_partials(accumulators: list[Accumulator], shared_outputs: list) -> list[Accumulator]:
    """Empty partials of started accumulators for another thread of this process: :meth:`Accumulator.partial`
    copies, except that the returned per-row output arrays (``shared_outputs``, numpy) stay the same objects, so
    every thread writes its blocks' rows into them."""
    buffer = io.BytesIO()
    _SharingPickler(buffer, shared_outputs).dump(accumulators)
    buffer.seek(0)
    return _SharingUnpickler(buffer, shared_outputs).load()


def run_blocks_side_by_side(accumulators: list[Accumulator], raw_blocks, workers: int, shared_outputs: list,
                            progress_task=None) -> int:
    """The in-process engine with ``workers`` threads: block ``i`` of the pass goes to thread ``i % workers``,
    which feeds its own empty partials (:func:`thread_partials`; thread 0 feeds ``accumulators`` themselves);
    the partials are merged into ``accumulators`` in thread order at the end. Which thread sums which block does
    not depend on timing, so the float64 sums, and the results, are the same from run to run.

    numpy's BLAS, torch's kernels and the read's decompression release the interpreter lock, so the threads use
    the cores the reader leaves idle. Memory: at most ``workers`` blocks taken from the reader at once, besides
    its read-ahead. ``raw_blocks`` yields the store's row blocks (``start``, ``stop``, ``data``)."""
    sets = [accumulators] + [thread_partials(accumulators, shared_outputs) for _ in range(workers - 1)]
    inboxes = [queue.SimpleQueue() for _ in range(workers)]
    taken = threading.Semaphore(workers)  # blocks handed out and not finished yet
    failed = threading.Event()
    progress_lock = threading.Lock()

    def work(k: int) -> int:
        buffers, nonfinite = BlockBuffers(), 0
        while True:
            raw = inboxes[k].get()
            if raw is None:
                return nonfinite
            try:
                if failed.is_set():  # another thread failed: drain without work until told to stop
                    continue
                block = Block(raw.start, raw.stop, raw.data, buffers)
                for acc in sets[k]:
                    acc.update(block)
                nonfinite += block.nonfinite
                if progress_task is not None:
                    with progress_lock:
                        progress_task.advance(block.rows, nbytes=4 * block.values.shape[1] * block.rows)
                del block
            except BaseException:
                failed.set()
                raise
            finally:
                raw.release()  # the reader may read into its memory again
                del raw
                taken.release()

    iterator = iter(raw_blocks)
    with ThreadPoolExecutor(workers, thread_name_prefix="cmdtool-pass") as pool:
        futures = [pool.submit(work, k) for k in range(workers)]
        try:
            for i in itertools.count():
                while not taken.acquire(timeout=0.1):
                    if failed.is_set():
                        break
                if failed.is_set():
                    break
                raw = next(iterator, None)
                if raw is None:
                    break
                inboxes[i % workers].put(raw)
                del raw
        finally:
            for inbox in inboxes:
                inbox.put(None)
            close = getattr(iterator, "close", None)
            if close is not None:
                close()  # stops the reader's thread
        nonfinite = sum(future.result() for future in futures)  # re-raises a thread's error
    for partials in sets[1:]:
        for acc, part in zip(accumulators, partials):
            acc.merge(part)
    return nonfinite


def run_blocks(accumulators: list[Accumulator], blocks, progress_task=None) -> int:
    """Feed every block to every accumulator (the in-process engine); returns the rows with NaN/Inf seen."""
    nonfinite = 0
    for block in blocks:
        for acc in accumulators:
            acc.update(block)
        block.release()
        nonfinite += block.nonfinite
        if progress_task is not None:
            progress_task.advance(block.rows, nbytes=4 * block.values.shape[1] * block.rows)
    return nonfinite


def pass_context(store, columns: slice | None, device, block_bytes: int = DEFAULT_BLOCK_BYTES) -> PassContext:
    columns = columns if columns is not None else slice(0, store.n_checkpoints)
    n_cols = columns.stop - columns.start
    block_rows = max(1, min(store.default_block_rows(n_cols, block_bytes), max(store.n_rows, 1)))
    return PassContext(store, columns, resolve_device(device), block_rows)


def stream(store, accumulators: list[Accumulator], columns: slice | None = None, device="auto",
           progress=None, description: str = "pass", block_bytes: int = DEFAULT_BLOCK_BYTES) -> PassStats:
    """Run one pass over ``store`` feeding every accumulator (start, update per block, finish).

    The one engine switch: inside :func:`cmdtool.utils.cluster.on_cluster` the blocks run as Dask tasks on the cluster
    and their partials are tree-merged (:mod:`.dask_engine`); otherwise in this process. ``start`` and ``finish``
    run here either way, so the staged result is created and committed by this process only.
    """
    from ..utils.cluster import active_client

    progress = progress or NullProgress()
    client = active_client()
    ctx = pass_context(store, columns, device, block_bytes)
    if client is not None:
        from .dask_engine import ScratchOutputs

        ctx.outputs = ScratchOutputs(store)
    try:
        for acc in accumulators:
            acc.start(ctx)
        started = time.perf_counter()
        with progress.task(description, total=store.n_rows, unit="rows") as task:
            workers = pass_workers(ctx.device) if client is None and all(a.side_by_side for a in accumulators) \
                else 1
            n_blocks = -(-store.n_rows // ctx.block_rows)
            if client is None and workers > 1 and n_blocks > 1:
                with compute_threads(workers):
                    nonfinite = run_blocks_side_by_side(
                        accumulators, store.iter_blocks(columns=ctx.columns, block_rows=ctx.block_rows,
                                                        device=reader_device(ctx.device), reuse_arrays=True),
                        min(workers, n_blocks), ctx.outputs.arrays, task)
            elif client is None:
                with compute_threads():
                    nonfinite = run_blocks(accumulators,
                                           iter_pass_blocks(store, ctx.columns, ctx.device, ctx.block_rows), task)
            else:
                from .dask_engine import run_pass

                nonfinite = run_pass(client, store, accumulators, ctx, task, description)
        for acc in accumulators:
            acc.finish()
    finally:
        ctx.outputs.close()
    return PassStats(store.n_rows, nonfinite, time.perf_counter() - started, 4 * store.n_rows * ctx.n_cols)


class GramAccumulator(Accumulator):
    """G = Wᵀ W over the window (T x T, float64), plus the column sums 1ᵀ W for centring (design sec. 3.1).

    The block product is float64: a float32 product with float64 accumulation changes the DMD/PCA errors that
    follow from G measurably (bench/gram_precision.py; docs/performance.md, "What bounds it"), because those
    errors are small differences of G's entries. On the CPU it is numpy's syrk on cache-sized
    float64 chunks (:mod:`~cmdtool.passes.host_float64`), accumulated into the float64 tensors' memory.
    """

    def start(self, ctx):
        n = ctx.n_cols
        self.rows = 0
        if computes_in_numpy(ctx.device):
            self.gram, self.column_sums = np.zeros((n, n)), np.zeros(n)
            return
        import torch

        self.gram = torch.zeros((n, n), dtype=torch.float64, device=ctx.device)
        self.column_sums = torch.zeros(n, dtype=torch.float64, device=ctx.device)

    def update(self, block):
        if block.on_cpu:
            gram, column_sums = self.gram, self.column_sums
            for _, _, x in block.float64_chunks():
                gram += x.T @ x  # numpy sees Xᵀ X of one buffer and calls syrk
                column_sums += x.sum(axis=0)
        else:
            x = block.float64()
            self.gram.addmm_(x.T, x)
            self.column_sums += x.sum(dim=0)
        self.rows += block.rows - block.nonfinite

    def merge(self, other):
        add_reductions(self, other, ("gram", "column_sums", "rows"))

    def finish(self):
        self.gram = to_numpy(self.gram)
        self.column_sums = to_numpy(self.column_sums)


class RowGather(Accumulator):
    """Collect given rows (e.g. CMD's sample) during a pass, instead of a separate scattered read."""

    def __init__(self, indices):
        self.indices = np.asarray(indices, dtype=np.int64)

    def start(self, ctx):
        self.order = np.argsort(self.indices, kind="stable")
        self.sorted = self.indices[self.order]
        self.values = np.zeros((len(self.indices), ctx.n_cols), dtype=np.float32)
        self.finite = np.ones(len(self.indices), dtype=bool)
        self.seen = np.zeros(len(self.indices), dtype=bool)

    def update(self, block):
        lo, hi = np.searchsorted(self.sorted, [block.start, block.stop])
        if lo == hi:
            return
        local = self.sorted[lo:hi] - block.start
        positions = self.order[lo:hi]
        if block.on_cpu:
            self.values[positions] = block.values[local]
            self.finite[positions] = block.finite[local]
        else:
            import torch

            local = torch.as_tensor(local, device=block.values.device)
            self.values[positions] = block.values.index_select(0, local).cpu().numpy()
            self.finite[positions] = block.finite.index_select(0, local).cpu().numpy()
        self.seen[positions] = True

    def merge(self, other):
        # each row lies in one block: a partial contributes the rows its blocks held
        taken = other.seen
        self.values[taken] = other.values[taken]
        self.finite[taken] = other.finite[taken]
        self.seen |= taken


@dataclass
class GramMatrix:
    """The cached Gram matrix of the whole store and what it was computed from."""

    gram: np.ndarray           # (T, T) float64, Wᵀ W over rows without NaN/Inf
    column_sums: np.ndarray    # (T,) float64, 1ᵀ W
    rows: int                  # rows that entered (finite ones)
    nonfinite_rows: int
    seconds: float
    from_cache: bool = False   # read from the store's cache (no pass was run for it)

    def window(self, columns: slice) -> tuple[np.ndarray, np.ndarray]:
        """G and column sums of an epoch window: a sub-matrix, no new pass."""
        return self.gram[columns, columns], self.column_sums[columns]


GRAM_KIND, GRAM_NAME = "gram", "full"


def cached_gram(store) -> GramMatrix | None:
    """The store's Gram matrix if one was saved for the store's current revision."""
    if not store.results.exists(GRAM_KIND, GRAM_NAME):
        return None
    result = store.results.get(GRAM_KIND, GRAM_NAME)
    if result.attrs.get("store_revision") != store.revision:
        return None
    return GramMatrix(result["gram"], result["column_sums"], int(result.attrs["rows"]),
                      int(result.attrs["nonfinite_rows"]), float(result.attrs["seconds"]), from_cache=True)


def save_gram(store, acc: GramAccumulator, stats: PassStats) -> GramMatrix:
    gram = GramMatrix(acc.gram, acc.column_sums, acc.rows, stats.nonfinite_rows, stats.seconds)
    if store.mode != "r":
        writer = store.results.writer(GRAM_KIND, GRAM_NAME)
        writer.put("gram", gram.gram)
        writer.put("column_sums", gram.column_sums)
        writer.attrs.update(store_revision=store.revision, n_checkpoints=store.n_checkpoints, rows=gram.rows,
                            nonfinite_rows=gram.nonfinite_rows, seconds=gram.seconds)
        writer.commit()
    return gram


def gram_matrix(store, device="auto", progress=None, extra: list[Accumulator] = ()) -> GramMatrix:
    """Gram matrix of all columns: from the cache, or one pass (which also feeds ``extra`` accumulators).

    When cached and ``extra`` is non-empty, the pass still runs for the extras only; callers that need the pass
    anyway (e.g. CMD's sample) should pass their accumulators here so that the read is shared.
    """
    cached = cached_gram(store)
    if cached is not None and not extra:
        return cached
    accumulators = list(extra)
    gram_acc = None if cached is not None else GramAccumulator()
    if gram_acc is not None:
        accumulators.append(gram_acc)
    stats = stream(store, accumulators, None, device, progress, "gram pass" if gram_acc else "sampling pass")
    return cached if gram_acc is None else save_gram(store, gram_acc, stats)
