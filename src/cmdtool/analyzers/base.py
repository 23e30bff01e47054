"""The analyzer contract: scikit-learn's estimator conventions over a trajectory store, PyDMD's one class per method.

An analyzer is one class in one module of this package (listed in the registry, see ``__init__.py``). It declares

- ``params``: its parameters (:class:`~cmdtool.analyzers.params.Param`). Its ``__init__`` is written out with
  exactly these keyword-only parameters and defaults (checked when the class is defined): it stores them and does
  nothing else. ``get_params`` / ``set_params`` / :func:`clone` are scikit-learn's. ``fit`` validates them first
  (one declarative check whose errors name the library parameter; the CLI spells it as its flag).
- ``reconstructions``: the modelled checkpoints it can give (:class:`Reconstruction`), which ``cmdtool
  evaluate`` and ``cmdtool reconstruct --method`` offer.
- ``figures``: its report figures (:class:`FigureSpec`), drawn by ``cmdtool report`` when a result exists (the
  drawing functions live in :mod:`cmdtool.report.figures`; the analyzer only names them).
- ``saved_arrays`` / ``streamed_arrays`` / ``saved_attrs``: its learned state, which :meth:`Analyzer.save` and
  :meth:`Analyzer.load` persist without code of their own.

and implements ``_fit(store, writer, progress)`` (the streaming passes, at most two) and ``_reconstruct``.

Learned state ends in ``_`` and is documented in the class's numpydoc "Attributes" section. Per-row outputs
(N-long) are streamed into a *staged* result while a pass runs, so memory stays bounded by the block size
whatever N is; they are lazy zarr arrays. A fit that fails for any reason discards its staged result and leaves
the analyzer not fitted. ``metrics_`` holds the figures every method shares (for ``compare`` and ``report``):
``relative_error`` (‖W−Ŵ‖/‖W‖), ``relative_error_motion`` (‖W−Ŵ‖/‖W − mean_t W‖), ``epoch_relative_error`` (one
per column: ‖w_t − ŵ_t‖/‖w_t‖) and ``stored_floats`` (numbers the model keeps).

See docs/architecture.md for the whole contract and a worked example (POD).
"""

from __future__ import annotations

import copy
import inspect
import time
from dataclasses import dataclass, field
from typing import Callable, ClassVar

import numpy as np

from ..errors import NotFittedError, ParameterError, UsageError
from ..utils.progress import NullProgress
from .params import Param, validate


# ---------------------------------------------------------------------------------------------- declarations
@dataclass(frozen=True)
class Reconstruction:
    """A modelled checkpoint an analyzer gives, under the name ``evaluate`` and ``reconstruct`` use.

    ``options`` are the keyword arguments of :meth:`Analyzer.reconstruct_epochs` that select it (e.g. CMD's
    ``variant="online"``); ``requires`` names a boolean attribute of the fitted analyzer that must be true for it
    to exist (e.g. ``has_online``), and ``produce`` the extra ``cmdtool decompose`` options that make it.
    """

    name: str
    label: str
    options: dict = field(default_factory=dict, compare=False)
    requires: str | None = None
    produce: str = ""

    def available(self, analyzer) -> bool:
        return self.requires is None or bool(getattr(analyzer, self.requires))


@dataclass(frozen=True)
class FigureSpec:
    """A report figure of an analyzer's result.

    ``draw`` names the drawing function as ``"module:function"`` (imported only when the report draws it, so that
    declaring a figure costs no matplotlib import); it is called with a :class:`ResultView` and returns a
    ``matplotlib.figure.Figure``. ``caption`` is a string or a function of the view, ``numbers`` a function of the
    view giving the key numbers shown beside the figure. ``missing_note`` is the note's text when no result can
    draw the figure (``None``: no note), ``note`` an optional function of the view giving a note when it is drawn.
    """

    id: str
    title: str
    caption: str | Callable[["ResultView"], str]
    draw: str
    numbers: Callable[["ResultView"], dict] | None = None
    missing_note: str | None = None
    note: Callable[["ResultView"], str | None] | None = None


