"""CMD — Correlation Mode Decomposition over a trajectory store (paper 000, Sec. 3.2-3.3, Alg. 1-3).

Two passes over W, whatever N is:

1. **Sampling pass.** K rows are gathered (App. C.2 sampling). The pass is the one that computes the store's
   Gram matrix (``gram_matrix(store, extra=[RowGather])``), so DMD/KGA/PCA later reuse it for free; when the
   Gram matrix is cached already, only the chunk rows holding sampled rows are read. Clustering the sample
   (complete linkage on ``pdist(C1)``, Eq. 4, App. C.3) gives the modes and their reference weights.
2. **Fit pass.** Row blocks on the compute device: mode = argmax |corr| with the references (Eq. 5), affine
   coefficients by least squares in closed form (Eq. 6), residuals of the reconstruction (Eq. 7) reduced to
   per-epoch, per-layer and per-row errors. Mode, A, B and the per-row error stream into the staged result.
   With ``warmup=F`` the same pass also fits online CMD (Sec. 3.3): modes, references and assignment from
   the first F columns, coefficients by the recursion of Eqs. 8-10 (in its sufficient-statistics form).

Rows that CMD does not model keep their stored values at reconstruction: BatchNorm running statistics under
``bn_stats="source"`` (mode -1; see docs/cmd.md for why this is the default) and trajectories with NaN/Inf
(mode -2, counted in the metrics).

The estimator is here; the fit pass is :mod:`~cmdtool.analyzers.cmd.fit_pass`, the reconstruction at given
epochs (post-hoc, and the online replay) :mod:`~cmdtool.analyzers.cmd.replay`, and Step 1 and the closed forms
:mod:`~cmdtool.analyzers.cmd.math`, which :class:`~cmdtool.analyzers.cmd.online.OnlineCMD` shares.
"""

from __future__ import annotations

import math
import time

import numpy as np

from ...utils.device import resolve_device
from ...errors import ParameterError, UsageError
from ..base import Analyzer, FigureSpec, Reconstruction
from .drift import assess_drift
from .math import BN_STATS_CHOICES, SAMPLING_CHOICES, check_modes_fit_sample, sample_rows, select_references
from ..params import DEVICE, EPOCHS, Param
from ...passes.local import RowGather, cached_gram, gram_matrix, stream

DEFAULT_BLOCK_BYTES = 32 * 1024**2  # float32 bytes per block of the fit pass: peak ~3x (float64 copy), ~12x online

# parameters shared with OnlineCMD (one declaration, one flag)
MODES = Param("modes", 10, "Number of CMD modes M (clusters; the maxclust cut).", kind=int, minimum=1, size=True)
THRESHOLD = Param("threshold", None, "Cut the clustering at this distance (between rows of C1) instead of a number "
                  "of modes.", kind=float, optional=True, above=0)
SAMPLES = Param("samples", 1000, "Sampled weights K used for clustering (paper 000 App. C.2).", kind=int, minimum=2)
SAMPLING = Param("sampling", "balanced", "balanced (half per layer, half uniform; paper 000 App. C.2) or uniform.",
                 choices=SAMPLING_CHOICES)
SEED = Param("seed", 0, "Random seed of the sample.", kind=int)
BN_STATS = Param("bn_stats", "source", "BatchNorm running statistics: 'source' keeps them from the checkpoint at "
                 "reconstruction, 'model' models them like weights.", choices=BN_STATS_CHOICES)
WARMUP = Param("warmup", None, "Also fit online CMD with this many warm-up checkpoints F (paper 000 Sec. 3.3).",
               kind=int, optional=True, minimum=2)
BLOCK_BYTES = Param("block_bytes", DEFAULT_BLOCK_BYTES, "float32 bytes of W per block of the fit pass (memory bound: "
                    "peak about 3x this, 12x with warmup).", kind=int, minimum=1)

CMD_MISSING = "CMD figures skipped (correlation matrix, modes, reconstructions, modes per layer)"


