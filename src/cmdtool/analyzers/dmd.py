"""Dynamic Mode Decomposition of the trajectories from the cached T×T Gram matrix (paper 003 Eqs. 4-9).

The snapshots are the checkpoints: X = W[:, :-1], Y = W[:, 1:] (N × (T−1) each, Eq. 5). Everything DMD needs
about X and Y is a block of G = Wᵀ W (docs/references.md, "The Gram path"):

    Xᵀ X = G[:-1, :-1] = V Σ² Vᵀ                 (eigh: the right singular vectors and values of X, Eq. 6)
    Ã    = Uᵀ Y V Σ⁻¹ = Σ⁻¹ Vᵀ (Xᵀ Y) V Σ⁻¹       (Eq. 7, U = X V Σ⁻¹, Xᵀ Y = G[:-1, 1:])
    Ã Q  = Q Λ                                    (Eq. 9)
    Φ    = X V Σ⁻¹ Q  (projected)  or  Y V Σ⁻¹ Q  (exact)  =  W C   for a T×r matrix C
    b    = Φ⁺ w_0                                 (least squares; ΦᴴΦ = Cᴴ G C and Φᴴ w_0 = Cᴴ G e_0)
    W_rec[:, t] = Φ (λᵗ ∘ b)  =  W K e_t,    K = C diag(b) [λ_kᵗ]   (PyDMD's ``reconstructed_data``)

so eigenvalues, amplitudes, the reconstruction and its error per epoch need no pass over W once G is cached;
the modes Φ (N×r) need one pass, taken only with ``save_modes=True``.

Conventions follow PyDMD's ``DMD`` (``svd_rank`` rule, ``exact``, amplitudes fitted to the first snapshot,
time steps 0..T−1), so results agree with ``pydmd.DMD(svd_rank=..., exact=...)`` fitted on the columns of W.
The modelled weights are real: the reconstruction keeps the real part of W K (the imaginary parts of conjugate
pairs cancel).

Numerical caveat: G squares the condition number of W; singular values below ~σ_max·sqrt(T·ε) are roundoff and
are dropped (the fitted rank is then smaller than asked; ``rank_requested_`` keeps what was asked).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import UsageError
from .base import Reconstruction
from .eigenvalues import EIGENVALUE_FIGURE
from .linear_models import (RANK, GramModel, RowProjection, descending_eigh, factor_model,
                            gram_square_root, numerical_rank, truncation_rank)
from .params import DEVICE, EPOCHS, Param
from ..passes.local import stream


@dataclass
class DMDFit:
    """DMD of one window, computed from its Gram matrix (all arrays small: O(T²))."""

    singular_values: np.ndarray     # (T−1,) every singular value of X (for the spectrum plot / rank choice)
    rank_requested: int             # rank from the truncation rule
    right_singular_vectors: np.ndarray  # (T−1, r) V_r of X = U Σ V_rᵀ (the reduced basis, in time)
    atilde: np.ndarray              # (r, r) Ã, Eq. 7
    eigenvalues: np.ndarray         # (r,) complex λ, Eq. 9
    eigenvectors: np.ndarray        # (r, r) complex Q, Eq. 9
    mode_coefficients: np.ndarray   # (T, r) complex C with Φ = W C
    amplitudes: np.ndarray          # (r,) complex b = Φ⁺ w_0
    reconstruction: np.ndarray      # (T, T) real K with W_rec = W K

    @property
    def rank(self) -> int:
        return int(self.eigenvalues.size)


def dmd_from_gram(gram: np.ndarray, n_rows: int, rank=0, exact: bool = False) -> DMDFit:
    """DMD (paper 003 Eqs. 5-9) of a window whose Gram matrix is ``gram`` (T×T); ``n_rows`` = N (for the
    Gavish-Donoho aspect ratio). See the module docstring for the formulas."""
    gram = np.asarray(gram, dtype=np.float64)
    n_cols = gram.shape[0]
    if n_cols < 2:
        raise UsageError(f"DMD needs at least 2 checkpoints in the window, got {n_cols}")
    eig_xx, right_vectors = descending_eigh(gram[:-1, :-1])          # Xᵀ X = V Σ² Vᵀ
    singular_values = np.sqrt(eig_xx)
    rank_requested = truncation_rank(singular_values, n_rows, n_cols - 1, rank)
    usable = numerical_rank(eig_xx)
    if usable == 0:
        raise UsageError("the trajectories in this window are all zero: nothing to decompose")
    r = min(rank_requested, usable)
    sigma = singular_values[:r]
    basis = right_vectors[:, :r]  # V_r
    # Ã = Σ⁻¹ Vᵀ (Xᵀ Y) V Σ⁻¹   (Eq. 7 with U = X V Σ⁻¹)
    atilde = (basis.T @ gram[:-1, 1:] @ basis) / sigma[:, None] / sigma[None, :]
    eigenvalues, eigenvectors = np.linalg.eig(atilde)
    # deterministic order: largest |λ| first, then by angle (np.linalg.eig's order is arbitrary)
    order = np.lexsort((np.angle(eigenvalues), -np.abs(eigenvalues)))
    eigenvalues, eigenvectors = eigenvalues[order], eigenvectors[:, order]
    # Φ = X V Σ⁻¹ Q (projected) or Y V Σ⁻¹ Q (exact) = W C
    coefficients = np.zeros((n_cols, r), dtype=np.complex128)
    in_time = (basis / sigma[None, :]) @ eigenvectors
    if exact:
        coefficients[1:] = in_time
    else:
        coefficients[:-1] = in_time
    # b = argmin ‖Φ b − w_0‖ (PyDMD's lstsq on the first snapshot); with W = U_W R (R = G^½ factor) the same
    # least-squares problem lives in T rows: argmin ‖R C b − R e_0‖
    root = gram_square_root(gram)
    amplitudes = np.linalg.lstsq(root @ coefficients, root[:, 0].astype(np.complex128), rcond=None)[0]
    vandermonde = eigenvalues[:, None] ** np.arange(n_cols)[None, :]
    reconstruction = (coefficients @ (amplitudes[:, None] * vandermonde)).real
    return DMDFit(singular_values, int(rank_requested), basis, atilde, eigenvalues, eigenvectors, coefficients,
                  amplitudes, reconstruction)


def dmd_stored_floats(rank: int, n_rows: int) -> int:
    """Real numbers of the DMD model Φ, λ, b: a real eigenvalue keeps a real mode (N) and λ, b (2); a conjugate
    pair keeps one complex mode (2N) and one complex λ and b (4): r·N + 2r in both cases."""
    return int(rank * n_rows + 2 * rank)


EXACT = Param("exact", False, "Exact DMD modes (from Y) instead of projected ones (from X).", kind=bool)
SAVE_MODES = Param("save_modes", False, "Materialise the DMD modes Φ (N x r; one more pass), stored as modes_real / "
                   "modes_imag float32.", kind=bool, runtime=True)
class DMD(GramModel):
    """Exact or projected DMD of an epoch window (PyDMD conventions), fitted from the cached Gram matrix.

    Attributes
    ----------
    singular_values_ : ndarray (T-1,)
        Every singular value of X (for the spectrum plot and the rank choice).
    rank_ : int
        Rank fitted: ``rank_requested_`` less the singular values below the Gram path's roundoff.
    rank_requested_ : int
        Rank given by the truncation rule.
    right_singular_vectors_ : ndarray (T-1, r)
        V_r of X = U Σ V_rᵀ (Eq. 6).
    atilde_ : ndarray (r, r)
        Ã, paper 003 Eq. 7.
    eigenvalues_, eigenvectors_ : ndarray (r,), (r, r) complex
        Λ and Q of Ã Q = Q Λ (Eq. 9), largest |λ| first.
    mode_coefficients_ : ndarray (T, r) complex
        C with Φ = W C.
    amplitudes_ : ndarray (r,) complex
        b = Φ⁺ w_0.
    reconstruction_matrix_ : ndarray (T, T)
        K with W_rec = W K.
    modes_real_, modes_imag_ : zarr arrays (N, r) or None
        The modes Φ (lazy), with ``save_modes``; ``modes_`` combines them.
    gram_from_cache_ : bool
        Whether the window's Gram matrix came from the store's cache.
    nonfinite_rows_ : int
        Rows left out for NaN/Inf.
    metrics_, timings_ : dict
        Shared quality figures (see :mod:`cmdtool.analyzers.base`) and seconds per stage.
    window_, labels_ : slice, ndarray (T,) int64
        Store columns of the fitted epoch window, and their epoch labels.
    store_, result_, name_ :
        The store fitted on, the saved result and its name (None until saved).
    """

    method = "dmd"
    title = "DMD"
    params = (RANK, EXACT, SAVE_MODES, EPOCHS, DEVICE)
    reconstructions = (Reconstruction("dmd", "DMD"),)
    figures = (EIGENVALUE_FIGURE,)
    key_numbers = ("rank",)
    saved_arrays = ("singular_values", "right_singular_vectors", "atilde", "eigenvalues", "eigenvectors",
                    "mode_coefficients", "amplitudes", "reconstruction_matrix")
    streamed_arrays = ("modes_real", "modes_imag")
    saved_attrs = ("rank", "rank_requested")

    def __init__(self, *, rank=0, exact=False, save_modes=False, epochs=None, device="auto"):
        self.rank = rank
        self.exact = exact
        self.save_modes = save_modes
        self.epochs = epochs
        self.device = device

    # ------------------------------------------------------------------ fitting
    def _needs_writer(self) -> bool:
        return bool(self.save_modes)

    def _fit(self, store, writer, progress) -> None:
        gram = self._window_gram(store, progress)
        self._set_dmd(dmd_from_gram(gram, store.n_rows, self.rank, self.exact))
        self._derive_from_gram(store, gram)
        accumulators = self._pass_accumulators(store, writer)
        if accumulators:
            stats = stream(store, accumulators, self.window_, self.device, progress, f"{self.method} pass")
            self.timings_["pass_seconds"] = stats.seconds
        self._after_pass(accumulators)
        self.metrics_ = self._linear_metrics(gram, dmd_stored_floats(self.rank_, store.n_rows))

    def _set_dmd(self, fit: DMDFit) -> None:
        self.singular_values_ = fit.singular_values
        self.rank_requested_ = fit.rank_requested
        self.rank_ = fit.rank
        self.right_singular_vectors_ = fit.right_singular_vectors
        self.atilde_ = fit.atilde
        self.eigenvalues_ = fit.eigenvalues
        self.eigenvectors_ = fit.eigenvectors
        self.mode_coefficients_ = fit.mode_coefficients
        self.amplitudes_ = fit.amplitudes
        self.reconstruction_matrix_ = fit.reconstruction

    def _derive_from_gram(self, store, gram: np.ndarray) -> None:
        """Hook for subclasses: more small results from the window's G (no pass)."""

    def _pass_accumulators(self, store, writer) -> list:
        """Per-row outputs of the (optional) second pass; KGA adds its masks here so the read is shared."""
        return [RowProjection(writer, "modes", self.mode_coefficients_)] if self.save_modes else []

    def _after_pass(self, accumulators) -> None:
        pass

    def _extra_attrs(self, writer) -> dict:
        return {"modes_saved": "modes_real" in writer.group}

    def _loaded(self, result) -> None:
        self.rank_, self.rank_requested_ = int(self.rank_), int(self.rank_requested_)

    @property
    def modes_(self):
        """The DMD modes Φ (N×r complex) when saved, read from the store (``None`` otherwise). For large N read
        ``modes_real_`` and ``modes_imag_`` in row blocks instead."""
        if getattr(self, "modes_real_", None) is None:
            return None
        return self.modes_real_[...].astype(np.complex128) + 1j * self.modes_imag_[...]

    # ------------------------------------------------------------------ use
    def dynamics(self, steps=None) -> np.ndarray:
        """λ_kᵗ b_k for t in ``steps`` (default the window's 0..T−1), r × len(steps) complex (PyDMD's
        ``dynamics``); steps beyond T−1 extrapolate."""
        self._check_fitted()
        steps = np.arange(self.reconstruction_matrix_.shape[0]) if steps is None else np.asarray(steps)
        return self.amplitudes_[:, None] * self.eigenvalues_[:, None] ** steps[None, :]

    def _reconstruct(self, store, columns, steps, progress=None, rows: slice | None = None) -> np.ndarray:
        """Several modelled checkpoints, Re Φ (λᵗ ∘ b) for every t: saved modes are read once, not per epoch;
        without them one pass over the window gives W K."""
        if not self._reconstructs_rows():
            return super()._reconstruct(store, columns, steps, progress, rows=rows)
        weights = self.dynamics(steps)   # r × k
        return factor_model([(self.modes_real_, weights.real), (self.modes_imag_, -weights.imag)], rows=rows)

    def _reconstructs_rows(self, **options) -> bool:
        return self.result_ is not None and self.modes_real_ is not None

    @classmethod
    def options_for_budget(cls, budget_floats: int, n_rows: int, n_cols: int) -> dict:
        """The largest rank whose stored model (r·N + 2r floats) fits ``budget_floats`` (at least 1)."""
        rank = max(1, min(int(budget_floats // (n_rows + 2)), n_cols - 1))
        return {"rank": rank}

    # ------------------------------------------------------------------ summaries
    def eigenvalue_table(self) -> list[dict]:
        return [{"eigenvalue": [float(lam.real), float(lam.imag)], "modulus": float(abs(lam)),
                 "amplitude": float(abs(b))} for lam, b in zip(self.eigenvalues_, self.amplitudes_)]

    def summary(self) -> dict:
        out = super().summary()
        m = self.metrics_
        out.update(rank=self.rank_, rank_requested=self.rank_requested_, exact=bool(self.exact),
                   final_epoch_error=m["epoch_relative_error"][-1], worst_epoch_error=max(m["epoch_relative_error"]),
                   eigenvalues=self.eigenvalue_table())
        return out

    # ------------------------------------------------------------------ report and export
    @classmethod
    def headline(cls, view) -> dict:
        return {"rank": view.attrs.get("rank", view.value("rank"))}

    @classmethod
    def csv_tables(cls, result, store) -> dict:
        tables = super().csv_tables(result, store)
        eigenvalues, amplitudes = result["eigenvalues"], result["amplitudes"]
        classes = result["classes"] if "classes" in result else None
        class_names = {int(k): v for k, v in (result.attrs.get("class_codes") or {}).items()}
        rows = []
        for k, (lam, b) in enumerate(zip(eigenvalues, amplitudes)):
            row = [k, lam.real, lam.imag, abs(lam), float(np.angle(lam)), b.real, b.imag, abs(b)]
            if classes is not None:
                row.append(class_names.get(int(classes[k]), int(classes[k])))
            rows.append(row)
        header = ["k", "eigenvalue_real", "eigenvalue_imag", "modulus", "angle", "amplitude_real",
                  "amplitude_imag", "amplitude_abs"] + (["class"] if classes is not None else [])
        tables["spectrum"] = (header, rows)
        tables["singular_values"] = (["k", "singular_value"], list(enumerate(result["singular_values"])))
        return tables