# ---------------------------------------------------------------------------------------------- views of results
class ResultView:
    """One interface over a committed :class:`~cmdtool.store.results.Result` and a fitted analyzer (saved or not).

    ``small(key)`` gives a small stored array (an analyzer's ``key_`` attribute), ``lazy(key)`` a zarr array read
    on demand (N-long outputs), ``value(key)`` a json attribute (an analyzer's ``key_``). ``store`` is the store the
    result belongs to, when known; ``cache`` is shared by every view of the same source (e.g. a sample read once
    for several figures).
    """

    def __init__(self, source, store=None):
        from ..store.results import Result

        if isinstance(source, ResultView):
            self.__dict__.update(source.__dict__)
            self._store = store if store is not None else source._store
            return
        self.source, self._store, self.cache = source, store, {}
        if isinstance(source, Result):
            self.result, self.analyzer = source, None
            self.method, self.name = source.kind, source.name
            self.attrs = source.attrs
            self.metrics = source.metrics
            self.config = source.config
        elif hasattr(source, "metrics_") and hasattr(source, "method"):
            self.result, self.analyzer = getattr(source, "result_", None), source
            self.method, self.name = source.method, getattr(source, "name_", None) or "unsaved"
            self.attrs = dict(self.result.attrs) if self.result is not None else {}
            self.metrics = source.metrics_
            self.config = source.get_params(deep=False)
        else:
            raise TypeError(f"expected a cmdtool Result or a fitted analyzer, got {type(source).__name__}")

    @property
    def labels(self) -> np.ndarray:
        if self.analyzer is not None:
            return np.asarray(self.analyzer.labels_, dtype=np.int64)
        return np.asarray(self.attrs["labels"], dtype=np.int64)

    @property
    def window(self) -> slice:
        if self.analyzer is not None:
            return self.analyzer.window_
        return slice(*self.attrs["columns"])

    def has(self, key: str) -> bool:
        if self.analyzer is not None:
            return getattr(self.analyzer, key + "_", None) is not None
        return key in self.result

    def small(self, key: str) -> np.ndarray:
        if self.analyzer is not None:
            return np.asarray(getattr(self.analyzer, key + "_"))
        return self.result[key]

    def lazy(self, key: str):
        if self.analyzer is not None:
            return getattr(self.analyzer, key + "_")
        return self.result.array(key)

    def value(self, key: str, default=None):
        if self.analyzer is not None:
            return getattr(self.analyzer, key + "_", default)
        return self.attrs.get(key, default)

    def store(self, store=None):
        store = store if store is not None else self._store
        store = store if store is not None else getattr(self.analyzer, "store_", None)
        if store is None:
            raise UsageError(f"this figure reads sampled trajectories: pass the store the {self.method} result "
                             "belongs to (store=...)")
        return store


