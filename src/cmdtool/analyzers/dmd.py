"""Dynamic Mode Decomposition of the trajectories from the cached T×T Gram matrix (paper 003 Eqs. 4-9).

The snapshots are the checkpoints: X = W[:, :-1], Y = W[:, 1:] (N × (T−1) each, Eq. 5). Everything DMD needs
about X and Y is a block of G = Wᵀ W (design note 3.1):

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
from .linear_models import (GramModel, RowProjection, descending_eigh, gram_square_root,
                            numerical_rank, truncation_rank)
from .passes import stream


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


class DMD(GramModel):
    """Exact or projected DMD of an epoch window (PyDMD conventions), fitted from the cached Gram matrix.

    Parameters
    ----------
    rank : int, float or str
        Truncation rank: an integer r, 0 for the Gavish-Donoho optimal hard threshold, an energy fraction in (0,1),
        or -1 for no truncation (PyDMD's ``svd_rank``).
    exact : bool
        Exact modes (from Y) instead of projected ones (from X).
    save_modes : bool
        Materialise the modes Φ (N×r) in one pass, stored as ``modes_real`` / ``modes_imag`` float32.
    epochs : str or None
        Epoch window ``A:B`` (labels, inclusive).
    device : str
        Where the passes compute (auto, cpu, cuda).

    Learned state: ``singular_values_``, ``rank_``, ``rank_requested_``, ``right_singular_vectors_`` (V_r), ``atilde_``,
    ``eigenvalues_``, ``eigenvectors_``, ``mode_coefficients_`` (C, Φ = W C), ``amplitudes_``,
    ``reconstruction_matrix_`` (K), ``metrics_``; ``modes_`` (lazy, complex N×r) when saved.
    """

    method = "dmd"

    def __init__(self, rank=0, exact: bool = False, save_modes: bool = False, epochs: str | None = None,
                 device: str = "auto"):
        self.rank = rank
        self.exact = exact
        self.save_modes = save_modes
        self.epochs = epochs
        self.device = device

    # ------------------------------------------------------------------ fitting
    def fit(self, store, progress=None) -> "DMD":
        writer = self._begin_fit(store)
        gram = self._window_gram(store, progress)
        self._set_dmd(dmd_from_gram(gram, store.n_rows, self.rank, self.exact))
        self._derive_from_gram(store, gram)
        accumulators = self._pass_accumulators(store, writer)
        if accumulators:
            stats = stream(store, accumulators, self.columns_, self.device, progress, f"{self.method} pass")
            self.timings_["pass_seconds"] = stats.seconds
        self._after_pass(accumulators)
        self.metrics_ = self._linear_metrics(gram, dmd_stored_floats(self.rank_, store.n_rows))
        self._end_fit()
        return self

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
        if not self.save_modes:
            return []
        return [RowProjection(self._require_writer("DMD modes"), "modes", self.mode_coefficients_)]

    def _after_pass(self, accumulators) -> None:
        pass

    # ------------------------------------------------------------------ persistence
    _SMALL_ARRAYS = ("singular_values", "right_singular_vectors", "atilde", "eigenvalues", "eigenvectors",
                     "mode_coefficients", "amplitudes", "reconstruction_matrix")

    def _save_arrays(self, writer) -> None:
        for key in self._SMALL_ARRAYS:
            writer.put(key, getattr(self, key + "_"))
        writer.put("epoch_relative_error", np.asarray(self.metrics_["epoch_relative_error"]))
        writer.attrs.update(rank=self.rank_, rank_requested=self.rank_requested_,
                            modes_saved="modes_real" in writer.group)

    def _load_arrays(self, result) -> None:
        for key in self._SMALL_ARRAYS:
            setattr(self, key + "_", result[key])
        self.rank_ = int(result.attrs["rank"])
        self.rank_requested_ = int(result.attrs["rank_requested"])

    @property
    def modes_(self):
        """The DMD modes Φ (N×r complex) when saved, read from the store (``None`` otherwise). For large N read
        ``result_.array('modes_real')`` in row blocks instead."""
        result = getattr(self, "result_", None)
        if result is None or "modes_real" not in result:
            return None
        return result["modes_real"].astype(np.complex128) + 1j * result["modes_imag"]

    # ------------------------------------------------------------------ use
    def dynamics(self, steps=None) -> np.ndarray:
        """λ_kᵗ b_k for t in ``steps`` (default the window's 0..T−1), r × len(steps) complex (PyDMD's
        ``dynamics``); steps beyond T−1 extrapolate."""
        steps = np.arange(self.reconstruction_matrix_.shape[0]) if steps is None else np.asarray(steps)
        return self.amplitudes_[:, None] * self.eigenvalues_[:, None] ** steps[None, :]

    def reconstruct_epochs(self, store, columns, progress=None) -> np.ndarray:
        """Several modelled checkpoints, Re Φ (λᵗ ∘ b) for every t: the saved modes are read once, not per epoch."""
        result = getattr(self, "result_", None)
        if result is None or "modes_real" not in result:
            return super().reconstruct_epochs(store, columns, progress)
        weights = self.dynamics([self._window_column(int(c)) for c in columns])   # r × k
        modes_real, modes_imag = result.array("modes_real"), result.array("modes_imag")
        out = np.empty((modes_real.shape[0], weights.shape[1]), dtype=np.float32)
        step = max(1, (32 * 1024**2) // (8 * max(self.rank_, weights.shape[1], 1)))
        for r0 in range(0, out.shape[0], step):
            rows = slice(r0, min(r0 + step, out.shape[0]))
            out[rows] = (modes_real[rows].astype(np.float64) @ weights.real
                         - modes_imag[rows].astype(np.float64) @ weights.imag)
        return out

    @classmethod
    def options_for_budget(cls, budget_floats: int, n_rows: int, n_cols: int) -> dict:
        """The largest rank whose stored model (r·N + 2r floats) fits ``budget_floats`` (at least 1)."""
        rank = max(1, min(int(budget_floats // (n_rows + 2)), n_cols - 1))
        return {"rank": rank}

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

    def render_summary(self, console) -> None:
        from rich.table import Table

        s = self.summary()
        title = f"{self.method} / {getattr(self, 'name_', '')}: rank {s['rank']}"
        if s["rank"] != s["rank_requested"]:
            title += f" (asked {s['rank_requested']}; the rest is below the Gram path's roundoff)"
        table = Table(title=title, show_edge=False)
        for col in ("λ", "|λ|", "|b|"):
            table.add_column(col, justify="right")
        for row in s["eigenvalues"][:20]:
            re, im = row["eigenvalue"]
            table.add_row(f"{re:+.5f}{im:+.5f}j", f"{row['modulus']:.5f}", f"{row['amplitude']:.4g}")
        console.print(table)
        console.print(f"relative error {s['relative_error']:.4g} (to motion {s['relative_error_motion']:.4g}), "
                      f"final epoch {s['final_epoch_error']:.4g}, worst epoch {s['worst_epoch_error']:.4g}; "
                      f"stored floats {s['stored_floats']:,}; {s['fit_seconds']:.2f} s", highlight=False)
