"""Embedded CMD (paper 000, Sec. 3.4, Alg. 4, App. E): gradually replace trained weights by their CMD model.

After a warm-up of F plain epochs, post-hoc CMD clusters the weights into modes (Sec. 3.2); from then on the
affine coefficients (a_i, b_i) follow Eq. 9 every epoch (online CMD, Sec. 3.3). Every L epochs the weights whose
coefficients moved least over the last L epochs,

    Diff_i = sqrt((a_i − a_i^old)² + (b_i − b_i^old)²)                           (Alg. 4; c_i(t) of Sec. 3.4)

are *embedded*: the bottom P of Diff among the un-embedded, non-reference weights (Eq. 12). An embedded
weight's coefficients are frozen and its value is a_i w_m(t) + b_i (Eq. 11), so it keeps moving with its
reference.

When Eq. 11 is enforced is ``freeze``:

- ``"epoch"`` (default; Alg. 4 as written, and the authors' code): every weight trains with the user's optimizer
  during the epoch, and at the epoch's end the embedded weights are set to a_i w_m(t) + b_i. Embedded weights
  still get gradients and optimizer updates inside the epoch (their optimizer state is left alone): the saving
  is in what CMD models, not in compute. Alg. 4's loop ties before it decides, so the weights chosen at epoch
  t are first set to a_i w_m + b_i at the end of epoch t + 1.
- ``"step"`` (option): embedded weights are tied to their references at every optimizer step and are not
  trained. This is the variant that saves the embedded weights' updates, and in federated learning
  (:mod:`cmdtool.training.federated`) their communication.

What a reference steps on is ``reference_gradient`` (:mod:`cmdtool.training.freeze`):

- ``"projection"`` (default with ``freeze="epoch"``, and only there): every weight, references included, steps
  on its own gradient inside the epoch (Alg. 4's "regular SGD step"), and at the epoch's end each reference is
  set to the least-squares point of its mode's line,
  r_m* = (w_m + Σ a_i (w_i − b_i)) / (1 + Σ a_i²) over the mode's embedded weights as trained, before Eq. 11.
  With plain SGD from a tied state that moves r_m by the epoch's ``"mode"`` gradients below, evaluated at the
  weights as trained; no optimizer hook.
- ``"mode"`` (default with ``freeze="step"``): a pre-step hook gives each reference its mode's chain-rule
  gradient scaled by 1 / (1 + Σ a_i²) over the embedded weights of the mode.
- ``"own"``: its own partial derivative, Alg. 4 literally; at the epoch's end the reference keeps its trained
  value and the embedded weights are overwritten from it.

With basic P everything but the M references is embedded after 1/P decisions, and from then on ``"own"`` moves
each whole mode by a_i times its reference's own step, which in general is no descent direction of the tied
network: on a held-out MLP it collapsed 7 of 10 seeds by epoch 150, on the digits CNN one by epoch 170
(docs/training.md); ``"mode"`` and ``"projection"`` none.

Add it to a plain PyTorch loop::

    cmd = EmbeddedCMD(model, optimizer=optimizer, modes=10, warmup=20, every=10, fraction=0.10)
    for epoch in range(epochs):
        train_one_epoch(model, optimizer)
        cmd.on_epoch_end(epoch)            # warm-up CMD, Eq. 9 updates, Alg. 4 decisions, Eq. 11
    print(cmd.trained_fraction())

P is a fraction of all trainable weights (``relative=False``, the paper's "basic" case: the same number every
time) or of the not yet embedded ones (``relative=True``); ``schedule`` lowers it over time (App. E.2:
:func:`linear_decay`, :func:`exponential_decay`, :func:`halve_above` of App. F.1).

Memory after the warm-up is O(N) (App. C.7): :class:`~cmdtool.analyzers.cmd.online.OnlineCMD`'s running sums
plus, here, the coefficients at the last embedding epoch (float64) and an embedded flag per weight; on the
model's device a mask per parameter and float32 coefficients of the embedded entries. During the warm-up the
F checkpoints are buffered, as Alg. 4's first line needs them.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ..analyzers.cmd.drift import DEFAULT_DRIFT_FACTOR, DriftMonitor, relative_epoch_error
from ..analyzers.cmd.online import OnlineCMD
from ..errors import UsageError
from ._state import export_attributes, restore_attributes
from .freeze import REFERENCE_GRADIENTS, TIES, FrozenEmbedding
from .layout import StateLayout

log = logging.getLogger("cmdtool.training")

STATE_VERSION = 1

# schedule(step, embedded_fraction, previous_fraction, initial_fraction) -> P for this embedding step
Schedule = Callable[[int, float, float, float], float]


# ---------------------------------------------------------------------------------------------- App. E.2
def linear_decay(steps: int) -> Schedule:
    """P decreases linearly from its initial value to 0 over ``steps`` embedding steps."""
    if steps < 1:
        raise UsageError("linear_decay needs at least one step")
    return lambda step, embedded, previous, initial: initial * max(0.0, 1.0 - step / steps)


def exponential_decay(gamma: float = 0.5) -> Schedule:
    """P multiplied by ``gamma`` at every embedding step: P_k = P_0 gamma^k."""
    if not 0 < gamma <= 1:
        raise UsageError("exponential_decay needs 0 < gamma <= 1")
    return lambda step, embedded, previous, initial: initial * gamma ** step


def halve_above(threshold: float = 0.8) -> Schedule:
    """App. F.1: constant P until more than ``threshold`` of the weights are embedded, then P <- P/2 at every
    embedding step (the rule the paper's federated-learning runs borrow from APF)."""
    return lambda step, embedded, previous, initial: previous / 2 if embedded > threshold else previous


@dataclass
class EmbeddingStep:
    """What one embedding decision chose: rows, their frozen coefficients and reference positions."""

    epoch: int
    fraction: float         # P used at this step
    rows: np.ndarray        # sorted row indices newly embedded
    a: np.ndarray           # float64 frozen coefficients of those rows
    b: np.ndarray
    reference: np.ndarray   # position of each row's reference in the reference vector (= its mode)


class GradualEmbedding:
    """Alg. 4 on state dicts, without a model: the warm-up CMD, Eq. 9 updates, Diff and the embedded set.

    :class:`EmbeddedCMD` applies it to a live model; the federated server
    (:class:`~cmdtool.training.federated.FederatedCMD`) applies it to the aggregated main model.

    ``eligible`` names the state-dict tensors whose entries may be embedded (trainable parameters); the
    fraction P counts those entries. Reference weights and rows CMD does not model are never embedded.
    """

    def __init__(self, modes: int = 10, warmup: int = 20, every: int = 10, fraction: float = 0.10,
                 relative: bool = False, schedule: Schedule | None = None, samples: int = 1000, seed: int = 0,
                 *, eligible=None, sampling: str = "balanced", bn_stats: str = "source", device: str = "cpu",
                 drift_factor: float = DEFAULT_DRIFT_FACTOR):
        if every < 1:
            raise UsageError(f"every (L) must be at least 1 epoch (got {every})")
        if not 0 < fraction <= 1:
            raise UsageError(f"fraction (P) must be in (0, 1] (got {fraction}); 10% is 0.10")
        self.every = int(every)
        self.fraction = float(fraction)
        self.relative = bool(relative)
        self.schedule = schedule
        self.eligible_names = None if eligible is None else list(eligible)
        self.online = OnlineCMD(warmup=warmup, modes=modes, samples=samples, sampling=sampling, seed=seed,
                                bn_stats=bn_stats, device=device, drift_factor=drift_factor)
        self.online.drift_.warn = False  # the embedded model's own drift is tracked below
        self.drift = DriftMonitor(drift_factor, source="embedded CMD")
        self.epoch = 0
        self.steps = 0                    # embedding decisions taken
        self.current_fraction = self.fraction
        self.layout: StateLayout | None = None

    @property
    def warmup(self) -> int:
        return self.online.warmup

    @property
    def warmed_up(self) -> bool:
        return self.epoch >= self.warmup

    def _start(self, state: dict) -> None:
        self.layout = StateLayout(state)
        names = self.eligible_names if self.eligible_names is not None else [e.name for e in self.layout.entries]
        unknown = [n for n in names if n not in self.layout.by_name]
        if unknown:
            raise UsageError(f"eligible tensors not in the state dict: {', '.join(unknown[:5])}")
        self.eligible = self.layout.rows_of(names)
        self.n_eligible = int(self.eligible.sum())
        if self.n_eligible == 0:
            raise UsageError("no trainable floating-point weights to embed")
        self.embedded = np.zeros(self.layout.n_rows, dtype=bool)

    # ------------------------------------------------------------------ one epoch
    def observe(self, state: dict) -> EmbeddingStep | None:
        """Feed the state dict at the end of the next epoch; returns the embedding step taken, if any."""
        if self.layout is None:
            self._start(state)
        self.online.update(state)
        self.epoch += 1
        self.latest = self.layout.flatten(state).numpy()
        if self.epoch < self.warmup:
            return None
        a, b = self.online.coefficients()
        if self.epoch == self.warmup:  # Alg. 4: {A, B}_old <- post-hoc CMD on W_{1:F}
            self.a_old, self.b_old = a, b
            self._fix_modes()
            self.drift.record(self.epoch, relative_epoch_error(self.latest, self.model_vector()))
            return None
        step = None
        if (self.epoch - self.warmup) % self.every == 0:
            step = self._embed(a, b)
        self.drift.record(self.epoch, relative_epoch_error(self.latest, self.model_vector()))
        return step

    def _fix_modes(self) -> None:
        """Modes and references as the warm-up fixed them, and the rows that may ever be embedded."""
        self.mode = self.online.mode_  # int16 (int32 past 32k modes): -1/-2 for rows CMD does not model
        self.reference_rows = np.asarray(self.online.reference_indices_, dtype=np.int64)
        self.candidate = self.eligible & (self.mode >= 0)
        self.candidate[self.reference_rows] = False  # "we do not embed the reference weights" (Sec. 3.4)

    def _embed(self, a: np.ndarray, b: np.ndarray) -> EmbeddingStep:
        """Alg. 4's embedding epoch: Diff against {A, B}_old, {A, B}_old <- {A, B}, embed the bottom P."""
        frozen = self.embedded
        a = np.where(frozen, self.a_old, a)  # embedded coefficients stay frozen
        b = np.where(frozen, self.b_old, b)
        diff = np.hypot(a - self.a_old, b - self.b_old)
        self.a_old, self.b_old = a, b
        if self.schedule is not None:
            self.current_fraction = float(self.schedule(self.steps, self.embedded_fraction(), self.current_fraction,
                                                        self.fraction))
        base = self.n_eligible - int(self.embedded.sum()) if self.relative else self.n_eligible
        count = math.ceil(self.current_fraction * base - 1e-9)
        candidates = np.flatnonzero(self.candidate & ~self.embedded)
        count = min(max(count, 0), len(candidates))
        if count == len(candidates):
            chosen = candidates
        else:
            chosen = candidates[np.argpartition(diff[candidates], count - 1)[:count]] if count else candidates[:0]
        chosen = np.sort(chosen)
        self.embedded[chosen] = True
        self.steps += 1
        return EmbeddingStep(self.epoch, self.current_fraction, chosen, a[chosen], b[chosen],
                             self.mode[chosen].astype(np.int64))

    # ------------------------------------------------------------------ results
    def embedded_fraction(self) -> float:
        """Embedded share of the eligible (trainable) weights."""
        return float(self.embedded.sum()) / self.n_eligible if self.layout is not None else 0.0

    def trained_fraction(self) -> float:
        return 1.0 - self.embedded_fraction()

    def coefficients(self) -> tuple[np.ndarray, np.ndarray]:
        """(a, b) of every row, float64: frozen for embedded rows, Eq. 9's latest for the others."""
        a, b = self.online.coefficients()
        if self.epoch > self.warmup:
            a = np.where(self.embedded, self.a_old, a)
            b = np.where(self.embedded, self.b_old, b)
        return a, b

    def model_vector(self) -> np.ndarray:
        """The CMD model at the latest epoch (Eq. 7; the latest weights for rows CMD does not model), float32."""
        if not self.warmed_up:
            return self.latest.copy()
        a, b = self.coefficients()
        references = self.latest[self.reference_rows].astype(np.float64)
        model = a * references[np.clip(self.mode, 0, None)] + b
        return np.where(self.mode >= 0, model, self.latest).astype(np.float32)

    # ------------------------------------------------------------------ resume
    _OWN = ("epoch", "steps", "current_fraction", "embedded", "a_old", "b_old", "latest", "drift")

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION,
                "online": export_attributes(self.online, skip=("device",)),
                "own": export_attributes(self, skip=tuple(k for k in vars(self) if k not in self._OWN))}

    def load_state_dict(self, state: dict, first_state: dict) -> None:
        """Restore from :meth:`state_dict`; ``first_state`` is any state dict of the model (for its layout)."""
        if state.get("version") != STATE_VERSION:
            raise UsageError(f"training state version {state.get('version')} is not {STATE_VERSION}")
        self._start(first_state)
        restore_attributes(self.online, state["online"], device=self.online.device)
        restore_attributes(self, state["own"])
        if self.embedded.shape != (self.layout.n_rows,):
            raise UsageError("the saved embedded-CMD state belongs to a model of another size")
        if self.warmed_up:
            self._fix_modes()


