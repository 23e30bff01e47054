"""The pieces of CMD (paper 000, Sec. 3.2-3.3, Alg. 1-3, App. C.2-C.4) shared by the store analyzer
(:mod:`cmdtool.analyzers.cmd.posthoc`) and the in-training :class:`~cmdtool.analyzers.cmd.online.OnlineCMD`.

Everything here works on small things (K sampled rows, M reference trajectories) or on one row block at a
time, so callers keep memory bounded by the block size whatever N is. Step 1 as a whole is
:func:`select_references`; the reference-row rule (a reference weight models itself: a = 1, b = 0) is
:func:`pin_reference_rows`. Steps 2-3 work on numpy arrays (a CPU pass, which imports no torch) or torch tensors (a
GPU pass, and the training-time online CMD) alike, through :mod:`cmdtool.passes.host_float64`'s functions; torch
and scipy are imported where they are used, not with the module.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...errors import ParameterError, UsageError
from ...passes.host_float64 import copy, is_numpy, like, matmul, where

# Mode codes of rows that CMD does not model; their reconstruction is the stored original value.
MODE_KEPT = -1        # BatchNorm running statistics under bn_stats="source"
MODE_NONFINITE = -2   # the trajectory holds NaN/Inf in the analysed window: excluded from the fit

SAMPLING_CHOICES = ("balanced", "uniform")
BN_STATS_CHOICES = ("source", "model")


# ---------------------------------------------------------------------------------------------- Step 1: sample
def sample_rows(layers: list[tuple[int, int]], samples: int, sampling: str = "balanced",
                seed: int = 0) -> np.ndarray:
    """Sorted row indices of the K sampled trajectories (App. C.2).

    ``layers`` lists ``(first_row, numel)`` of each tensor that CMD models. ``balanced``: a budget of
    ``K / (2 |layers|)`` rows per layer (capped by the layer's size), the rest uniform over all modelled rows
    not yet chosen; when ``K/2 <= |layers|`` everything is uniform, as in the paper. ``uniform``: K rows
    uniformly. Without replacement; memory O(K) whatever N is (rejection sampling, no arange(N)).
    """
    if sampling not in SAMPLING_CHOICES:
        raise ParameterError("unknown {sampling} {value!r}: choose balanced or uniform", "sampling", value=sampling)
    if samples < 2:
        raise ParameterError("{samples} must be at least 2 (got {value})", "samples", value=samples)
    sizes = np.array([n for _, n in layers], dtype=np.int64)
    starts = np.array([s for s, _ in layers], dtype=np.int64)
    total = int(sizes.sum())
    if total == 0:
        raise UsageError("no trajectory rows to model (every tensor was left out)")
    # "virtual" positions 0..total-1 run over the modelled rows only; map them back to store rows
    virtual_starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])

    def to_rows(virtual: np.ndarray) -> np.ndarray:
        layer = np.searchsorted(virtual_starts, virtual, side="right") - 1
        return starts[layer] + (virtual - virtual_starts[layer])

    if samples >= total:
        return to_rows(np.arange(total, dtype=np.int64))
    rng = np.random.default_rng(seed)
    half = samples // 2
    chosen: list[np.ndarray] = []
    if sampling == "balanced" and half > len(layers):
        per_layer = half // len(layers)
        for v0, n in zip(virtual_starts, sizes):
            k = int(min(n, per_layer))
            chosen.append(v0 + rng.choice(int(n), size=k, replace=False))
    taken = np.unique(np.concatenate(chosen)) if chosen else np.empty(0, dtype=np.int64)
    # the uniform part (and what the per-layer caps left over): draw, drop repeats, until K in all
    while len(taken) < samples:
        draw = rng.integers(0, total, size=2 * (samples - len(taken)) + 16)
        fresh = np.setdiff1d(np.unique(draw), taken)
        rng.shuffle(fresh)  # unique() sorts; shuffle so the cut below does not favour low rows
        taken = np.union1d(taken, fresh[:samples - len(taken)])
    return to_rows(taken.astype(np.int64))


# ---------------------------------------------------------------------------------------------- Step 1: cluster
def abs_correlation(values: np.ndarray) -> np.ndarray:
    """C1[k1, k2] = |corr(w_k1, w_k2)| of the sampled trajectories (Eq. 4), float64.

    A constant trajectory has no defined correlation; as in the authors' code it gets 0 everywhere (its
    diagonal entry included), so constant rows end up together in a cluster of their own.
    """
    x = np.asarray(values, dtype=np.float64)
    centred = x - x.mean(axis=1, keepdims=True)
    norms = np.sqrt((centred * centred).sum(axis=1))
    unit = np.divide(centred, norms[:, None], out=np.zeros_like(centred), where=norms[:, None] > 0)
    return np.clip(np.abs(unit @ unit.T), 0.0, 1.0)


@dataclass
class Clustering:
    """Result of Step 1 on the sample: C1, the linkage, each sampled row's mode and each mode's reference."""

    correlation: np.ndarray          # (K, K) float64, Eq. 4
    linkage: np.ndarray              # (K-1, 4) scipy linkage matrix (complete linkage on pdist(C1))
    labels: np.ndarray               # (K,) mode of each sampled row, 0 = largest mode
    reference_positions: np.ndarray  # (M,) position in the sample of each mode's reference

    @property
    def n_modes(self) -> int:
        return len(self.reference_positions)


def cluster_sample(values: np.ndarray, modes: int | None = 10, threshold: float | None = None) -> Clustering:
    """Cluster the sampled trajectories into modes and pick each mode's reference (Alg. 1 lines 2-4, App. C.3).

    Complete ("farthest point") linkage on Euclidean distances between the rows of C1, as the authors' code
    does (``pdist(C1)``), cut into ``modes`` clusters (``maxclust``) or at a distance ``threshold``. Modes are
    numbered by size, largest first (ties: the cluster scipy numbered first). The reference of a mode is the
    member with the highest mean |corr| to the mode's members.
    """
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import pdist

    k = len(values)
    correlation = abs_correlation(values)
    if threshold is None and (modes is None or modes < 1):
        raise ParameterError("{modes} must be at least 1", "modes")
    if threshold is None and modes > k:
        raise ParameterError("{modes} {value} is more than the {k} sampled weights with finite values; lower {modes}",
                             "modes", value=modes, k=k)
    if k < 2:
        raise UsageError("CMD needs at least two sampled weights")
    tree = linkage(pdist(correlation), method="complete")
    if threshold is not None:
        raw = fcluster(tree, t=float(threshold), criterion="distance")
    else:
        raw = fcluster(tree, t=int(modes), criterion="maxclust")
    ids, counts = np.unique(raw, return_counts=True)
    order = sorted(range(len(ids)), key=lambda j: (-counts[j], ids[j]))
    relabel = {int(ids[j]): m for m, j in enumerate(order)}
    labels = np.array([relabel[int(r)] for r in raw], dtype=np.int64)
    references = []
    for m in range(len(ids)):
        members = np.flatnonzero(labels == m)
        mean_corr = correlation[np.ix_(members, members)].mean(axis=0)
        references.append(members[int(np.argmax(mean_corr))])
    return Clustering(correlation, tree, labels, np.asarray(references, dtype=np.int64))


def check_modes_fit_sample(modes: int | None, threshold: float | None, samples: int, modelled_rows: int) -> None:
    """Before any pass: ``modes`` clusters need at least as many sampled weights (K = min(samples, modelled
    rows)). The message names the fix that works: more samples while the store has more weights to sample,
    else fewer modes."""
    if threshold is not None or modes is None:
        return
    modes, sampled = int(modes), min(int(samples), int(modelled_rows))
    if modes <= sampled:
        return
    if sampled < modelled_rows:
        raise ParameterError("{modes} {value} is more than the {k} sampled weights: raise {samples} to at least "
                             "{value} (the store has {n:,} weights to sample), or lower {modes}", "modes", "samples",
                             value=modes, k=sampled, n=modelled_rows)
    raise ParameterError("{modes} {value} is more than the {k} sampled weights, which are all the weights CMD models "
                         "in this store: lower {modes} to at most {k}", "modes", value=modes, k=sampled)


@dataclass
class StepOne:
    """What Step 1 gives (Alg. 1 lines 1-4): the sampled rows that are finite, their clustering, the references."""

    sampled_indices: np.ndarray         # (K',) store rows of the finite sampled trajectories
    values: np.ndarray                  # (K', T) their values
    clustering: Clustering
    reference_indices: np.ndarray       # (M,) store rows of the reference weights
    reference_trajectories: np.ndarray  # (M, T) float32
    n_sampled: int                      # K, before the rows with NaN/Inf were left out


def select_references(sampled: np.ndarray, values: np.ndarray, modes: int | None = 10,
                      threshold: float | None = None, finite: np.ndarray | None = None,
                      columns: slice = slice(None)) -> StepOne:
    """Step 1 of CMD (Alg. 1 lines 1-4) on the gathered sample: leave out the trajectories with NaN/Inf (they
    cannot be correlated; ``finite`` flags them when given, else they are found in ``values``), cluster the rest
    over ``columns`` (:func:`cluster_sample`, Eq. 4), and take each mode's reference weight.

    ``values`` holds the sampled rows' trajectories (K × T). A reference's trajectory is its whole row, so a
    warm-up clustering over the first F columns (Sec. 3.3) still gives references over every column.
    """
    finite = np.isfinite(values).all(axis=1) if finite is None else np.asarray(finite, dtype=bool)
    kept, kept_values = np.asarray(sampled)[finite], values[finite]
    clustering = cluster_sample(kept_values[:, columns], modes, threshold)
    positions = clustering.reference_positions
    return StepOne(kept, kept_values, clustering, kept[positions], kept_values[positions].astype(np.float32),
                   n_sampled=len(sampled))


def pin_reference_rows(reference_indices, start: int, stop: int, mode=None, a=None, b=None, offset=None) -> None:
    """The reference-row rule, in place on a row block ``start:stop``: a reference weight belongs to its own mode
    and models itself, a = 1 and b = 0 (b = −offset when the block's rows were shifted by ``offset``, an R-vector).

    ``mode`` (R,), ``a`` and ``b`` ((R,) or (R, k): every column) are numpy arrays, or torch tensors on one
    device; any may be None.
    """
    indices = np.asarray(reference_indices, dtype=np.int64)
    inside = np.flatnonzero((indices >= start) & (indices < stop))
    if not inside.size:
        return
    some = next(t for t in (mode, a, b) if t is not None)
    rows = like(indices[inside] - start, some)
    if mode is not None:
        mode[rows] = like(inside, mode).astype(mode.dtype) if is_numpy(mode) else like(inside, mode).to(mode.dtype)
    if a is not None:
        a[rows] = 1.0
    if b is not None:
        b[rows] = 0.0 if offset is None else -offset[rows].reshape(-1, *([1] * (b.ndim - 1)))


# ---------------------------------------------------------------------------------------------- Steps 2-3
class ReferenceSet:
    """The M reference trajectories on the compute device, with what Steps 2-3 need of them (float64): numpy
    arrays for ``device=None`` (a CPU pass), torch tensors on ``device`` otherwise."""

    def __init__(self, trajectories, device=None):
        if device is None:
            self.values = np.asarray(trajectories, dtype=np.float64)  # (M, T)
            self.mean = self.values.mean(axis=1)
            self.centred = self.values - self.mean[:, None]
            self.sq_norm = (self.centred * self.centred).sum(axis=1)  # S_rr of Eq. 6 in closed form
            self.norm = np.sqrt(self.sq_norm)
            return
        import torch

        self.values = torch.as_tensor(np.asarray(trajectories), dtype=torch.float64, device=device)  # (M, T)
        self.mean = self.values.mean(dim=1)
        self.centred = self.values - self.mean[:, None]
        self.sq_norm = (self.centred * self.centred).sum(dim=1)  # S_rr of Eq. 6 in closed form
        self.norm = self.sq_norm.sqrt()


def correlate(centred, sq_norm, refs: ReferenceSet):
    """C2 = |corr(w_i, r_m)| of a block of centred rows (Eq. 5), and the cross sums Σ(w−w̄)(r−r̄) (R x M)
    (numpy or torch, as ``centred``). Constant rows (and constant references) get correlation 0, as in the
    authors' code.
    """
    cross = matmul(centred, refs.centred.T)
    if is_numpy(centred):
        denom = np.sqrt(sq_norm)[:, None] * refs.norm[None, :]
        corr = np.where(denom > 0, np.abs(cross) / np.where(denom > 0, denom, 1.0), 0.0)
        return corr, cross
    import torch

    denom = sq_norm.sqrt()[:, None] * refs.norm[None, :]
    corr = torch.where(denom > 0, cross.abs() / torch.where(denom > 0, denom, 1.0), 0.0)
    return corr, cross


def centre_rows_(block):
    """Centre each row in place (float64 block, numpy or torch); returns (row means w̄, Σ_t (w−w̄)² per row)."""
    if is_numpy(block):
        mean = block.mean(axis=1)
        block -= mean[:, None]
        return mean, np.einsum("ij,ij->i", block, block)
    import torch

    mean = block.mean(dim=1)
    block.sub_(mean[:, None])
    return mean, torch.linalg.vector_norm(block, dim=1).square()


def closed_form_fit(mode, cross, mean, sq_norm, refs: ReferenceSet):
    """Eq. 6 in closed form for rows with a given mode: a = Σ(w−w̄)(r−r̄) / Σ(r−r̄)², b = w̄ − a r̄.

    A constant row gets a = 0, b = its value; against a constant reference a = 0, b = w̄. Returns
    (a, b, Σ(w−w̄)(r−r̄) of the chosen mode).
    """
    s_rr = refs.sq_norm[mode]
    if is_numpy(cross):
        s_wr = np.take_along_axis(cross, mode[:, None], axis=1)[:, 0]
    else:
        s_wr = cross.gather(1, mode[:, None]).squeeze(1)
    a = where((s_rr > 0) & (sq_norm > 0), s_wr / where(s_rr > 0, s_rr, 1.0), 0.0)
    return a, mean - a * refs.mean[mode], s_wr


def fit_block(block, refs: ReferenceSet):
    """Steps 2-3 on a row block (float64, left unchanged): mode = argmax_m C2[i, m] (Eq. 5, first maximum on
    ties, like numpy), then the least-squares affine fit of Eq. 6 (see :func:`closed_form_fit`).

    Returns (mode int64, a, b, Σ(w−w̄)² per row).
    """
    centred = copy(block)
    mean, sq_norm = centre_rows_(centred)
    corr, cross = correlate(centred, sq_norm, refs)
    mode = corr.argmax(1)
    a, b, _ = closed_form_fit(mode, cross, mean, sq_norm, refs)
    return mode, a, b, sq_norm


def affine_from_sums(count, sum_u, sum_uv, sum_v, sum_vv, shift_w, shift_r):
    """Least-squares (a, b) of w ≈ a r + b over ``count`` epochs from running sums of the *shifted* values
    u = w − shift_w and v = r − shift_r (Eqs. 8-10 kept as sufficient statistics).

    Eq. 9 carries Ã_m(t−1)(w̃_{m,t−1} w̃ᵀ_{m,t−1}) forward; that product is exactly [Σ w r, Σ w] (App. C.4,
    Eq. 17), so keeping these sums and solving the 2x2 system of Eq. 10 at the end is the same recursion
    without re-multiplying by an inverse every epoch. The shift (each row's and each reference's first value)
    removes the large common offset before squaring, which avoids cancellation in Σr² − (Σr)²/t. Works on
    any broadcastable numpy arrays or torch tensors (one epoch or a whole cumulative block).
    """
    s_uv = sum_uv - sum_u * sum_v / count
    s_vv = sum_vv - sum_v * sum_v / count
    a = where(s_vv > 0, s_uv / where(s_vv > 0, s_vv, 1.0), 0.0)
    b = shift_w + sum_u / count - a * (shift_r + sum_v / count)
    return a, b
