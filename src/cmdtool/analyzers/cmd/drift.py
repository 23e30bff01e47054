"""Drift of an online CMD model (paper 000, Sec. 3.3-3.4): is the warm-up's clustering still a good model?

Online CMD (Alg. 3) fixes the modes, references and the assignment of weights to modes at the end of the
warm-up (epoch F) and only refits the affine coefficients afterwards (Eq. 9). When training later moves in
ways the warm-up did not see, the fixed modes stop fitting and the online model degrades silently (docs/training.md
shows a digits run where it does).

The signal used here is the error of the online model at each epoch t >= F,

    e(t) = ‖w(t) − ŵ(t)‖ / ‖w(t)‖,   ŵ_i(t) = a_i(t) r_m(t) + b_i   (Eq. 7 with the Eq. 9 coefficients),

over the finite rows (rows CMD leaves as trained add nothing to the numerator). ``e(F)`` is the warm-up error:
the in-sample error of the warm-up fit at its last epoch. Drift is declared when ``e(t) > factor * e(F)``;
the default factor 2 ("the error doubled") is what the digits case above crossed. A user who sees it should
lengthen the warm-up or re-cluster (run post-hoc CMD again).

``cmdtool decompose --warmup`` already stores e(t) as ``metrics["online"]["epoch_relative_error"]``;
:func:`assess_drift` turns such a list into a :class:`DriftReport`. In a training loop
:class:`DriftMonitor` does the same one epoch at a time and warns once.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field

import numpy as np

DEFAULT_DRIFT_FACTOR = 2.0


class CMDDriftWarning(UserWarning):
    """The online CMD model's error grew past ``factor`` times its warm-up error."""


@dataclass
class DriftReport:
    """Where the online model's per-epoch error stands against the warm-up error."""

    warmup_epoch: int
    warmup_error: float
    latest_epoch: int
    latest_error: float
    worst_epoch: int
    worst_error: float
    factor: float
    first_drift_epoch: int | None  # first epoch with error > factor * warmup_error, None if none

    @property
    def drifted(self) -> bool:
        return self.first_drift_epoch is not None

    @property
    def ratio(self) -> float:
        """Latest error over the warm-up error (inf when the warm-up fit was exact)."""
        if self.warmup_error > 0:
            return self.latest_error / self.warmup_error
        return 0.0 if self.latest_error == 0 else float("inf")

    def message(self, source: str = "online CMD") -> str:
        return (f"{source} drifted: its error at epoch {self.first_drift_epoch} exceeded {self.factor:g}x the "
                f"warm-up error ({self.warmup_error:.4g} at epoch {self.warmup_epoch}); latest "
                f"{self.latest_error:.4g} at epoch {self.latest_epoch}. The modes fixed at the end of the warm-up "
                f"no longer fit: lengthen the warm-up or re-cluster (run post-hoc CMD again)")

    def as_dict(self) -> dict:
        return {**asdict(self), "drifted": self.drifted, "ratio": self.ratio}

    @classmethod
    def from_dict(cls, data: dict) -> "DriftReport":
        """Back from :meth:`as_dict` (e.g. a saved result's metrics); derived keys are ignored."""
        return cls(**{name: data[name] for name in cls.__dataclass_fields__})


def relative_epoch_error(weights: np.ndarray, model: np.ndarray) -> float:
    """e(t) = ‖w − ŵ‖ / ‖w‖ over the rows where w is finite (float64 sums)."""
    weights = np.asarray(weights, dtype=np.float64)
    model = np.asarray(model, dtype=np.float64)
    finite = np.isfinite(weights) & np.isfinite(model)
    norm = float(np.linalg.norm(weights[finite]))
    error = float(np.linalg.norm(weights[finite] - model[finite]))
    return error / norm if norm > 0 else 0.0


def assess_drift(epochs, errors, factor: float = DEFAULT_DRIFT_FACTOR) -> DriftReport:
    """The :class:`DriftReport` of per-epoch errors e(t), the first entry being the warm-up epoch F.

    ``epochs`` are the labels of the errors (e.g. ``range(F, T + 1)``). For the output of
    ``cmdtool decompose --warmup F`` pass ``metrics["online"]["epoch_relative_error"][F-1:]`` with the
    window's epoch labels from F on.
    """
    epochs = [int(e) for e in epochs]
    errors = [float(e) for e in errors]
    if not errors or len(epochs) != len(errors):
        raise ValueError("assess_drift needs one error per epoch, the warm-up epoch first")
    if factor <= 1:
        raise ValueError(f"drift factor must be above 1 (got {factor})")
    baseline = errors[0]
    first = next((ep for ep, err in zip(epochs[1:], errors[1:]) if err > factor * baseline), None)
    worst = int(np.argmax(errors))
    return DriftReport(epochs[0], baseline, epochs[-1], errors[-1], epochs[worst], errors[worst], float(factor),
                       first)


@dataclass
class DriftMonitor:
    """Per-epoch errors of an online model in a training loop; warns (:class:`CMDDriftWarning`) once, at the
    first epoch whose error exceeds ``factor`` times the first recorded (warm-up) error.

    A plain dataclass so that training checkpoints can save and restore it field by field.
    """

    factor: float = DEFAULT_DRIFT_FACTOR
    source: str = "online CMD"
    warn: bool = True
    epochs: list[int] = field(default_factory=list)
    errors: list[float] = field(default_factory=list)
    warned: bool = False

    def __post_init__(self):
        if self.factor <= 1:
            raise ValueError(f"drift factor must be above 1 (got {self.factor})")

    def record(self, epoch: int, error: float) -> DriftReport:
        self.epochs.append(int(epoch))
        self.errors.append(float(error))
        report = self.report()
        if report.drifted and not self.warned:
            self.warned = True
            if self.warn:
                warnings.warn(report.message(self.source), CMDDriftWarning, stacklevel=4)  # the user's call
        return report

    def report(self) -> DriftReport | None:
        return assess_drift(self.epochs, self.errors, self.factor) if self.errors else None
