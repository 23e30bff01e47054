"""Training-time Koopman-based gradient acceleration (KGA) with KWM / norm / delta masking (paper 003).

:class:`KGAOptimizer` wraps any ``torch.optim`` optimizer. Every epoch (KGA-Epoch) or every k optimizer steps (KGA-Iter,
Sec. 4.1) it takes a snapshot of the weights and refits a DMD of its snapshots (by default all of them, the
paper's growing W; the last ``history`` as an option); on every step it reshapes the optimizer's update along the
stable Koopman modes (Alg. 1):

    Ã = Uᵀ W_{i+1} V Σ⁻¹            (Eq. 7; from the Gram matrix G = Wᵀ W by :func:`dmd_from_gram`)
    Ã = W̃_{i+1} V Σ⁻¹, W̃ = Uᵀ W     (Eq. 8, Efficient-KGA: U fixed at the first fit, W is not kept)
    Ã Q = Q Λ                       (Eq. 9)
    Δw̃ = Uᵀ Δw                      (Eq. 10, Δw = w_{i+1} − w_i from the base optimizer's step)
    Δŵ = L_stable Δw̃                (Eq. 11, L = Q⁻¹, the left eigenvectors)
    Δw̃ ← Δw̃ + α Q_stable Λ_stable Δŵ   (Eq. 12: stable mode k scaled by 1 + α λ_k, the rest untouched)
    Δw = U Δw̃                       (Eq. 13)

Eq. 13 read literally replaces Δw by its projection on span(U) (r ≪ N directions) and throws the rest of the
optimizer's update away. By default the part of Δw outside span(U) is kept, i.e.
Δw ← Δw + α U Q_s Λ_s L_s Uᵀ Δw, which equals Eq. 13 for every update inside span(U) and leaves the other
directions "untouched" as Eq. 12 says of the non-stable components. ``drop_complement=True`` gives the literal
reading (docs/kga-training.md measures both). No stable mode, no acceleration (Sec. 3.2): the step is then exactly
the base optimizer's.

Masks (Sec. 3.3, 4.2, App. A.5; Alg. 2) restrict KGA to a subset of the weights. The DMD of each refit is taken
over the weights still in KGA (W_m, the extant mask); the refit then updates the mask from that same DMD (one DMD
per refit, as the paper notes) and the new mask applies from the next step on. A masked weight stays masked
(Alg. 2 scores only the rows of W_m) and gets the base optimizer's update only; its rows leave the snapshot
buffer, so the DMD gets cheaper as training goes on. With s = ``window`` and τ = ``mask_threshold``:

- ``"kwm"`` (Eqs. 14-15): masked when S_{i',j} = |Σ_{k not neutral} λ_kⁱ' b_k Φ_{j,k}| < τ for every i' in the
  last s snapshots (the non-neutral part of the DMD reconstruction, :func:`kwm_score_matrix`);
- ``"norm"`` (Sec. 4.2, App. A.5 c): masked when |w_j| < τ at the refit;
- ``"delta"`` (Sec. 4.2, App. A.5 a): masked when |w_j(i') − w_j(i'−1)| < τ for each of the last s intervals.

The DMD, the mode classes and the KWM scores are the analyzers' kernels (:func:`dmd_from_gram`,
:func:`classify_eigenvalues`, :func:`kwm_score_matrix`); this module keeps the snapshots and their Gram matrix
up to date (one N-long float64 product per snapshot) and applies Eqs. 10-13.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from ..analyzers.dmd import DMDFit, dmd_from_gram
from ..analyzers.eigenvalues import CLASS_NAMES, STABLE, classify_eigenvalues
from ..analyzers.kga import kwm_score_matrix
from ..analyzers.linear_models import descending_eigh, numerical_rank, parse_rank
from ..errors import UsageError

MASK_KINDS = ("kwm", "norm", "delta")
STATE_VERSION = 1
# the float64 copy of a row chunk of the snapshots (rows × columns × 8 bytes) stays under this many bytes
_CHUNK_BYTES = 16 * 1024**2


def _row_chunks(matrix: torch.Tensor):
    """Row slices of ``matrix`` whose float64 copies stay under _CHUNK_BYTES."""
    rows = max(1, _CHUNK_BYTES // (8 * max(matrix.shape[1] if matrix.dim() > 1 else 1, 1)))
    return [slice(r0, r0 + rows) for r0 in range(0, max(matrix.shape[0], 1), rows)]


def acceleration_operator(eigenvalues: np.ndarray, right_eigenvectors: np.ndarray, classes: np.ndarray,
                          alpha: float) -> np.ndarray | None:
    """α Q_stable Λ_stable L_stable (r×r, real), the term Eq. 12 adds to Δw̃; ``None`` when no mode is stable.

    L = Q⁻¹ (pseudo-inverse for a defective Q): in mode coordinates ŵ = L Δw̃ the stable components become
    (1 + α λ_k) ŵ_k and the others are untouched. Conjugate pairs share a class, so the product is real up to
    rounding."""
    stable = np.asarray(classes) == STABLE
    if not stable.any():
        return None
    left = np.linalg.pinv(right_eigenvectors)
    product = (right_eigenvectors[:, stable] * eigenvalues[stable][None, :]) @ left[stable, :]
    return alpha * product.real


def accelerate_update(delta: torch.Tensor, basis: torch.Tensor, operator: torch.Tensor,
                      drop_complement: bool = False) -> torch.Tensor:
    """Eqs. 10-13 on a flat update ``delta`` (n,) with ``basis`` U (n×r) and ``operator`` from
    :func:`acceleration_operator` (r×r): Δw + U op Uᵀ Δw, or U (I + op) Uᵀ Δw with ``drop_complement``."""
    reduced = basis.T @ delta                          # Eq. 10
    boost = operator @ reduced                         # Eqs. 11-12: α Q_s Λ_s L_s Δw̃
    if drop_complement:
        return basis @ (reduced + boost)               # Eq. 13 as written
    return delta + basis @ boost


def _dot64(matrix: torch.Tensor, vector: torch.Tensor) -> np.ndarray:
    """matrixᵀ vector accumulated in float64 (the Gram path squares the condition number: float32 sums would lose
    the small singular values that carry the decaying modes; see analyzers/linear_models.py)."""
    out = torch.zeros(matrix.shape[1], dtype=torch.float64, device=matrix.device)
    for rows in _row_chunks(matrix):
        out += matrix[rows].to(torch.float64).T @ vector[rows].to(torch.float64)
    return out.cpu().numpy()


def _matmul64(matrix: torch.Tensor, coefficients: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """matrix @ coefficients computed in float64 a row chunk at a time, stored as ``dtype`` (n×k): U = X V Σ⁻¹
    combines snapshots dominated by their common mean, which float32 arithmetic would cancel badly."""
    right = torch.as_tensor(coefficients, dtype=torch.float64, device=matrix.device)
    out = torch.empty((matrix.shape[0], right.shape[1]), dtype=dtype, device=matrix.device)
    for rows in _row_chunks(matrix):
        out[rows] = matrix[rows].to(torch.float64) @ right
    return out


class SnapshotWindow:
    """The last ``history`` weight snapshots of the weights in KGA (n×t, a ring of columns) and their Gram
    matrix, updated with one product per snapshot instead of recomputing Wᵀ W (paper 003 Eqs. 5-7)."""

    def __init__(self, n_rows: int, history: int | None, dtype: torch.dtype, device: torch.device):
        self.history = history
        capacity = history if history is not None else 8
        self.data = torch.zeros((n_rows, capacity), dtype=dtype, device=device)
        self.gram = np.zeros((capacity, capacity))
        self.slots: list[int] = []          # chronological order of the filled columns

    @property
    def size(self) -> int:
        return len(self.slots)

    def add(self, column: torch.Tensor) -> None:
        if self.history is not None and self.size == self.history:
            slot = self.slots.pop(0)                        # the oldest snapshot leaves the window
        else:
            slot = self.size                                # slots fill 0, 1, ... until the ring wraps
            if slot == self.data.shape[1]:                  # unbounded history: grow by doubling
                self._grow(2 * slot)
        self.data[:, slot] = column
        products = _dot64(self.data, column)
        self.gram[slot, :] = products
        self.gram[:, slot] = products
        self.slots.append(slot)

    def _grow(self, capacity: int) -> None:
        data = torch.zeros((self.data.shape[0], capacity), dtype=self.data.dtype, device=self.data.device)
        data[:, :self.data.shape[1]] = self.data
        gram = np.zeros((capacity, capacity))
        gram[:self.gram.shape[0], :self.gram.shape[1]] = self.gram
        self.data, self.gram = data, gram

    def window_gram(self) -> np.ndarray:
        """G = Wᵀ W of the window, chronological (t×t float64)."""
        return self.gram[np.ix_(self.slots, self.slots)]

    def _placed(self, coefficients: np.ndarray) -> np.ndarray:
        """A chronological t×k matrix C laid out on the ring's slots (zero rows for empty slots), so that
        W C needs no gather of W's columns."""
        placed = np.zeros((self.data.shape[1], coefficients.shape[1]), dtype=coefficients.dtype)
        placed[self.slots] = coefficients
        return placed

    def times(self, coefficients: np.ndarray) -> torch.Tensor:
        """W C for a chronological real t×k matrix C, in the snapshots' dtype (computed in float64)."""
        return _matmul64(self.data, self._placed(coefficients), self.data.dtype)

    def rows_all_below(self, coefficients: np.ndarray, threshold: float) -> torch.Tensor:
        """Per row j: |(W C)_{j,i}| < threshold for every column i, for a complex t×k matrix C (bool, n). Row
        chunk by row chunk, so the n×k scores are never held."""
        placed = self._placed(coefficients)
        real = torch.as_tensor(placed.real, dtype=torch.float64, device=self.data.device)
        imag = torch.as_tensor(placed.imag, dtype=torch.float64, device=self.data.device)
        out = torch.empty(self.data.shape[0], dtype=torch.bool, device=self.data.device)
        for rows in _row_chunks(self.data):
            chunk = self.data[rows].to(torch.float64)
            out[rows] = (torch.hypot(chunk @ real, chunk @ imag) < threshold).all(dim=1)
        return out

    def columns(self, last: int) -> torch.Tensor:
        """The last ``last`` snapshots, chronological (n×last)."""
        return self.data[:, self.slots[-last:]]

    def drop_rows(self, keep: torch.Tensor) -> None:
        """Remove the rows not in ``keep`` (bool, n): G loses their contribution (G − W_outᵀ W_out), the
        buffer shrinks to the kept rows."""
        removed = self.data[~keep]
        for rows in _row_chunks(removed):
            part = removed[rows].to(torch.float64)
            self.gram -= (part.T @ part).cpu().numpy()
        self.data = self.data[keep].contiguous()

    def release(self) -> None:
        """Free the snapshots (Efficient-KGA keeps W̃ instead)."""
        self.data = self.data.new_zeros((self.data.shape[0], 0))
        self.gram = np.zeros((0, 0))
        self.slots = []

    def state(self) -> dict:
        return {"data": self.data.clone(), "gram": torch.from_numpy(self.gram.copy()), "slots": list(self.slots)}

    def load(self, state: dict, device: torch.device) -> None:
        self.data = state["data"].to(device).clone()
        self.gram = state["gram"].numpy().copy()
        self.slots = [int(s) for s in state["slots"]]

    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size() + self.gram.nbytes


