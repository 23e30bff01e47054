"""Online CMD inside a training loop (paper 000, Sec. 3.3, Alg. 3): feed one state dict per epoch.

::

    online = OnlineCMD(warmup=20, modes=10)
    for epoch in range(epochs):
        train_one_epoch(model)
        online.update(model.state_dict())
    model_cmd.load_state_dict(online.state_dict())   # the online CMD model at the current epoch

Memory. During the warm-up the first F checkpoints are buffered (F x N float32, as Alg. 3 needs them for
the full CMD at epoch F). After it, O(N) only: per weight the shift w_i(1) and the running sums Σu, Σuv of the
shifted values (float64), its mode (int16) and the latest value (float32, for the rows CMD does not model);
per mode a handful of scalars and the reference trajectory. No checkpoint is kept.
"""

from __future__ import annotations

import numpy as np
import torch

from ..device import resolve_device
from ..errors import UsageError
from ..store.layout import tensor_kind
from .cmd_drift import DEFAULT_DRIFT_FACTOR, DriftMonitor, relative_epoch_error
from .cmd_math import (BN_STATS_CHOICES, MODE_KEPT, MODE_NONFINITE, ReferenceSet, affine_from_sums,
                       cluster_sample, fit_block, sample_rows)


class OnlineCMD:
    """Online CMD fed state dicts one at a time.

    Parameters as :class:`~cmdtool.analyzers.cmd.PosthocCMD` (``warmup`` is F). With the same ``samples``,
    ``sampling``, ``seed`` and tensors it samples the same weights as ``cmdtool decompose --warmup F`` on a
    store of the same checkpoints, so both give the same online model.

    After :meth:`update` has seen epoch t >= F, :meth:`coefficients` equals the batch least-squares fit of
    Eq. 6 over epochs 1..t with the assignment fixed at F (Eq. 9 is recursive least squares).

    ``drift_`` records the online model's error e(t) = ‖w(t) − ŵ(t)‖/‖w(t)‖ from epoch F on and warns
    (:class:`~cmdtool.analyzers.cmd_drift.CMDDriftWarning`) once it exceeds ``drift_factor`` x e(F).
    """

    def __init__(self, warmup: int = 20, modes: int = 10, threshold: float | None = None, samples: int = 1000,
                 sampling: str = "balanced", seed: int = 0, bn_stats: str = "source", device: str = "cpu",
                 block_rows: int = 1 << 18, drift_factor: float = DEFAULT_DRIFT_FACTOR):
        if warmup < 2:
            raise UsageError("warmup must be at least 2 epochs")
        if bn_stats not in BN_STATS_CHOICES:
            raise UsageError(f"unknown bn_stats {bn_stats!r}: choose source or model")
        self.warmup = warmup
        self.modes = modes
        self.threshold = threshold
        self.samples = samples
        self.sampling = sampling
        self.seed = seed
        self.bn_stats = bn_stats
        self.device = resolve_device(device)
        self.block_rows = block_rows
        self.epoch_ = 0
        self._latest_state: dict | None = None
        # e(t) of the online model from the warm-up on; warns past drift_factor x e(F) (see cmd_drift)
        self.drift_ = DriftMonitor(drift_factor)

    # ------------------------------------------------------------------ layout of the state dicts
    def _learn_layout(self, state: dict) -> None:
        self.entries_ = []  # (name, shape, dtype, offset, numel, modelled) of every floating tensor
        offset = 0
        for name, value in state.items():
            if not torch.is_tensor(value) or not value.is_floating_point():
                continue
            modelled = self.bn_stats == "model" or tensor_kind(name) != "buffer"
            self.entries_.append((name, tuple(value.shape), value.dtype, offset, value.numel(), modelled))
            offset += value.numel()
        if offset == 0:
            raise UsageError("the state dict holds no floating-point tensors")
        self.n_rows_ = offset
        self._modelled_mask = np.zeros(offset, dtype=bool)
        for _, _, _, start, numel, modelled in self.entries_:
            self._modelled_mask[start:start + numel] = modelled

    def _flatten(self, state: dict) -> np.ndarray:
        out = np.empty(self.n_rows_, dtype=np.float32)
        for name, shape, _, start, numel, _ in self.entries_:
            value = state[name]
            if tuple(value.shape) != shape:
                raise UsageError(f"tensor {name!r} changed shape from {shape} to {tuple(value.shape)}")
            out[start:start + numel] = value.detach().reshape(-1).to("cpu", torch.float32).numpy()
        return out

    # ------------------------------------------------------------------ feeding
    def update(self, state_dict: dict) -> "OnlineCMD":
        """Feed the state dict of the next epoch (copied; the caller may keep training the model)."""
        if self.epoch_ == 0:
            self._learn_layout(state_dict)
            self._warm = np.empty((self.n_rows_, self.warmup), dtype=np.float32)
        values = self._flatten(state_dict)
        self._latest_state = {k: v.detach().clone() if torch.is_tensor(v) and not v.is_floating_point() else None
                              for k, v in state_dict.items()}
        self._latest = values
        self.epoch_ += 1
        if self.epoch_ <= self.warmup:
            self._warm[:, self.epoch_ - 1] = values
            if self.epoch_ == self.warmup:
                self._end_warmup()
                self._record_drift()
        else:
            self._step(values)
            self._record_drift()
        return self

    def _record_drift(self) -> None:
        self.drift_.record(self.epoch_, relative_epoch_error(self._latest, self.model_vector()))

    def _end_warmup(self) -> None:
        """Alg. 3 line 2: the full CMD (Steps 1-3) on the F buffered epochs, then drop the buffer."""
        warm = self._warm
        layers = [(start, numel) for _, _, _, start, numel, modelled in self.entries_ if modelled]
        sampled = sample_rows(layers, int(self.samples), self.sampling, int(self.seed))
        sample_values = warm[sampled]
        finite = np.isfinite(sample_values).all(axis=1)
        self.sampled_indices_ = sampled[finite]
        sample_values = sample_values[finite]
        cut = None if self.threshold is not None else int(self.modes)
        clustering = cluster_sample(sample_values, cut, self.threshold)
        self.clustering_ = clustering
        self.reference_indices_ = self.sampled_indices_[clustering.reference_positions]
        device = self.device
        f64 = dict(dtype=torch.float64, device=device)
        refs = ReferenceSet(sample_values[clustering.reference_positions], device)
        n_modes = len(self.reference_indices_)
        self._ref_shift = refs.values[:, 0].clone()
        shifted_refs = refs.values - self._ref_shift[:, None]
        self._sum_v = shifted_refs.sum(dim=1)
        self._sum_vv = (shifted_refs * shifted_refs).sum(dim=1)
        self._count = self.warmup
        self.reference_trajectories_ = [refs.values[:, t].cpu().numpy() for t in range(self.warmup)]
        mode_dtype = torch.int16 if n_modes < 2**15 else torch.int32
        self._mode = torch.empty(self.n_rows_, dtype=mode_dtype, device=device)
        self._shift = torch.empty(self.n_rows_, **f64)
        self._sum_u = torch.empty(self.n_rows_, **f64)
        self._sum_uv = torch.empty(self.n_rows_, **f64)
        modelled_all = torch.as_tensor(self._modelled_mask, device=device)
        for r0 in range(0, self.n_rows_, self.block_rows):
            r1 = min(r0 + self.block_rows, self.n_rows_)
            x = torch.as_tensor(warm[r0:r1], device=device).to(torch.float64)
            finite = torch.isfinite(x).all(dim=1)
            x = torch.where(finite[:, None], x, 0.0)
            mode, _, _, _ = fit_block(x, refs)  # Step 2 on the warm-up epochs (Eq. 5)
            inside = np.flatnonzero((self.reference_indices_ >= r0) & (self.reference_indices_ < r1))
            mode[torch.as_tensor(self.reference_indices_[inside] - r0, device=device)] = torch.as_tensor(
                inside, device=device)
            modelled = modelled_all[r0:r1] & finite
            u = x - x[:, :1]
            self._shift[r0:r1] = x[:, 0]
            self._sum_u[r0:r1] = u.sum(dim=1)
            self._sum_uv[r0:r1] = (u * shifted_refs[mode]).sum(dim=1)
            code = torch.where(finite, MODE_KEPT, MODE_NONFINITE)
            self._mode[r0:r1] = torch.where(modelled, mode, code).to(mode_dtype)
        self._reference_rows = torch.as_tensor(self.reference_indices_, device=device)
        del self._warm  # from here on O(N): no checkpoint is kept

    def _step(self, values: np.ndarray) -> None:
        """One epoch after the warm-up: Eqs. 8 and 10 as running sums (see ``affine_from_sums``)."""
        w = torch.as_tensor(values, device=self.device).to(torch.float64)
        reference_now = w[self._reference_rows]
        self.reference_trajectories_.append(reference_now.cpu().numpy())
        v = reference_now - self._ref_shift
        self._sum_v += v
        self._sum_vv += v * v
        self._count += 1
        mode = self._mode.long()
        safe = mode.clamp(min=0)
        u = w - self._shift
        self._sum_u += torch.where(mode >= 0, u, 0.0)
        self._sum_uv += torch.where(mode >= 0, u * v[safe], 0.0)

    # ------------------------------------------------------------------ results
    @property
    def warmed_up(self) -> bool:
        return self.epoch_ >= self.warmup

    @property
    def mode_(self) -> np.ndarray:
        """Mode of every weight (-1: kept as trained, BatchNorm stats under bn_stats='source'; -2: NaN/Inf)."""
        self._require_warm()
        return self._mode.cpu().numpy()

    def _require_warm(self):
        if not self.warmed_up:
            raise UsageError(f"online CMD is still in its warm-up ({self.epoch_} of {self.warmup} epochs fed)")

    def coefficients(self) -> tuple[np.ndarray, np.ndarray]:
        """(a, b) of every weight after the latest epoch, float64 (0 for rows CMD does not model)."""
        self._require_warm()
        a, b = self._coefficients()
        return a.cpu().numpy(), b.cpu().numpy()

    def _coefficients(self):
        mode = self._mode.long()
        safe = mode.clamp(min=0)
        count = torch.tensor(float(self._count), dtype=torch.float64, device=self.device)
        a, b = affine_from_sums(count, self._sum_u, self._sum_uv, self._sum_v[safe], self._sum_vv[safe],
                                self._shift, self._ref_shift[safe])
        a[self._reference_rows] = 1.0
        b[self._reference_rows] = 0.0
        modelled = mode >= 0
        return torch.where(modelled, a, 0.0), torch.where(modelled, b, 0.0)

    def model_vector(self) -> np.ndarray:
        """The online model at the latest epoch as a flat float32 vector (the original weights before F)."""
        if self._latest_state is None:
            raise UsageError("no state dict fed yet")
        if not self.warmed_up:
            return self._latest.copy()
        a, b = self._coefficients()
        mode = self._mode.long()
        reference_now = torch.as_tensor(self.reference_trajectories_[-1], dtype=torch.float64,
                                        device=self.device)
        value = a * reference_now[mode.clamp(min=0)] + b  # Eq. 7
        latest = torch.as_tensor(self._latest, device=self.device).to(torch.float64)
        return torch.where(mode >= 0, value, latest).float().cpu().numpy()

    def state_dict(self) -> dict:
        """The online CMD model at the latest epoch: same keys, order, shapes and dtypes as the fed state dicts.

        Before the warm-up ends it is the latest fed state dict itself (the warm-up is plain training).
        Non-floating entries (e.g. ``num_batches_tracked``) are the latest fed values.
        """
        vector = torch.from_numpy(self.model_vector())
        floating = {name: (shape, dtype, start, numel) for name, shape, dtype, start, numel, _ in self.entries_}
        out = {}
        for name, kept in self._latest_state.items():
            if name in floating:
                shape, dtype, start, numel = floating[name]
                out[name] = vector[start:start + numel].reshape(shape).to(dtype).clone()
            else:
                out[name] = kept
        return out
