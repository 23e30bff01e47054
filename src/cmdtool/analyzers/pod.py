"""POD — proper orthogonal decomposition (a truncated SVD) of the trajectories, from the cached Gram matrix.

The baseline PyDMD users expect beside DMD: the best rank-r model of W in the least-squares sense
(Eckart-Young), with no dynamics imposed on the time profiles. It is paper 000 Eq. 1 with the time profiles
w_m(t) free, and the SVD that DMD truncates first (paper 003 Eqs. 6-7). With W = U Σ Vᵀ (N×T) and G = Wᵀ W:

    G = V Σ² Vᵀ                               (eigh of the cached T×T Gram matrix: no pass)
    modes          U_r = W V_r Σ_r⁻¹           (N×r, one streaming pass)
    coefficients   C = V_r Σ_r                  (T×r: checkpoint t is Σ_k U_k C[t, k])
    model          W_rec = U_r Σ_r V_rᵀ = W K,  K = V_r V_rᵀ

so the error per epoch follows from G like every model fitted from it (:mod:`~cmdtool.analyzers.linear_models`).
Unlike PCA (:mod:`~cmdtool.analyzers.pca`) the trajectories are not centred: the first mode carries the weights'
mean, as in POD of a flow without its mean subtracted. The rank follows DMD's ``rank`` rule (an integer, 0 for
the Gavish-Donoho optimal hard threshold, an energy fraction, -1 for all), capped at the numerical rank of G.

This module is the worked example of docs/architecture.md: one class with its declarations, registered in
``BUILTIN``; ``decompose -m pod``, ``compare``, ``evaluate``, ``reconstruct -m pod``, ``report`` (figures drawn
in :mod:`cmdtool.report.figures`) and ``export`` read it from the registry.
"""

from __future__ import annotations

import numpy as np

from ..errors import UsageError
from .base import FigureSpec, Reconstruction
from .linear_models import (RANK, GramModel, RowProjection, descending_eigh, factor_model, numerical_rank,
                            truncation_rank)
from .params import DEVICE, EPOCHS
from ..passes.local import stream


def pod_stored_floats(rank: int, n_rows: int, n_cols: int) -> int:
    """Modes (N·r) and coefficients (T·r)."""
    return int(rank * (n_rows + n_cols))


