"""Evaluate a user's metric function on original, modelled and weight-averaged checkpoints.

The user names a callable that takes a state dict and returns ``{metric name: float}``. It is called on

- the baselines of :mod:`cmdtool.workflows.averages`: ``original`` (the checkpoints as stored: the source files are not
  needed), ``ema`` and ``swa`` (weight averages),
- the reconstructions of each decomposition in the store, as the analyzer registry lists them (``cmd``
  post-hoc, ``cmd-online``, ``dmd``, ``pca``, ``pod``, ...; a method that extends another, such as ``kga`` whose
  model is DMD's, only on request),

for every epoch of a window (or every K-th). Everything is relative to the evaluated window ``--epochs A:B``:
EMA starts at A, SWA's T is the window's length. Integer entries (``num_batches_tracked``) are the epoch's own.

Memory: EMA and SWA stream the store in column windows (an N-vector of running sums, never N×T); the
reconstructions come in groups of epochs sized to ``memory_budget``. State dicts are built in memory and handed
to the callable: no checkpoint file is ever written.

Stored result (kind ``"evaluation"``, read by the reporter): attrs ``records`` =
``[{"method": str, "epoch": int, "metrics": {name: float}}, ...]`` plus ``config`` and ``timings``. It is
committed after every method and at least every ``commit_seconds``; when the callable fails, what was computed
before is committed and :class:`EvaluationError` names the epoch and method.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .averages import BASELINES, DEFAULT_MEMORY_BUDGET, check_ema_beta, iter_averages, swa_length
from ..errors import CmdtoolError, ParameterError, UsageError, first_line
from ..utils.imports import working_directory_importable
from ..utils.progress import NullProgress

KIND = "evaluation"


def all_methods() -> tuple[str, ...]:
    """Every method ``evaluate`` knows: the baselines, then each registered reconstruction."""
    from ..analyzers import reconstructions

    return BASELINES + tuple(reconstructions())


class EvaluationError(CmdtoolError):
    """The user's metric function failed (or returned something that is not a dict of numbers)."""