class KGAOptimizer:
    """Koopman-based gradient acceleration around a torch optimizer (paper 003 Sec. 3.2-3.3, Alg. 1-2).

    Use ``kga.step()`` instead of ``optimizer.step()`` and call ``kga.epoch_end()`` after every epoch::

        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        kga = KGAOptimizer(opt, model.named_parameters(), alpha=2.0)
        for epoch in range(epochs):
            for x, y in loader:
                opt.zero_grad(); loss_fn(model(x), y).backward(); kga.step()
            kga.epoch_end()

    Parameters
    ----------
    optimizer : torch.optim.Optimizer
        The base optimizer (SGD, SGD with momentum, Adam, ...); its own state is not touched.
    params : iterable of tensors or of (name, tensor) pairs, optional
        The weights KGA models and accelerates (default: every parameter of ``optimizer``). Names label the
        per-tensor masked fractions. One device and one floating dtype.
    alpha : float
        Acceleration rate α of Eq. 12 (stable mode k is scaled by 1 + α λ_k).
    eps : float
        Neutral band half-width of Sec. 3.1: |λ| < 1 − eps is stable, |λ| > 1 + eps unstable.
    every : "epoch" or int
        "epoch" (KGA-Epoch): a snapshot and a DMD refit at every :meth:`epoch_end`; an int k (KGA-Iter): every k
        optimizer steps (Sec. 4.1).
    history : int or None
        ``None`` (default): every snapshot since the start, the paper's growing W ("must continue to accumulate
        memory", Sec. 3.2); memory grows by N floats per snapshot. An int t keeps only the last t (an option:
        bounded memory, measured against the growing history in docs/kga-training.md).
    efficient : bool
        Efficient-KGA (Eq. 8): keep U (N×r, fixed at the first fit) and W̃ = Uᵀ W (r×t) instead of W.
    mask : None, "kwm", "norm" or "delta"
        Which weights stay in KGA (module docstring). Needs ``efficient=False`` (the masks read W).
    window : int
        s of Eq. 15 (and of delta masking): snapshots a weight must stay below ``mask_threshold``.
    mask_threshold : float
        τ, in weight units (KWM score, |w| or |Δw| per interval). Required with a mask.
    rank : int or float
        DMD truncation (:func:`dmd_from_gram`): 0 = Gavish-Donoho optimal hard threshold (the paper's choice),
        an int r, an energy fraction in (0, 1), -1 = all.
    warmup : int
        Refit intervals (epochs or k-step blocks) of plain training before the first DMD fit (Alg. 1 waits
        for the window to fill; the paper accelerates after the 5th epoch, Sec. 4.2).
    drop_complement : bool
        Apply Eq. 13 literally: Δw ← U Δw̃, dropping the part of the update outside span(U).

    State: ``steps_``, ``epochs_``, ``mask_``, ``fits_`` (one record per refit: eigenvalues, classes, rank, masked
    fraction, seconds), ``epoch_log_`` (one record per epoch: masked fraction overall and per tensor),
    ``eigenvalues_``, ``classes_``, ``atilde_`` (last fit), :meth:`memory_bytes`, :meth:`state_dict`.
    """

    def __init__(self, optimizer, params=None, alpha: float = 1.0, eps: float = 0.01, every="epoch",
                 history: int | None = None, efficient: bool = False, mask: str | None = None, window: int = 5,
                 mask_threshold: float | None = None, rank=0, warmup: int = 5, drop_complement: bool = False):
        self.optimizer = optimizer
        self.alpha = float(alpha)
        self.eps = float(eps)
        self.every = every
        self.history = history
        self.efficient = bool(efficient)
        self.mask = mask
        self.window = int(window)
        self.mask_threshold = mask_threshold
        self.rank = parse_rank(rank)
        self.warmup = int(warmup)
        self.drop_complement = bool(drop_complement)
        self._check_config()
        self._set_params(params)

        self.steps_ = 0
        self.epochs_ = 0
        self.intervals_ = 0                     # refit intervals completed (epochs or k-step blocks)
        self.fits_: list[dict] = []
        self.epoch_log_: list[dict] = []
        self.eigenvalues_ = np.zeros(0, dtype=np.complex128)
        self.classes_ = np.zeros(0, dtype=np.int8)
        self.atilde_ = np.zeros((0, 0))
        self._kept: torch.Tensor | None = None  # flat indices of the weights still in KGA (None = all)
        self._window = SnapshotWindow(self.n_params, history, self._dtype, self._device)
        self._basis: torch.Tensor | None = None     # U (n_kept × r) of the acceleration
        self._operator: torch.Tensor | None = None  # α Q_s Λ_s L_s in U's coordinates (None: no acceleration)
        self._reduced: np.ndarray | None = None     # Efficient-KGA: W̃ = Uᵀ W (r × t), chronological
        self._previous: torch.Tensor | None = None  # weights before the base step (allocated on first use)
        self._fit_seconds_this_epoch = 0.0

    # ------------------------------------------------------------------ configuration
    def _check_config(self) -> None:
        if self.every != "epoch" and not (isinstance(self.every, int) and not isinstance(self.every, bool)
                                          and self.every >= 1):
            raise UsageError(f"every={self.every!r}: use 'epoch' (KGA-Epoch) or a positive number of steps "
                             "(KGA-Iter)")
        if self.history is not None and (not isinstance(self.history, int) or self.history < 2):
            raise UsageError(f"history={self.history!r}: DMD needs at least 2 snapshots (or None for all)")
        if self.eps < 0:
            raise UsageError(f"eps={self.eps}: the neutral band half-width must be >= 0")
        if self.warmup < 1:
            raise UsageError(f"warmup={self.warmup}: at least one interval must pass before the first fit")
        if self.window < 1:
            raise UsageError(f"window={self.window}: s of Eq. 15 must be >= 1")
        if self.mask is not None:
            if self.mask not in MASK_KINDS:
                raise UsageError(f"mask={self.mask!r}: use None, " + ", ".join(repr(k) for k in MASK_KINDS))
            if self.efficient:
                raise UsageError("masks read the weight snapshots W, which Efficient-KGA does not keep: "
                                 "use efficient=False with a mask")
            if self.mask_threshold is None or not self.mask_threshold > 0:
                raise UsageError(f"mask={self.mask!r} needs mask_threshold > 0 (in weight units, e.g. 1e-3)")

    def _set_params(self, params) -> None:
        if params is None:
            params = [p for group in self.optimizer.param_groups for p in group["params"]]
        named = []
        for k, item in enumerate(params):
            name, tensor = item if isinstance(item, tuple) else (f"param{k}", item)
            named.append((str(name), tensor))
        named = [(n, p) for n, p in named if p.requires_grad]
        if not named:
            raise UsageError("KGA needs at least one parameter that requires grad")
        first = named[0][1]
        for name, p in named:
            if p.device != first.device or p.dtype != first.dtype or not p.is_floating_point():
                raise UsageError(f"KGA needs floating parameters of one dtype on one device; {name} is {p.dtype} "
                                 f"on {p.device}, {named[0][0]} is {first.dtype} on {first.device}")
        self.param_names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.param_sizes = np.array([p.numel() for p in self.params], dtype=np.int64)
        self._ends = np.cumsum(self.param_sizes)
        self.n_params = int(self._ends[-1])
        self._dtype, self._device = first.dtype, first.device

    # ------------------------------------------------------------------ optimizer interface
    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def _flat(self, out: torch.Tensor | None = None) -> torch.Tensor:
        return torch.cat([p.reshape(-1) for p in self.params], out=out)

    def step(self, closure=None):
        """The base optimizer's step, then Eqs. 10-13 on its update when a stable mode exists."""
        self._first_snapshot()
        accelerate = self._operator is not None
        if accelerate:
            if self._previous is None:
                self._previous = torch.empty(self.n_params, dtype=self._dtype, device=self._device)
            self._flat(out=self._previous)
        loss = self.optimizer.step() if closure is None else self.optimizer.step(closure)
        if accelerate:
            self._apply_acceleration()
        self.steps_ += 1
        if self.every != "epoch" and self.steps_ % self.every == 0:
            self._refit_point()
        return loss

    @torch.no_grad()
    def _apply_acceleration(self) -> None:
        delta = self._flat().sub_(self._previous)         # Δw of the base optimizer (Alg. 1)
        if self._kept is None:
            change = accelerate_update(delta, self._basis, self._operator, self.drop_complement) - delta
        else:
            kept_delta = delta.index_select(0, self._kept)
            change = torch.zeros_like(delta)
            change[self._kept] = accelerate_update(kept_delta, self._basis, self._operator,
                                                   self.drop_complement) - kept_delta
        for p, piece in zip(self.params, torch.split(change, self.param_sizes.tolist())):
            p.add_(piece.view_as(p))

    def epoch_end(self) -> dict:
        """Mark the end of an epoch: with ``every="epoch"`` take a snapshot and refit the DMD and the mask.
        Returns the epoch's record (also appended to ``epoch_log_``)."""
        self._first_snapshot()
        self.epochs_ += 1
        if self.every == "epoch":
            self._refit_point()
        record = {"epoch": self.epochs_, "step": self.steps_, "accelerating": self._operator is not None,
                  "n_stable": int(np.count_nonzero(self.classes_ == STABLE)),
                  "fit_seconds": self._fit_seconds_this_epoch, **self.masked_fractions()}
        self._fit_seconds_this_epoch = 0.0
        self.epoch_log_.append(record)
        return record

    # ------------------------------------------------------------------ snapshots and refits
    def _first_snapshot(self) -> None:
        """w_0, the weights before any update, opens the window."""
        if self.intervals_ == 0 and self._window.size == 0 and self._reduced is None:
            self._snapshot()

    @torch.no_grad()
    def _snapshot(self) -> None:
        flat = self._flat()
        if self._reduced is not None:                       # Efficient-KGA: only w̃ = Uᵀ w is kept (Eq. 8)
            column = _dot64(self._basis, flat)
            self._reduced = np.concatenate([self._reduced, column[:, None]], axis=1)
            if self.history is not None:
                self._reduced = self._reduced[:, -self.history:]
        else:
            self._window.add(flat if self._kept is None else flat.index_select(0, self._kept))

    def _refit_point(self) -> None:
        started = time.perf_counter()
        self._snapshot()
        self.intervals_ += 1
        if self.intervals_ >= self.warmup and self.n_kept > 0:
            self._refit()
            seconds = time.perf_counter() - started
            self.fits_[-1]["seconds"] = seconds
            self._fit_seconds_this_epoch += seconds

    @property
    def n_kept(self) -> int:
        """Weights still in KGA (not masked out)."""
        return self.n_params if self._kept is None else int(self._kept.numel())

    def _refit(self) -> None:
        """DMD of the window (Eqs. 7-9), the acceleration operator (Eqs. 11-12) and the mask (Eqs. 14-15)."""
        if self._reduced is not None:
            gram = self._reduced.T @ self._reduced        # W̃ᵀ W̃ = Wᵀ W when U spans the snapshots
        else:
            gram = self._window.window_gram()
        n_snapshots = gram.shape[0]
        fit = None
        # a diverged run (NaN/Inf weights in the window) or an all-zero window has no dynamics to model: no
        # acceleration until such snapshots have left the window
        if np.isfinite(gram).all() and gram.any():
            if self.efficient and self._reduced is None:
                gram = self._start_efficient(gram)
            try:
                fit = dmd_from_gram(gram, self.n_kept, self.rank)
            except UsageError:
                fit = None
        if fit is None:
            self.eigenvalues_, self.classes_, self.atilde_ = (np.zeros(0, np.complex128), np.zeros(0, np.int8),
                                                              np.zeros((0, 0)))
            self._operator = None
        else:
            self.eigenvalues_, self.atilde_ = fit.eigenvalues, fit.atilde
            self.classes_ = classify_eigenvalues(fit.eigenvalues, self.eps)
            operator = acceleration_operator(fit.eigenvalues, fit.eigenvectors, self.classes_, self.alpha)
            if self.efficient:
                self._set_efficient(fit, operator)
            else:
                self._set_full(fit, operator)
                if self.mask is not None:
                    self._update_mask(fit)
        self.fits_.append(self._fit_record(fit, n_snapshots))

    def _time_basis(self, fit: DMDFit) -> np.ndarray:
        """[V Σ⁻¹; 0] (t×r): U = X V Σ⁻¹ = W [V Σ⁻¹; 0] (Eq. 7's left singular vectors)."""
        coefficients = np.zeros((fit.right_singular_vectors.shape[0] + 1, fit.rank))
        coefficients[:-1] = fit.right_singular_vectors / fit.singular_values[:fit.rank][None, :]
        return coefficients

    def _set_full(self, fit: DMDFit, operator: np.ndarray | None) -> None:
        if operator is None:
            self._basis = self._operator = None
            return
        self._basis = self._window.times(self._time_basis(fit))
        self._operator = torch.as_tensor(operator, dtype=self._dtype, device=self._device)

    def _start_efficient(self, gram: np.ndarray) -> np.ndarray:
        """Efficient-KGA's first fit fixes U: every left singular vector of the window W = U Σ Vᵀ that stands
        above roundoff (U = W V Σ⁻¹, from G = V Σ² Vᵀ), so later dynamics have room beyond the first fit's DMD
        rank; then W̃ = Uᵀ W = Σ Vᵀ is kept and W is freed (Eq. 8). Returns W̃ᵀ W̃, the Gram matrix of every
        Efficient-KGA fit (equal to G up to the roundoff-level singular values dropped here)."""
        eigenvalues, vectors = descending_eigh(gram)
        rank = numerical_rank(eigenvalues)
        sigma = np.sqrt(eigenvalues[:rank])
        self._basis = self._window.times(vectors[:, :rank] / sigma[None, :])
        self._reduced = sigma[:, None] * vectors[:, :rank].T
        self._window.release()
        return self._reduced.T @ self._reduced

    def _set_efficient(self, fit: DMDFit, operator: np.ndarray | None) -> None:
        """Efficient-KGA (Eq. 8): the DMD of W̃ has its own left singular vectors Ũ = X̃ V Σ⁻¹ (r₀×r) in U's
        coordinates, so Eq. 12's operator acts on U as Ũ op Ũᵀ."""
        if operator is None:
            self._operator = None
            return
        rotation = self._reduced @ self._time_basis(fit)        # Ũ = W̃ [V Σ⁻¹; 0]
        self._operator = torch.as_tensor(rotation @ operator @ rotation.T, dtype=self._dtype, device=self._device)

    # ------------------------------------------------------------------ masks
    @torch.no_grad()
    def _update_mask(self, fit: DMDFit) -> None:
        """Eq. 15 (KWM) or a baseline on the weights still in KGA; the newly masked ones leave W_m for good."""
        threshold = float(self.mask_threshold)
        if self.mask == "kwm":
            if self._operator is None:
                return        # a fit without a stable mode drives no KGA: it does not decide which weights need it
            score_matrix = kwm_score_matrix(fit.mode_coefficients, fit.amplitudes, fit.eigenvalues, self.classes_,
                                            self._window.size, self.window)
            masked = self._window.rows_all_below(score_matrix, threshold)     # S_{i',j} < τ for all i'
        elif self.mask == "norm":
            masked = self._window.columns(1)[:, 0].abs() < threshold
        else:                                                                 # delta
            if self._window.size < self.window + 1:
                return
            recent = self._window.columns(self.window + 1)
            masked = ((recent[:, 1:] - recent[:, :-1]).abs() < threshold).all(dim=1)
        if not bool(masked.any()):
            return
        keep = ~masked
        kept = torch.arange(self.n_params, device=self._device) if self._kept is None else self._kept
        self._kept = kept[keep]
        self._window.drop_rows(keep)
        if self._basis is not None:
            self._basis = self._basis[keep].contiguous()
        if self._kept.numel() == 0:
            self._basis = self._operator = None

    @property
    def mask_(self) -> torch.Tensor:
        """Per weight, in ``params`` order (bool, N): True while the weight is in KGA, False once masked out."""
        mask = torch.ones(self.n_params, dtype=torch.bool, device=self._device)
        if self._kept is not None:
            mask.zero_()
            mask[self._kept] = True
        return mask

    def masked_fractions(self) -> dict:
        """Fraction of weights masked out of KGA, overall and per tensor."""
        masked_per_tensor = self.param_sizes.copy()
        if self._kept is not None:
            tensor_of = np.searchsorted(self._ends, self._kept.cpu().numpy(), side="right")
            masked_per_tensor -= np.bincount(tensor_of, minlength=len(self.param_sizes))
        else:
            masked_per_tensor[:] = 0
        return {"masked_fraction": float(masked_per_tensor.sum() / self.n_params),
                "masked_per_tensor": {name: float(m / n) for name, m, n in
                                      zip(self.param_names, masked_per_tensor, self.param_sizes)}}

    def _fit_record(self, fit: DMDFit | None, n_snapshots: int) -> dict:
        counts = {name: int(np.count_nonzero(self.classes_ == code)) for code, name in CLASS_NAMES.items()}
        return {"step": self.steps_, "epoch": self.epochs_, "snapshots": n_snapshots, "fitted": fit is not None,
                "rank": 0 if fit is None else fit.rank, "classes": counts,
                "eigenvalues": [[float(v.real), float(v.imag)] for v in self.eigenvalues_],
                "accelerating": self._operator is not None, "kept": self.n_kept,
                # ‖α Q_s Λ_s L_s‖₂ in U's coordinates: far above α·max|λ_s| when stable and other eigenvectors
                # are nearly parallel (ill-conditioned Q): the largest gain a step's projection can get
                "operator_norm": 0.0 if self._operator is None else float(torch.linalg.matrix_norm(
                    self._operator.double(), ord=2)),
                "masked_fraction": 1.0 - self.n_kept / self.n_params}

    # ------------------------------------------------------------------ memory and state
    def memory_bytes(self) -> dict:
        """Bytes KGA holds now (on the parameters' device; the Gram matrix and W̃ on the CPU), by part."""
        def size(t):
            return 0 if t is None else t.numel() * t.element_size()

        parts = {"snapshots": self._window.nbytes(), "basis": size(self._basis), "operator": size(self._operator),
                 "reduced_trajectories": 0 if self._reduced is None else self._reduced.nbytes,
                 "mask_index": size(self._kept), "step_buffer": size(self._previous)}
        parts["total"] = sum(parts.values())
        return parts

    def _config(self) -> dict:
        return {"alpha": self.alpha, "eps": self.eps, "every": self.every, "history": self.history,
                "efficient": self.efficient, "mask": self.mask, "window": self.window,
                "mask_threshold": self.mask_threshold, "rank": self.rank, "warmup": self.warmup,
                "drop_complement": self.drop_complement, "param_names": list(self.param_names),
                "param_sizes": [int(n) for n in self.param_sizes]}

    def state_dict(self) -> dict:
        """Everything needed to resume exactly (save it beside the model's and the optimizer's state dicts).
        Loads with ``torch.load(..., weights_only=True)``."""
        return {"version": STATE_VERSION, "config": self._config(), "steps": self.steps_, "epochs": self.epochs_,
                "intervals": self.intervals_, "fits": [dict(f) for f in self.fits_],
                "epoch_log": [dict(r) for r in self.epoch_log_],
                "eigenvalues": torch.from_numpy(np.stack([self.eigenvalues_.real, self.eigenvalues_.imag])),
                "classes": torch.from_numpy(self.classes_.astype(np.int64)),
                "atilde": torch.from_numpy(np.asarray(self.atilde_, dtype=np.float64)),
                "kept": None if self._kept is None else self._kept.clone(),
                "window": self._window.state(),
                "basis": None if self._basis is None else self._basis.clone(),
                "operator": None if self._operator is None else self._operator.clone(),
                "reduced": None if self._reduced is None else torch.from_numpy(self._reduced.copy()),
                "fit_seconds_this_epoch": self._fit_seconds_this_epoch}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`; the constructor's arguments must be the ones the state was saved with."""
        if state.get("version") != STATE_VERSION:
            raise UsageError(f"KGA state version {state.get('version')!r} is not {STATE_VERSION}")
        saved, mine = state["config"], self._config()
        differing = sorted(k for k in mine if saved.get(k) != mine[k])
        if differing:
            raise UsageError("KGA state was saved with other settings: " + ", ".join(
                f"{k}={saved.get(k)!r} (now {mine[k]!r})" for k in differing[:4]))
        device = self._device
        self.steps_, self.epochs_, self.intervals_ = int(state["steps"]), int(state["epochs"]), int(state["intervals"])
        self.fits_ = [dict(f) for f in state["fits"]]
        self.epoch_log_ = [dict(r) for r in state["epoch_log"]]
        eig = state["eigenvalues"].numpy()
        self.eigenvalues_ = eig[0] + 1j * eig[1]
        self.classes_ = state["classes"].numpy().astype(np.int8)
        self.atilde_ = state["atilde"].numpy().copy()
        self._kept = None if state["kept"] is None else state["kept"].to(device).clone()
        self._window = SnapshotWindow(0, self.history, self._dtype, device)
        self._window.load(state["window"], device)
        self._basis = None if state["basis"] is None else state["basis"].to(device).clone()
        self._operator = None if state["operator"] is None else state["operator"].to(device).clone()
        self._reduced = None if state["reduced"] is None else state["reduced"].numpy().copy()
        self._fit_seconds_this_epoch = float(state["fit_seconds_this_epoch"])

    def __repr__(self) -> str:
        kind = "Iter" if self.every != "epoch" else "Epoch"
        extra = ", efficient" if self.efficient else ""
        extra += f", mask={self.mask}" if self.mask else ""
        return (f"KGA-{kind}({type(self.optimizer).__name__}, alpha={self.alpha}, eps={self.eps}, "
                f"history={self.history}{extra}; {self.n_params:,} weights, {len(self.fits_)} fits)")
