"""Weight averages of a run, the baselines every model is compared with (``cmdtool evaluate``) and that
``cmdtool reconstruct --method ema|swa`` writes as checkpoints (paper 000 Table 2 compares CMD with them).

- ``original``: the checkpoints as stored (values from the store's columns),
- ``ema``: the exponential moving average of the weights, ema_1 = w_1, ema_t = β ema_{t−1} + (1 − β) w_t,
- ``swa``: the mean of the last L = max(1, round(fraction · T)) checkpoints up to epoch t, at every epoch whose
  window is full (t ≥ the L-th checkpoint); at the final epoch this is SWA as in paper 000 Table 2.

Everything is relative to an epoch window: EMA starts at its first epoch, SWA's T is its length. The averages
cover every float trajectory of the store, BatchNorm running statistics included (SWA proper would recompute them
with a pass over the training data; cmdtool cannot).

Each average is linear in the weights: the vector at epoch t is W_window a_t for a window-long column of weights
(:func:`average_weights`), so every asked (method, epoch) is one column of a T×k matrix and one streaming pass over
row blocks gives them all (:class:`~cmdtool.analyzers.linear_models.ColumnsOfModel`, the pass that gives the
linear models' checkpoints). Memory: the k output N-vectors (the caller's budget) plus the pass's blocks; the
pass keeps no N-long state of its own.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from ..errors import ParameterError
from ..utils.progress import NullProgress

BASELINES = ("original", "ema", "swa")
DEFAULT_MEMORY_BUDGET = 256 * 1024**2


def check_ema_beta(beta: float) -> float:
    if not 0.0 <= float(beta) < 1.0:
        raise ParameterError("{ema_beta} must lie in [0, 1), got {value}", "ema_beta", value=beta)
    return float(beta)


def swa_length(n_columns: int, fraction: float) -> int:
    """L, the number of checkpoints SWA averages: the ``fraction`` of the window's ``n_columns`` (at least 1)."""
    if not 0.0 < float(fraction) <= 1.0:
        raise ParameterError("{swa_fraction} must lie in (0, 1], got {value}", "swa_fraction", value=fraction)
    return max(1, int(round(float(fraction) * n_columns)))


def average_weights(method: str, step: int, length: int, beta: float = 0.9, swa_len: int = 1) -> np.ndarray:
    """The weights a (``length``,) float64 with ``W_window a`` = the average ``method`` at window position ``step``:
    original e_t; EMA β^t for the first checkpoint and (1 − β) β^(t−s) for checkpoint s in 1..t (the recursion
    ema_t = β ema_{t−1} + (1 − β) w_t unrolled); SWA 1/L on the last L checkpoints up to t."""
    weights = np.zeros(length, dtype=np.float64)
    if method == "original":
        weights[step] = 1.0
    elif method == "ema":
        weights[1:step + 1] = (1.0 - beta) * beta ** np.arange(step - 1, -1, -1, dtype=np.float64)
        weights[0] = beta ** step
    elif method == "swa":
        weights[step - swa_len + 1:step + 1] = 1.0 / swa_len
    else:
        raise ValueError(f"unknown average {method!r}")
    return weights


def iter_averages(store, window: slice, columns, methods, beta: float = 0.9, swa_len: int = 1,
                  memory_budget: int = DEFAULT_MEMORY_BUDGET, progress=None,
                  description: str = "original/EMA/SWA", device="auto") -> Iterator[tuple[str, int, np.ndarray]]:
    """Yield ``(method, column, N-vector float32)`` of ``methods`` (among :data:`BASELINES`) at each of
    ``columns``, in column order (rows with NaN/Inf give NaN/Inf, as stored). SWA is given only where its window of
    the last ``swa_len`` checkpoints is full.

    The vectors come in groups of as many as ``memory_budget`` holds, each group from one pass over the window's
    columns up to the group's last one.
    """
    from ..analyzers.linear_models import ColumnsOfModel
    from ..passes.local import stream

    progress = progress or NullProgress()
    wanted = [(method, column) for column in sorted(set(columns)) for method in BASELINES if method in methods
              and (method != "swa" or column - window.start + 1 >= swa_len)]
    group = max(1, int(memory_budget // (4 * max(store.n_rows, 1))))
    with progress.task(description, total=len(wanted), unit="vectors") as task:
        for g0 in range(0, len(wanted), group):
            chunk = wanted[g0:g0 + group]
            length = max(column for _, column in chunk) - window.start + 1
            weights = np.stack([average_weights(method, column - window.start, length, beta, swa_len)
                                for method, column in chunk], axis=1)
            acc = ColumnsOfModel(weights, keep_nonfinite=True)  # the original keeps NaN/Inf as stored
            stream(store, [acc], slice(window.start, window.start + length), device)
            for k, (method, column) in enumerate(chunk):
                yield method, column, acc.out[:, k]
                task.advance(1)


__all__ = ["BASELINES", "DEFAULT_MEMORY_BUDGET", "average_weights", "check_ema_beta", "iter_averages", "swa_length"]