# ---------------------------------------------------------------------------------------------- estimators
class Estimator:
    """Parameters declared once (``params``), stored by a keyword-only ``__init__`` that does no work (as in
    scikit-learn), read and changed by :meth:`get_params` / :meth:`set_params`, validated by
    :meth:`validate_params`, shown by ``repr``; :meth:`_check_fitted` guards every use of learned state.

    A subclass that declares ``params`` writes its ``__init__`` out (so that type checkers and IDEs see the
    parameters)::

        params = (DIMS, EPOCHS, DEVICE)

        def __init__(self, *, dims=40, epochs=None, device="auto"):
            self.dims = dims
            self.epochs = epochs
            self.device = device

    and the class statement fails (``TypeError``) unless that signature has exactly the declared names, defaults
    and order, all keyword-only: the ``Param`` table stays the one source of truth.
    """

    params: ClassVar[tuple[Param, ...]] = ()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        names = [p.name for p in cls.params]
        if len(set(names)) != len(names):
            raise TypeError(f"{cls.__name__} declares a parameter twice: {names}")
        if cls.params:
            _check_init_signature(cls)
        if cls.__doc__ and cls.params and "Parameters\n" not in cls.__doc__:
            cls.__doc__ = _with_parameters_section(cls.__doc__, cls.params)

    @classmethod
    def param_names(cls) -> list[str]:
        return [p.name for p in cls.params]

    def get_params(self, deep: bool = True) -> dict:
        """The parameters as given, by name (scikit-learn's ``get_params``).

        ``deep=True`` also lists the parameters of parameters that are estimators, as ``name__sub`` (none of
        this package's analyzers has one; the keyword is scikit-learn's).
        """
        out = {}
        for name in self.param_names():
            value = getattr(self, name)
            if deep and hasattr(value, "get_params") and not isinstance(value, type):
                out.update((f"{name}__{key}", sub) for key, sub in value.get_params(deep=True).items())
            out[name] = value
        return out

    def set_params(self, **params) -> "Estimator":
        """Set parameters by name (``name__sub`` for a parameter of a parameter that is an estimator) and return
        ``self``, as scikit-learn's ``set_params``; nothing is validated or refitted until ``fit``."""
        names = self.param_names()
        nested: dict[str, dict] = {}
        for key, value in params.items():
            name, delimiter, sub = key.partition("__")
            if name not in names:
                raise ValueError(f"invalid parameter {name!r} for estimator {type(self).__name__}; its parameters "
                                 f"are {', '.join(names)}")
            if delimiter:
                nested.setdefault(name, {})[sub] = value
            else:
                setattr(self, name, value)
        for name, sub_params in nested.items():
            getattr(self, name).set_params(**sub_params)
        return self

    @classmethod
    def from_options(cls, options: dict):
        """Build from an option dict (e.g. the CLI's), taking only this class's parameters that are not None."""
        names = cls.param_names()
        return cls(**{k: v for k, v in options.items() if k in names and v is not None})

    def validate_params(self) -> None:
        """The declarative check of every parameter, then the rules that involve several (``_check_params``)."""
        validate(self.params, self.get_params(deep=False))
        self._check_params()

    def _check_params(self) -> None:
        """Hook: rules between parameters (raise :class:`~cmdtool.errors.ParameterError`)."""

    def __repr__(self) -> str:
        changed = [f"{p.name}={getattr(self, p.name)!r}" for p in self.params
                   if not _same_value(getattr(self, p.name), p.default)]
        return f"{type(self).__name__}({', '.join(changed)})"

    # ------------------------------------------------------------------ fitted state
    @property
    def is_fitted(self) -> bool:
        return getattr(self, "metrics_", None) is not None

    def _check_fitted(self) -> None:
        if not self.is_fitted:
            name = type(self).__name__
            raise NotFittedError(f"this {name} is not fitted yet: call fit(store) first, or {name}.load(store, name) "
                                 "for a saved result")


def clone(estimator: Estimator) -> Estimator:
    """A new, unfitted estimator with the same parameters (scikit-learn's ``sklearn.base.clone``).

    Parameters that are estimators are cloned in turn; other values are deep-copied, so that the clone shares
    no mutable parameter with the original. Learned state (``*_``) is not copied.
    """
    if not isinstance(estimator, Estimator):
        raise TypeError(f"cannot clone {estimator!r}: it is not a cmdtool estimator (no declared params)")
    params = {name: clone(value) if isinstance(value, Estimator) else copy.deepcopy(value)
              for name, value in estimator.get_params(deep=False).items()}
    return type(estimator)(**params)


def _check_init_signature(cls) -> None:
    """Raise ``TypeError`` unless ``cls.__init__`` takes exactly the declared parameters, keyword-only, with the
    declared defaults, in the declared order."""
    try:
        signature = inspect.signature(cls.__init__)
    except (TypeError, ValueError) as exc:  # pragma: no cover - a C-level __init__
        raise TypeError(f"{cls.__name__}.__init__ has no signature to check against its params: {exc}") from None
    written = [p for name, p in signature.parameters.items() if name != "self"]
    got = [(p.name, p.kind, p.default) for p in written]
    want = [(p.name, inspect.Parameter.KEYWORD_ONLY, p.default) for p in cls.params]
    if len(got) != len(want) or any(g[:2] != w[:2] or not _same_value(g[2], w[2]) for g, w in zip(got, want)):
        declared = ", ".join(f"{p.name}={p.default!r}" for p in cls.params)
        raise TypeError(f"{cls.__name__}.__init__{signature} does not match its declared params: write "
                        f"__init__(self, *, {declared}) and store each value as is")


