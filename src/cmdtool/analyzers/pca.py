"""P-BFGS / DLDR-style PCA of the checkpoints (Li et al. 2023; paper 000 Sec. 2 and 5), from the cached Gram.

The samples are the T checkpoints of the window (rows of Wᵀ), the features the N parameters. Centring each
parameter over the window, W_c = W H with H = I − 11ᵀ/T, gives the T×T centred Gram matrix

    G_c = H G H = V Λ Vᵀ                                  (eigh, largest first)
    explained variance  Λ / (T − 1)                       (scikit-learn's convention)
    explained variance ratio  Λ / trace(G_c)
    checkpoint coordinates  V Λ^½            (T×d: sklearn's ``transform`` of the checkpoints)
    directions in parameter space  W_c V Λ^−½  (N×d: sklearn's ``components_``ᵀ; the P-BFGS subspace)

Only the directions and the per-parameter means need a pass (one, streamed into the stored result). The rank-d
model ŵ_t = mean + directions · coordinates_t is W K with K = 11ᵀ/T + V_d V_dᵀ (eigenvectors of G_c with
non-zero eigenvalue are orthogonal to 1), so its error per epoch also comes from G.

``dims`` = 0 (the default) keeps the directions whose singular value σ_k = √λ_k of the centred data passes the
Gavish & Donoho (2014) optimal hard threshold for an unknown noise level, σ_k > ω(β)·median(σ) (the rule POD and
DMD apply by default), capped at 40 (the number P-BFGS uses): a model that compresses, never the data itself. An
explicit ``dims`` is capped at T − 1 (centred data of T samples has at most that rank) and at the numerical rank
of G_c (squared singular values below roundoff are dropped; see docs/pca.md); reaching T − 1 reproduces every
checkpoint, which the summary warns about.
"""

from __future__ import annotations

import numpy as np

from ..errors import UsageError
from .base import FigureSpec, Reconstruction
from .linear_models import (GramModel, RowProjection, descending_eigh, factor_model, numerical_rank,
                            optimal_hard_threshold_rank)
from .params import DEVICE, EPOCHS, Param
from ..passes.local import stream


def pca_stored_floats(dims: int, n_rows: int, n_cols: int) -> int:
    """Directions (N·d), means (N) and coordinates (T·d)."""
    return int(dims * n_rows + n_rows + dims * n_cols)


AUTO_DIMS_CAP = 40  # P-BFGS's number of directions (paper 000 Sec. 5): the most the default rule keeps
DIMS = Param("dims", 0, "Principal directions kept: 0 for the Gavish-Donoho optimal hard threshold on the "
             f"singular values of the centred checkpoints, at most {AUTO_DIMS_CAP} (P-BFGS's number); or a number "
             "d, capped at T − 1 (which reproduces every checkpoint) and the numerical rank.",
             kind=int, minimum=0, size=True)
PCA_MISSING = "PCA figures skipped"


