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

from ...utils.device import resolve_device
from ...errors import NotFittedError, UsageError
from ...store.layout import tensor_kind
from ..base import Estimator
from .drift import DEFAULT_DRIFT_FACTOR, DriftMonitor, relative_epoch_error
from .posthoc import BN_STATS, MODES, SAMPLES, SAMPLING, SEED, THRESHOLD
from .math import (MODE_KEPT, MODE_NONFINITE, ReferenceSet, affine_from_sums, check_modes_fit_sample, fit_block,
                       pin_reference_rows, sample_rows, select_references)
from ..params import Param, check_device

WARMUP = Param("warmup", 20, "F: epochs of plain training whose checkpoints the full CMD is fitted on (Alg. 3).",
               kind=int, minimum=2)
DEVICE = Param("device", "cpu", "Where the O(N) sums live: cpu, cuda or cuda:N (auto: CUDA when present).",
               types=(object,), check=check_device)
BLOCK_ROWS = Param("block_rows", 1 << 18, "Rows per block of the warm-up fit (memory bound).", kind=int, minimum=1)
DRIFT_FACTOR = Param("drift_factor", DEFAULT_DRIFT_FACTOR, "Warn (CMDDriftWarning) once the online model's error "
                     "e(t) exceeds this many times its warm-up error e(F) (see .drift).", kind=float, above=1)