class EmbeddedCMD:
    """Embedded CMD on a live model (Alg. 4): call :meth:`on_epoch_end` after each training epoch.

    Parameters
    ----------
    model : the torch module being trained.
    modes, samples, seed : CMD's M, K and sampling seed (Sec. 3.2, App. C.2).
    warmup : F, plain-training epochs before the post-hoc CMD.
    every : L, epochs between embedding decisions.
    fraction : P, share of the trainable weights embedded at each decision (0.10 = 10%).
    relative : P counts the not yet embedded weights instead of all (App. E.2 "relative P").
    schedule : lowers P over the decisions (:func:`linear_decay`, :func:`exponential_decay`,
        :func:`halve_above`, or any ``f(step, embedded_fraction, previous_P, initial_P) -> P``).
    freeze : ``"epoch"`` (default, Alg. 4): all weights train during the epoch, embedded ones are set to
        a_i r_m + b_i at its end (those chosen at this epoch's decision from the next epoch's end on, Alg. 4's
        order). ``"step"``: embedded weights are tied at every optimizer step from their decision on and not
        trained.
    reference_gradient : ``"projection"`` (default with ``freeze="epoch"``, and only there): each reference steps
        on its own partial derivative, and at the epoch's end it is set to the least-squares point of its mode's
        line, (r_m + Σ a_i (w_i − b_i)) / (1 + Σ a_i²), before Eq. 11; ``"mode"`` (default with
        ``freeze="step"``): on its mode's chain-rule gradient scaled by 1 / (1 + Σ a_i²); ``"own"``: on its own
        partial derivative (Alg. 4 literally).
    optimizer : the training optimizer; its steps are hooked (the references' gradient before each step; with
        ``freeze="step"`` the reset after it, and its state zeroed for embedded weights). Required unless
        ``freeze="epoch"`` with ``reference_gradient="own"`` or ``"projection"``, which hook nothing.
    evaluate : optional ``f(state_dict) -> dict of metrics``, run on the CMD model every epoch from F on and
        stored in :attr:`history_`.
    device : where the CMD sums live (default: the model's device).
    drift_factor : warn (:class:`~cmdtool.analyzers.cmd.drift.CMDDriftWarning`) when the CMD model's error
        exceeds this multiple of its warm-up error.

    Only trainable parameters (``requires_grad``) are embedded and counted in :meth:`trained_fraction`; BatchNorm
    statistics follow ``bn_stats`` as in :class:`~cmdtool.analyzers.cmd.online.OnlineCMD`.
    """

    def __init__(self, model: torch.nn.Module, modes: int = 10, warmup: int = 20, every: int = 10,
                 fraction: float = 0.10, relative: bool = False, schedule: Schedule | None = None,
                 samples: int = 1000, seed: int = 0, *, freeze: str = "epoch", reference_gradient: str | None = None,
                 optimizer=None,
                 evaluate: Callable[[dict], dict] | None = None, sampling: str = "balanced",
                 bn_stats: str = "source", device: str | torch.device | None = None,
                 drift_factor: float = DEFAULT_DRIFT_FACTOR):
        self.model = model
        trainable = {id(p) for p in model.parameters() if p.requires_grad}
        seen: set[int] = set()
        eligible = []
        for name, tensor in model.state_dict(keep_vars=True).items():
            if id(tensor) in trainable and id(tensor) not in seen:  # tied weights: the first name only
                seen.add(id(tensor))
                eligible.append(name)
        if device is None:  # the model's device where the CMD sums can live (CPU for MPS and others)
            first = next(iter(model.parameters()), None)
            device = first.device if first is not None and first.device.type in ("cpu", "cuda") else "cpu"
        self.plan = GradualEmbedding(modes, warmup, every, fraction, relative, schedule, samples, seed,
                                     eligible=eligible, sampling=sampling, bn_stats=bn_stats, device=str(device),
                                     drift_factor=drift_factor)
        if freeze not in TIES:
            raise UsageError(f"freeze must be 'epoch' or 'step' (got {freeze!r})")
        if reference_gradient is None:  # each freeze mode's default (module docstring)
            reference_gradient = "projection" if freeze == "epoch" else "mode"
        if reference_gradient not in REFERENCE_GRADIENTS:
            raise UsageError(f"reference_gradient must be 'mode', 'own' or 'projection' (got {reference_gradient!r})")
        if reference_gradient == "projection" and freeze != "epoch":
            raise UsageError("reference_gradient='projection' is the tie at the epoch's end: it needs freeze='epoch'")
        if optimizer is None and (freeze == "step" or reference_gradient == "mode"):
            raise UsageError(f"EmbeddedCMD(freeze={freeze!r}, reference_gradient={reference_gradient!r}) needs "
                             "optimizer=: it hooks into the optimizer's steps")
        self.freeze = freeze
        self.reference_gradient = reference_gradient
        self.evaluate = evaluate
        self.optimizer = optimizer
        self.frozen: FrozenEmbedding | None = None
        self.history_: list[dict] = []

    # ------------------------------------------------------------------ training loop
    def attach_optimizer(self, optimizer) -> None:
        """Give another optimizer (``freeze="step"`` hooks into its steps from now on)."""
        self.optimizer = optimizer
        if self.frozen is not None:
            self.frozen.attach_optimizer(optimizer)

    def on_epoch_end(self, epoch: int | None = None) -> dict:
        """After each training epoch: feed the weights, take Alg. 4's step, enforce Eq. 11; returns the epoch's
        record (also appended to :attr:`history_` and logged)."""
        plan = self.plan
        trained_during = plan.trained_fraction()
        if self.frozen is not None:
            self.frozen.apply()  # Eq. 11 at the epoch's end: a r + b with the references' values now
        step = plan.observe(self.model.state_dict())
        if plan.epoch == plan.warmup:
            self.frozen = FrozenEmbedding(self.model, plan.layout, plan.reference_rows, self.optimizer,
                                          tie=self.freeze, reference_gradient=self.reference_gradient)
        if step is not None:  # freeze="epoch": tied from the next epoch's end on (Alg. 4's order)
            self.frozen.embed(step.rows, step.a, step.b, step.reference, tie_now=self.freeze == "step")
        record = {"epoch": plan.epoch if epoch is None else epoch, "trained_fraction": trained_during,
                  "embedded_fraction": plan.embedded_fraction()}
        if step is not None:
            record.update(embedded_now=len(step.rows), fraction_used=step.fraction)
        if plan.warmed_up:
            record["cmd_error"] = plan.drift.errors[-1]
            if self.evaluate is not None:
                record["cmd_metrics"] = self.evaluate(self.cmd_state_dict())
        self.history_.append(record)
        log.info("embedded CMD epoch %s: trained %.1f%% during the epoch, %.1f%% embedded now%s",
                 record["epoch"], 100 * trained_during, 100 * record["embedded_fraction"],
                 f", CMD model error {record['cmd_error']:.4g}" if "cmd_error" in record else "")
        return record

    # ------------------------------------------------------------------ results
    def trained_fraction(self) -> float:
        """Share of the trainable weights not embedded, from now on: those whose value the optimizer sets
        (with ``freeze="epoch"`` the embedded ones also get optimizer updates inside each epoch, and are
        overwritten by Eq. 11 at its end; with ``freeze="step"`` they get none)."""
        return self.plan.trained_fraction()

    def run_trained_fraction(self) -> float:
        """Mean over the epochs seen of :meth:`trained_fraction` during each epoch (Fig. 3 right: ~50% in the
        paper)."""
        if not self.history_:
            return 1.0
        return float(np.mean([r["trained_fraction"] for r in self.history_]))

    def embedded_mask(self) -> dict[str, torch.Tensor]:
        """Per parameter name, a boolean mask of its embedded entries."""
        return {} if self.frozen is None else {n: p.mask.clone() for n, p in self.frozen.parts.items()}

    def cmd_state_dict(self) -> dict:
        """The CMD model of this run (Eq. 7 with frozen coefficients for embedded weights), same keys, shapes
        and dtypes as ``model.state_dict()``; before the warm-up ends, the model's own weights."""
        vector = torch.from_numpy(self.plan.model_vector())
        state = self.plan.layout.unflatten_into(vector, self.model.state_dict())
        if self.frozen is not None:  # embedded weights: a_i r_m + b_i as Eq. 11 writes it, to the last bit
            for name, (mask, value) in self.frozen.tied_values().items():
                state[name][mask.to(state[name].device)] = value.to(state[name].device, state[name].dtype)
        return state

    @property
    def drift_report(self):
        return self.plan.drift.report()

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict:
        """Everything needed to resume (tensors and plain values: loads with ``torch.load(weights_only=True)``)."""
        return {"plan": self.plan.state_dict(), "history": list(self.history_)}

    def load_state_dict(self, state: dict) -> None:
        """Resume: call after ``model.load_state_dict`` (and the optimizer's) of the same epoch."""
        self.plan.load_state_dict(state["plan"], self.model.state_dict())
        self.history_ = [dict(r) for r in state["history"]]
        if self.frozen is not None:
            self.frozen.remove_hooks()
            self.frozen = None
        plan = self.plan
        if plan.epoch >= plan.warmup:
            self.frozen = FrozenEmbedding(self.model, plan.layout, plan.reference_rows, self.optimizer,
                                          tie=self.freeze, reference_gradient=self.reference_gradient)
            rows = np.flatnonzero(plan.embedded)
            self.frozen.embed(rows, plan.a_old[rows], plan.b_old[rows], plan.mode[rows],
                              tie_now=self.freeze == "step")  # the loaded model holds them as they were

    def close(self) -> None:
        """Remove the optimizer hooks (the model keeps its current weights)."""
        if self.frozen is not None:
            self.frozen.remove_hooks()