def _same_value(a, b) -> bool:
    try:
        return bool(a == b) and type(a) is type(b)
    except Exception:  # noqa: BLE001 - arrays and odd types: show them
        return False


def _with_parameters_section(doc: str, params) -> str:
    """The class docstring with a numpydoc "Parameters" section generated from the declaration, placed before its
    "Attributes" section."""
    doc = inspect.cleandoc(doc)
    lines = ["Parameters", "----------"]
    for p in params:
        kind = p.kind.__name__ + (" or None" if p.optional else "")
        lines.append(f"{p.name} : {kind}, default {p.default!r}")
        lines.append(f"    {p.help}" + (f" One of {', '.join(map(repr, p.choices))}." if p.choices else ""))
    section = "\n".join(lines) + "\n\n"
    marker = "Attributes\n----------"
    return doc.replace(marker, section + marker, 1) if marker in doc else doc + "\n\n" + section.rstrip()


# ---------------------------------------------------------------------------------------------- analyzers
class Analyzer(Estimator):
    """A method that models the trajectories of a store (see the module note for the contract)."""

    method: ClassVar[str] = ""               # registry name and result kind, e.g. "pca"
    title: ClassVar[str] = ""                # how people write it, e.g. "PCA"
    fit_command: ClassVar[str | None] = None  # the command that makes a result (default `cmdtool decompose -m M`)
    extends: ClassVar[str | None] = None     # a method whose model this one is too (KGA extends DMD)
    min_checkpoints: ClassVar[int] = 2
    reconstructions: ClassVar[tuple[Reconstruction, ...]] = ()
    figures: ClassVar[tuple[FigureSpec, ...]] = ()
    key_numbers: ClassVar[tuple[str, ...]] = ()   # headline keys the html report shows as details
    saved_arrays: ClassVar[tuple[str, ...]] = ()     # small learned arrays ``key_``, saved whole
    streamed_arrays: ClassVar[tuple[str, ...]] = ()  # per-row outputs streamed into the staged result (lazy)
    saved_attrs: ClassVar[tuple[str, ...]] = ()      # learned numbers / lists ``key_`` kept in the attributes
    # a classmethod (budget_floats, n_rows, n_cols) -> the size options whose stored model fits the budget
    # (``compare``'s equal budget); None: the size cannot be set from a budget (the method is then the reference)
    options_for_budget: ClassVar[Callable[[int, int, int], dict] | None] = None

    @classmethod
    def command(cls) -> str:
        return cls.fit_command or f"cmdtool decompose -m {cls.method}"

    # ------------------------------------------------------------------ fitting
    def fit(self, store, progress=None) -> "Analyzer":
        """Validate the parameters, run the passes over ``store`` and keep the learned state; returns ``self``.

        Per-row outputs go into a staged result of the store, which :meth:`save` commits. On any error (bad
        input, an interrupt, a failure in a pass) the staged result is discarded and the analyzer is not fitted.
        """
        self.validate_params()
        self._check_store(store)
        self.metrics_ = None
        writer = self._begin_fit(store)
        started = time.perf_counter()
        try:
            self._fit(store, writer, progress or NullProgress())
            for key in self.streamed_arrays:
                setattr(self, key + "_", writer.group[key] if writer is not None and key in writer.group else None)
        except BaseException:
            if writer is not None:
                writer.discard()
            self._writer = None
            self.metrics_ = None
            raise
        self.timings_["fit_seconds"] = time.perf_counter() - started
        return self

    def _check_store(self, store) -> None:
        """The checks that need the store or torch, before any work: the device exists (for a GPU this imports
        torch, so that ``fit_seconds`` times the fit, not the import; the CPU needs no torch), the window is long
        enough, outputs can be written."""
        if hasattr(self, "device"):
            from ..utils.device import resolve_device

            resolve_device(self.device)
        window = store.resolve_epochs(getattr(self, "epochs", None))
        n_cols = window.stop - window.start
        if n_cols < self.min_checkpoints:
            raise UsageError(f"{self.title or self.method} needs at least {self.min_checkpoints} checkpoints in the "
                             f"epoch window, got {n_cols}")
        if store.mode == "r" and self._needs_writer():
            raise UsageError(f"{self.title or self.method} streams its per-weight outputs into the store: open it "
                             "with mode='r+'")
        self._check_window(store, window)

    def _check_window(self, store, window: slice) -> None:
        """Hook: parameter rules that depend on the store or the window (raise ParameterError)."""

    def _needs_writer(self) -> bool:
        return bool(self.streamed_arrays)

    def _begin_fit(self, store):
        """Record the store and the window; stage a result for streamed outputs (None on a read-only store)."""
        self.store_ = store
        self.window_ = store.resolve_epochs(getattr(self, "epochs", None))
        self.labels_ = store.labels[self.window_]
        self.timings_ = {}
        self.result_ = None
        self.name_ = None
        self._writer = store.results.writer(self.method, "staged") if store.mode != "r" else None
        return self._writer

    def _fit(self, store, writer, progress) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------ persistence
    def save(self, name: str = "default"):
        """Commit the staged result atomically as ``results/<method>/<name>`` (replacing one of that name)."""
        self._check_fitted()
        writer = getattr(self, "_writer", None)
        if writer is None:
            raise UsageError("fit the analyzer on a store opened with mode='r+' before saving")
        for key in self.saved_arrays:
            value = getattr(self, key + "_", None)
            if value is not None:
                writer.put(key, value)
        writer.put("epoch_relative_error", np.asarray(self.metrics_["epoch_relative_error"], dtype=np.float64))
        writer.attrs.update(method=self.method, config=self.get_params(deep=False), metrics=self.metrics_,
                            timings=self.timings_, store_revision=self.store_.revision,
                            columns=[self.window_.start, self.window_.stop],
                            labels=[int(x) for x in self.labels_])
        writer.attrs.update({key: getattr(self, key + "_") for key in self.saved_attrs})
        writer.attrs.update(self._extra_attrs(writer))
        self.result_ = writer.commit(name)
        self._writer = None
        self.name_ = name
        self._read_streamed(self.result_)  # lazy arrays now point into the committed result
        return self.result_

    def _extra_attrs(self, writer) -> dict:
        """Hook: more json attributes of the saved result."""
        return {}

    @classmethod
    def load(cls, store, name: str = "default") -> "Analyzer":
        """The analyzer of a saved result, fitted: its configuration, learned state and lazy per-row arrays."""
        result = store.results.get(cls.method, name)
        names = cls.param_names()
        obj = cls(**{k: v for k, v in result.config.items() if k in names})
        obj.store_, obj.result_, obj.name_, obj._writer = store, result, name, None
        obj.window_ = slice(*result.attrs["columns"])
        obj.labels_ = np.asarray(result.attrs["labels"], dtype=np.int64)
        obj.timings_ = result.attrs.get("timings", {})
        for key in cls.saved_arrays:
            setattr(obj, key + "_", result[key] if key in result else None)
        for key in cls.saved_attrs:
            setattr(obj, key + "_", result.attrs.get(key))
        obj._read_streamed(result)
        obj._loaded(result)
        obj.metrics_ = result.metrics
        return obj

    def _read_streamed(self, result) -> None:
        for key in self.streamed_arrays:
            setattr(self, key + "_", result.array(key) if key in result else None)

    def _loaded(self, result) -> None:
        """Hook: learned state derived from the loaded one."""

    # ------------------------------------------------------------------ use
    def window_position(self, store, column: int) -> int:
        """Position of a store column inside the fitted epoch window (an error naming the epochs if outside)."""
        window = self.window_
        if not window.start <= column < window.stop:
            labels = self.labels_
            raise ParameterError(
                "epoch {epoch} is outside the window this {title} model was fitted on (epochs {first}..{last}); "
                "fit again with a wider {epochs}", "epochs", epoch=int(store.labels[column]),
                title=self.title or self.method, first=int(labels[0]), last=int(labels[-1]))
        return column - window.start

    def reconstruct_epoch(self, store, column: int, **options) -> np.ndarray:
        """The modelled N-vector (float32) of one checkpoint: :meth:`reconstruct_epochs` of that one column."""
        return self.reconstruct_epochs(store, [column], **options)[:, 0]

    def reconstruct_epochs(self, store, columns, **options) -> np.ndarray:
        """The modelled N-vectors of several checkpoints as an (N, len(columns)) float32 array.

        One shared read serves every column (the caller bounds ``len(columns)`` so that N×k fits its memory).
        ``options`` select a variant (see ``reconstructions``).
        """
        self._check_fitted()
        columns = [int(c) for c in columns]
        steps = [self.window_position(store, c) for c in columns]
        return self._reconstruct(store, columns, steps, **options)

    def reconstruction_blocks(self, store, columns, block_rows: int = 1 << 18, **options):
        """The modelled checkpoints of :meth:`reconstruct_epochs` as consecutive row blocks: yields
        ``(rows, values)`` with ``rows`` a slice of store rows and ``values`` its (len, k) float32 part.

        Models kept per row (CMD's mode, A, B; saved DMD/PCA/POD factors) are evaluated block by block, so a
        writer that streams (``reconstruct`` to safetensors) holds one block, whatever N is. Others (a pass over
        the store, e.g. online CMD's replay) compute the whole (N, k) output first and hand out slices of it.
        """
        self._check_fitted()
        columns = [int(c) for c in columns]
        steps = [self.window_position(store, c) for c in columns]
        whole = None if self._reconstructs_rows(**options) else self._reconstruct(store, columns, steps, **options)
        for r0 in range(0, store.n_rows, block_rows):
            rows = slice(r0, min(r0 + block_rows, store.n_rows))
            yield rows, whole[rows] if whole is not None else \
                self._reconstruct(store, columns, steps, rows=rows, **options)

    def _reconstructs_rows(self, **options) -> bool:
        """Whether :meth:`_reconstruct` evaluates any range of rows on its own (``rows=``)."""
        return False

    def _reconstruct(self, store, columns: list[int], steps: list[int], **options) -> np.ndarray:
        """The (N, k) float32 models of ``columns`` (``steps``: their positions in the window); subclasses that
        say :meth:`_reconstructs_rows` also take ``rows=slice`` and return only those rows."""
        raise NotImplementedError(f"{type(self).__name__} gives no reconstruction")

    # ------------------------------------------------------------------ summaries
    def model_size(self) -> dict:
        """The size parameters (``Param.size``) as fitted (e.g. DMD's rank after the optimal threshold), else as
        given."""
        out = {}
        for param in self.params:
            if param.size:
                fitted = getattr(self, param.name + "_", None)
                out[param.name] = int(fitted) if isinstance(fitted, (int, np.integer)) else getattr(self, param.name)
        return out

    def summary(self) -> dict:
        """Headline figures for printing and --json."""
        self._check_fitted()
        m = self.metrics_
        return {"method": self.method, "relative_error": m.get("relative_error"),
                "relative_error_motion": m.get("relative_error_motion"), "stored_floats": m.get("stored_floats"),
                "fit_seconds": self.timings_.get("fit_seconds")}

    # ------------------------------------------------------------------ report and export (saved or fitted)
    @classmethod
    def headline(cls, view: ResultView) -> dict:
        """Key numbers of a result besides the shared ones (summary.json, html report)."""
        return {}

    @classmethod
    def error_series(cls, view: ResultView) -> list[dict]:
        """Per-epoch relative errors of the models in a result (the report's error figure)."""
        errors = view.metrics.get("epoch_relative_error")
        if errors is None:
            return []
        label = cls.reconstructions[0].label if cls.reconstructions else cls.title or cls.method
        return [{"labels": view.labels, "name": view.name, "method": cls.method, "label": label,
                 "errors": np.asarray(errors, dtype=np.float64), "relative_error": view.metrics.get("relative_error"),
                 "stored_floats": view.metrics.get("stored_floats")}]

    @classmethod
    def csv_tables(cls, result, store) -> dict:
        """``{table: (header, rows)}`` of a result's small tables for ``cmdtool export`` (per-epoch errors here)."""
        errors = result.metrics.get("epoch_relative_error")
        if errors is None:
            return {}
        labels = [int(x) for x in result.attrs.get("labels", [])]
        return {"epoch_errors": (["epoch", "relative_error"], list(zip(labels, errors)))}


__all__ = ["Analyzer", "Estimator", "FigureSpec", "Reconstruction", "ResultView", "clone"]
