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

``dims`` defaults to 40 (P-BFGS) and is capped at T − 1 (centred data of T samples has at most that rank) and at
the numerical rank of G_c (squared singular values below roundoff are dropped; see docs/pca.md).
"""

from __future__ import annotations

import numpy as np

from ..errors import UsageError
from .linear_models import GramModel, RowProjection, descending_eigh, numerical_rank
from .passes import stream


def pca_stored_floats(dims: int, n_rows: int, n_cols: int) -> int:
    """Directions (N·d), means (N) and coordinates (T·d)."""
    return int(dims * n_rows + n_rows + dims * n_cols)


class PCA(GramModel):
    """Top-``dims`` principal directions of the checkpoints (P-BFGS subspace), fitted from the cached Gram.

    Parameters
    ----------
    dims : int
        Directions kept (default 40, as P-BFGS); capped at T − 1 and the numerical rank.
    epochs : str or None
        Epoch window ``A:B`` (labels, inclusive).
    device : str
        Where the pass computes (auto, cpu, cuda).

    Learned state: ``dims_``, ``explained_variance_``, ``explained_variance_ratio_``, ``singular_values_``
    (of the centred data, all T), ``coordinates_`` (T×d), ``time_vectors_`` (V_d, T×d),
    ``reconstruction_matrix_`` (K), ``metrics_``; ``directions_`` (N×d float32) and ``means_`` (N float32) as lazy
    zarr arrays of the stored result.
    """

    method = "pca"

    def __init__(self, dims: int = 40, epochs: str | None = None, device: str = "auto"):
        self.dims = dims
        self.epochs = epochs
        self.device = device

    def fit(self, store, progress=None) -> "PCA":
        if int(self.dims) < 1:
            raise UsageError(f"--dims must be at least 1, got {self.dims}")
        writer = self._begin_fit(store)
        writer = self._require_writer("PCA directions")
        gram = self._window_gram(store, progress)
        n_cols = gram.shape[0]
        if n_cols < 2:
            raise UsageError("PCA needs at least 2 checkpoints in the window")
        centring = np.eye(n_cols) - 1.0 / n_cols
        centred_gram = centring @ gram @ centring
        eigenvalues, vectors = descending_eigh(centred_gram)
        self.dims_ = int(min(int(self.dims), n_cols - 1, numerical_rank(eigenvalues)))
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
        stats = stream(store, [projection], self.columns_, self.device, progress, "pca pass")
        self.timings_["pass_seconds"] = stats.seconds
        # K = 11ᵀ/T + V_d V_dᵀ: the mean plus the projection on the kept directions
        self.reconstruction_matrix_ = (np.full((n_cols, n_cols), 1.0 / n_cols)
                                       + self.time_vectors_ @ self.time_vectors_.T)
        self.metrics_ = self._linear_metrics(gram, pca_stored_floats(self.dims_, store.n_rows, n_cols))
        self._end_fit()
        return self

    # ------------------------------------------------------------------ persistence
    _SMALL_ARRAYS = ("explained_variance", "explained_variance_ratio", "singular_values", "coordinates",
                     "time_vectors", "reconstruction_matrix")

    def _save_arrays(self, writer) -> None:
        for key in self._SMALL_ARRAYS:
            writer.put(key, getattr(self, key + "_"))
        writer.put("epoch_relative_error", np.asarray(self.metrics_["epoch_relative_error"]))
        writer.attrs.update(dims=self.dims_)

    def _load_arrays(self, result) -> None:
        for key in self._SMALL_ARRAYS:
            setattr(self, key + "_", result[key])
        self.dims_ = int(result.attrs["dims"])

    @property
    def directions_(self):
        """The P-BFGS subspace: N×d float32 (lazy zarr array; column k is principal direction k)."""
        return self._result_array("directions")

    @property
    def means_(self):
        return self._result_array("means")

    # ------------------------------------------------------------------ use
    def reconstruct_epochs(self, store, columns, progress=None) -> np.ndarray:
        """Several modelled checkpoints, mean + directions · coordinates_t: the directions are read once."""
        if getattr(self, "result_", None) is None:
            return super().reconstruct_epochs(store, columns, progress)
        weights = self.coordinates_[[self._window_column(int(c)) for c in columns]].T   # d × k
        directions, means = self.directions_, self.means_
        out = np.empty((directions.shape[0], weights.shape[1]), dtype=np.float32)
        step = max(1, (32 * 1024**2) // (8 * max(self.dims_, weights.shape[1], 1)))
        for r0 in range(0, out.shape[0], step):
            rows = slice(r0, min(r0 + step, out.shape[0]))
            out[rows] = means[rows].astype(np.float64)[:, None] + directions[rows].astype(np.float64) @ weights
        return out

    @classmethod
    def options_for_budget(cls, budget_floats: int, n_rows: int, n_cols: int) -> dict:
        """The most directions whose stored model (N·d + N + T·d floats) fits ``budget_floats`` (at least 1)."""
        dims = max(1, min(int((budget_floats - n_rows) // (n_rows + n_cols)), n_cols - 1))
        return {"dims": dims}

    def summary(self) -> dict:
        out = super().summary()
        m = self.metrics_
        out.update(dims=self.dims_, explained_variance_ratio_total=float(np.sum(self.explained_variance_ratio_)),
                   final_epoch_error=m["epoch_relative_error"][-1], worst_epoch_error=max(m["epoch_relative_error"]),
                   explained_variance_ratio=[float(x) for x in self.explained_variance_ratio_])
        return out

    def render_summary(self, console) -> None:
        from rich.table import Table

        s = self.summary()
        table = Table(title=f"pca / {getattr(self, 'name_', '')}: {s['dims']} directions "
                            f"({s['explained_variance_ratio_total']:.2%} of the variance)", show_edge=False)
        table.add_column("direction", justify="right")
        table.add_column("explained variance", justify="right")
        table.add_column("ratio", justify="right")
        table.add_column("cumulative", justify="right")
        cumulative = np.cumsum(self.explained_variance_ratio_)
        for k in range(min(self.dims_, 12)):
            table.add_row(str(k + 1), f"{self.explained_variance_[k]:.4g}",
                          f"{self.explained_variance_ratio_[k]:.2%}", f"{cumulative[k]:.2%}")
        console.print(table)
        console.print(f"relative error {s['relative_error']:.4g} (to motion {s['relative_error_motion']:.4g}), "
                      f"final epoch {s['final_epoch_error']:.4g}, worst epoch {s['worst_epoch_error']:.4g}; "
                      f"stored floats {s['stored_floats']:,}; {s['fit_seconds']:.2f} s", highlight=False)