class OnlineCMD(Estimator):
    """Online CMD fed state dicts one at a time.

    Shares its parameters with :class:`~cmdtool.analyzers.cmd.posthoc.PosthocCMD` (``warmup`` is F). With the same
    ``samples``, ``sampling``, ``seed`` and tensors it samples the same weights as ``cmdtool decompose --warmup F``
    on a store of the same checkpoints, so both give the same online model; its learned state has the same names
    and shapes.

    After :meth:`update` has seen epoch t >= F, :meth:`coefficients` equals the batch least-squares fit of
    Eq. 6 over epochs 1..t with the assignment fixed at F (Eq. 9 is recursive least squares).

    Attributes
    ----------
    epoch_ : int
        State dicts fed so far.
    n_rows_, entries_ : int, list
        Floating-point values per state dict (N), and (name, shape, dtype, offset, numel, modelled) of every
        floating tensor.
    sampled_indices_ : ndarray (K',) int64
        Rows of the sampled trajectories (App. C.2) without NaN/Inf in the warm-up.
    correlation_, linkage_, sample_modes_ : ndarray
        C1 of the sample (Eq. 4), its complete-linkage tree and each sampled weight's mode, at the warm-up's end.
    reference_indices_ : ndarray (M,) int64
        Rows of the reference weights.
    reference_trajectories_ : ndarray (M, t) float32
        The references over the epochs fed so far (as PosthocCMD's, M × T over its window).
    mode_ : ndarray (N,)
        Mode of every weight (-1: kept as trained, BatchNorm stats under bn_stats='source'; -2: NaN/Inf).
    drift_ : DriftMonitor
        e(t) = ‖w(t) − ŵ(t)‖/‖w(t)‖ of the online model from epoch F on; warns
        (:class:`~cmdtool.analyzers.cmd.drift.CMDDriftWarning`) once it exceeds ``drift_factor`` x e(F).
    """

    params = (WARMUP, MODES, THRESHOLD, SAMPLES, SAMPLING, SEED, BN_STATS, DEVICE, BLOCK_ROWS, DRIFT_FACTOR)

    def __init__(self, *, warmup=20, modes=10, threshold=None, samples=1000, sampling="balanced", seed=0,
                 bn_stats="source", device="cpu", block_rows=1 << 18, drift_factor=DEFAULT_DRIFT_FACTOR):
        self.warmup = warmup
        self.modes = modes
        self.threshold = threshold
        self.samples = samples
        self.sampling = sampling
        self.seed = seed
        self.bn_stats = bn_stats
        self.device = device
        self.block_rows = block_rows
        self.drift_factor = drift_factor
        self.epoch_ = 0
        self._latest_state: dict | None = None
        # e(t) of the online model from the warm-up on; warns past drift_factor x e(F) (see .drift)
        self.drift_ = DriftMonitor(self.drift_factor)

    @property
    def is_fitted(self) -> bool:
        return self.epoch_ >= self.warmup

    # ------------------------------------------------------------------ layout of the state dicts
    def _learn_layout(self, state: dict) -> None:
        import torch

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
        import torch

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
            self.validate_params()
            import torch

            self._device = torch.device(resolve_device(self.device))  # training-time code: its sums are torch
            self._learn_layout(state_dict)
            self._warm = np.empty((self.n_rows_, self.warmup), dtype=np.float32)
        import torch

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
        import torch

        warm = self._warm
        layers = [(start, numel) for _, _, _, start, numel, modelled in self.entries_ if modelled]
        check_modes_fit_sample(self.modes, self.threshold, self.samples, sum(numel for _, numel in layers))
        sampled = sample_rows(layers, int(self.samples), self.sampling, int(self.seed))
        cut = None if self.threshold is not None else int(self.modes)
        step = select_references(sampled, warm[sampled], cut, self.threshold)
        self.sampled_indices_ = step.sampled_indices
        self.correlation_ = step.clustering.correlation.astype(np.float32)
        self.linkage_ = step.clustering.linkage
        self.sample_modes_ = step.clustering.labels.astype(np.int16)
        self.reference_indices_ = step.reference_indices
        device = self._device
        f64 = dict(dtype=torch.float64, device=device)
        refs = ReferenceSet(step.reference_trajectories, device)
        n_modes = len(self.reference_indices_)
        self._ref_shift = refs.values[:, 0].clone()
        shifted_refs = refs.values - self._ref_shift[:, None]
        self._sum_v = shifted_refs.sum(dim=1)
        self._sum_vv = (shifted_refs * shifted_refs).sum(dim=1)
        self._count = self.warmup
        self._reference_columns = [refs.values[:, t].cpu().numpy() for t in range(self.warmup)]
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
            pin_reference_rows(self.reference_indices_, r0, r1, mode=mode)
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
        import torch

        w = torch.as_tensor(values, device=self._device).to(torch.float64)
        reference_now = w[self._reference_rows]
        self._reference_columns.append(reference_now.cpu().numpy())
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
        return self.is_fitted

    def _check_fitted(self) -> None:
        if not self.is_fitted:
            raise NotFittedError(f"online CMD is still in its warm-up ({self.epoch_} of {self.warmup} epochs fed)")

    @property
    def mode_(self) -> np.ndarray:
        """Mode of every weight (-1: kept as trained, BatchNorm stats under bn_stats='source'; -2: NaN/Inf)."""
        self._check_fitted()
        return self._mode.cpu().numpy()

    @property
    def reference_trajectories_(self) -> np.ndarray:
        """The reference trajectories over the epochs fed so far, M × t float32 (PosthocCMD's shape)."""
        self._check_fitted()
        return np.stack(self._reference_columns, axis=1).astype(np.float32)

    def coefficients(self) -> tuple[np.ndarray, np.ndarray]:
        """(a, b) of every weight after the latest epoch, float64 (0 for rows CMD does not model)."""
        self._check_fitted()
        a, b = self._coefficients()
        return a.cpu().numpy(), b.cpu().numpy()

    def _coefficients(self):
        import torch

        mode = self._mode.long()
        safe = mode.clamp(min=0)
        count = torch.tensor(float(self._count), dtype=torch.float64, device=self._device)
        a, b = affine_from_sums(count, self._sum_u, self._sum_uv, self._sum_v[safe], self._sum_vv[safe],
                                self._shift, self._ref_shift[safe])
        pin_reference_rows(self.reference_indices_, 0, self.n_rows_, a=a, b=b)
        modelled = mode >= 0
        return torch.where(modelled, a, 0.0), torch.where(modelled, b, 0.0)

    def model_vector(self) -> np.ndarray:
        """The online model at the latest epoch as a flat float32 vector (the original weights before F)."""
        import torch

        if self._latest_state is None:
            raise UsageError("no state dict fed yet")
        if not self.warmed_up:
            return self._latest.copy()
        a, b = self._coefficients()
        mode = self._mode.long()
        reference_now = torch.as_tensor(self._reference_columns[-1], dtype=torch.float64, device=self._device)
        value = a * reference_now[mode.clamp(min=0)] + b  # Eq. 7
        latest = torch.as_tensor(self._latest, device=self._device).to(torch.float64)
        return torch.where(mode >= 0, value, latest).float().cpu().numpy()

    def state_dict(self) -> dict:
        """The online CMD model at the latest epoch: same keys, order, shapes and dtypes as the fed state dicts.

        Before the warm-up ends it is the latest fed state dict itself (the warm-up is plain training).
        Non-floating entries (e.g. ``num_batches_tracked``) are the latest fed values.
        """
        import torch

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
