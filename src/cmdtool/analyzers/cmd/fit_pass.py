"""CMD's fit pass (paper 000 Alg. 2 Steps 2-3, and Alg. 3 for online CMD): one streaming pass over the store
that assigns, fits and measures every row block, streaming mode/A/B and the per-row error into the staged result.

On the CPU the pass is numpy (no torch is imported), on a GPU torch: one code for both, written with
:mod:`cmdtool.passes.host_float64`'s functions, which do the same on either kind of array. torch is imported where
a GPU pass runs, not with the module (the registry imports every analyzer module).
"""

from __future__ import annotations

import numpy as np

from .math import (MODE_KEPT, MODE_NONFINITE, ReferenceSet, affine_from_sums, centre_rows_, closed_form_fit,
                       correlate, fit_block, pin_reference_rows)
from ...passes.host_float64 import (arange, bincount, clamp_min, float32_numpy, float32_rounded, is_numpy, like,
                                    matmul, square_, to_float64_, to_numpy, where, zeros)
from ...passes.contract import Accumulator, add_reductions
from ...utils.device import computes_in_numpy


class LayerIndex:
    """Layer id (index into the layout's trajectory entries) of the rows of any block, without an N-array."""

    def __init__(self, layout, modelled):
        entries = layout.trajectory_entries
        self.starts = np.array([e.offset for e in entries], dtype=np.int64)
        names = {e.name for e in modelled}
        self.modelled = np.array([e.name in names for e in entries], dtype=bool)
        self.n_layers = len(entries)

    def of(self, start: int, stop: int) -> np.ndarray:
        return np.searchsorted(self.starts, np.arange(start, stop), side="right") - 1


