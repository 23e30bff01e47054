"""A pass as Dask work (design sec. 5.1; docs/scale.md): the engine :func:`passes.stream` switches to inside
:func:`cmdtool.utils.cluster.on_cluster`.

W's window is a dask array whose blocks are the pass's row blocks (``ctx.block_rows`` rows, a whole number of
chunk rows, all the window's columns). Each block becomes one task that unpickles empty partials of the pass's
accumulators (the contract's :meth:`~passes.Accumulator.partial`), feeds them the block — per-row outputs are
written there, into the staged result's zarr arrays, by the worker that holds those rows — and returns the
partials; tasks of ``SPLIT_EVERY`` partials ``merge`` them, in a tree, up to one. The client merges that one into
its own started accumulators and runs ``finish``; the analyzer commits the staged result as in process. Float64
sums over the same blocks in another order: equal to the in-process pass to float64 rounding (tests: 1e-10).

Workers read W through :func:`cmdtool.store.open_store` with the address the client opened (one opening point
for every kind of storage) and the store's own block read (checksum errors named, rechunk detected), rather than
through a pickled zarr array.
"""

from __future__ import annotations

import pickle
import uuid

import numpy as np

from ..utils.cluster import store_address
from ..utils.device import computes_in_numpy
from .contract import Block, merged

SPLIT_EVERY = 8  # partials merged per reduction task: a tree of depth log8(blocks)

_open_stores: dict = {}  # per worker process: store address -> opened store (its metadata parsed once)


def _worker_store(address: str):
    from ..store import open_store

    store = _open_stores.get(address)
    if store is None:
        store = _open_stores[address] = open_store(address, mode="r")
    return store


class StoreWindow:
    """W[:, columns] of the store at ``address`` as an array-like for :func:`dask.array.from_array`: pickles as
    the address and the window, opens the store on first read in each worker."""

    def __init__(self, address: str, columns: slice, n_rows: int):
        self.address, self.columns = address, columns
        self.shape = (int(n_rows), columns.stop - columns.start)
        self.dtype, self.ndim = np.dtype(np.float32), 2

    def __getitem__(self, index):
        rows, cols = index
        start = self.columns.start
        cols = slice(start + (cols.start or 0), start + (cols.stop if cols.stop is not None else self.shape[1]))
        return _worker_store(self.address)._read(rows, cols)


def window_array(store, ctx):
    """The pass's window as a dask array of row blocks (``ctx.block_rows`` rows each, every window column)."""
    import dask.array as da

    source = StoreWindow(store_address(store), ctx.columns, store.n_rows)
    return da.from_array(source, chunks=(ctx.block_rows, source.shape[1]), lock=False, asarray=False,
                         fancy=False, meta=np.empty((0, 0), dtype=np.float32),
                         name=f"cmdtool-window-{uuid.uuid4().hex[:12]}")


def _block_partials(template: bytes, values: np.ndarray, start: int, device: str | None):
    """One task of the map: fresh empty partials (unpickled from the template) fed one block (numpy for
    ``device=None``, else a torch tensor on that device)."""
    partials = pickle.loads(template)
    values = np.ascontiguousarray(values)
    if device is not None:
        import torch

        values = torch.from_numpy(values).to(device)
    block = Block(start, start + values.shape[0], values)
    for acc in partials:
        acc.update(block)
    return partials, block.nonfinite


def _merge_partials(*parts):
    """One task of the tree reduction: the partials of several tasks merged (accumulator by accumulator)."""
    accumulators = [merged([part[0][k] for part in parts]) for k in range(len(parts[0][0]))]
    return accumulators, sum(part[1] for part in parts)


def run_pass(client, store, accumulators, ctx, progress_task=None, description: str = "pass") -> int:
    """Feed every block of the pass to ``accumulators`` (started) on the cluster; returns the rows with NaN/Inf.

    The accumulators end holding the merged reductions, as after :func:`passes.run_blocks` in process."""
    import dask
    from dask.delayed import Delayed
    from distributed import as_completed

    from ..utils.cluster import killed_worker_error

    window = window_array(store, ctx)
    template = pickle.dumps(accumulators)  # empty partials: client-only state and scratch stay here
    template_key = dask.delayed(template, pure=True, traverse=False)
    device = None if computes_in_numpy(ctx.device) else str(ctx.device)
    starts = np.cumsum((0,) + window.chunks[0][:-1])
    map_tasks = [dask.delayed(_block_partials, pure=True)(template_key, block, int(start), device)
                 for block, start in zip(window.to_delayed().ravel(), starts)]
    try:
        map_futures = client.compute(map_tasks)
        level = list(map_futures)
        while len(level) > 1:
            level = [dask.delayed(_merge_partials, pure=True)(*level[i:i + SPLIT_EVERY])
                     for i in range(0, len(level), SPLIT_EVERY)]
        total = client.compute(level[0]) if isinstance(level[0], Delayed) else level[0]
        rows = {future.key: int(n) for future, n in zip(map_futures, window.chunks[0])}
        for future in as_completed(map_futures):
            if progress_task is not None:
                progress_task.advance(rows[future.key], nbytes=4 * ctx.n_cols * rows[future.key])
            if future.status == "error":
                break
        del map_futures, level
        partials, nonfinite = total.result()
    except Exception as exc:
        error = killed_worker_error(exc, description)
        if error is not None:
            raise error from None
        raise
    for acc, part in zip(accumulators, partials):
        acc.merge(part)
    return int(nonfinite)


class ScratchOutputs:
    """Returned per-row outputs on a cluster: zarr arrays in a scratch folder of the store's results (workers
    write their rows there; the accumulator reads them back in ``finish``), removed when the pass ends. A run
    killed before that leaves an unindexed folder that the next commit of a result collects."""

    def __init__(self, store):
        self.store, self.writer = store, None

    def create(self, shape: tuple, dtype, chunks: tuple):
        from ..store.results import ResultWriter

        if self.writer is None:
            # the results catalog refuses writers on a read-only store; this scratch is no result and is removed
            self.store.results.root.mkdir(exist_ok=True)
            self.writer = ResultWriter(self.store.results, "scratch", "pass")
        return self.writer.create(f"out{len(list(self.writer.group.array_keys()))}", shape, dtype, chunks=chunks,
                                  compress=False)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.discard()
            self.writer = None


__all__ = ["SPLIT_EVERY", "ScratchOutputs", "StoreWindow", "run_pass", "window_array"]