class PCA(GramModel):
    """Top-``dims`` principal directions of the checkpoints (P-BFGS subspace), fitted from the cached Gram.

    Attributes
    ----------
    dims_ : int
        Directions kept (``dims`` capped at T − 1 and at the numerical rank of G_c).
    explained_variance_, explained_variance_ratio_ : ndarray (d,)
        Λ / (T − 1) and Λ / trace(G_c) of the kept directions (scikit-learn's conventions).
    singular_values_ : ndarray (T,)
        Singular values of the centred data, all of them.
    coordinates_ : ndarray (T, d)
        Each checkpoint's coordinates V Λ^½ (scikit-learn's ``transform``).
    time_vectors_ : ndarray (T, d)
        V_d, eigenvectors of G_c.
    reconstruction_matrix_ : ndarray (T, T)
        K = 11ᵀ/T + V_d V_dᵀ with W_rec = W K.
    directions_ : zarr array (N, d) float32
        The P-BFGS subspace W_c V Λ^−½ (lazy; column k is direction k).
    means_ : zarr array (N,) float32
        Each parameter's mean over the window (lazy).
    gram_from_cache_, nonfinite_rows_, metrics_, timings_, window_, labels_, store_, result_, name_ :
        As :class:`~cmdtool.analyzers.dmd.DMD`.
    """

    method = "pca"
    title = "PCA"
    params = (DIMS, EPOCHS, DEVICE)
    reconstructions = (Reconstruction("pca", "PCA"),)
    figures = (
        FigureSpec("pca_variance", "PCA explained variance",
                   "Explained-variance ratio of each principal direction of the checkpoints (P-BFGS / DLDR "
                   "subspace) and the cumulative ratio.", "cmdtool.report.figures:pca_variance_figure",
                   numbers=lambda view: {"directions": view.value("dims"),
                                         "first": float(view.small("explained_variance_ratio")[0]),
                                         "total": float(view.small("explained_variance_ratio").sum())},
                   missing_note=PCA_MISSING),
        FigureSpec("pca_path", "Checkpoints in the first two PCA coordinates",
                   "Each checkpoint's coordinates on the first two principal directions (weight units), coloured "
                   "by epoch: the training path.", "cmdtool.report.figures:pca_path_figure",
                   numbers=lambda view: {"PC1 + PC2 share": float(view.small("explained_variance_ratio")[:2].sum())},
                   missing_note=PCA_MISSING),
    )
    key_numbers = ("dims", "explained_variance_ratio_total")
    saved_arrays = ("explained_variance", "explained_variance_ratio", "singular_values", "coordinates",
                    "time_vectors", "reconstruction_matrix")
    streamed_arrays = ("directions", "means")
    saved_attrs = ("dims",)

    def __init__(self, *, dims=0, epochs=None, device="auto"):
        self.dims = dims
        self.epochs = epochs
        self.device = device

    def _fit(self, store, writer, progress) -> None:
        gram = self._window_gram(store, progress)
        n_cols = gram.shape[0]
        centring = np.eye(n_cols) - 1.0 / n_cols
        centred_gram = centring @ gram @ centring
        eigenvalues, vectors = descending_eigh(centred_gram)
        self.dims_ = int(min(self._requested_dims(eigenvalues, store.n_rows), n_cols - 1,
                             numerical_rank(eigenvalues)))
        if self.dims_ == 0:
            raise UsageError("the trajectories do not move in this window: no principal direction")
        lam = eigenvalues[:self.dims_]
        self.time_vectors_ = vectors[:, :self.dims_]
        self.singular_values_ = np.sqrt(eigenvalues)
        self.explained_variance_ = lam / (n_cols - 1)
        self.explained_variance_ratio_ = lam / eigenvalues.sum()
        self.coordinates_ = self.time_vectors_ * np.sqrt(lam)[None, :]
        # directions = W_c V Λ^-½, written block by block together with the means (one pass)
        projection = RowProjection(writer, "directions", self.time_vectors_ / np.sqrt(lam)[None, :], centre=True)
        stats = stream(store, [projection], self.window_, self.device, progress, "pca pass")
        self.timings_["pass_seconds"] = stats.seconds
        # K = 11ᵀ/T + V_d V_dᵀ: the mean plus the projection on the kept directions
        self.reconstruction_matrix_ = (np.full((n_cols, n_cols), 1.0 / n_cols)
                                       + self.time_vectors_ @ self.time_vectors_.T)
        self.metrics_ = self._linear_metrics(gram, pca_stored_floats(self.dims_, store.n_rows, n_cols))

    def _requested_dims(self, eigenvalues: np.ndarray, n_rows: int) -> int:
        """``dims``, or for 0 the Gavish-Donoho rank of the centred singular values (their T − 1 non-trivial
        ones: centring removes one), at most :data:`AUTO_DIMS_CAP`."""
        if int(self.dims) > 0:
            return int(self.dims)
        n_cols = len(eigenvalues)
        sigma = np.sqrt(np.clip(eigenvalues[:max(n_cols - 1, 1)], 0.0, None))
        return min(optimal_hard_threshold_rank(sigma, n_rows, n_cols), AUTO_DIMS_CAP)

    def _loaded(self, result) -> None:
        self.dims_ = int(self.dims_)

    def reproduces_the_data(self) -> bool:
        """True when the kept directions span every centred checkpoint of the window (d = T − 1): the model is
        the data itself (exact up to roundoff), not a compression of it."""
        return self.dims_ >= len(self.coordinates_) - 1

    # ------------------------------------------------------------------ use
    def _reconstruct(self, store, columns, steps, progress=None, rows: slice | None = None) -> np.ndarray:
        """Several modelled checkpoints, mean + directions · coordinates_t: the directions are read once."""
        if not self._reconstructs_rows():
            return super()._reconstruct(store, columns, steps, progress, rows=rows)
        return factor_model([(self.directions_, self.coordinates_[steps].T)], self.means_, rows=rows)  # d × k

    def _reconstructs_rows(self, **options) -> bool:
        return self.result_ is not None

    @classmethod
    def options_for_budget(cls, budget_floats: int, n_rows: int, n_cols: int) -> dict:
        """The most directions whose stored model (N·d + N + T·d floats) fits ``budget_floats`` (at least 1)."""
        dims = max(1, min(int((budget_floats - n_rows) // (n_rows + n_cols)), n_cols - 1))
        return {"dims": dims}

    # ------------------------------------------------------------------ summaries
    def summary(self) -> dict:
        out = super().summary()
        m = self.metrics_
        out.update(dims=self.dims_, explained_variance_ratio_total=float(np.sum(self.explained_variance_ratio_)),
                   final_epoch_error=m["epoch_relative_error"][-1], worst_epoch_error=max(m["epoch_relative_error"]),
                   explained_variance_ratio=[float(x) for x in self.explained_variance_ratio_])
        return out

    # ------------------------------------------------------------------ report and export
    @classmethod
    def headline(cls, view) -> dict:
        ratio = view.small("explained_variance_ratio")
        return {"dims": view.value("dims"), "explained_variance_ratio_first": [float(x) for x in ratio[:3]],
                "explained_variance_ratio_total": float(ratio.sum())}

    @classmethod
    def csv_tables(cls, result, store) -> dict:
        tables = super().csv_tables(result, store)
        labels = [int(x) for x in result.attrs.get("labels", [])]
        variance, ratio = result["explained_variance"], result["explained_variance_ratio"]
        tables["explained_variance"] = (["k", "explained_variance", "explained_variance_ratio", "cumulative_ratio"],
                                        [(k + 1, v, r, c) for k, (v, r, c) in
                                         enumerate(zip(variance, ratio, np.cumsum(ratio)))])
        coordinates = result["coordinates"]
        tables["coordinates"] = (["epoch"] + [f"pc_{k + 1}" for k in range(coordinates.shape[1])],
                                 [(label, *coordinates[t]) for t, label in enumerate(labels)])
        return tables