class FitPass(Accumulator):
    """Pass 2: Steps 2-3 for every row block, streaming mode/A/B/errors, reducing the metrics' sums.

    Reductions (float64 sums per epoch, per layer and per mode, and row counts) add up across partials
    (:meth:`merge`); mode/A/B/row error (and online CMD's mode/A/B) are written to the block's rows."""

    client_only = ("writer",)
    # the fit makes dozens of small array calls per 2048-row chunk, which hold the interpreter lock between them:
    # blocks in two threads would contend for the lock rather than compute side by side
    side_by_side = False
    REDUCTIONS = ("column_sq_error", "column_sq_norm", "sq_motion", "layer_sq_error", "layer_sq_norm",
                  "layer_sq_motion", "layer_mode_counts", "kept_rows", "constant_rows", "nonfinite_rows")
    ONLINE_REDUCTIONS = ("online_column_sq_error", "online_mode_counts")

    def __init__(self, writer, layout, modelled, reference_indices, reference_trajectories, online):
        self.writer = writer
        self.layers = LayerIndex(layout, modelled)
        self.reference_indices = np.asarray(reference_indices, dtype=np.int64)
        self.reference_trajectories = reference_trajectories
        self.online = online  # (reference indices, reference trajectories, F) or None
        self.n_modes = len(self.reference_indices)

    def start(self, ctx):
        n, n_cols = ctx.n_rows, ctx.n_cols
        device = None if computes_in_numpy(ctx.device) else ctx.device  # None: numpy arrays (ReferenceSet)
        self.device = device
        chunks = ctx.output_chunks()
        mode_dtype = np.int16 if self.n_modes < 2**15 else np.int32
        self.out_mode = self.writer.create("mode", (n,), mode_dtype, chunks=chunks)
        self.out_a = self.writer.create("A", (n,), np.float32, chunks=chunks)
        self.out_b = self.writer.create("B", (n,), np.float32, chunks=chunks)
        self.out_row_error = self.writer.create("row_sq_error", (n,), np.float32, chunks=chunks)
        self.refs = ReferenceSet(self.reference_trajectories, device)
        kind = self.refs.values  # the pass's kind of array (numpy, or torch on the device), for new arrays
        self.layer_modelled = like(self.layers.modelled, kind)
        self.column_sq_error = zeros(n_cols, kind)
        self.column_sq_norm = zeros(n_cols, kind)
        self.sq_motion = zeros((), kind)
        n_layers = self.layers.n_layers
        self.layer_sq_error = zeros(n_layers, kind)
        self.layer_sq_norm = zeros(n_layers, kind)
        self.layer_sq_motion = zeros(n_layers, kind)
        self.layer_mode_counts = zeros(n_layers * self.n_modes, kind, "int64")
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
            self.online_column_sq_error = zeros(n_cols, kind)
            self.online_mode_counts = zeros(self.online_modes, kind, "int64")
            # per-mode cumulative sums of the shifted references (Eq. 10), shared by every block
            shifted = self.online_refs.values - self.online_refs.values[:, :1]
            self.online_ref_cum = shifted.cumsum(1)
            self.online_ref_cum_sq = (shifted * shifted).cumsum(1)
            self.online_ref_shifted = shifted

    def merge(self, other):
        add_reductions(self, other, self.REDUCTIONS + (self.ONLINE_REDUCTIONS if self.online is not None else ()))

    def update(self, block):
        """Steps 2-3 on the block, one cache-sized float64 row chunk at a time on the CPU (numpy conversion and
        products, :mod:`~cmdtool.passes.host_float64`), the whole block at once on CUDA.

        A chunk does what needs its values: centring, the correlations, the fit and the two products whose sums
        the per-epoch errors need. Everything else (the per-row outputs, the sums by layer and by mode, the row
        counts) is done once per block on block-long vectors: per 2048-row chunk, those dozens of small calls
        would cost about as much as the chunk's products."""
        n_cols = block.values.shape[1]
        kind = self.refs.values
        layer = like(self.layers.of(block.start, block.stop), kind)
        modelled = self.layer_modelled[layer] & block.finite
        fitted = _FittedRows(block.rows, self.n_modes, n_cols, kind)
        outputs = {name: np.empty(block.rows, dtype=array.dtype) for name, array in self._row_outputs().items()}
        if block.on_cpu:
            for r0, r1, x in block.float64_chunks():
                self._fit_rows(block.start + r0, x, modelled[r0:r1], block.finite[r0:r1], fitted, slice(r0, r1),
                               outputs)
        else:
            import torch

            device = block.values.device
            x = to_float64_(self._scratch("centred", block.values.shape, torch.float64, device), block.values)
            self._fit_rows(block.start, x, modelled, block.finite, fitted, slice(0, block.rows), outputs)
        self._add_block(layer, modelled, block.finite, fitted, n_cols, outputs)
        for name, array in self._row_outputs().items():
            array[block.start:block.stop] = outputs[name]

    def _row_outputs(self) -> dict:
        """The staged per-row output arrays, by name."""
        names = ["mode", "a", "b", "row_error"] + (["online_mode", "online_a", "online_b"] if self.online else [])
        return {name: getattr(self, "out_" + name) for name in names}

    def _fit_rows(self, start, x, modelled, finite, fitted: "_FittedRows", rows: slice, outputs):
        """Steps 2-3 on rows ``start:start+len(x)`` given as float64 ``x`` (centred in place here, then squared):
        their per-row results go to ``fitted``'s rows ``rows``, the products over them are added to its sums."""
        stop = start + x.shape[0]
        n_cols = x.shape[1]
        refs = self.refs
        # Step 2 (Eq. 5) and Step 3 (Eq. 6) in closed form; x holds w − w̄ from here on
        mean, motion = centre_rows_(x)
        corr, cross = correlate(x, motion, refs)
        mode = corr.argmax(1)
        pin_reference_rows(self.reference_indices, start, stop, mode=mode)
        a, b, s_wr = closed_form_fit(mode, cross, mean, motion, refs)
        pin_reference_rows(self.reference_indices, start, stop, a=a, b=b)
        # the stored model is float32: every error below is that of exactly the stored model
        a = float32_rounded(where(modelled, a, 0.0))
        b = float32_rounded(where(modelled, b, 0.0))
        # residual e_it = (w_it − w̄_i) − a_i (r_t − r̄) + δ_i with δ_i = w̄_i − a_i r̄ − b_i (float32 rounding);
        # its sums follow from sums the block already gave, so no N x T residual is ever formed:
        #   per row    Σ_t e² = S_ww − 2 a S_wr + a² S_rr + T δ²        (Σ_t (w−w̄) = Σ_t (r−r̄) = 0)
        #   per epoch  Σ_i e² = Σ_i (w−w̄)² − 2 Σ_m (r_m−r̄_m) P_m + ... with P_m = Σ_{i in m} a_i (w_i−w̄_i)
        delta = where(modelled, mean - a * refs.mean[mode] - b, 0.0)
        fitted.row_sq_error[rows] = where(
            modelled, clamp_min(motion - 2 * a * s_wr + a * a * refs.sq_norm[mode], 0) + n_cols * delta * delta,
            0.0)
        weights = zeros((self.n_modes + 4, x.shape[0]), x)
        if is_numpy(weights):
            weights[mode, np.arange(len(mode))] = a
        else:
            weights.scatter_(0, mode[None, :], a[None, :])
        weights[self.n_modes] = delta
        weights[self.n_modes + 1] = mean  # rows with NaN/Inf arrive zeroed: their mean is 0
        # (M+2, T): P_m, Σ δ_i (w_i−w̄_i), Σ w̄_i (w_i−w̄_i)
        fitted.products[:self.n_modes + 2] += matmul(weights[:self.n_modes + 2], x)
        if self.online is not None:
            self._update_online(start, stop, x, mean, modelled, finite, outputs, rows)
        square_(x)
        weights[self.n_modes + 2] = modelled
        weights[self.n_modes + 3] = finite
        # (2, T): Σ (w−w̄)² over modelled rows, and over all finite rows
        fitted.products[self.n_modes + 2:] += matmul(weights[self.n_modes + 2:], x)
        fitted.mode[rows], fitted.a[rows], fitted.b[rows] = mode, a, b
        fitted.delta[rows], fitted.mean[rows], fitted.motion[rows] = delta, mean, motion

    def _add_block(self, layer, modelled, finite, fitted: "_FittedRows", n_cols: int, outputs) -> None:
        """A block's reductions and per-row outputs from its fitted rows (block-long vectors)."""
        refs, n_modes, n_layers = self.refs, self.n_modes, self.layers.n_layers
        mode, a, b, delta, mean, motion = fitted.mode, fitted.a, fitted.b, fitted.delta, fitted.mean, fitted.motion
        projections, squares = fitted.products[:n_modes + 2], fitted.products[n_modes + 2:]
        centred_refs = refs.centred
        # sums by mode and by layer as weighted bincounts, which cost a fraction of index_add_ on the CPU
        sum_a_sq = bincount(mode, weights=a * a, minlength=n_modes)
        sum_a_delta = bincount(mode, weights=a * delta, minlength=n_modes)
        column_sq_error = (squares[0] - 2 * (centred_refs * projections[:n_modes]).sum(0)
                           + (sum_a_sq[:, None] * centred_refs * centred_refs).sum(0)
                           + 2 * projections[n_modes]
                           - 2 * (sum_a_delta[:, None] * centred_refs).sum(0)
                           + (delta * delta).sum())
        self.column_sq_error += clamp_min(column_sq_error, 0)
        self.column_sq_norm += squares[1] + 2 * projections[n_modes + 1] + (mean * mean).sum()
        self.sq_motion += motion.sum()
        row_sq_norm = motion + n_cols * mean * mean
        self.layer_sq_error += bincount(layer, weights=fitted.row_sq_error, minlength=n_layers)
        self.layer_sq_norm += bincount(layer, weights=row_sq_norm, minlength=n_layers)
        self.layer_sq_motion += bincount(layer, weights=motion, minlength=n_layers)
        self.layer_mode_counts += bincount((layer * n_modes + mode)[modelled], minlength=len(self.layer_mode_counts))
        kept_code = where(finite, MODE_KEPT, MODE_NONFINITE)
        self.kept_rows += int((finite & ~modelled).sum())
        self.nonfinite_rows += int((~finite).sum())
        self.constant_rows += int((modelled & (motion == 0)).sum())
        outputs["mode"][:] = to_numpy(where(modelled, mode, kept_code))
        outputs["a"][:] = float32_numpy(a)
        outputs["b"][:] = float32_numpy(b)
        outputs["row_error"][:] = float32_numpy(fitted.row_sq_error)

    def _update_online(self, start, stop, centred, mean, modelled, finite, outputs, rows):
        """Online CMD on the same rows: assignment from the first F epochs (Step 2 at the end of the warm-up),
        then the coefficients after every epoch t >= F as the recursion of Eqs. 8-10 leaves them, i.e. the
        least-squares fit over epochs 1..t (cumulative sums along the block's columns).

        ``centred`` holds w − w̄ (w̄ over the whole window); the fit is shift-invariant, so it runs on these
        values and w̄ is added back to b at the end.
        """
        F = self.warmup
        mode, _, _, _ = fit_block(centred[:, :F], self.online_warm_refs)
        pin_reference_rows(self.online_indices, start, stop, mode=mode)
        shift = centred[:, :1]
        u = centred - shift
        v = self.online_ref_shifted[mode]
        count = arange(1, centred.shape[1] + 1, centred)
        a_t, b_t = affine_from_sums(count, u.cumsum(1), (u * v).cumsum(1), self.online_ref_cum[mode],
                                    self.online_ref_cum_sq[mode], shift, self.online_refs.values[mode, :1])
        pin_reference_rows(self.online_indices, start, stop, a=a_t, b=b_t, offset=mean)  # b = 0 in raw units
        residual = centred - (a_t * self.online_refs.values[mode] + b_t)
        # epochs before F are the original weights (the warm-up is plain training): no error there
        in_model = modelled[:, None] & (count >= F)[None, :]
        residual = where(in_model, residual, 0.0)
        self.online_column_sq_error += (residual * residual).sum(0)
        self.online_mode_counts += bincount(mode[modelled], minlength=self.online_modes)
        kept_code = where(finite, MODE_KEPT, MODE_NONFINITE)
        outputs["online_mode"][rows] = to_numpy(where(modelled, mode, kept_code))
        outputs["online_a"][rows] = float32_numpy(where(modelled, a_t[:, -1], 0.0))
        outputs["online_b"][rows] = float32_numpy(where(modelled, b_t[:, -1] + mean, 0.0))

    def finish(self):
        to_np = to_numpy
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


class _FittedRows:
    """Per-row results of one block's fit (block-long float64 vectors; mode int64) and the sums of its products
    ((M+4, T): P_m, Σ δ (w−w̄), Σ w̄ (w−w̄), Σ (w−w̄)² over modelled and over finite rows), filled chunk by chunk."""

    __slots__ = ("mode", "a", "b", "delta", "mean", "motion", "row_sq_error", "products")

    def __init__(self, rows: int, n_modes: int, n_cols: int, kind):
        """``kind``: an array of the pass's kind (numpy, or torch on the device)."""
        self.mode = zeros(rows, kind, "int64")
        self.a, self.b, self.delta = (zeros(rows, kind) for _ in range(3))
        self.mean, self.motion, self.row_sq_error = (zeros(rows, kind) for _ in range(3))
        self.products = zeros((n_modes + 4, n_cols), kind)
