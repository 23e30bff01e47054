"""Koopman mode classes and KWM weight masks (paper 003 Sec. 3.1-3.3, Eqs. 10-15), on top of DMD.

Classes (Sec. 3.1, after Avila & Mezić 2020), for the DMD eigenvalues λ_k of the window:

    neutral   1 − ε ≤ |λ_k| ≤ 1 + ε        stable   |λ_k| < 1 − ε        unstable   |λ_k| > 1 + ε

KWM (Eqs. 14-15): the weights split into the part carried by neutral modes and the rest,
w_i = Σ_{neutral} λ_kⁱ b_k φ_k + Σ_{not neutral} λ_kⁱ b_k φ_k. Weight j is *masked out* of KGA (mask_j = 0) when

    S_{i',j} = | Σ_{k not neutral} λ_kⁱ' b_k Φ_{j,k} | < ε_mask     for every i' in the last s epochs [T−s, T−1]

(time steps counted from the window's first checkpoint, as in the reconstruction). With Φ = W C, the row block
of S is |W_block M| with M = C_nn diag(b_nn) [λ_kⁱ'] (T×s): one streaming pass, Φ never stored.

The same pass writes the reduced basis U = X V Σ⁻¹ (N×r, Eq. 7's left singular vectors) that a training-time KGA
projects its updates on (Eqs. 10, 13); the eigen-pairs (right eigenvectors Q, left eigenvectors rows of Q⁻¹,
Eqs. 11-12), the classes, Ã and the reduced trajectories W̃ = Uᵀ W (Efficient-KGA, Eq. 8) are stored with it.
DMD itself comes from the cached Gram matrix (no extra pass; see :mod:`cmdtool.analyzers.dmd`).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from .base import FigureSpec, Reconstruction
from .dmd import DMD, EXACT, SAVE_MODES
from .eigenvalues import (CLASS_NAMES, DEFAULT_CLASS_EPS, EIGENVALUE_FIGURE, NEUTRAL, STABLE,
                          classify_eigenvalues)
from .linear_models import RANK, RowProjection
from .params import DEVICE, EPOCHS, Param
from ..passes.contract import Accumulator
from ..utils.device import computes_in_numpy

def kwm_score_matrix(mode_coefficients: np.ndarray, amplitudes: np.ndarray, eigenvalues: np.ndarray,
                     classes: np.ndarray, n_cols: int, window: int) -> np.ndarray:
    """M (T×s complex) with S = |W M|: the non-neutral part of the DMD reconstruction (Eq. 14's second sum) at
    the last ``window`` time steps of the window (Eq. 15)."""
    steps = np.arange(max(n_cols - window, 0), n_cols)
    keep = classes != NEUTRAL
    dynamics = amplitudes[keep, None] * eigenvalues[keep, None] ** steps[None, :]
    return mode_coefficients[:, keep] @ dynamics


class KWMMasks(Accumulator):
    """Eq. 15 per row block: mask (1 = keeps going through KGA, 0 = masked out), and masked counts per tensor
    (the reduction that partials add up)."""

    client_only = ("writer",)

    def __init__(self, writer, score_matrix: np.ndarray, threshold: float, tensor_stops: np.ndarray):
        self.writer, self.score_matrix, self.threshold = writer, score_matrix, threshold
        self.tensor_stops = np.asarray(tensor_stops, dtype=np.int64)  # cumulative row ends of the tensors

    def start(self, ctx):
        self.mask = self.writer.create("mask", (ctx.n_rows,), "uint8", chunks=ctx.output_chunks())
        self.masked_per_tensor = np.zeros(len(self.tensor_stops), dtype=np.int64)
        if computes_in_numpy(ctx.device):
            self.real = np.asarray(self.score_matrix.real, dtype=np.float64)
            self.imag = np.asarray(self.score_matrix.imag, dtype=np.float64)
            return
        import torch

        self.real = torch.as_tensor(self.score_matrix.real, dtype=torch.float64, device=ctx.device)
        self.imag = torch.as_tensor(self.score_matrix.imag, dtype=torch.float64, device=ctx.device)

    def update(self, block):
        start, stop = block.start, block.stop
        # rows with NaN/Inf were zeroed by the pass; they are not "quiet", so they stay in KGA
        if block.on_cpu:  # numpy on cache-sized float64 chunks (host_float64)
            real, imag, finite = self.real, self.imag, block.finite
            masked_np = np.empty(block.rows, dtype=bool)
            for r0, r1, x in block.float64_chunks():
                score = np.hypot(x @ real, x @ imag)                       # S_{i',j}, (rows, s)
                masked_np[r0:r1] = (score < self.threshold).all(axis=1) & finite[r0:r1]
        else:
            block64 = block.float64()
            score = (block64 @ self.real).hypot(block64 @ self.imag)
            masked_np = ((score < self.threshold).all(dim=1) & block.finite).cpu().numpy()
        self.mask[start:stop] = (~masked_np).astype(np.uint8)
        # masked count per tensor without an N-long layer array: split the block at tensor boundaries
        bounds = np.concatenate([[start], self.tensor_stops[(self.tensor_stops > start) & (self.tensor_stops < stop)],
                                 [stop]])
        first = int(np.searchsorted(self.tensor_stops, start, side="right"))
        for k, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
            self.masked_per_tensor[first + k] += int(masked_np[lo - start:hi - start].sum())

    def merge(self, other):
        self.masked_per_tensor += other.masked_per_tensor


EPS = Param("eps", DEFAULT_CLASS_EPS, "|λ| within [1 − eps, 1 + eps] is neutral (paper 003 Sec. 3.1); also the "
            "KWM mask threshold unless a mask threshold is given.", kind=float, minimum=0)
WINDOW = Param("window", 5, "s of Eq. 15: a weight is masked out only if its score stays below the threshold over "
               "the last s epochs.", kind=int, minimum=1)
MASK_THRESHOLD = Param("mask_threshold", None, "ε of Eq. 15 in weight units (default: eps, as the paper's single ε).",
                       kind=float, optional=True, minimum=0)

KWM_FIGURE = FigureSpec(
    "kwm_masks", "KWM masked fraction per tensor",
    "Weights whose non-neutral DMD component stays below ε over the last s epochs are masked out of KGA (paper 003 "
    "Eq. 15); bars give each tensor's masked share.",
    "cmdtool.report.figures:kwm_mask_figure",
    numbers=lambda view: {"masked fraction": view.value("masked_fraction")}, missing_note="KWM mask figure skipped")


class KGA(DMD):
    """DMD eigenvalue classes and KWM weight masks (paper 003), with what a training-time KGA needs.

    Attributes
    ----------
    classes_ : ndarray (r,) int8
        Class of each DMD eigenvalue: 0 stable, 1 neutral, 2 unstable (Sec. 3.1).
    left_eigenvectors_ : ndarray (r, r) complex
        Rows of Q⁻¹ (Eq. 11).
    reduced_trajectories_ : ndarray (r, T)
        W̃ = Uᵀ W (Efficient-KGA, Eq. 8).
    mask_ : zarr array (N,) uint8
        Eq. 15 mask per weight (lazy; 0 = masked out of KGA).
    weight_basis_ : zarr array (N, r) float32
        U = X V Σ⁻¹, the reduced basis of Eqs. 7, 10, 13 (lazy).
    masked_fraction_ : float
        Share of all weights masked out.
    masked_per_tensor_, tensor_sizes_, tensor_names_ : ndarray (tensors,) int64, ndarray, list
        Masked weights, size and name of each trajectory tensor.
    singular_values_, rank_, rank_requested_, right_singular_vectors_, atilde_, eigenvalues_, eigenvectors_,
    mode_coefficients_, amplitudes_, reconstruction_matrix_, modes_real_, modes_imag_, gram_from_cache_,
    nonfinite_rows_, metrics_, timings_, window_, labels_, store_, result_, name_ :
        As :class:`~cmdtool.analyzers.dmd.DMD`.
    """

    method = "kga"
    title = "KGA"
    extends = "dmd"
    params = (RANK, EXACT, EPS, WINDOW, MASK_THRESHOLD, SAVE_MODES, EPOCHS, DEVICE)
    reconstructions = (Reconstruction("kga", "DMD (of KGA)"),)
    figures = (replace(EIGENVALUE_FIGURE, note=None), KWM_FIGURE)
    key_numbers = ("rank", "classes", "masked_fraction")
    saved_arrays = DMD.saved_arrays + ("classes", "left_eigenvectors", "reduced_trajectories", "masked_per_tensor",
                                       "tensor_sizes")
    streamed_arrays = DMD.streamed_arrays + ("mask", "weight_basis")
    saved_attrs = DMD.saved_attrs + ("tensor_names", "masked_fraction")

    def __init__(self, *, rank=0, exact=False, eps=DEFAULT_CLASS_EPS, window=5, mask_threshold=None, save_modes=False,
                 epochs=None, device="auto"):
        self.rank = rank
        self.exact = exact
        self.eps = eps
        self.window = window
        self.mask_threshold = mask_threshold
        self.save_modes = save_modes
        self.epochs = epochs
        self.device = device

    def _needs_writer(self) -> bool:
        return True

    def _derive_from_gram(self, store, gram) -> None:
        """Classes (Sec. 3.1), left eigenvectors (Eq. 11) and W̃ = Uᵀ W (Eq. 8): all from G, no pass."""
        self.classes_ = classify_eigenvalues(self.eigenvalues_, self.eps)
        self.left_eigenvectors_ = np.linalg.pinv(self.eigenvectors_)
        # W̃ = Uᵀ W = Σ⁻¹ Vᵀ Xᵀ W = Σ⁻¹ Vᵀ G[:-1, :]
        sigma = self.singular_values_[:self.rank_]
        self.reduced_trajectories_ = (self.right_singular_vectors_.T @ gram[:-1, :]) / sigma[:, None]
        entries = store.layout.trajectory_entries
        self.tensor_names_ = [e.name for e in entries]
        self.tensor_sizes_ = np.array([e.numel for e in entries], dtype=np.int64)

    def _pass_accumulators(self, store, writer) -> list:
        """One pass: KWM masks (Eq. 15), the weight-space basis U, and the modes when asked."""
        n_cols = self.reconstruction_matrix_.shape[0]
        score = kwm_score_matrix(self.mode_coefficients_, self.amplitudes_, self.eigenvalues_, self.classes_,
                                 n_cols, self.window)
        threshold = self.eps if self.mask_threshold is None else self.mask_threshold
        # U = X V Σ⁻¹ = W [V Σ⁻¹; 0]
        basis_coefficients = np.zeros((n_cols, self.rank_))
        basis_coefficients[:-1] = self.right_singular_vectors_ / self.singular_values_[:self.rank_][None, :]
        self._masks = KWMMasks(writer, score, float(threshold), np.cumsum(self.tensor_sizes_))
        return super()._pass_accumulators(store, writer) + [
            self._masks, RowProjection(writer, "weight_basis", basis_coefficients)]

    def _after_pass(self, accumulators) -> None:
        self.masked_per_tensor_ = self._masks.masked_per_tensor
        self.masked_fraction_ = float(self.masked_per_tensor_.sum() / max(self.tensor_sizes_.sum(), 1))

    def _extra_attrs(self, writer) -> dict:
        return {**super()._extra_attrs(writer), "class_codes": {str(k): v for k, v in CLASS_NAMES.items()}}

    def _loaded(self, result) -> None:
        super()._loaded(result)
        self.tensor_names_ = list(self.tensor_names_)
        self.masked_fraction_ = float(self.masked_fraction_)

    def training_kga_state(self) -> dict:
        """What a training-time KGA step (Eqs. 10-13) needs besides the basis U: the stable and neutral
        eigen-pairs of Ã (eigenvalues, right eigenvectors Q, left eigenvectors rows of Q⁻¹)."""
        self._check_fitted()
        out = {}
        for code in (STABLE, NEUTRAL):
            keep = self.classes_ == code
            out[CLASS_NAMES[code]] = {"eigenvalues": self.eigenvalues_[keep],
                                      "right_eigenvectors": self.eigenvectors_[:, keep],
                                      "left_eigenvectors": self.left_eigenvectors_[keep, :]}
        return out

    # ------------------------------------------------------------------ summaries
    def class_counts(self) -> dict:
        self._check_fitted()
        return {name: int(np.count_nonzero(self.classes_ == code)) for code, name in CLASS_NAMES.items()}

    def summary(self) -> dict:
        out = super().summary()
        for row, code in zip(out["eigenvalues"], self.classes_):
            row["class"] = CLASS_NAMES[int(code)]
        out.update(classes=self.class_counts(), masked_fraction=self.masked_fraction_,
                   masked_per_tensor={name: {"masked": int(m), "size": int(n), "fraction": float(m / max(n, 1))}
                                      for name, m, n in zip(self.tensor_names_, self.masked_per_tensor_,
                                                            self.tensor_sizes_)})
        return out

    # ------------------------------------------------------------------ report and export
    @classmethod
    def headline(cls, view) -> dict:
        classes = view.small("classes")
        return {**super().headline(view),
                "classes": {name: int(np.sum(classes == code)) for code, name in CLASS_NAMES.items()},
                "masked_fraction": view.value("masked_fraction")}

    @classmethod
    def csv_tables(cls, result, store) -> dict:
        tables = super().csv_tables(result, store)
        masked, sizes = result["masked_per_tensor"], result["tensor_sizes"]
        tables["layers"] = (["tensor", "rows", "masked", "masked_fraction"],
                            [(n, int(s), int(m), m / max(s, 1))
                             for n, m, s in zip(result.attrs["tensor_names"], masked, sizes)])
        return tables