class POD(GramModel):
    """Truncated SVD (POD) of the trajectories of an epoch window, fitted from the cached Gram matrix.

    Attributes
    ----------
    singular_values_ : ndarray (T,)
        Every singular value of W over the window (for the spectrum and the rank choice).
    rank_ : int
        Modes kept: ``rank_requested_`` capped at the numerical rank of G.
    rank_requested_ : int
        Rank given by the truncation rule.
    energy_ : float
        Share of Σσ² the kept modes hold.
    right_singular_vectors_ : ndarray (T, r)
        V_r.
    coefficients_ : ndarray (T, r)
        C = V_r Σ_r: the checkpoints' coordinates on the modes.
    reconstruction_matrix_ : ndarray (T, T)
        K = V_r V_rᵀ with W_rec = W K.
    modes_ : zarr array (N, r) float32
        U_r = W V_r Σ_r⁻¹, orthonormal columns (lazy).
    gram_from_cache_, nonfinite_rows_, metrics_, timings_, window_, labels_, store_, result_, name_ :
        As :class:`~cmdtool.analyzers.dmd.DMD`.
    """

    method = "pod"
    title = "POD"
    params = (RANK, EPOCHS, DEVICE)
    reconstructions = (Reconstruction("pod", "POD"),)
    figures = (
        FigureSpec("pod_spectrum", "POD spectrum", "Singular values of the trajectories over the window, relative to "
                   "the largest, and the share of the energy Σσ² that the first k modes leave out (log scale), with "
                   "the rank kept (truncated SVD: the best rank-r model of W in the least-squares sense).",
                   "cmdtool.report.figures:pod_spectrum_figure",
                   numbers=lambda view: {"rank": view.value("rank"), "energy": view.value("energy")}),
        FigureSpec("pod_coefficients", "POD time coefficients", "Coordinates σ_k v_k(t) of each checkpoint on the "
                   "first POD modes. The trajectories are not centred, so mode 1 carries their mean; the others "
                   "carry the motion.", "cmdtool.report.figures:pod_coefficients_figure"),
    )
    key_numbers = ("rank", "energy")
    saved_arrays = ("singular_values", "right_singular_vectors", "coefficients", "reconstruction_matrix")
    streamed_arrays = ("modes",)
    saved_attrs = ("rank", "rank_requested", "energy")

    def __init__(self, *, rank=0, epochs=None, device="auto"):
        self.rank = rank
        self.epochs = epochs
        self.device = device

    def _fit(self, store, writer, progress) -> None:
        gram = self._window_gram(store, progress)
        eigenvalues, vectors = descending_eigh(gram)                  # G = V Σ² Vᵀ
        self.singular_values_ = np.sqrt(eigenvalues)
        self.rank_requested_ = truncation_rank(self.singular_values_, store.n_rows, gram.shape[0], self.rank)
        self.rank_ = int(min(self.rank_requested_, numerical_rank(eigenvalues)))
        if self.rank_ == 0:
            raise UsageError("the trajectories in this window are all zero: nothing to decompose")
        sigma = self.singular_values_[:self.rank_]
        self.right_singular_vectors_ = vectors[:, :self.rank_]
        self.coefficients_ = self.right_singular_vectors_ * sigma[None, :]
        self.energy_ = float(np.sum(sigma**2) / np.sum(eigenvalues))
        # U_r = W V_r Σ_r⁻¹, written block by block (one pass)
        projection = RowProjection(writer, "modes", self.right_singular_vectors_ / sigma[None, :])
        stats = stream(store, [projection], self.window_, self.device, progress, "pod pass")
        self.timings_["pass_seconds"] = stats.seconds
        self.reconstruction_matrix_ = self.right_singular_vectors_ @ self.right_singular_vectors_.T
        self.metrics_ = self._linear_metrics(gram, pod_stored_floats(self.rank_, store.n_rows, gram.shape[0]))

    def _loaded(self, result) -> None:
        self.rank_, self.rank_requested_ = int(self.rank_), int(self.rank_requested_)

    def _reconstruct(self, store, columns, steps, progress=None, rows: slice | None = None) -> np.ndarray:
        """Several modelled checkpoints U_r C[t]: the saved modes are read once (one pass over W before saving)."""
        if not self._reconstructs_rows():
            return super()._reconstruct(store, columns, steps, progress, rows=rows)
        return factor_model([(self.modes_, self.coefficients_[steps].T)], rows=rows)

    def _reconstructs_rows(self, **options) -> bool:
        return self.result_ is not None

    @classmethod
    def options_for_budget(cls, budget_floats: int, n_rows: int, n_cols: int) -> dict:
        """The largest rank whose stored model (r·(N + T) floats) fits ``budget_floats`` (at least 1)."""
        return {"rank": max(1, min(int(budget_floats // (n_rows + n_cols)), n_cols))}

    # ------------------------------------------------------------------ summaries
    def summary(self) -> dict:
        out = super().summary()
        errors = self.metrics_["epoch_relative_error"]
        out.update(rank=self.rank_, rank_requested=self.rank_requested_, energy=self.energy_,
                   final_epoch_error=errors[-1], worst_epoch_error=max(errors),
                   singular_values=[float(x) for x in self.singular_values_[:self.rank_]])
        return out

    # ------------------------------------------------------------------ report and export
    @classmethod
    def headline(cls, view) -> dict:
        return {"rank": view.value("rank"), "energy": view.value("energy")}

    @classmethod
    def csv_tables(cls, result, store) -> dict:
        tables = super().csv_tables(result, store)
        sigma = result["singular_values"]
        energy = np.cumsum(sigma**2) / np.sum(sigma**2)
        tables["singular_values"] = (["k", "singular_value", "cumulative_energy"],
                                     [(k + 1, s, e) for k, (s, e) in enumerate(zip(sigma, energy))])
        coefficients = result["coefficients"]
        labels = [int(x) for x in result.attrs.get("labels", [])]
        tables["coefficients"] = (["epoch"] + [f"mode_{k + 1}" for k in range(coefficients.shape[1])],
                                  [(label, *coefficients[t]) for t, label in enumerate(labels)])
        return tables
