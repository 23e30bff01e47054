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

import numpy as np
import torch

from ..errors import UsageError
from .dmd import DMD
from .linear_models import RowProjection
from .passes import Accumulator

STABLE, NEUTRAL, UNSTABLE = 0, 1, 2
CLASS_NAMES = {STABLE: "stable", NEUTRAL: "neutral", UNSTABLE: "unstable"}


def classify_eigenvalues(eigenvalues: np.ndarray, eps: float) -> np.ndarray:
    """Class code per eigenvalue (paper 003 Sec. 3.1): 0 stable, 1 neutral, 2 unstable."""
    modulus = np.abs(np.asarray(eigenvalues))
    classes = np.full(modulus.shape, NEUTRAL, dtype=np.int8)
    classes[modulus < 1.0 - eps] = STABLE
    classes[modulus > 1.0 + eps] = UNSTABLE
    return classes


def kwm_score_matrix(mode_coefficients: np.ndarray, amplitudes: np.ndarray, eigenvalues: np.ndarray,
                     classes: np.ndarray, n_cols: int, window: int) -> np.ndarray:
    """M (T×s complex) with S = |W M|: the non-neutral part of the DMD reconstruction (Eq. 14's second sum) at
    the last ``window`` time steps of the window (Eq. 15)."""
    steps = np.arange(max(n_cols - window, 0), n_cols)
    keep = classes != NEUTRAL
    dynamics = amplitudes[keep, None] * eigenvalues[keep, None] ** steps[None, :]
    return mode_coefficients[:, keep] @ dynamics


class KWMMasks(Accumulator):
    """Eq. 15 per row block: mask (1 = keeps going through KGA, 0 = masked out), and masked counts per tensor."""

    def __init__(self, writer, score_matrix: np.ndarray, threshold: float, tensor_stops: np.ndarray):
        self.writer, self.score_matrix, self.threshold = writer, score_matrix, threshold
        self.tensor_stops = np.asarray(tensor_stops, dtype=np.int64)  # cumulative row ends of the tensors

    def start(self, store, columns, device):
        chunk_rows = min(max(store.n_rows, 1), store.default_block_rows(columns.stop - columns.start))
        self.mask = self.writer.create("mask", (store.n_rows,), "uint8", chunks=(chunk_rows,))
        self.real = torch.as_tensor(self.score_matrix.real, dtype=torch.float64, device=device)
        self.imag = torch.as_tensor(self.score_matrix.imag, dtype=torch.float64, device=device)
        self.masked_per_tensor = np.zeros(len(self.tensor_stops), dtype=np.int64)

    def update(self, start, stop, block, finite):
        block64 = block.to(torch.float64)
        score = torch.hypot(block64 @ self.real, block64 @ self.imag)       # S_{i',j}, (rows, s)
        # rows with NaN/Inf were zeroed by the pass; they are not "quiet", so they stay in KGA
        masked = (score < self.threshold).all(dim=1) & finite
        masked_np = masked.cpu().numpy()
        self.mask[start:stop] = (~masked_np).astype(np.uint8)
        # masked count per tensor without an N-long layer array: split the block at tensor boundaries
        bounds = np.concatenate([[start], self.tensor_stops[(self.tensor_stops > start) & (self.tensor_stops < stop)],
                                 [stop]])
        first = int(np.searchsorted(self.tensor_stops, start, side="right"))
        for k, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
            self.masked_per_tensor[first + k] += int(masked_np[lo - start:hi - start].sum())


