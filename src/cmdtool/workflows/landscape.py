"""CMD landscapes (paper 000 Sec. 3.5, App. G, Fig. 4 and 20): a metric over the values of one or two reference
weights, every modelled weight following its reference, w_i = a_i r_{mode_i} + b_i.

At epoch t the recorded reference values are r_m(t). The grid of mode m spans
``[r_m − span·|r_m|, r_m + span·|r_m|]`` in ``points`` steps (App. G: span 1/2 and increments of r_m/50, i.e.
51 points). Moving r_m by δ moves every weight of mode m by a_i δ and leaves the other modes at their modelled
values, so each grid point costs one N-vector update and one call of the metric function. A reference whose
recorded value is 0 has no scale of its own; its grid then spans ``span·max_t |r_m(t)|``.

The grid point δ = 0 is the CMD-modelled checkpoint (``recorded``); the original checkpoint of epoch t is
evaluated too, for comparison. ``best`` is the grid point with the best value of the sort metric (among tied
points, the one nearest the recorded values).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import ParameterError, UsageError
from .evaluate import EvaluationError, checked_metrics, describe_failure, lower_is_better, metric_function
from ..utils.progress import NullProgress


@dataclass
class Landscape:
    epoch: int
    modes: list[int]
    reference_weights: list[str]
    axes: list[np.ndarray]                  # grid values of each mode's reference weight
    recorded: list[float]                   # r_m(t)
    metrics: dict[str, np.ndarray]          # metric name -> values of shape (points,) or (points, points)
    recorded_metrics: dict[str, float]      # the CMD-modelled checkpoint (δ = 0)
    original_metrics: dict[str, float]      # the stored checkpoint of the epoch
    sort_metric: str
    lower_is_better: bool
    best_index: tuple[int, ...] = ()
    config: dict = field(default_factory=dict)

    @property
    def best_values(self) -> list[float]:
        return [float(axis[i]) for axis, i in zip(self.axes, self.best_index)]

    @property
    def best_metrics(self) -> dict[str, float]:
        return {k: float(v[self.best_index]) for k, v in self.metrics.items()}

    def to_json(self) -> dict:
        return {"epoch": self.epoch, "modes": self.modes, "reference_weights": self.reference_weights,
                "recorded": self.recorded, "axes": [a.tolist() for a in self.axes],
                "sort_metric": self.sort_metric, "lower_is_better": self.lower_is_better,
                "best": {"index": list(self.best_index), "values": self.best_values, "metrics": self.best_metrics},
                "recorded_metrics": self.recorded_metrics, "original_metrics": self.original_metrics,
                "config": self.config}

    def save(self, folder: str | Path, figure: bool = True, force: bool = False, store=None) -> dict[str, Path]:
        """``landscape_epoch<E>_modes<..>.npz`` (grid and every metric), ``.json`` (summary) and ``.png``.

        ``folder`` follows the output-folder rule of :mod:`cmdtool.utils.output_folder` (``store``: the store whose
        folders are protected; ``force``: write into a non-empty folder cmdtool did not mark)."""
        from ..utils.output_folder import OutputFolder

        stem = f"landscape_epoch{self.epoch}_mode{'-'.join(str(m) for m in self.modes)}"
        names = {"npz": f"{stem}.npz", "json": f"{stem}.json"} | ({"png": f"{stem}.png"} if figure else {})
        output = OutputFolder(folder, "landscape", force=force, store=store)
        with output as staging:
            arrays = {f"axis_{k}": axis for k, axis in enumerate(self.axes)}
            arrays.update({f"metric_{name}": values for name, values in self.metrics.items()})
            np.savez(staging / names["npz"], recorded=np.asarray(self.recorded),
                     best_index=np.asarray(self.best_index), **arrays)
            (staging / names["json"]).write_text(json.dumps(self.to_json(), indent=2) + "\n")
            if figure:
                self.plot(staging / names["png"])
        return {kind: output.path / name for kind, name in names.items()}

    def plot(self, path: str | Path) -> Path:
        from matplotlib.figure import Figure

        values = self.metrics[self.sort_metric]
        fig = Figure(figsize=(6, 4.2))  # no pyplot: nothing global is registered, no display is needed
        ax = fig.add_subplot()
        if len(self.modes) == 1:
            axis = self.axes[0]
            ax.plot(axis, values, "-", color="tab:blue", lw=1.5)
            ax.axvline(self.recorded[0], color="0.4", ls="--", lw=1, label=f"recorded r (CMD): "
                       f"{self.recorded_metrics[self.sort_metric]:.4g}")
            ax.axhline(self.original_metrics[self.sort_metric], color="tab:green", ls=":", lw=1,
                       label=f"original checkpoint: {self.original_metrics[self.sort_metric]:.4g}")
            ax.plot(self.best_values[0], values[self.best_index], "*", color="tab:red", ms=12,
                    label=f"best: {values[self.best_index]:.4g}")
            ax.set_xlabel(f"reference weight of mode {self.modes[0]} ({self.reference_weights[0]})")
            ax.set_ylabel(self.sort_metric)
        else:
            mesh = ax.contourf(self.axes[1], self.axes[0], values, levels=20, cmap="viridis")
            fig.colorbar(mesh, ax=ax, label=self.sort_metric)
            ax.plot(self.recorded[1], self.recorded[0], "o", color="white", mec="black",
                    label=f"recorded (CMD): {self.recorded_metrics[self.sort_metric]:.4g}")
            ax.plot(self.best_values[1], self.best_values[0], "*", color="tab:red", ms=12,
                    label=f"best: {values[self.best_index]:.4g}")
            ax.set_xlabel(f"mode {self.modes[1]} ({self.reference_weights[1]})")
            ax.set_ylabel(f"mode {self.modes[0]} ({self.reference_weights[0]})")
        ax.set_title(f"CMD landscape at epoch {self.epoch}")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        return Path(path)


def grid_axis(recorded: float, span: float, points: int, scale: float | None = None) -> np.ndarray:
    """``points`` values evenly spaced over [r − span·|r|, r + span·|r|] (``scale`` replaces |r| when given)."""
    half = span * (abs(recorded) if scale is None else scale)
    return recorded + np.linspace(-half, half, points)


def landscape(store, fn: str | Callable, epoch: int, modes: list[int], *, span: float = 0.5,
              points: int | None = None, decomposition: str = "default", model_factory=None,
              sort_metric: str | None = None, sort_mode: str = "auto", progress=None,
              strip_prefix: tuple[str, ...] = ()) -> Landscape:
    """Evaluate ``fn`` over a 1-D (one mode) or 2-D (two modes) grid of reference values at ``epoch``.
    ``strip_prefix``: prefixes removed from the tensor names first (as in
    :func:`cmdtool.workflows.evaluate.evaluate`)."""
    from ..analyzers import get_analyzer
    from ..ingestion.checkpoints import build_state_dict

    progress = progress or NullProgress()
    modes = [int(m) for m in modes]
    if len(modes) not in (1, 2) or len(set(modes)) != len(modes):
        raise UsageError(f"give one mode (a curve) or two different modes (a surface), got {modes}")
    if not span > 0:
        raise ParameterError("{span} must be positive, got {value}", "span", value=span)
    points = int(points or (51 if len(modes) == 1 else 21))
    if points < 2:
        raise ParameterError("{points} must be at least 2, got {value}", "points", value=points)
    if not store.results.exists("cmd", decomposition):
        raise UsageError(f"no CMD decomposition named {decomposition!r} in {store.path} yet: run "
                         f"`cmdtool decompose --modes 10` first")
    cmd = get_analyzer("cmd").load(store, decomposition)
    n_modes = cmd.reference_trajectories_.shape[0]
    for m in modes:
        if not 0 <= m < n_modes:
            raise UsageError(f"mode {m} does not exist: the decomposition has modes 0..{n_modes - 1}")
    column = store.column_of(epoch)
    t = cmd.window_position(store, column)
    call = metric_function(fn, model_factory, strip_prefix)
    references = cmd.reference_trajectories_.astype(np.float64)
    recorded = [float(references[m, t]) for m in modes]
    axes = [grid_axis(r, span, points, None if r != 0 else float(np.abs(references[m]).max()))
            for r, m in zip(recorded, modes)]
    base = cmd.reconstruct_epoch(store, column).astype(np.float64)
    members = [_mode_members(cmd, m) for m in modes]   # (rows, a_i) of each chosen mode

    def metrics_of(vector: np.ndarray, where: str) -> dict:
        state = build_state_dict(store, vector.astype(np.float32), column)
        try:
            value = call(state)
        except UsageError:  # the weights do not fit --model-factory's model: one line, said as it is
            raise
        except Exception as exc:  # noqa: BLE001 - the user's code: one line naming where it failed
            raise EvaluationError(f"the metric function failed on {where} at epoch {epoch}: "
                                  f"{describe_failure(exc, state)}") from exc
        return checked_metrics(value, f"landscape ({where})", epoch)

    def evaluate_at(deltas, where: str) -> dict:
        vector = base.copy()
        for (rows, slopes), delta in zip(members, deltas):
            vector[rows] += slopes * delta
        return metrics_of(vector, where)

    original_metrics = metrics_of(store.read_column(column), "the original checkpoint")
    recorded_metrics = evaluate_at([0.0] * len(modes), "the recorded reference values")
    shape = (points,) * len(modes)
    metrics: dict[str, np.ndarray] = {}
    with progress.task("landscape", total=int(np.prod(shape)), unit="points") as task:
        for index in np.ndindex(*shape):
            values = [axes[k][i] for k, i in enumerate(index)]
            result = evaluate_at([v - r for v, r in zip(values, recorded)],
                                 "the landscape point " + ", ".join(f"{v:.6g}" for v in values))
            for key, number in result.items():
                metrics.setdefault(key, np.full(shape, np.nan))[index] = number
            task.advance(1)
    sort_metric = sort_metric or next(iter(recorded_metrics))
    if sort_metric not in metrics:
        raise UsageError(f"--sort-metric {sort_metric!r} is not among the metrics: {', '.join(metrics)}")
    lower = lower_is_better(sort_metric, sort_mode)
    values = metrics[sort_metric]
    best_value = np.nanmin(values) if lower else np.nanmax(values)
    # ties (accuracy on a finite test set is flat over ranges): the tied point nearest the recorded values
    distance = sum(((grid - r) / (np.ptp(axis) or 1.0)) ** 2 for grid, r, axis in
                   zip(np.meshgrid(*axes, indexing="ij"), recorded, axes))
    flat = int(np.argmin(np.where(values == best_value, distance, np.inf)))
    return Landscape(epoch=int(epoch), modes=modes,
                     reference_weights=store.layout.row_names(cmd.reference_indices_[modes]),
                     axes=axes, recorded=recorded, metrics=metrics, recorded_metrics=recorded_metrics,
                     original_metrics=original_metrics, sort_metric=sort_metric, lower_is_better=lower,
                     best_index=tuple(int(i) for i in np.unravel_index(flat, shape)),
                     config={"fn": fn if isinstance(fn, str) else getattr(fn, "__qualname__", repr(fn)),
                             "span": float(span), "points": points, "decomposition": decomposition})


def _mode_members(cmd, mode: int, block_rows: int = 1 << 20) -> tuple[np.ndarray, np.ndarray]:
    """Rows assigned to ``mode`` and their slopes a_i, gathered block by block from the lazy per-row arrays."""
    rows, slopes = [], []
    n_rows = cmd.mode_.shape[0]
    for r0 in range(0, n_rows, block_rows):
        r1 = min(r0 + block_rows, n_rows)
        hit = np.flatnonzero(np.asarray(cmd.mode_[r0:r1]) == mode)
        rows.append(hit + r0)
        slopes.append(np.asarray(cmd.A_[r0:r1], dtype=np.float64)[hit])
    return np.concatenate(rows), np.concatenate(slopes)
