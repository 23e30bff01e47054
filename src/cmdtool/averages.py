"""Weight averages of a run, the baselines every model is compared with (``cmdtool evaluate``) and that
``cmdtool reconstruct --method ema|swa`` writes as checkpoints (paper 000 Table 2 compares CMD with them).

- ``original``: the checkpoints as stored (values from the store's columns),
- ``ema``: the exponential moving average of the weights, ema_1 = w_1, ema_t = β ema_{t−1} + (1 − β) w_t,
- ``swa``: the mean of the last L = max(1, round(fraction · T)) checkpoints up to epoch t, at every epoch whose
  window is full (t ≥ the L-th checkpoint); at the final epoch this is SWA as in paper 000 Table 2.

Everything is relative to an epoch window: EMA starts at its first epoch, SWA's T is its length. The averages
cover every float trajectory of the store, BatchNorm running statistics included (SWA proper would recompute them
with a pass over the training data; cmdtool cannot).

Memory: the store is streamed in column windows of ``memory_budget`` bytes; the averages are float64 N-vectors
of running sums, never N×T.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from .errors import ParameterError
from .progress import NullProgress

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


def column_windows(store, start: int, stop: int, width: int) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (column, N-vector float32) for columns start..stop-1, reading ``width`` columns of W at a time."""
    for c0 in range(start, stop, width):
        c1 = min(c0 + width, stop)
        block = store.read_columns(slice(c0, c1))
        for k in range(c1 - c0):
            yield c0 + k, block[:, k]


def iter_averages(store, window: slice, columns, methods, beta: float = 0.9, swa_len: int = 1,
                  memory_budget: int = DEFAULT_MEMORY_BUDGET, progress=None,
                  description: str = "original/EMA/SWA") -> Iterator[tuple[str, int, np.ndarray]]:
    """Yield ``(method, column, N-vector float32)`` of ``methods`` (among :data:`BASELINES`) at each of
    ``columns``, in one streaming read of ``window`` (plus a trailing read for SWA's window).

    Memory: the read-ahead of ``width`` columns (two for SWA) plus two float64 N-vectors of running sums. SWA is
    given only where its window of the last ``swa_len`` checkpoints is full.
    """
    progress = progress or NullProgress()
    wanted = set(columns)
    width = max(1, min(window.stop - window.start, int(memory_budget // (8 * max(store.n_rows, 1)))))
    ema = swa_sum = None
    trailing = column_windows(store, window.start, window.stop, width) if "swa" in methods else None
    with progress.task(description, total=window.stop - window.start, unit="epochs") as task:
        for column, values in column_windows(store, window.start, window.stop, width):
            values64 = values.astype(np.float64)
            if "ema" in methods:
                ema = values64.copy() if ema is None else beta * ema + (1.0 - beta) * values64
            if "swa" in methods:
                swa_sum = values64.copy() if swa_sum is None else swa_sum + values64
                if column - window.start >= swa_len:  # the checkpoint that leaves the window of the last swa_len
                    swa_sum -= next(trailing)[1]
            if column in wanted:
                if "original" in methods:
                    yield "original", column, values
                if "ema" in methods:
                    yield "ema", column, ema.astype(np.float32)
                if "swa" in methods and column - window.start + 1 >= swa_len:
                    yield "swa", column, (swa_sum / swa_len).astype(np.float32)
            task.advance(1)


__all__ = ["BASELINES", "DEFAULT_MEMORY_BUDGET", "check_ema_beta", "column_windows", "iter_averages",
           "swa_length"]
