"""What DMD, KGA, PCA and POD share: they are *linear in W* and are fitted from the cached Gram matrix.

Each of these models reconstructs the window's trajectories as ``W_rec = W K`` for a small T×T matrix ``K``
(docs/references.md, "The Gram path"). Hence everything about its quality follows from ``G = Wᵀ W`` without reading W
again:

    ‖w_t − W K e_t‖² = (e_t − K e_t)ᵀ G (e_t − K e_t)                      (per-epoch squared error)

Per-row outputs (DMD modes, KWM masks, PCA directions) are ``W_block @ C`` for a small T×k matrix ``C``; one
streaming pass computes them block by block and writes them into the staged result, so memory is bounded by the
block size whatever N is.

Numerical caveat of the Gram path: G squares the singular values of W, so its eigen-decomposition resolves
singular values only down to about ``σ_max · sqrt(T · ε_64)`` (≈ 1e-7 σ_max for T = 150) and errors computed from
G have a floor of about ``sqrt(ε_64) ≈ 1.5e-8`` relative to ‖w_t‖. Ranks whose singular values fall below that
are dropped (:func:`numerical_rank`). For the ranks of interest here (r ≪ T, well separated leading singular
values) float64 is ample; see docs/dmd.md.
"""

from __future__ import annotations

import numpy as np

from ..errors import ParameterError
from .base import Analyzer
from .params import Param
from ..passes.contract import Accumulator
from ..passes.local import gram_matrix, stream
from ..utils.device import computes_in_numpy

# relative eigenvalue floor of a Gram matrix: eigenvalues below  max_eig * T * GRAM_EPS  are roundoff
GRAM_EPS = 1e-13


def numerical_rank(eigenvalues: np.ndarray) -> int:
    """How many (descending) Gram eigenvalues stand above roundoff; see the module note."""
    eigenvalues = np.asarray(eigenvalues, dtype=np.float64)
    if eigenvalues.size == 0 or eigenvalues[0] <= 0:
        return 0
    floor = eigenvalues[0] * max(eigenvalues.size, 1) * GRAM_EPS
    return int(np.count_nonzero(eigenvalues > floor))


