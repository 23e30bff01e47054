"""Streaming passes over the store: several accumulators share one read of W.

A pass reads row blocks ``W[r0:r1, window]`` (background read-ahead), moves each to the compute device and
hands it to every accumulator. Rows holding NaN/Inf are zeroed and flagged (``finite`` mask) so that no
non-finite value leaks into a reduction; accumulators decide what to do with them.

torch is imported where a pass runs, not with the module (the registry imports every analyzer module).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from ..device import resolve_device
from ..progress import NullProgress


class Accumulator:
    """Base of a per-pass reduction. ``update`` sees every row block once, in order."""

    def start(self, store, columns: slice, device) -> None:
        pass

    def update(self, start: int, stop: int, block, finite) -> None:
        raise NotImplementedError

    def finish(self) -> None:
        pass


@dataclass
class PassStats:
    rows: int
    nonfinite_rows: int
    seconds: float
    bytes_read: int


def stream(store, accumulators: list[Accumulator], columns: slice | None = None, device="auto",
           progress=None, description: str = "pass", block_bytes: int = 128 * 1024**2) -> PassStats:
    """Run one pass over ``store`` feeding every accumulator; returns what was read."""
    import torch

    progress = progress or NullProgress()
    device = resolve_device(device)
    columns = columns if columns is not None else slice(0, store.n_checkpoints)
    n_cols = columns.stop - columns.start
    for acc in accumulators:
        acc.start(store, columns, device)
    started = time.perf_counter()
    nonfinite = 0
    with progress.task(description, total=store.n_rows, unit="rows") as task:
        for block in store.iter_blocks(columns=columns, block_bytes=block_bytes, device=device):
            data = block.data
            # a row with NaN/Inf has a non-finite sum; one reduction finds them ~30x faster than an
            # elementwise isfinite. Rows whose finite values overflow the sum are checked exactly.
            finite = torch.isfinite(data.sum(dim=1))
            if not bool(finite.all()):
                suspect = (~finite).nonzero().squeeze(1)
                finite[suspect] = torch.isfinite(data.index_select(0, suspect)).all(dim=1)
            if not bool(finite.all()):
                nonfinite += int((~finite).sum())
                data = torch.where(finite[:, None], data, torch.zeros((), dtype=data.dtype, device=data.device))
            for acc in accumulators:
                acc.update(block.start, block.stop, data, finite)
            task.advance(block.stop - block.start, nbytes=4 * n_cols * (block.stop - block.start))
    for acc in accumulators:
        acc.finish()
    return PassStats(store.n_rows, nonfinite, time.perf_counter() - started, 4 * store.n_rows * n_cols)


class GramAccumulator(Accumulator):
    """G = Wᵀ W over the window (T x T, float64), plus the column sums 1ᵀ W for centring."""

    def start(self, store, columns, device):
        import torch

        n = columns.stop - columns.start
        self.device = device
        self.gram = torch.zeros((n, n), dtype=torch.float64, device=device)
        self.column_sums = torch.zeros(n, dtype=torch.float64, device=device)
        self.rows = 0

    def update(self, start, stop, block, finite):
        import torch

        block64 = block.to(torch.float64)
        self.gram += block64.T @ block64
        self.column_sums += block64.sum(dim=0)
        self.rows += int(finite.sum())

    def finish(self):
        self.gram = self.gram.cpu().numpy()
        self.column_sums = self.column_sums.cpu().numpy()


class RowGather(Accumulator):
    """Collect given rows (e.g. CMD's sample) during a pass, instead of a separate scattered read."""

    def __init__(self, indices):
        self.indices = np.asarray(indices, dtype=np.int64)

    def start(self, store, columns, device):
        self.order = np.argsort(self.indices, kind="stable")
        self.sorted = self.indices[self.order]
        self.values = np.zeros((len(self.indices), columns.stop - columns.start), dtype=np.float32)
        self.finite = np.ones(len(self.indices), dtype=bool)

    def update(self, start, stop, block, finite):
        lo, hi = np.searchsorted(self.sorted, [start, stop])
        if lo == hi:
            return
        import torch

        local = torch.as_tensor(self.sorted[lo:hi] - start, device=block.device)
        self.values[self.order[lo:hi]] = block.index_select(0, local).float().cpu().numpy()
        self.finite[self.order[lo:hi]] = finite.index_select(0, local).cpu().numpy()


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