# ---------------------------------------------------------------------------------------------- the callable
def load_callable(spec: str, what: str = "--fn") -> Callable:
    """``package.module:function`` or ``path/to/file.py:function`` -> the function (imported, never eval'd). A
    module is looked for on the import path with the working directory first, as ``python -m`` does; the path is
    restored afterwards."""
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise UsageError(f"{what} {spec!r}: write module:function or path/to/file.py:function")
    try:
        if target.endswith(".py") or "/" in target or "\\" in target:
            path = Path(target)
            if not path.is_file():
                raise UsageError(f"{what} {spec!r}: no file {path}")
            module_name = f"_cmdtool_user_{abs(hash(str(path.resolve())))}"
            module_spec = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[module_name] = module  # lets dataclasses/pickle inside the user's file find it
            module_spec.loader.exec_module(module)
        else:
            with working_directory_importable():  # as `python -m` has it: a module beside the user's shell
                module = importlib.import_module(target)
    except UsageError:
        raise
    except ModuleNotFoundError as exc:
        if exc.name and target.startswith(exc.name):
            file_form = target.replace(".", "/") + ".py"
            raise UsageError(f"{what} {spec!r}: no module {exc.name!r} on the import path (the working directory "
                             f"and PYTHONPATH); name its file instead, e.g. {what} {file_form}:{attr}") from None
        raise UsageError(f"{what} {spec!r}: cannot import {target}: {type(exc).__name__}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - any import-time failure of user code is reported in one line
        raise UsageError(f"{what} {spec!r}: cannot import {target}: {type(exc).__name__}: {exc}") from None
    func = getattr(module, attr, None)
    if not callable(func):
        raise UsageError(f"{what} {spec!r}: {target} has no function {attr!r}")
    return func


def metric_function(fn: str | Callable, model_factory: str | Callable | None = None,
                    strip_prefix: tuple[str, ...] = ()) -> Callable[[dict], dict]:
    """The callable that maps a state dict to metrics.

    Without a factory ``fn(state_dict)`` is called. With one, cmdtool builds the model once
    (``model_factory()``), loads each state dict into it (``strict=True``, eval mode) and calls ``fn(model)``;
    a state dict that does not fit the model is a one-line :class:`~cmdtool.errors.UsageError` saying what
    differs (and which ``strip_prefix`` would fix a wrapper's prefix). ``strip_prefix``: prefixes removed from
    the tensor names first (``_orig_mod.`` of torch.compile, ``module.`` of DataParallel/DDP).
    """
    func = load_callable(fn) if isinstance(fn, str) else fn
    strip_prefix = tuple(strip_prefix)
    if model_factory is None:
        if not strip_prefix:
            return func
        return lambda state_dict: func(_stripped(state_dict, strip_prefix))
    factory = load_callable(model_factory, "--model-factory") if isinstance(model_factory, str) else model_factory
    model = factory()
    expected = list(model.state_dict())

    def on_model(state_dict: dict) -> dict:
        state_dict = _stripped(state_dict, strip_prefix)
        if set(state_dict) != set(expected):
            raise UsageError(load_mismatch(list(state_dict), expected))
        try:
            model.load_state_dict(state_dict, strict=True)
        except RuntimeError as exc:  # shapes: torch lists every mismatch on lines of their own
            raise UsageError(f"the store's weights do not load into the --model-factory model: "
                             f"{first_line_of_load_error(exc)}") from None
        model.eval()
        return func(model)

    return on_model


def _stripped(state_dict: dict, prefixes: tuple[str, ...]) -> dict:
    if not prefixes:
        return state_dict
    from ..ingestion.formats import strip_prefix

    return {strip_prefix(name, prefixes): value for name, value in state_dict.items()}


def load_mismatch(names: list[str], expected: list[str]) -> str:
    """One line on how the store's tensor names differ from the model's: a wrapper's prefix on one side (and
    the option that removes it), else the counts and first names missing and unexpected."""
    have, want = set(names), set(expected)
    missing = [n for n in expected if n not in have]
    unexpected = [n for n in names if n not in want]
    text = "the store's weights do not load into the --model-factory model: "
    if missing and unexpected and len(missing) == len(unexpected):
        extra = unexpected[0][:len(unexpected[0]) - len(missing[0])] if unexpected[0].endswith(missing[0]) else ""
        if extra and sorted(n[len(extra):] for n in unexpected if n.startswith(extra)) == sorted(missing) \
                and all(n.startswith(extra) for n in unexpected):
            return text + (f"the store's tensor names carry the prefix {extra!r} and the model's do not; pass "
                           f"--strip-prefix {extra}")
    parts = []
    if missing:
        parts.append(f"{len(missing)} of the model's tensors missing ({', '.join(missing[:3])}"
                     f"{', ...' if len(missing) > 3 else ''})")
    if unexpected:
        parts.append(f"{len(unexpected)} not in the model ({', '.join(unexpected[:3])}"
                     f"{', ...' if len(unexpected) > 3 else ''})")
    return text + "; ".join(parts)


def first_line_of_load_error(exc: BaseException) -> str:
    """The first mismatch of a ``load_state_dict`` error (torch puts each on a line of its own)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    detail = next((line for line in lines[1:] if line), "")
    return detail or (lines[0] if lines else type(exc).__name__)


def checked_metrics(value, method: str, label: int) -> dict[str, float]:
    """The metric function's return value as ``{name: float}``, or an :class:`EvaluationError` saying what it
    returned instead (naming the epoch and method)."""
    if not isinstance(value, dict) or not value:
        raise EvaluationError(f"the metric function returned {type(value).__name__} for epoch {label} of method "
                              f"{method}; it must return a non-empty dict of numbers, e.g. {{'test_acc': 0.93}}")
    out = {}
    for key, number in value.items():
        try:
            out[str(key)] = float(number)
        except (TypeError, ValueError):
            raise EvaluationError(f"the metric function returned a non-number for {key!r} at epoch {label} of "
                                  f"method {method}: {number!r}") from None
    return out


def lower_is_better(metric: str, mode: str = "auto") -> bool:
    """``auto``: losses, errors and perplexities are minimised, everything else (accuracy, F1...) maximised."""
    if mode not in ("auto", "max", "min"):
        raise UsageError(f"unknown sort mode {mode!r}: choose auto, max or min")
    if mode != "auto":
        return mode == "min"
    name = metric.lower()
    return any(word in name for word in ("loss", "err", "perplexity", "nll", "mse", "mae"))


# ---------------------------------------------------------------------------------------------- epochs
def select_columns(store, epochs: str | None = None, every: int = 1) -> tuple[slice, list[int]]:
    """The window (a column slice) and the evaluated columns in it: every K-th from its start, plus its end."""
    if int(every) < 1:
        raise ParameterError("{every} must be at least 1, got {value}", "every", value=every)
    window = store.resolve_epochs(epochs)
    columns = list(range(window.start, window.stop, int(every)))
    if columns[-1] != window.stop - 1:
        columns.append(window.stop - 1)  # the final epoch is what the table compares
    return window, columns


# ---------------------------------------------------------------------------------------------- the run
@dataclass
class Evaluation:
    """An evaluation in progress or loaded from the store."""

    store: object
    name: str = "default"
    config: dict = field(default_factory=dict)
    records: list = field(default_factory=list)
    timings: dict = field(default_factory=dict)

    def method_timing(self, method: str) -> dict:
        """This method's running timing record (seconds in the metric function, in reconstruction, count)."""
        return self.timings.setdefault(method, {"evaluate_seconds": 0.0, "reconstruct_seconds": 0.0,
                                                "evaluations": 0})

    def add(self, method: str, label: int, metrics: dict) -> None:
        self.records.append({"method": method, "epoch": int(label), "metrics": metrics})

    def commit(self) -> None:
        writer = self.store.results.writer(KIND, self.name)
        writer.attrs.update(method=KIND, records=self.records, config=self.config, timings=self.timings,
                            store_revision=self.store.revision)
        writer.commit(self.name)

    # ---------------------------------------------------------------- reading
    @classmethod
    def load(cls, store, name: str = "default") -> "Evaluation":
        result = store.results.get(KIND, name)
        return cls(store, name, dict(result.attrs.get("config", {})), list(result.attrs.get("records", [])),
                   dict(result.attrs.get("timings", {})))

    def methods(self) -> list[str]:
        return list(dict.fromkeys(r["method"] for r in self.records))

    def curve(self, method: str, metric: str) -> tuple[np.ndarray, np.ndarray]:
        """(epochs, values) of one metric of one method, by epoch."""
        rows = sorted((r["epoch"], r["metrics"].get(metric, math.nan)) for r in self.records
                      if r["method"] == method)
        return (np.array([e for e, _ in rows], dtype=np.int64),
                np.array([np.nan if v is None else v for _, v in rows], dtype=np.float64))

    def summary(self, sort_metric: str | None = None, sort_mode: str = "auto") -> list[dict]:
        """Per method: metrics at its final evaluated epoch, and its best epoch by ``sort_metric``."""
        if not self.records:
            return []
        metric = sort_metric or next(iter(self.records[0]["metrics"]))
        lower = lower_is_better(metric, sort_mode)
        rows = []
        for method in self.methods():
            records = sorted((r for r in self.records if r["method"] == method), key=lambda r: r["epoch"])
            scored = [r for r in records if r["metrics"].get(metric) is not None
                      and math.isfinite(r["metrics"][metric])]
            best = (min if lower else max)(scored, key=lambda r: r["metrics"][metric]) if scored else None
            rows.append({"method": method, "final_epoch": records[-1]["epoch"], "final": records[-1]["metrics"],
                         "sort_metric": metric, "best_epoch": best["epoch"] if best else None,
                         "best": best["metrics"][metric] if best else None, "epochs_evaluated": len(records)})
        return rows


def default_methods(store, decomposition: str = "default") -> list[str]:
    """The methods ``evaluate`` runs by default: the baselines and every reconstruction of the decompositions
    named ``decomposition`` in the store (a method that extends another, e.g. kga, only on request)."""
    from ..analyzers import reconstructions

    out = list(BASELINES)
    loaded: dict = {}
    for name, (cls, reconstruction) in reconstructions().items():
        if cls.extends is not None or not store.results.exists(cls.method, decomposition):
            continue
        if reconstruction.requires is not None:
            analyzer = loaded.setdefault(cls.method, cls.load(store, decomposition))
            if not reconstruction.available(analyzer):
                continue
        out.append(name)
    return out


def evaluate(store, fn: str | Callable, *, model_factory: str | Callable | None = None, methods=None,
             epochs: str | None = None, every: int = 1, ema_beta: float = 0.9, swa_fraction: float = 0.25,
             decomposition: str = "default", name: str = "default", memory_budget: int = DEFAULT_MEMORY_BUDGET,
             commit_seconds: float = 30.0, progress=None, strip_prefix: tuple[str, ...] = ()) -> Evaluation:
    """Run the evaluation and commit it as ``results/evaluation/<name>`` (see the module note).

    ``strip_prefix``: prefixes removed from the tensor names before the metric function (or the model) sees
    them (:func:`metric_function`)."""
    from ..analyzers import load_reconstruction
    from ..ingestion.checkpoints import build_state_dict

    progress = progress or NullProgress()
    ema_beta = check_ema_beta(ema_beta)
    window, columns = select_columns(store, epochs, every)
    swa_len = swa_length(window.stop - window.start, swa_fraction)
    chosen = _resolve_methods(methods) if methods else default_methods(store, decomposition)
    loaded: dict = {}
    # every requested decomposition is loaded (and checked) before any evaluation
    modelled = {method: load_reconstruction(store, method, decomposition, loaded) for method in chosen
                if method not in BASELINES}
    call = metric_function(fn, model_factory, strip_prefix)
    labels = store.labels
    run = Evaluation(store, name, config={
        "fn": fn if isinstance(fn, str) else getattr(fn, "__qualname__", repr(fn)),
        "model_factory": model_factory if model_factory is None or isinstance(model_factory, str)
        else getattr(model_factory, "__qualname__", repr(model_factory)),
        "methods": chosen, "decomposition": decomposition, "epochs": [int(labels[c]) for c in columns],
        "window": [int(labels[window.start]), int(labels[window.stop - 1])], "every": int(every),
        "ema_beta": float(ema_beta), "swa_fraction": float(swa_fraction), "swa_length": swa_len,
        "swa_epochs": "evaluated epochs whose window of the last swa_length checkpoints is full",
        "skipped": {}})
    last_commit = [time.perf_counter()]

    def evaluate_vector(method: str, column: int, vector: np.ndarray) -> None:
        label = int(labels[column])
        state = build_state_dict(store, vector, column)
        started = time.perf_counter()
        try:
            value = call(state)
        except UsageError:  # the weights do not fit the model: one line, said as it is
            run.commit()
            raise
        except Exception as exc:  # noqa: BLE001 - the user's code: keep what was computed, name where it failed
            run.commit()
            raise EvaluationError(f"the metric function failed at epoch {label} of method {method}: "
                                  f"{describe_failure(exc, state)} ({len(run.records)} result(s) computed before are "
                                  f"kept in evaluation/{name})") from exc
        try:
            metrics = checked_metrics(value, method, label)
        except EvaluationError:
            run.commit()
            raise
        timing = run.method_timing(method)
        timing["evaluate_seconds"] += time.perf_counter() - started
        timing["evaluations"] += 1
        run.add(method, label, metrics)
        if time.perf_counter() - last_commit[0] > commit_seconds:
            run.commit()
            last_commit[0] = time.perf_counter()

    started_all = time.perf_counter()
    baselines = [m for m in chosen if m in BASELINES]
    if baselines:
        started = time.perf_counter()
        for method, column, vector in iter_averages(store, window, columns, baselines, ema_beta, swa_len,
                                                    memory_budget, progress, "evaluate original/EMA/SWA"):
            evaluate_vector(method, column, vector)
        # reading the store and averaging: the stage's time less the time spent in the metric function
        spent = sum(run.timings.get(m, {}).get("evaluate_seconds", 0.0) for m in baselines)
        run.timings["baselines_stream_seconds"] = time.perf_counter() - started - spent
        run.commit()
        last_commit[0] = time.perf_counter()
    for method, (analyzer, reconstruction) in modelled.items():
        inside = [c for c in columns if analyzer.window_.start <= c < analyzer.window_.stop]
        if len(inside) < len(columns):
            run.config["skipped"][method] = [int(labels[c]) for c in columns if c not in inside]
            progress.note(f"{method}: {len(columns) - len(inside)} epoch(s) outside the decomposition's window "
                          f"are skipped")
        group = max(1, int(memory_budget // (4 * max(store.n_rows, 1))))
        with progress.task(f"evaluate {method}", total=len(inside), unit="epochs") as task:
            for g0 in range(0, len(inside), group):
                chunk = inside[g0:g0 + group]
                started = time.perf_counter()
                vectors = analyzer.reconstruct_epochs(store, chunk, **reconstruction.options)
                timing = run.method_timing(method)
                timing["reconstruct_seconds"] += time.perf_counter() - started
                for k, column in enumerate(chunk):
                    evaluate_vector(method, column, vectors[:, k])
                    task.advance(1)
        run.commit()
        last_commit[0] = time.perf_counter()
    run.timings["total_seconds"] = time.perf_counter() - started_all
    run.commit()
    return run


def describe_failure(exc: BaseException, state: dict) -> str:
    """One line on the metric function's exception; a ``load_state_dict`` error is cut to its first mismatch,
    with the option that strips a wrapper's prefix when every name carries one."""
    if isinstance(exc, RuntimeError) and "Error(s) in loading state_dict" in str(exc):
        from ..ingestion.ingest import carried_prefix

        prefix = carried_prefix(state)
        hint = f"; every tensor name carries the prefix {prefix!r}: pass --strip-prefix {prefix}" if prefix else ""
        return f"the state dict does not load: {first_line_of_load_error(exc)}{hint}"
    return f"{type(exc).__name__}: {first_line(exc)}"


def _resolve_methods(methods) -> list[str]:
    """The asked methods (repeated or comma-separated), each checked against :func:`all_methods`."""
    known = all_methods()
    chosen = []
    for item in methods:
        for method in str(item).split(","):
            method = method.strip().lower()
            if not method:
                continue
            if method not in known:
                raise UsageError(f"unknown method {method!r}: choose from {', '.join(known)}")
            chosen.append(method)
    return list(dict.fromkeys(chosen))
