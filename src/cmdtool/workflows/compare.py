"""Several models of the same trajectories side by side (``cmdtool compare``): error, size, time.

Written against the analyzer base contract only (``metrics_``, ``timings_``, ``get_params``, ``save``/``load``,
the declared parameters), so any registered method (cmd, dmd, kga, pca, pod, ...) takes part. For each method it
reuses a saved result fitted on the same store revision and window: when the caller gave none of that method's
options and its size is not set by the budget, the user's own fit (``decompose`` saves it as ``default``: a
``cmdtool decompose --modes 5`` is compared as it was fitted, not refitted at the method's default), else a result
with the same configuration; otherwise it fits and saves one. Each row says which fit it is (``fit``).

Fair by default (``equal_budget=True``): every method that can trade size for accuracy (its classmethod
``options_for_budget(budget, N, T)``, e.g. DMD's rank or PCA's dims) is sized to store at most as many numbers as
the reference, so that errors are compared at equal model size. The reference is the first method that cannot be
sized from a budget (CMD), else the first method named; an explicit ``budget`` replaces it. A size the caller gave
explicitly (e.g. ``rank``) is kept, and said so.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from ..errors import UsageError
from ..analyzers import get_analyzer


@dataclass
class MethodComparison:
    method: str
    name: str
    reused: bool
    config: dict
    size: dict                       # the size parameters as fitted: rank / dims / modes
    relative_error: float
    relative_error_motion: float
    final_epoch_error: float
    worst_epoch_error: float
    worst_epoch: int                 # label of the worst-modelled checkpoint
    stored_floats: int
    compression_ratio: float         # N·T raw floats / stored floats
    fit_seconds: float | None        # wall time of the fit (of the saved fit when reused)
    wall_seconds: float              # wall time inside this comparison (≈ 0 when reused)
    budget_matched: bool = False     # sized by options_for_budget
    size_given: bool = False         # under an equal budget, kept the size the caller gave
    epoch_relative_error: list = field(default_factory=list)
    fit: str = ""                    # which fit this row is, in words (saved by decompose, reused, fitted now)


@dataclass
class Comparison:
    store: str
    store_revision: int
    n_rows: int
    n_cols: int
    labels: list
    raw_floats: int
    budget: int | None
    methods: list[MethodComparison]
    budget_source: str | None = None  # the reference method whose size is the budget, "given", or None (own sizes)

    def to_dict(self) -> dict:
        return asdict(self)

    def best(self, key: str = "relative_error") -> str:
        return min(self.methods, key=lambda m: getattr(m, key)).method


def runtime_keys(analyzer) -> set[str]:
    """Parameters that change how a fit runs, not what it computes (device, save_modes, ...)."""
    return {p.name for p in analyzer.params if p.runtime}


def _same_config(saved: dict, wanted: dict, ignored: set[str]) -> bool:
    keys = (set(saved) | set(wanted)) - ignored
    return all(str(saved.get(k)) == str(wanted.get(k)) for k in keys)


def result_name_for(prefix: str, analyzer, columns: slice) -> str:
    """``<prefix>-<digest of window and configuration>``: comparisons of different configurations (e.g. with
    and without an equal budget) keep their own fits instead of overwriting one another."""
    ignored = runtime_keys(analyzer)
    config = {k: str(v) for k, v in sorted(analyzer.get_params().items()) if k not in ignored}
    text = json.dumps([columns.start, columns.stop, config], sort_keys=True)
    return f"{prefix}-{hashlib.sha1(text.encode()).hexdigest()[:8]}"


def find_reusable(store, analyzer, columns: slice, prefer: str | None = None) -> str | None:
    """Name of a saved result of ``analyzer.method`` fitted on this store revision and window with the same
    configuration (runtime options such as the device aside), or None."""
    names = [n for _, n in store.results.list(analyzer.method)]
    if prefer in names:
        names.remove(prefer)
        names.insert(0, prefer)
    wanted = analyzer.get_params()
    for name in names:
        attrs = store.results.get(analyzer.method, name).attrs
        if attrs.get("store_revision") != store.revision:
            continue
        if list(attrs.get("columns", [])) != [columns.start, columns.stop]:
            continue
        if _same_config(attrs.get("config", {}), wanted, runtime_keys(analyzer)):
            return name
    return None


def saved_fit(store, method: str, columns: slice, own_prefix: str) -> str | None:
    """The user's own saved result of ``method`` on this store revision and window, whatever its configuration:
    ``default`` (what ``decompose`` saves) first, then other names in order; never a fit a comparison saved
    (``<own_prefix>-<digest>``, perhaps sized to another budget); None when there is none."""
    names = [n for _, n in store.results.list(method) if not n.startswith(f"{own_prefix}-")]
    names.sort(key=lambda n: (n != "default", n))
    for name in names:
        attrs = store.results.get(method, name).attrs
        if attrs.get("store_revision") == store.revision and \
                list(attrs.get("columns", [])) == [columns.start, columns.stop]:
            return name
    return None


def compare(store, methods, options: dict | None = None, *, name: str = "compare", reuse: bool = True,
            equal_budget: bool = True, budget: int | None = None, progress=None) -> Comparison:
    """Fit (or reuse) every method on the same trajectories and collect their figures.

    ``options`` are CLI-style options (``rank``, ``dims``, ``modes``, ``epochs``, ``device`` ...); each method
    takes the ones named like its parameters, None meaning its own default. New fits are saved as
    ``results/<method>/<name>-<config digest>`` (see :func:`result_name_for`). ``equal_budget`` (the default)
    sizes the methods to one budget (see the module note); ``budget`` gives it explicitly. ``reuse=False``
    fits every method again.
    """
    methods = list(dict.fromkeys(m.lower() for m in methods))
    if not methods:
        raise UsageError("name at least one method to compare, e.g. `cmdtool compare dmd pca`")
    classes = {m: get_analyzer(m) for m in methods}
    options = {k: v for k, v in (options or {}).items() if v is not None}
    columns = store.resolve_epochs(options.get("epochs"))
    n_rows, n_cols = store.n_rows, columns.stop - columns.start
    raw = n_rows * n_cols

    # the reference of an equal budget is fitted first, with its own options
    equal_budget = equal_budget or budget is not None
    order = list(methods)
    reference = None
    if equal_budget and budget is None:
        unsized = [m for m in methods if classes[m].options_for_budget is None]
        reference = (unsized or methods)[0]
        order.remove(reference)
        order.insert(0, reference)

    fitted: dict[str, MethodComparison] = {}
    for method in order:
        cls = classes[method]
        method_options = dict(options)
        matched = given = False
        if equal_budget and method != reference and cls.options_for_budget is not None:
            sized = cls.options_for_budget(budget, n_rows, n_cols)
            given = any(key in options for key in sized)   # the caller's explicit size wins
            method_options.update({k: v for k, v in sized.items() if k not in options})
            matched = not given
        analyzer = cls.from_options(method_options)
        started = time.perf_counter()
        own_name = result_name_for(name, analyzer, columns)
        options_given = sorted(p.name for p in cls.params
                               if p.name in options and not p.runtime and p.name != "epochs")
        saved, fit = None, ""
        if reuse and not matched and not options_given:  # nothing asked of this method: the user's own fit
            saved = saved_fit(store, method, columns, name)
            if saved is not None:
                fit = f"saved fit '{saved}'" + (" (of decompose)" if saved == "default" else "")
        if saved is None and reuse:
            saved = find_reusable(store, analyzer, columns, prefer=own_name)
            fit = f"saved fit '{saved}' (same configuration)" if saved is not None else ""
        if saved is not None:
            analyzer = cls.load(store, saved)
            result_name = saved
        else:
            analyzer.fit(store, progress=progress)
            analyzer.save(own_name)
            result_name = own_name
            why = ("sized to the budget" if matched else
                   f"{', '.join(options_given)} as given" if options_given else
                   "--refit" if not reuse else "no saved fit on this window")
            fit = f"fitted now ({why}), saved as '{own_name}'"
        wall = time.perf_counter() - started
        metrics = analyzer.metrics_
        epoch_errors = [float(x) for x in metrics["epoch_relative_error"]]
        worst = int(np.argmax(epoch_errors))
        stored = int(metrics["stored_floats"])
        fitted[method] = MethodComparison(
            method=method, name=result_name, reused=saved is not None, config=analyzer.get_params(),
            size=analyzer.model_size(),
            relative_error=float(metrics["relative_error"]),
            relative_error_motion=float(metrics.get("relative_error_motion") or float("nan")),
            final_epoch_error=epoch_errors[-1], worst_epoch_error=epoch_errors[worst],
            worst_epoch=int(store.labels[columns][worst]), stored_floats=stored,
            compression_ratio=raw / stored if stored else float("inf"),
            fit_seconds=analyzer.timings_.get("fit_seconds"), wall_seconds=wall, budget_matched=matched,
            size_given=given, epoch_relative_error=epoch_errors, fit=fit)
        if equal_budget and method == reference:
            budget = stored
    source = None if not equal_budget else (reference if reference is not None else "given")
    return Comparison(store=str(store.path), store_revision=store.revision, n_rows=n_rows, n_cols=n_cols,
                      labels=[int(x) for x in store.labels[columns]], raw_floats=raw, budget=budget,
                      methods=[fitted[m] for m in methods], budget_source=source)