def descending_eigh(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (clipped at 0: a Gram matrix is PSD, negatives are roundoff) and vectors, largest first."""
    values, vectors = np.linalg.eigh(matrix)
    order = np.argsort(values)[::-1]
    return np.clip(values[order], 0.0, None), vectors[:, order]


def gram_square_root(gram: np.ndarray) -> np.ndarray:
    """R (T×T) with Rᵀ R = G. Then W = U_W R with U_W orthonormal, so any least-squares problem over the N rows of
    W (e.g. DMD's amplitudes b = Φ⁺ w_0 with Φ = W C) is the same problem over the T rows of R."""
    values, vectors = descending_eigh(gram)
    return np.sqrt(values)[:, None] * vectors.T


def epoch_squared_errors(gram: np.ndarray, reconstruction: np.ndarray) -> np.ndarray:
    """‖w_t − (W K)_t‖² for every column t, from G alone: diag((I − K)ᴴ G (I − K))."""
    residual = np.eye(gram.shape[0]) - reconstruction
    errors = np.einsum("it,ij,jt->t", residual.conj(), gram, residual).real
    return np.clip(errors, 0.0, None)


def linear_model_metrics(gram: np.ndarray, reconstruction: np.ndarray, stored_floats: int) -> dict:
    """The base-class ``metrics_`` of a model W_rec = W K on a window with Gram matrix ``gram``."""
    errors = epoch_squared_errors(gram, reconstruction)
    norms = np.clip(np.diag(gram), 0.0, None)
    n_cols = gram.shape[0]
    # ‖W − mean_t W‖² = trace(H G H) = trace(G) − 1ᵀ G 1 / T
    motion = max(float(np.trace(gram) - gram.sum() / n_cols), 0.0)
    total = float(errors.sum())
    with np.errstate(divide="ignore", invalid="ignore"):
        per_epoch = np.where(norms > 0, np.sqrt(errors / np.where(norms > 0, norms, 1.0)), 0.0)
    return {
        "relative_error": float(np.sqrt(total / norms.sum())) if norms.sum() > 0 else 0.0,
        "relative_error_motion": float(np.sqrt(total / motion)) if motion > 0 else float("nan"),
        "epoch_relative_error": [float(x) for x in per_epoch],
        "stored_floats": int(stored_floats),
    }


def parse_rank(rank) -> int | float:
    """``--rank``: an integer (0 = optimal hard threshold, -1 = no truncation) or an energy fraction in (0, 1)."""
    if isinstance(rank, (bool, np.bool_)):
        raise ParameterError("invalid {rank} {value!r}", "rank", value=rank)
    if isinstance(rank, (int, np.integer)):
        value: int | float = int(rank)
    elif isinstance(rank, (float, np.floating)):
        value = float(rank)
    else:
        text = str(rank).strip()
        try:
            value = int(text)
        except ValueError:
            try:
                value = float(text)
            except ValueError:
                raise ParameterError("cannot read {rank} {value!r}: use an integer (0 = optimal hard threshold) "
                                     "or an energy fraction in (0,1), e.g. 0.99", "rank", value=rank) from None
    if isinstance(value, float):
        if value.is_integer() and value >= 0:
            return int(value)
        if not 0.0 < value < 1.0:
            raise ParameterError("{rank} {value!r}: a fractional rank is an energy fraction and must lie in (0,1)",
                                 "rank", value=rank)
        return value
    if value < -1:
        raise ParameterError("{rank} {value!r}: use a positive integer, 0 (optimal threshold) or -1 (no truncation)",
                             "rank", value=rank)
    return value


def optimal_hard_threshold_rank(singular_values: np.ndarray, n_rows: int, n_cols: int) -> int:
    """Gavish & Donoho (2014) optimal hard threshold for an unknown noise level, as PyDMD applies it:
    β = min/max aspect ratio, ω(β) ≈ 0.56β³ − 0.95β² + 1.82β + 1.43, keep σ > ω(β)·median(σ) (at least 1)."""
    beta = min(n_rows, n_cols) / max(n_rows, n_cols)
    omega = 0.56 * beta**3 - 0.95 * beta**2 + 1.82 * beta + 1.43
    tau = np.median(singular_values) * omega
    return max(1, int(np.count_nonzero(singular_values > tau)))


def truncation_rank(singular_values: np.ndarray, n_rows: int, n_cols: int, rank) -> int:
    """PyDMD's ``svd_rank`` rule: 0 optimal threshold, int r, float energy fraction, -1 everything."""
    rank = parse_rank(rank)
    if isinstance(rank, float):
        energy = np.cumsum(singular_values**2) / np.sum(singular_values**2)
        return int(np.searchsorted(energy, rank) + 1)
    if rank == 0:
        return optimal_hard_threshold_rank(singular_values, n_rows, n_cols)
    if rank == -1:
        return int(singular_values.size)
    return int(min(rank, singular_values.size))


RANK = Param("rank", 0, "Truncation rank: an integer r, 0 for the Gavish-Donoho optimal hard threshold, an energy "
             "fraction in (0,1), or -1 for no truncation (PyDMD's svd_rank).", kind=str, types=(int, float, str),
             check=parse_rank, size=True)


class RowProjection(Accumulator):
    """Per-row outputs ``(W_block − centre) @ matrix`` streamed into arrays of the staged result.

    ``matrix`` is T×k (real or complex, float64); a complex product is written as ``<key>_real`` and
    ``<key>_imag`` float32 arrays (zarr needs no complex support and readers get plain floats).
    ``centre=True`` subtracts each row's mean over the window first (PCA) and also writes it as ``means``.
    Nothing to merge: every output row is written by the block that holds it.
    """

    client_only = ("writer",)

    def __init__(self, writer, key: str, matrix: np.ndarray, centre: bool = False):
        self.writer, self.key, self.matrix, self.centre = writer, key, np.asarray(matrix), centre

    def start(self, ctx):
        width = self.matrix.shape[1]
        self.complex = np.iscomplexobj(self.matrix)
        parts = ("real", "imag") if self.complex else (None,)
        self.arrays = {}
        for part in parts:
            key = f"{self.key}_{part}" if part else self.key
            # dense float projections barely compress, and LZ4 doubles the cost of writing them
            self.arrays[part] = self.writer.create(key, (ctx.n_rows, width), "float32",
                                                   chunks=ctx.output_chunks(width), compress=False)
        self.means = (self.writer.create("means", (ctx.n_rows,), "float32", chunks=ctx.output_chunks())
                      if self.centre else None)
        matrices = {part: np.asarray(self.matrix.real if part != "imag" else self.matrix.imag, dtype=np.float64)
                    for part in parts}
        if computes_in_numpy(ctx.device):
            self.device_matrices = matrices
            return
        import torch

        self.device_matrices = {part: torch.as_tensor(matrix, dtype=torch.float64, device=ctx.device)
                                for part, matrix in matrices.items()}

    def update(self, block):
        if block.on_cpu:
            self._update_host(block)
            return
        import torch

        block64 = block.float64()
        if self.centre:
            mean = block64.mean(dim=1, keepdim=True)
            centred = self._scratch("centred", block64.shape, torch.float64, block64.device)
            block64 = torch.sub(block64, mean, out=centred)
            self.means[block.start:block.stop] = mean[:, 0].float().cpu().numpy()
        for part, matrix in self.device_matrices.items():
            self.arrays[part][block.start:block.stop] = (block64 @ matrix).float().cpu().numpy()

    def _update_host(self, block):
        """The CPU path: numpy on cache-sized float64 chunks (host_float64), outputs written once per block."""
        rows = slice(block.start, block.stop)
        outputs = {part: np.empty((block.rows, matrix.shape[1]), dtype=np.float32)
                   for part, matrix in self.device_matrices.items()}
        means = np.empty(block.rows, dtype=np.float32) if self.centre else None
        for r0, r1, x in block.float64_chunks():
            if self.centre:
                mean = x.mean(axis=1, keepdims=True)
                x -= mean
                means[r0:r1] = mean[:, 0]
            for part, matrix in self.device_matrices.items():
                outputs[part][r0:r1] = x @ matrix
        if self.centre:
            self.means[rows] = means
        for part, values in outputs.items():
            self.arrays[part][rows] = values


class ColumnsOfModel(Accumulator):
    """``W_window @ weights`` block by block into ``out`` (N×k float32): modelled checkpoints of a linear model
    (weights T×k), or weight averages (:mod:`cmdtool.workflows.averages`).

    ``out`` is any array written by row ranges (default: a new numpy array; give a zarr array when blocks run in
    other processes). Rows with NaN/Inf give 0, or with ``keep_nonfinite`` their stored values combined by the
    same weights (so the original checkpoint keeps its NaN/Inf, as stored).
    """

    def __init__(self, weights: np.ndarray, out=None, keep_nonfinite: bool = False):
        self.weights, self.out, self.keep_nonfinite = np.asarray(weights), out, keep_nonfinite

    def start(self, ctx):
        self.returned = self.out is None  # the pass's own output, handed back by finish as numpy
        if self.returned:
            self.out = ctx.row_output(*self.weights.shape[1:], dtype=np.float32)
        if computes_in_numpy(ctx.device):
            self.weights_device = np.asarray(self.weights, dtype=np.float64)
            return
        import torch

        self.weights_device = torch.as_tensor(self.weights, dtype=torch.float64, device=ctx.device)

    def update(self, block):
        if block.on_cpu:  # numpy on cache-sized float64 chunks (host_float64)
            weights = self.weights_device
            value = np.empty((block.rows,) + weights.shape[1:], dtype=np.float32)
            for r0, r1, x in block.float64_chunks():
                value[r0:r1] = x @ weights
            if self.keep_nonfinite and block.nonfinite:
                with np.errstate(invalid="ignore", over="ignore"):  # NaN/Inf in, NaN/Inf out: as stored
                    value[~block.finite] = block.nonfinite_values.astype(np.float64) @ weights
        else:
            value = (block.float64() @ self.weights_device).float().cpu().numpy()
            if self.keep_nonfinite and block.nonfinite:
                value[~block.finite.cpu().numpy()] = (block.nonfinite_values.double() @ self.weights_device) \
                    .float().cpu().numpy()
        self.out[block.start:block.stop] = value

    def finish(self):
        if self.returned:
            self.out = np.asarray(self.out[...])


def factor_model(terms, means=None, block_bytes: int = 32 * 1024**2, rows: slice | None = None) -> np.ndarray:
    """Several modelled checkpoints from stored per-row factors, read once in row blocks:
    ``means + Σ factors @ weights`` over ``terms = [(factors, weights), ...]`` (factors N×d lazy arrays, weights
    d×k float64, ``means`` an optional N-long lazy array); (rows, k) float32 for the store rows ``rows``
    (default all N)."""
    n_rows, k = terms[0][0].shape[0], terms[0][1].shape[1]
    rows = rows if rows is not None else slice(0, n_rows)
    width = max(terms[0][0].shape[1], k, 1)
    out = np.empty((rows.stop - rows.start, k), dtype=np.float32)
    step = max(1, block_bytes // (8 * width))
    for r0 in range(rows.start, rows.stop, step):
        block = slice(r0, min(r0 + step, rows.stop))
        value = None
        for factors, weights in terms:
            part = factors[block].astype(np.float64) @ weights
            value = part if value is None else value + part
        out[block.start - rows.start:block.stop - rows.start] = \
            value if means is None else means[block].astype(np.float64)[:, None] + value
    return out


class GramModel(Analyzer):
    """Base of the analyzers fitted from the cached Gram matrix (DMD, KGA, PCA, POD): ``reconstruction_matrix_``
    is their K (W_rec = W K); :meth:`_reconstruct` runs one pass for any set of epochs unless a subclass reads
    its own stored factors."""

    def _window_gram(self, store, progress) -> np.ndarray:
        """G of the fitted window: a sub-matrix of the store's cached Gram (one pass only if none is cached)."""
        gram = gram_matrix(store, self.device, progress)
        self.gram_from_cache_ = gram.from_cache
        self.timings_["gram_seconds"] = 0.0 if gram.from_cache else float(gram.seconds)
        self.nonfinite_rows_ = int(gram.nonfinite_rows)  # left out of G (and of every output): reported
        window, _ = gram.window(self.window_)
        return np.array(window, dtype=np.float64)

    def _linear_metrics(self, gram: np.ndarray, stored_floats: int) -> dict:
        """The base-class metrics of W_rec = W K, plus how many rows were left out for NaN/Inf."""
        metrics = linear_model_metrics(gram, self.reconstruction_matrix_, stored_floats)
        metrics["nonfinite_rows"] = self.nonfinite_rows_
        return metrics

    def _reconstruct(self, store, columns, steps, progress=None, rows: slice | None = None) -> np.ndarray:
        """ŵ_t for several t at once: one pass computes W_window K[:, ts] (instead of one pass per epoch).
        ``rows`` slices the pass's whole output (:meth:`reconstruction_blocks` asks for all rows at once)."""
        acc = ColumnsOfModel(np.asarray(self.reconstruction_matrix_)[:, steps])
        stream(store, [acc], self.window_, self.device, progress, "reconstruct")
        return acc.out if rows is None else acc.out[rows]