class KGA(DMD):
    """DMD eigenvalue classes and KWM weight masks (paper 003), with what a training-time KGA needs.

    Parameters (besides DMD's ``rank``, ``exact``, ``save_modes``, ``epochs``, ``device``)
    ----------
    eps : float
        |λ| within [1 − eps, 1 + eps] is neutral (Sec. 3.1).
    window : int
        s of Eq. 15: a weight is masked out only if its score stays below the threshold over the last s epochs.
    mask_threshold : float or None
        ε of Eq. 15 (in weight units); ``None`` uses ``eps`` as the paper's single ε does.

    Learned state (besides DMD's): ``classes_`` (0 stable, 1 neutral, 2 unstable), ``left_eigenvectors_``
    (rows of Q⁻¹), ``reduced_trajectories_`` (Uᵀ W, r×T), ``mask_`` (lazy uint8 N-long, Eq. 15: 0 = masked out),
    ``masked_fraction_``, ``masked_per_tensor_``.
    """

    method = "kga"

    def __init__(self, rank=0, exact: bool = False, eps: float = 0.01, window: int = 5,
                 mask_threshold: float | None = None, save_modes: bool = False, epochs: str | None = None,
                 device: str = "auto"):
        super().__init__(rank=rank, exact=exact, save_modes=save_modes, epochs=epochs, device=device)
        self.eps = eps
        self.window = window
        self.mask_threshold = mask_threshold

    def _derive_from_gram(self, store, gram) -> None:
        """Classes (Sec. 3.1), left eigenvectors (Eq. 11) and W̃ = Uᵀ W (Eq. 8): all from G, no pass."""
        if self.eps < 0 or self.window < 1:
            raise UsageError("KGA needs eps >= 0 and window >= 1")
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
        writer = self._require_writer("KWM masks")
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

    # ------------------------------------------------------------------ persistence
    def _save_arrays(self, writer) -> None:
        super()._save_arrays(writer)
        writer.put("classes", self.classes_)
        writer.put("left_eigenvectors", self.left_eigenvectors_)
        writer.put("reduced_trajectories", self.reduced_trajectories_)
        writer.put("masked_per_tensor", self.masked_per_tensor_)
        writer.put("tensor_sizes", self.tensor_sizes_)
        writer.attrs.update(tensor_names=self.tensor_names_, masked_fraction=self.masked_fraction_,
                            class_codes={str(k): v for k, v in CLASS_NAMES.items()})

    def _load_arrays(self, result) -> None:
        super()._load_arrays(result)
        self.classes_ = result["classes"]
        self.left_eigenvectors_ = result["left_eigenvectors"]
        self.reduced_trajectories_ = result["reduced_trajectories"]
        self.masked_per_tensor_ = result["masked_per_tensor"]
        self.tensor_sizes_ = result["tensor_sizes"]
        self.tensor_names_ = list(result.attrs["tensor_names"])
        self.masked_fraction_ = float(result.attrs["masked_fraction"])

    @property
    def mask_(self):
        """Eq. 15 mask per weight (uint8, N; 0 = masked out of KGA) as a lazy zarr array."""
        return self._result_array("mask")

    @property
    def weight_basis_(self):
        """U = X V Σ⁻¹ (N×r float32, lazy): the reduced basis of Eqs. 7, 10, 13."""
        return self._result_array("weight_basis")

    def training_kga_state(self) -> dict:
        """What a training-time KGA step (Eqs. 10-13) needs besides the basis U: the stable and neutral
        eigen-pairs of Ã (eigenvalues, right eigenvectors Q, left eigenvectors rows of Q⁻¹)."""
        out = {}
        for code in (STABLE, NEUTRAL):
            keep = self.classes_ == code
            out[CLASS_NAMES[code]] = {"eigenvalues": self.eigenvalues_[keep],
                                      "right_eigenvectors": self.eigenvectors_[:, keep],
                                      "left_eigenvectors": self.left_eigenvectors_[keep, :]}
        return out

    # ------------------------------------------------------------------ report
    def class_counts(self) -> dict:
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

    def render_summary(self, console) -> None:
        from rich.table import Table

        s = self.summary()
        table = Table(title=f"kga / {getattr(self, 'name_', '')}: rank {s['rank']}, eps {self.eps}",
                      show_edge=False)
        for col in ("λ", "|λ|", "|b|", "class"):
            table.add_column(col, justify="right")
        for row in s["eigenvalues"][:20]:
            re, im = row["eigenvalue"]
            table.add_row(f"{re:+.5f}{im:+.5f}j", f"{row['modulus']:.5f}", f"{row['amplitude']:.4g}", row["class"])
        console.print(table)
        counts = s["classes"]
        console.print(f"modes: {counts['stable']} stable, {counts['neutral']} neutral, {counts['unstable']} "
                      f"unstable; KWM (window {self.window}): {s['masked_fraction']:.1%} of weights masked out",
                      highlight=False)
        layers = Table(title="KWM masked fraction per tensor", show_edge=False)
        layers.add_column("tensor")
        layers.add_column("masked", justify="right")
        layers.add_column("size", justify="right")
        layers.add_column("fraction", justify="right")
        for name, row in list(s["masked_per_tensor"].items())[:40]:
            layers.add_row(name, f"{row['masked']:,}", f"{row['size']:,}", f"{row['fraction']:.1%}")
        console.print(layers)