def modelled_entries(layout, bn_stats: str):
    """Trajectory tensors CMD models: all of them, or all but the BatchNorm running stats (``source``)."""
    return [e for e in layout.trajectory_entries if bn_stats == "model" or e.kind != "buffer"]


class PosthocCMD(Analyzer):
    """Post-hoc CMD (Alg. 2) of a trajectory store, optionally with online CMD (Alg. 3, ``warmup``).

    Attributes
    ----------
    sampled_indices_ : ndarray (K',) int64
        Store rows of the sampled trajectories (App. C.2) that hold no NaN/Inf.
    correlation_ : ndarray (K', K') float32
        C1 = |corr| of the sampled trajectories (Eq. 4).
    linkage_ : ndarray (K'-1, 4)
        Complete-linkage tree of the sample (scipy format, App. C.3).
    sample_modes_ : ndarray (K',) int16
        Mode of each sampled weight in the clustering (0 = largest).
    reference_indices_ : ndarray (M,) int64
        Store rows of the reference weights.
    reference_trajectories_ : ndarray (M, T) float32
        The reference trajectories r_m over the window.
    mode_, A_, B_ : zarr arrays (N,)
        Mode of every weight (Eq. 5; -1 kept as stored, -2 NaN/Inf), a_i and b_i (Eq. 6); lazy.
    row_sq_error_ : zarr array (N,) float32
        Σ_t (w_i − ŵ_i)² of every weight (lazy).
    layer_mode_counts_ : ndarray (tensors, M) int64
        Weights of each trajectory tensor in each mode (Fig. 10b).
    online_sample_modes_, online_reference_indices_, online_reference_trajectories_ : ndarray or None
        As above for online CMD's warm-up clustering (``warmup`` given; None otherwise).
    online_mode_, online_A_, online_B_ : zarr arrays (N,) or None
        Online CMD's assignment and coefficients after the window's last epoch (Eqs. 8-10).
    metrics_ : dict
        The shared figures (see :mod:`cmdtool.analyzers.base`), mode sizes, per-layer errors, counts of kept,
        constant and NaN/Inf rows, and ``online`` with online CMD's figures.
    timings_ : dict
        Seconds of the sampling pass, the clustering, the fit pass and the whole fit.
    window_, labels_ : slice, ndarray (T,) int64
        Store columns of the fitted epoch window, and their epoch labels.
    store_, result_, name_ :
        The store fitted on, the saved result and its name (None until saved).
    """

    method = "cmd"
    title = "CMD"
    fit_command = "cmdtool decompose --modes 10"
    params = (MODES, THRESHOLD, SAMPLES, SAMPLING, SEED, WARMUP, BN_STATS, EPOCHS, DEVICE, BLOCK_BYTES)
    reconstructions = (
        Reconstruction("cmd", "CMD post-hoc", {"variant": "posthoc"}),
        Reconstruction("cmd-online", "CMD online", {"variant": "online"}, requires="has_online",
                       produce="--warmup 20"),
    )
    figures = (
        FigureSpec("cmd_correlation", "Clustered correlation matrix (CMD)",
                   lambda view: f"|corr| between the {view.metrics.get('sampled', 0):,} sampled weight trajectories "
                                f"(paper 000 Eq. 4), rows and columns ordered by mode and, inside a mode, by the "
                                f"complete-linkage dendrogram: block-diagonal by mode (paper 000 Fig. 1, 9). White "
                                f"lines separate the modes.",
                   "cmdtool.report.figures:correlation_matrix_figure",
                   numbers=lambda view: {"modes": view.metrics.get("modes"),
                                         "sampled weights": view.metrics.get("sampled")},
                   missing_note=CMD_MISSING),
        FigureSpec("cmd_modes", "Modes: reference and members (CMD)",
                   "Per mode, the reference weight's trajectory (black) and the mean ± std of the sampled weights "
                   "assigned to the mode, each trajectory min-max normalised to [0, 1] (paper 000 App. A.2; members "
                   "with a < 0 are mirrored first). corr1: mean pairwise |corr| inside the mode's sample; corr2: corr "
                   "of the members' mean with the reference (paper 000 Fig. 6).",
                   "cmdtool.report.figures:mode_trajectories_figure",
                   numbers=lambda view: {"mode sizes": view.metrics.get("mode_sizes")}, missing_note=CMD_MISSING),
        FigureSpec("cmd_reconstructions", "Weights and their CMD reconstruction",
                   "Three sampled weights per mode (solid) and their CMD model a_i r_m(t) + b_i (dashed), in weight "
                   "units (paper 000 Fig. 7).", "cmdtool.report.figures:reconstruction_examples_figure",
                   numbers=lambda view: {"relative error": view.metrics.get("relative_error"),
                                         "relative error to motion": view.metrics.get("relative_error_motion")},
                   missing_note=CMD_MISSING),
        FigureSpec("cmd_layer_modes", "Modes per layer (CMD)",
                   "Share of each tensor's weights in each mode (paper 000 Fig. 10b); grey hatched: values CMD keeps "
                   "as stored (BatchNorm running statistics under --bn-stats source).",
                   "cmdtool.report.figures:layer_modes_figure",
                   numbers=lambda view: {"kept rows": view.metrics.get("kept_rows"),
                                         "modelled rows": view.metrics.get("modelled_rows")},
                   missing_note=CMD_MISSING),
    )
    key_numbers = ("modes", "online")
    saved_arrays = ("sampled_indices", "correlation", "linkage", "sample_modes", "reference_indices",
                    "reference_trajectories", "online_sample_modes", "online_reference_indices",
                    "online_reference_trajectories", "layer_mode_counts")
    streamed_arrays = ("mode", "A", "B", "row_sq_error", "online_mode", "online_A", "online_B")

    def __init__(self, *, modes=10, threshold=None, samples=1000, sampling="balanced", seed=0, warmup=None,
                 bn_stats="source", epochs=None, device="auto", block_bytes=DEFAULT_BLOCK_BYTES):
        self.modes = modes
        self.threshold = threshold
        self.samples = samples
        self.sampling = sampling
        self.seed = seed
        self.warmup = warmup
        self.bn_stats = bn_stats
        self.epochs = epochs
        self.device = device
        self.block_bytes = block_bytes

    # ------------------------------------------------------------------ fitting
    def _check_window(self, store, window: slice) -> None:
        import scipy.cluster.hierarchy  # noqa: F401 - imported before the clock starts: timings_ time the fit

        n_cols = window.stop - window.start
        if self.warmup is not None and not int(self.warmup) <= n_cols:
            raise ParameterError("{warmup} must be between 2 and the {n} checkpoints of the window (got {value})",
                                 "warmup", n=n_cols, value=self.warmup)
        modelled = sum(e.numel for e in modelled_entries(store.layout, self.bn_stats))
        check_modes_fit_sample(self.modes, self.threshold, self.samples, modelled)

    def _fit(self, store, writer, progress) -> None:
        from .fit_pass import FitPass

        device = resolve_device(self.device)
        window = self.window_
        layout = store.layout
        modelled = modelled_entries(layout, self.bn_stats)
        sampled = sample_rows([(e.offset, e.numel) for e in modelled], int(self.samples), self.sampling,
                              int(self.seed))

        # ---- pass 1: the sample (sharing the read with the Gram matrix), then Step 1 on it
        started = time.perf_counter()
        values, finite = self._gather(store, sampled, device, progress)
        self.timings_["sampling_pass_seconds"] = time.perf_counter() - started
        started = time.perf_counter()
        cut = None if self.threshold is not None else int(self.modes)
        step = select_references(sampled, values[:, window], cut, self.threshold, finite=finite)
        self.sampled_indices_ = step.sampled_indices
        self.correlation_ = step.clustering.correlation.astype(np.float32)
        self.linkage_ = step.clustering.linkage
        self.sample_modes_ = step.clustering.labels.astype(np.int16)
        self.reference_indices_ = step.reference_indices
        self.reference_trajectories_ = step.reference_trajectories
        self.online_sample_modes_ = self.online_reference_indices_ = self.online_reference_trajectories_ = None
        online = None
        if self.warmup is not None:
            # Sec. 3.3 warm-up: Step 1 on the first F epochs only, same sample (as in App. C.5); references are
            # real weights, so their whole trajectory over the window is in the sample
            warm = select_references(sampled, values[:, window], cut, self.threshold, finite=finite,
                                     columns=slice(0, int(self.warmup)))
            self.online_sample_modes_ = warm.clustering.labels.astype(np.int16)
            self.online_reference_indices_ = warm.reference_indices
            self.online_reference_trajectories_ = warm.reference_trajectories
            online = (self.online_reference_indices_, self.online_reference_trajectories_, int(self.warmup))
        self.timings_["clustering_seconds"] = time.perf_counter() - started

        # ---- pass 2: assign, fit and measure every row (Steps 2-3)
        started = time.perf_counter()
        fit_pass = FitPass(writer, layout, modelled, self.reference_indices_, self.reference_trajectories_, online)
        stats = stream(store, [fit_pass], window, device, progress, "CMD fit pass", self.block_bytes)
        self.timings_["fit_pass_seconds"] = time.perf_counter() - started
        self.layer_mode_counts_ = fit_pass.layer_mode_counts  # (layers, M): the per-layer mode shares' counts
        self.metrics_ = self._metrics(fit_pass, layout, modelled, stats, step.n_sampled)

    @staticmethod
    def _gather(store, sampled, device, progress):
        """The sampled rows over all columns, with a finite flag per row."""
        if cached_gram(store) is not None:
            # the Gram matrix exists: read only the chunk rows that hold a sampled row
            values = store.read_rows(sampled)
            return values, np.isfinite(values).all(axis=1)
        gather = RowGather(sampled)
        gram_matrix(store, device=device, progress=progress, extra=[gather])
        return gather.values, gather.finite

    def _metrics(self, fit_pass, layout, modelled, stats, n_sampled) -> dict:
        """The shared metrics (see the base class) and CMD's own, from the sums the fit pass reduced."""

        def ratio(num, den):
            return float(math.sqrt(num / den)) if den > 0 else float("nan")

        acc = fit_pass
        n_modes = len(self.reference_indices_)
        entries = layout.trajectory_entries
        layers = {}
        for k, entry in enumerate(entries):
            counts = acc.layer_mode_counts[k]
            modelled_rows = int(counts.sum())
            layers[entry.name] = {
                "rows": entry.numel, "kind": entry.kind, "modelled": entry in modelled,
                "relative_error": ratio(acc.layer_sq_error[k], acc.layer_sq_norm[k]),
                "relative_error_motion": ratio(acc.layer_sq_error[k], acc.layer_sq_motion[k]),
                "mode_share": (counts / modelled_rows).tolist() if modelled_rows else [0.0] * n_modes,
            }
        mode_sizes = acc.layer_mode_counts.sum(axis=0)
        modelled_rows = int(mode_sizes.sum())
        n_cols = self.window_.stop - self.window_.start
        metrics = {
            "relative_error": ratio(acc.column_sq_error.sum(), acc.column_sq_norm.sum()),
            "relative_error_motion": ratio(acc.column_sq_error.sum(), acc.sq_motion),
            "epoch_relative_error": [ratio(e, n) for e, n in zip(acc.column_sq_error, acc.column_sq_norm)],
            "stored_floats": int(2 * modelled_rows + n_modes * n_cols),
            "modes": n_modes,
            "mode_sizes": mode_sizes.tolist(),
            "sample_mode_sizes": np.bincount(self.sample_modes_, minlength=n_modes).tolist(),
            "modelled_rows": modelled_rows,
            "kept_rows": int(acc.kept_rows),
            "constant_rows": int(acc.constant_rows),
            "nonfinite_rows": int(acc.nonfinite_rows),
            "sampled": int(len(self.sampled_indices_)),
            "sampled_nonfinite": int(n_sampled - len(self.sampled_indices_)),
            "layers": layers,
            "bytes_read_fit_pass": int(stats.bytes_read),
        }
        if acc.online is not None:
            online_sizes = acc.online_mode_counts
            metrics["online"] = {
                "warmup": int(self.warmup),
                "relative_error": ratio(acc.online_column_sq_error.sum(), acc.column_sq_norm.sum()),
                "relative_error_motion": ratio(acc.online_column_sq_error.sum(), acc.sq_motion),
                "epoch_relative_error": [ratio(e, n) for e, n in
                                         zip(acc.online_column_sq_error, acc.column_sq_norm)],
                "modes": len(self.online_reference_indices_),
                "mode_sizes": online_sizes.tolist(),
            }
            metrics["online"]["drift"] = self._online_drift(metrics["online"]["epoch_relative_error"])
        return metrics

    def _online_drift(self, epoch_errors: list) -> dict | None:
        """Did the online model drift from its warm-up fit? e(t) from epoch F on against e(F) (see
        :mod:`~cmdtool.analyzers.cmd.drift`); None when a column has no defined error (all-zero weights)."""
        first = int(self.warmup) - 1
        errors = epoch_errors[first:]
        if any(e is None for e in errors):
            return None
        return assess_drift(self.labels_[first:], errors).as_dict()

    # ------------------------------------------------------------------ use
    @property
    def has_online(self) -> bool:
        return getattr(self, "online_mode_", None) is not None

    def _reconstructs_rows(self, variant: str = "posthoc", **options) -> bool:
        return variant == "posthoc"   # the online variant replays a pass over the store

    def _reconstruct(self, store, columns, steps, variant: str = "posthoc", block_rows: int = 1 << 20,
                     rows: slice | None = None) -> np.ndarray:
        """The modelled N-vectors w_i(t) = a_i r_{mode_i}(t) + b_i (Eq. 7) of several checkpoints, (N, k) float32.

        Post-hoc: the per-row outputs (mode, A, B) are read once for all k epochs. ``variant="online"`` gives
        online CMD's model: the stored weights during the warm-up (plain training), the stored final
        coefficients at the window's last epoch, and in between the sums of Eqs. 8-10 up to each epoch, which
        one replay pass with cumulative sums gives for all of them. Rows CMD does not model (mode < 0) keep their
        stored values. Memory: the output plus one block.
        """
        from .replay import affine_model

        if variant == "posthoc":
            return affine_model(store, self.mode_, self.A_, self.B_, self.reference_trajectories_, columns, steps,
                                block_rows, rows=rows)
        if variant != "online":
            raise UsageError(f"unknown variant {variant!r}: choose posthoc or online")
        if not self.has_online:
            raise UsageError("this decomposition has no online variant: run `cmdtool decompose --modes "
                             f"{self.modes} --warmup F` first")
        last = self.window_.stop - self.window_.start - 1
        warmup_end = int(self.warmup) - 1
        out = np.empty((store.n_rows, len(columns)), dtype=np.float32)
        in_warmup = [k for k, t in enumerate(steps) if t < warmup_end]
        final = [k for k, t in enumerate(steps) if t >= warmup_end and t == last]
        replayed = [k for k, t in enumerate(steps) if warmup_end <= t < last]
        for k in in_warmup:
            out[:, k] = store.read_column(columns[k])  # warm-up epochs are plain training (paper 000 Alg. 3)
        if final:
            out[:, final] = affine_model(store, self.online_mode_, self.online_A_, self.online_B_,
                                         self.online_reference_trajectories_, [columns[k] for k in final],
                                         [steps[k] for k in final], block_rows)
        if replayed:
            out[:, replayed] = self._online_replay(store, [steps[k] for k in replayed])
        return out

    def _online_replay(self, store, steps: list[int]) -> np.ndarray:
        """Online model at several window-relative epochs: one pass over epochs 1..max(steps)."""
        from .replay import OnlineReplay

        last = max(steps)
        columns = slice(self.window_.start, self.window_.start + last + 1)
        replay = OnlineReplay(self.online_mode_, self.online_reference_indices_,
                              self.online_reference_trajectories_[:, :last + 1], steps)
        # cumulative float64 sums hold several copies of each block: read smaller blocks
        stream(store, [replay], columns, self.device, None, "online replay", max(self.block_bytes // 8, 1 << 20))
        return replay.out

    # ------------------------------------------------------------------ summaries
    def summary(self) -> dict:
        out = super().summary()
        m = self.metrics_
        out.update(modes=m["modes"], mode_sizes=m["mode_sizes"], bn_stats=self.bn_stats,
                   nonfinite_rows=m["nonfinite_rows"], kept_rows=m["kept_rows"], epochs=[int(self.labels_[0]),
                                                                                         int(self.labels_[-1])],
                   reference_weights=self.store_.layout.row_names(self.reference_indices_)
                   if getattr(self, "store_", None) is not None else None,
                   timings=self.timings_)
        if "online" in m:
            out["online"] = {k: v for k, v in m["online"].items() if k != "epoch_relative_error"}
        return out

    # ------------------------------------------------------------------ report and export
    @classmethod
    def headline(cls, view) -> dict:
        m = view.metrics
        out = {"modes": m.get("modes"), "mode_sizes": m.get("mode_sizes"), "sampled": m.get("sampled")}
        if m.get("online"):
            o = m["online"]
            out["online"] = {"warmup": o.get("warmup"), "relative_error": o.get("relative_error"),
                             "relative_error_motion": o.get("relative_error_motion"),
                             "final_epoch_error": (o.get("epoch_relative_error") or [None])[-1]}
        return out

    @classmethod
    def error_series(cls, view) -> list[dict]:
        """Post-hoc CMD's errors and, with a warm-up, online CMD's (the original weights before the end of the
        warm-up: no error to draw there)."""
        series = super().error_series(view)
        online = view.metrics.get("online")
        if series and online:
            errors = np.asarray(online["epoch_relative_error"], dtype=np.float64)
            warmup = int(online["warmup"])
            errors[:warmup - 1] = np.nan
            series.append({**series[0], "method": "cmd-online", "warmup_label": int(view.labels[warmup - 1]),
                           "label": f"{cls.reconstructions[1].label} (warm-up {warmup})", "errors": errors,
                           "relative_error": online.get("relative_error"), "stored_floats": None})
        return series

    @classmethod
    def csv_tables(cls, result, store) -> dict:
        metrics = result.metrics
        labels = [int(x) for x in result.attrs.get("labels", [])]
        tables = super().csv_tables(result, store)
        if metrics.get("online"):
            tables["epoch_errors"] = (["epoch", "relative_error", "online_relative_error"],
                                      list(zip(labels, metrics["epoch_relative_error"],
                                               metrics["online"]["epoch_relative_error"])))
        refs = result["reference_indices"]
        names = store.layout.row_names(refs)
        sample_sizes = metrics.get("sample_mode_sizes") or [None] * len(refs)
        tables["mode_sizes"] = (["mode", "weights", "sampled_weights", "reference_row", "reference_weight"],
                                [(m, size, sample_sizes[m], int(refs[m]), names[m])
                                 for m, size in enumerate(metrics["mode_sizes"])])
        modes = len(refs)
        tables["layers"] = (["tensor", "rows", "kind", "modelled", "relative_error", "relative_error_motion"]
                            + [f"share_mode_{m}" for m in range(modes)],
                            [(name, s["rows"], s["kind"], s["modelled"], s["relative_error"],
                              s["relative_error_motion"], *s["mode_share"]) for name, s in metrics["layers"].items()])
        references = result["reference_trajectories"]
        tables["reference_trajectories"] = (["epoch"] + [f"mode_{m}" for m in range(modes)],
                                            [(label, *references[:, t]) for t, label in enumerate(labels)])
        return tables
