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
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from ..device import resolve_device
from ..errors import UsageError
from ..progress import NullProgress
from .base import Analyzer
from .cmd_math import (BN_STATS_CHOICES, MODE_KEPT, MODE_NONFINITE, ReferenceSet, affine_from_sums,
                       centre_rows_, closed_form_fit, cluster_sample, correlate, fit_block, sample_rows)
from .passes import Accumulator, RowGather, cached_gram, gram_matrix, stream

DEFAULT_BLOCK_BYTES = 32 * 1024**2  # float32 bytes per block of the fit pass: peak ~3x (float64 copy), ~12x online


def modelled_entries(layout, bn_stats: str):
    """Trajectory tensors CMD models: all of them, or all but the BatchNorm running stats (``source``)."""
    return [e for e in layout.trajectory_entries if bn_stats == "model" or e.kind != "buffer"]


class PosthocCMD(Analyzer):
    """Post-hoc CMD (Alg. 2) of a trajectory store, optionally with online CMD (Alg. 3, ``warmup``).

    Parameters
    ----------
    modes : number of modes M (``maxclust`` cut); ignored when ``threshold`` is given.
    threshold : cut the complete-linkage tree at this distance (between rows of C1) instead.
    samples : K, sampled weights used for clustering (App. C.2).
    sampling : ``balanced`` (App. C.2) or ``uniform``.
    seed : seed of the sample.
    warmup : F; also fit online CMD whose modes and references come from the first F epochs of the window.
    bn_stats : ``source`` keeps BatchNorm running statistics as stored; ``model`` models them like weights.
    epochs : window ``"A:B"`` of epoch labels.
    device : ``auto`` | ``cpu`` | ``cuda[:N]`` for the row blocks.
    block_bytes : float32 bytes of W per block of the fit pass (memory bound: peak ~3x this, ~12x online).

    Fitted attributes: ``sampled_indices_``, ``correlation_`` (C1), ``linkage_``, ``sample_modes_``,
    ``reference_indices_``, ``reference_trajectories_`` (M x T), ``mode_``, ``A_``, ``B_`` and
    ``row_sq_error_`` (lazy N-long arrays), ``layer_mode_counts_``, ``metrics_``; with ``warmup`` also ``online_*`` of the same names.
    """

    method = "cmd"

    def __init__(self, modes: int = 10, threshold: float | None = None, samples: int = 1000,
                 sampling: str = "balanced", seed: int = 0, warmup: int | None = None, bn_stats: str = "source",
                 epochs: str | None = None, device: str = "auto", block_bytes: int = DEFAULT_BLOCK_BYTES):
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
    def _validate(self, store) -> None:
        if self.bn_stats not in BN_STATS_CHOICES:
            raise UsageError(f"unknown --bn-stats {self.bn_stats!r}: choose source or model")
        if self.threshold is None and int(self.modes) < 1:
            raise UsageError("--modes must be at least 1")
        if self.threshold is not None and not float(self.threshold) > 0:
            raise UsageError("--threshold must be a positive distance")
        if store.mode == "r":
            raise UsageError("CMD streams its per-weight outputs into the store: open it with mode='r+'")
        n_cols = len(range(*store.resolve_epochs(self.epochs).indices(store.n_checkpoints)))
        if n_cols < 2:
            raise UsageError("CMD needs at least two checkpoints in the epoch window")
        if self.warmup is not None and not 2 <= int(self.warmup) <= n_cols:
            raise UsageError(f"--warmup must be between 2 and the {n_cols} checkpoints of the window "
                             f"(got {self.warmup})")

    def fit(self, store, progress=None) -> "PosthocCMD":
        self._validate(store)
        progress = progress or NullProgress()
        writer = self._begin_fit(store)
        try:
            self._fit(store, writer, progress)
        except BaseException:
            writer.discard()
            self._writer = None
            raise
        self._end_fit()
        return self

    def _fit(self, store, writer, progress) -> None:
        device = resolve_device(self.device)
        window = self.columns_
        layout = store.layout
        modelled = modelled_entries(layout, self.bn_stats)
        sampled = sample_rows([(e.offset, e.numel) for e in modelled], int(self.samples), self.sampling,
                              int(self.seed))

        # ---- pass 1: the sample (sharing the read with the Gram matrix), then Step 1 on it
        started = time.perf_counter()
        values, finite = self._gather(store, sampled, device, progress)
        self.timings_["sampling_pass_seconds"] = time.perf_counter() - started
        values = values[:, window]
        # a sampled trajectory with NaN/Inf cannot be correlated: it leaves the sample (counted in metrics)
        self.sampled_indices_ = sampled[finite]
        sample_values = values[finite]
        started = time.perf_counter()
        cut = None if self.threshold is not None else int(self.modes)
        clustering = cluster_sample(sample_values, cut, self.threshold)
        self.correlation_ = clustering.correlation.astype(np.float32)
        self.linkage_ = clustering.linkage
        self.sample_modes_ = clustering.labels.astype(np.int16)
        self.reference_indices_ = self.sampled_indices_[clustering.reference_positions]
        self.reference_trajectories_ = sample_values[clustering.reference_positions].astype(np.float32)
        online = None
        if self.warmup is not None:
            # Sec. 3.3 warm-up: Step 1 on the first F epochs only, same sample (as in App. C.5)
            warm = cluster_sample(sample_values[:, :int(self.warmup)], cut, self.threshold)
            self.online_sample_modes_ = warm.labels.astype(np.int16)
            self.online_reference_indices_ = self.sampled_indices_[warm.reference_positions]
            # references are real weights: their whole trajectory over the window is in the sample
            self.online_reference_trajectories_ = sample_values[warm.reference_positions].astype(np.float32)
            online = (self.online_reference_indices_, self.online_reference_trajectories_, int(self.warmup))
        self.timings_["clustering_seconds"] = time.perf_counter() - started

        # ---- pass 2: assign, fit and measure every row (Steps 2-3)
        started = time.perf_counter()
        fit_pass = _FitPass(writer, layout, modelled, self.reference_indices_, self.reference_trajectories_,
                            online, self.block_rows(store))
        stats = stream(store, [fit_pass], window, device, progress, "CMD fit pass", self.block_bytes)
        self.timings_["fit_pass_seconds"] = time.perf_counter() - started
        self.mode_, self.A_, self.B_, self.row_sq_error_ = (writer.group[k] for k in
                                                            ("mode", "A", "B", "row_sq_error"))
        if online is not None:
            self.online_mode_, self.online_A_, self.online_B_ = (writer.group[k] for k in
                                                                 ("online_mode", "online_A", "online_B"))
        self.layer_mode_counts_ = fit_pass.layer_mode_counts  # (layers, M): the per-layer mode shares' counts
        self.metrics_ = self._metrics(fit_pass, layout, modelled, stats, len(sampled))

    def block_rows(self, store) -> int:
        n_cols = self.columns_.stop - self.columns_.start
        return min(store.default_block_rows(n_cols, self.block_bytes), max(store.n_rows, 1))

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

    def _metrics(self, fit_pass: "_FitPass", layout, modelled, stats, n_sampled) -> dict:
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
        n_cols = self.columns_.stop - self.columns_.start
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
        return metrics

    # ------------------------------------------------------------------ persistence
    _SMALL = ("sampled_indices", "correlation", "linkage", "sample_modes", "reference_indices",
              "reference_trajectories")
    _SMALL_ONLINE = ("online_sample_modes", "online_reference_indices", "online_reference_trajectories")

    def _save_arrays(self, writer) -> None:
        for key in self._SMALL + (self._SMALL_ONLINE if self.warmup is not None else ()):
            writer.put(key, getattr(self, key + "_"))
        writer.put("epoch_relative_error", np.asarray(self.metrics_["epoch_relative_error"], dtype=np.float64))
        writer.put("layer_mode_counts", self.layer_mode_counts_)

    def _load_arrays(self, result) -> None:
        for key in self._SMALL + ("layer_mode_counts",):
            setattr(self, key + "_", result[key])
        for key in ("mode", "A", "B", "row_sq_error"):
            setattr(self, key + "_", result.array(key))
        if "online_mode" in result:
            for key in self._SMALL_ONLINE:
                setattr(self, key + "_", result[key])
            for key in ("online_mode", "online_A", "online_B"):
                setattr(self, key + "_", result.array(key))

    def save(self, name: str = "default"):
        result = super().save(name)
        self._load_arrays(result)  # lazy arrays now point into the committed result
        return result

    # ------------------------------------------------------------------ use
    @property
    def has_online(self) -> bool:
        return getattr(self, "online_mode_", None) is not None

    def _check_column(self, store, column: int) -> int:
        window = self.columns_
        if not window.start <= column < window.stop:
            labels = self.labels_
            raise UsageError(f"epoch {int(store.labels[column])} is outside the window this decomposition was "
                             f"fitted on (epochs {labels[0]}..{labels[-1]}); decompose again with --epochs")
        return column - window.start

    def reconstruct_epoch(self, store, column: int, variant: str = "posthoc",
                          block_rows: int = 1 << 20) -> np.ndarray:
        """The modelled N-vector of one checkpoint (float32): w_i(t) = a_i r_{mode_i}(t) + b_i (Eq. 7).

        ``variant="online"`` gives online CMD's model at that epoch: the original weights before the end of
        the warm-up, then a_i(t) r(t) + b_i(t) with the coefficients fitted over epochs 1..t (Eq. 9). Rows
        CMD does not model (mode < 0) keep their stored values. Memory: the output plus one block.
        """
        return self.reconstruct_epochs(store, [column], variant, block_rows)[:, 0]

    def reconstruct_epochs(self, store, columns, variant: str = "posthoc",
                           block_rows: int = 1 << 20) -> np.ndarray:
        """Modelled N-vectors of several checkpoints, (N, k) float32 (see ``reconstruct_epoch``).

        Post-hoc: the per-row outputs (mode, A, B) are read once for all k epochs. Online: epochs of the
        warm-up are the stored weights; the window's last epoch uses the stored final coefficients; every
        epoch in between needs the sums of Eqs. 8-10 up to that epoch, which one replay pass with cumulative
        sums gives for all of them.
        """
        columns = [int(c) for c in columns]
        steps = [self._check_column(store, c) for c in columns]
        if variant == "posthoc":
            return self._affine_model(store, self.mode_, self.A_, self.B_, self.reference_trajectories_, columns,
                                      steps, block_rows)
        if variant != "online":
            raise UsageError(f"unknown variant {variant!r}: choose posthoc or online")
        if not self.has_online:
            raise UsageError("this decomposition has no online variant: run `cmdtool decompose --modes "
                             f"{self.modes} --warmup F` first")
        last = self.columns_.stop - self.columns_.start - 1
        warmup_end = int(self.warmup) - 1
        out = np.empty((store.n_rows, len(columns)), dtype=np.float32)
        in_warmup = [k for k, t in enumerate(steps) if t < warmup_end]
        final = [k for k, t in enumerate(steps) if t >= warmup_end and t == last]
        replayed = [k for k, t in enumerate(steps) if warmup_end <= t < last]
        for k in in_warmup:
            out[:, k] = store.read_column(columns[k])  # warm-up epochs are plain training (design.md section 4)
        if final:
            out[:, final] = self._affine_model(store, self.online_mode_, self.online_A_, self.online_B_,
                                               self.online_reference_trajectories_, [columns[k] for k in final],
                                               [steps[k] for k in final], block_rows)
        if replayed:
            out[:, replayed] = self._online_replay_steps(store, [steps[k] for k in replayed])
        return out

    @staticmethod
    def _affine_model(store, modes, A, B, reference_trajectories, columns, steps, block_rows) -> np.ndarray:
        """Eq. 7 at several epochs, (N, k) float32: a_i r_{mode_i}(t) + b_i read in row blocks; rows CMD does
        not model (mode < 0) keep their stored values."""
        reference_values = np.asarray(reference_trajectories)[:, steps].astype(np.float64)   # M × k
        first = min(columns)
        out = np.empty((store.n_rows, len(columns)), dtype=np.float32)
        for r0 in range(0, store.n_rows, block_rows):
            r1 = min(r0 + block_rows, store.n_rows)
            mode = np.asarray(modes[r0:r1]).astype(np.int64)
            value = (A[r0:r1].astype(np.float64)[:, None] * reference_values[np.maximum(mode, 0)]
                     + B[r0:r1].astype(np.float64)[:, None])
            kept = np.flatnonzero(mode < 0)
            if kept.size:
                stored = store.trajectories[r0:r1, first:max(columns) + 1]
                value[kept] = stored[kept][:, [c - first for c in columns]]
            out[r0:r1] = value
        return out

    def _online_replay_steps(self, store, steps: list[int]) -> np.ndarray:
        """Online model at several window-relative epochs: one pass over epochs 1..max(steps)."""
        last = max(steps)
        columns = slice(self.columns_.start, self.columns_.start + last + 1)
        replay = _OnlineReplayEpochs(self.online_mode_, self.online_reference_indices_,
                                     self.online_reference_trajectories_[:, :last + 1], steps)
        # cumulative float64 sums hold several copies of each block: read smaller blocks
        stream(store, [replay], columns, self.device, None, "online replay", max(self.block_bytes // 8, 1 << 20))
        return replay.out

    # ------------------------------------------------------------------ reporting
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

    def render_summary(self, console) -> None:
        from rich.table import Table

        m = self.metrics_
        names = self.store_.layout.row_names(self.reference_indices_)
        total = max(sum(m["mode_sizes"]), 1)
        table = Table(title=f"CMD, {m['modes']} modes, epochs {self.labels_[0]}..{self.labels_[-1]}",
                      show_edge=False)
        for column, justify in (("mode", "right"), ("weights", "right"), ("share", "right"),
                                ("reference weight", "left")):
            table.add_column(column, justify=justify)
        for k, (size, name) in enumerate(zip(m["mode_sizes"], names)):
            table.add_row(str(k), f"{size:,}", f"{100 * size / total:.1f}%", name)
        console.print(table)
        lines = [f"relative error ‖W−Ŵ‖/‖W‖ {m['relative_error']:.4g}, relative to motion "
                 f"‖W−Ŵ‖/‖W−mean_t W‖ {m['relative_error_motion']:.4g}, last epoch "
                 f"{m['epoch_relative_error'][-1]:.4g}"]
        if m["kept_rows"]:
            lines.append(f"{m['kept_rows']:,} BatchNorm running-stat values kept from the source (--bn-stats source)")
        if m["nonfinite_rows"]:
            lines.append(f"{m['nonfinite_rows']:,} weights with NaN/Inf were not modelled (kept as stored)")
        if "online" in m:
            o = m["online"]
            lines.append(f"online (warm-up {o['warmup']}): relative error {o['relative_error']:.4g}, "
                         f"to motion {o['relative_error_motion']:.4g}, last epoch "
                         f"{o['epoch_relative_error'][-1]:.4g}")
        lines.append(f"time {self.timings_.get('fit_seconds', float('nan')):.2f} s "
                     f"(sampling pass {self.timings_.get('sampling_pass_seconds', 0):.2f} s, clustering "
                     f"{self.timings_.get('clustering_seconds', 0):.2f} s, fit pass "
                     f"{self.timings_.get('fit_pass_seconds', 0):.2f} s)")
        for line in lines:
            console.print(line, highlight=False)


# ---------------------------------------------------------------------------------------------- the passes
class _LayerIndex:
    """Layer id (index into the layout's trajectory entries) of the rows of any block, without an N-array."""

    def __init__(self, layout, modelled):
        entries = layout.trajectory_entries
        self.starts = np.array([e.offset for e in entries], dtype=np.int64)
        names = {e.name for e in modelled}
        self.modelled = np.array([e.name in names for e in entries], dtype=bool)
        self.n_layers = len(entries)

    def of(self, start: int, stop: int) -> np.ndarray:
        return np.searchsorted(self.starts, np.arange(start, stop), side="right") - 1


class _FitPass(Accumulator):
    """Pass 2: Steps 2-3 for every row block, streaming mode/A/B/errors, reducing the metrics' sums."""

    def __init__(self, writer, layout, modelled, reference_indices, reference_trajectories, online,
                 block_rows: int):
        self.writer = writer
        self.layers = _LayerIndex(layout, modelled)
        self.reference_indices = np.asarray(reference_indices, dtype=np.int64)
        self.reference_trajectories = reference_trajectories
        self.online = online  # (reference indices, reference trajectories, F) or None
        self.block_rows = block_rows
        self.n_modes = len(self.reference_indices)

    def start(self, store, columns, device):
        n, n_cols = store.n_rows, columns.stop - columns.start
        self.device = device
        chunks = (max(1, min(self.block_rows, n)),)
        mode_dtype = np.int16 if self.n_modes < 2**15 else np.int32
        self.out_mode = self.writer.create("mode", (n,), mode_dtype, chunks=chunks)
        self.out_a = self.writer.create("A", (n,), np.float32, chunks=chunks)
        self.out_b = self.writer.create("B", (n,), np.float32, chunks=chunks)
        self.out_row_error = self.writer.create("row_sq_error", (n,), np.float32, chunks=chunks)
        self.refs = ReferenceSet(self.reference_trajectories, device)
        self.layer_modelled = torch.as_tensor(self.layers.modelled, device=device)
        f64 = dict(dtype=torch.float64, device=device)
        self.column_sq_error = torch.zeros(n_cols, **f64)
        self.column_sq_norm = torch.zeros(n_cols, **f64)
        self.sq_motion = torch.zeros((), **f64)
        n_layers = self.layers.n_layers
        self.layer_sq_error = torch.zeros(n_layers, **f64)
        self.layer_sq_norm = torch.zeros(n_layers, **f64)
        self.layer_sq_motion = torch.zeros(n_layers, **f64)
        self.layer_mode_counts = torch.zeros(n_layers * self.n_modes, dtype=torch.int64, device=device)
        self.kept_rows = self.constant_rows = self.nonfinite_rows = 0
        if self.online is not None:
            indices, trajectories, warmup = self.online
            self.online_indices = np.asarray(indices, dtype=np.int64)
            self.warmup = warmup
            self.online_refs = ReferenceSet(trajectories, device)
            self.online_warm_refs = ReferenceSet(np.asarray(trajectories)[:, :warmup], device)
            self.online_modes = len(self.online_indices)
            self.out_online_mode = self.writer.create("online_mode", (n,), mode_dtype, chunks=chunks)
            self.out_online_a = self.writer.create("online_A", (n,), np.float32, chunks=chunks)
            self.out_online_b = self.writer.create("online_B", (n,), np.float32, chunks=chunks)
            self.online_column_sq_error = torch.zeros(n_cols, **f64)
            self.online_mode_counts = torch.zeros(self.online_modes, dtype=torch.int64, device=device)
            # per-mode cumulative sums of the shifted references (Eq. 10), shared by every block
            shifted = self.online_refs.values - self.online_refs.values[:, :1]
            self.online_ref_cum = shifted.cumsum(dim=1)
            self.online_ref_cum_sq = (shifted * shifted).cumsum(dim=1)
            self.online_ref_shifted = shifted

    @staticmethod
    def _reference_rows(indices, start, stop, device):
        """(local row, own mode) of the reference weights inside rows start..stop."""
        inside = np.flatnonzero((indices >= start) & (indices < stop))
        return (torch.as_tensor(indices[inside] - start, device=device),
                torch.as_tensor(inside, dtype=torch.int64, device=device))

    def update(self, start, stop, block, finite):
        x = block.to(torch.float64)  # a copy of the block: centred in place below
        n_cols = x.shape[1]
        layer = torch.as_tensor(self.layers.of(start, stop), device=x.device)
        modelled = self.layer_modelled[layer] & finite
        refs = self.refs
        # Step 2 (Eq. 5) and Step 3 (Eq. 6) in closed form; x holds w − w̄ from here on
        mean, motion = centre_rows_(x)
        corr, cross = correlate(x, motion, refs)
        mode = corr.argmax(dim=1)
        local, own_mode = self._reference_rows(self.reference_indices, start, stop, x.device)
        mode[local] = own_mode
        a, b, s_wr = closed_form_fit(mode, cross, mean, motion, refs)
        a[local], b[local] = 1.0, 0.0  # reference rows model themselves exactly
        # the stored model is float32: every error below is that of exactly the stored model
        a = torch.where(modelled, a, 0.0).float().double()
        b = torch.where(modelled, b, 0.0).float().double()
        # residual e_it = (w_it − w̄_i) − a_i (r_t − r̄) + δ_i with δ_i = w̄_i − a_i r̄ − b_i (float32 rounding);
        # its sums follow from sums the block already gave, so no N x T residual is ever formed:
        #   per row    Σ_t e² = S_ww − 2 a S_wr + a² S_rr + T δ²        (Σ_t (w−w̄) = Σ_t (r−r̄) = 0)
        #   per epoch  Σ_i e² = Σ_i (w−w̄)² − 2 Σ_m (r_m−r̄_m) P_m + ... with P_m = Σ_{i in m} a_i (w_i−w̄_i)
        delta = torch.where(modelled, mean - a * refs.mean[mode] - b, 0.0)
        row_sq_error = torch.where(
            modelled, (motion - 2 * a * s_wr + a * a * refs.sq_norm[mode]).clamp(min=0) + n_cols * delta * delta,
            0.0)
        weights = torch.zeros((self.n_modes + 2, x.shape[0]), dtype=torch.float64, device=x.device)
        weights.scatter_(0, mode[None, :], a[None, :])
        weights[self.n_modes] = delta
        weights[self.n_modes + 1] = mean  # rows with NaN/Inf arrive zeroed: their mean is 0
        projections = weights @ x  # (M+2, T): P_m, Σ δ_i (w_i−w̄_i), Σ w̄_i (w_i−w̄_i)
        if self.online is not None:
            self._update_online(start, stop, x, mean, modelled, finite)
        x.square_()
        masks = torch.stack([modelled, finite]).to(torch.float64)
        squares = masks @ x  # (2, T): Σ (w−w̄)² over modelled rows, and over all finite rows
        centred_refs = refs.centred
        sum_a_sq = torch.zeros(self.n_modes, dtype=torch.float64, device=x.device).index_add_(0, mode, a * a)
        sum_a_delta = torch.zeros(self.n_modes, dtype=torch.float64, device=x.device).index_add_(0, mode, a * delta)
        column_sq_error = (squares[0] - 2 * (centred_refs * projections[:self.n_modes]).sum(dim=0)
                           + (sum_a_sq[:, None] * centred_refs * centred_refs).sum(dim=0)
                           + 2 * projections[self.n_modes]
                           - 2 * (sum_a_delta[:, None] * centred_refs).sum(dim=0)
                           + (delta * delta).sum())
        self.column_sq_error += column_sq_error.clamp(min=0)
        self.column_sq_norm += squares[1] + 2 * projections[self.n_modes + 1] + (mean * mean).sum()
        self.sq_motion += motion.sum()
        row_sq_norm = motion + n_cols * mean * mean
        self.layer_sq_error.index_add_(0, layer, row_sq_error)
        self.layer_sq_norm.index_add_(0, layer, row_sq_norm)
        self.layer_sq_motion.index_add_(0, layer, motion)
        self.layer_mode_counts += torch.bincount((layer * self.n_modes + mode)[modelled],
                                                 minlength=self.layer_mode_counts.numel())
        kept_code = torch.where(finite, MODE_KEPT, MODE_NONFINITE)
        self.kept_rows += int((finite & ~modelled).sum())
        self.nonfinite_rows += int((~finite).sum())
        self.constant_rows += int((modelled & (motion == 0)).sum())
        self.out_mode[start:stop] = torch.where(modelled, mode, kept_code).cpu().numpy().astype(self.out_mode.dtype)
        self.out_a[start:stop] = a.float().cpu().numpy()
        self.out_b[start:stop] = b.float().cpu().numpy()
        self.out_row_error[start:stop] = row_sq_error.float().cpu().numpy()

    def _update_online(self, start, stop, centred, mean, modelled, finite):
        """Online CMD on the same block: assignment from the first F epochs (Step 2 at the end of the warm-up),
        then the coefficients after every epoch t >= F as the recursion of Eqs. 8-10 leaves them, i.e. the
        least-squares fit over epochs 1..t (cumulative sums along the block's columns).

        ``centred`` holds w − w̄ (w̄ over the whole window); the fit is shift-invariant, so it runs on these
        values and w̄ is added back to b at the end.
        """
        F = self.warmup
        mode, _, _, _ = fit_block(centred[:, :F], self.online_warm_refs)
        local, own_mode = self._reference_rows(self.online_indices, start, stop, centred.device)
        mode[local] = own_mode
        shift = centred[:, :1]
        u = centred - shift
        v = self.online_ref_shifted[mode]
        count = torch.arange(1, centred.shape[1] + 1, dtype=torch.float64, device=centred.device)
        a_t, b_t = affine_from_sums(count, u.cumsum(dim=1), (u * v).cumsum(dim=1), self.online_ref_cum[mode],
                                    self.online_ref_cum_sq[mode], shift, self.online_refs.values[mode, :1])
        a_t[local], b_t[local] = 1.0, -mean[local, None]  # reference rows: w = 1 * r + 0 (b in raw units)
        residual = centred - (a_t * self.online_refs.values[mode] + b_t)
        # epochs before F are the original weights (the warm-up is plain training): no error there
        in_model = modelled[:, None] & (count >= F)[None, :]
        residual = torch.where(in_model, residual, 0.0)
        self.online_column_sq_error += (residual * residual).sum(dim=0)
        self.online_mode_counts += torch.bincount(mode[modelled], minlength=self.online_modes)
        kept_code = torch.where(finite, MODE_KEPT, MODE_NONFINITE)
        self.out_online_mode[start:stop] = torch.where(modelled, mode, kept_code).cpu().numpy().astype(
            self.out_online_mode.dtype)
        self.out_online_a[start:stop] = torch.where(modelled, a_t[:, -1], 0.0).float().cpu().numpy()
        self.out_online_b[start:stop] = torch.where(modelled, b_t[:, -1] + mean, 0.0).float().cpu().numpy()

    @staticmethod
    def _reference_mask(indices, start, stop, device):
        mask = torch.zeros(stop - start, dtype=torch.bool, device=device)
        inside = indices[(indices >= start) & (indices < stop)] - start
        if len(inside):
            mask[torch.as_tensor(inside, device=device)] = True
        return mask

    def finish(self):
        to_np = lambda t: t.cpu().numpy()  # noqa: E731
        self.column_sq_error = to_np(self.column_sq_error)
        self.column_sq_norm = to_np(self.column_sq_norm)
        self.sq_motion = float(self.sq_motion)
        self.layer_sq_error = to_np(self.layer_sq_error)
        self.layer_sq_norm = to_np(self.layer_sq_norm)
        self.layer_sq_motion = to_np(self.layer_sq_motion)
        self.layer_mode_counts = to_np(self.layer_mode_counts).reshape(self.layers.n_layers, self.n_modes)
        if self.online is not None:
            self.online_column_sq_error = to_np(self.online_column_sq_error)
            self.online_mode_counts = to_np(self.online_mode_counts)


class _OnlineReplayEpochs(Accumulator):
    """Online models at intermediate epochs (only the last epoch's coefficients are stored): the sums of
    Eqs. 8-10 over epochs 1..t for every requested t, as cumulative sums along each block, then Eq. 7."""

    def __init__(self, modes, reference_indices, reference_trajectories, steps):
        self.modes = modes
        self.reference_indices = np.asarray(reference_indices, dtype=np.int64)
        self.reference_trajectories = reference_trajectories
        self.steps = np.asarray(steps, dtype=np.int64)

    def start(self, store, columns, device):
        self.store = store
        self.refs = torch.as_tensor(self.reference_trajectories, dtype=torch.float64, device=device)
        self.first_column = columns.start
        self.out = np.empty((store.n_rows, len(self.steps)), dtype=np.float32)

    def update(self, start, stop, block, finite):
        x = block.to(torch.float64)
        mode = torch.as_tensor(np.asarray(self.modes[start:stop]).astype(np.int64), device=x.device)
        safe = mode.clamp(min=0)
        steps = torch.as_tensor(self.steps, device=x.device)
        refs = self.refs[safe]
        shift = x[:, :1]
        u = x - shift
        v = refs - refs[:, :1]
        count = (steps + 1).to(torch.float64)[None, :]
        a, b = affine_from_sums(count, u.cumsum(dim=1)[:, steps], (u * v).cumsum(dim=1)[:, steps],
                                v.cumsum(dim=1)[:, steps], (v * v).cumsum(dim=1)[:, steps], shift, refs[:, :1])
        is_reference = _FitPass._reference_mask(self.reference_indices, start, stop, x.device)[:, None]
        a = torch.where(is_reference, 1.0, a)
        b = torch.where(is_reference, 0.0, b)
        value = a * refs[:, steps] + b
        value = torch.where(mode[:, None] >= 0, value, x[:, steps])
        out = value.float().cpu().numpy()
        if not bool(finite.all()):
            # the pass zeroed rows holding NaN/Inf; give back their stored values at these epochs
            for r in np.flatnonzero(~finite.cpu().numpy()):
                out[r] = self.store.trajectories[start + int(r), self.first_column + self.steps]
        self.out[start:stop] = out
