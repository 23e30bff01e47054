"""The pattern every analyzer follows (PyDMD / scikit-learn style).

- Configuration in ``__init__`` (keyword arguments, stored as attributes of the same name; no work there).
- ``fit(store)`` does the streaming passes (at most two) and returns ``self``. Learned state ends in ``_``.
  Per-row outputs (N-long) are streamed into a *staged* result inside the store while the pass runs, so memory
  stays bounded by the batch size whatever N is; they are exposed as lazy zarr arrays.
- ``save(name)`` commits the staged result atomically as ``results/<method>/<name>``; ``load(store, name)``
  gives back an equivalent fitted object.
- ``metrics_`` holds the quality figures shared by every method (for ``compare``):
  ``relative_error`` (‖W−Ŵ‖/‖W‖), ``relative_error_motion`` (‖W−Ŵ‖/‖W − mean_t W‖),
  ``epoch_relative_error`` (one per column: ‖w_t − ŵ_t‖/‖w_t‖), ``stored_floats`` (numbers the model keeps).
- ``reconstruct_epoch(store, column)`` gives the modelled N-vector of one checkpoint (float32);
  ``reconstruct_epochs(store, columns)`` several at once (N×k), for analyzers whose single-epoch path costs a
  read of the store or of their factors per call (``cmdtool evaluate`` asks for groups of epochs).
"""

from __future__ import annotations

import inspect
import time
from typing import ClassVar

import numpy as np

from ..errors import UsageError
from ..store.results import Result, ResultWriter


class Analyzer:
    method: ClassVar[str] = ""
    # CLI option names (of `cmdtool decompose`) this analyzer reads in from_options
    option_names: ClassVar[tuple[str, ...]] = ()

    # ------------------------------------------------------------------ configuration
    @classmethod
    def _param_names(cls) -> list[str]:
        sig = inspect.signature(cls.__init__)
        return [p for p in sig.parameters if p != "self"]

    def get_config(self) -> dict:
        return {name: getattr(self, name) for name in self._param_names()}

    @classmethod
    def from_options(cls, options: dict) -> "Analyzer":
        """Build from the CLI's option dict, taking only the options this method understands."""
        params = cls._param_names()
        return cls(**{k: v for k, v in options.items() if k in params and v is not None})

    # ------------------------------------------------------------------ fitting
    def fit(self, store, progress=None) -> "Analyzer":
        raise NotImplementedError

    def _begin_fit(self, store) -> ResultWriter:
        """Call at the start of ``fit``: records the store and stages a result for streamed outputs."""
        self.store_ = store
        self.columns_ = store.resolve_epochs(getattr(self, "epochs", None))
        self.labels_ = store.labels[self.columns_]
        self.timings_ = {}
        self._fit_started = time.perf_counter()
        self._writer = store.results.writer(self.method, "staged") if store.mode != "r" else None
        self.result_ = None
        return self._writer

    def _end_fit(self) -> None:
        self.timings_["fit_seconds"] = time.perf_counter() - self._fit_started

    # ------------------------------------------------------------------ persistence
    def _save_arrays(self, writer: ResultWriter) -> None:
        """Write the in-memory (small) arrays; streamed ones are already in the writer."""
        raise NotImplementedError

    def _load_arrays(self, result: Result) -> None:
        raise NotImplementedError

    def save(self, name: str = "default") -> Result:
        writer = getattr(self, "_writer", None)
        if writer is None:
            raise UsageError("fit the analyzer on a store opened with mode='r+' before saving")
        self._save_arrays(writer)
        writer.attrs.update(method=self.method, config=self.get_config(), metrics=self.metrics_,
                            timings=self.timings_, store_revision=self.store_.revision,
                            columns=[self.columns_.start, self.columns_.stop],
                            labels=[int(x) for x in self.labels_])
        self.result_ = writer.commit(name)
        self._writer = None
        self.name_ = name
        return self.result_

    @classmethod
    def load(cls, store, name: str = "default") -> "Analyzer":
        result = store.results.get(cls.method, name)
        config = {k: v for k, v in result.config.items() if k in cls._param_names()}
        obj = cls(**config)
        obj.store_ = store
        obj.result_ = result
        obj.name_ = name
        obj.columns_ = slice(*result.attrs["columns"])
        obj.labels_ = np.asarray(result.attrs["labels"], dtype=np.int64)
        obj.metrics_ = result.metrics
        obj.timings_ = result.attrs.get("timings", {})
        obj._writer = None
        obj._load_arrays(result)
        return obj

    def _result_array(self, key: str):
        """A saved per-row array as a lazy zarr array (``None`` before ``save``/``load``)."""
        result = getattr(self, "result_", None)
        return result.array(key) if result is not None else None

    # ------------------------------------------------------------------ use
    def reconstruct_epoch(self, store, column: int) -> np.ndarray:
        raise NotImplementedError

    def reconstruct_epochs(self, store, columns, **options) -> np.ndarray:
        """The modelled N-vectors of several checkpoints as an (N, len(columns)) float32 array.

        Default: one ``reconstruct_epoch`` per column. Analyzers override it when one shared read serves every
        column (the caller bounds ``len(columns)`` so that N×k fits its memory budget).
        """
        columns = [int(c) for c in columns]
        out = np.empty((store.n_rows, len(columns)), dtype=np.float32)
        for k, column in enumerate(columns):
            out[:, k] = self.reconstruct_epoch(store, column, **options)
        return out

    def summary(self) -> dict:
        """Headline figures for printing and --json."""
        m = self.metrics_
        return {"method": self.method, "relative_error": m.get("relative_error"),
                "relative_error_motion": m.get("relative_error_motion"), "stored_floats": m.get("stored_floats"),
                "fit_seconds": self.timings_.get("fit_seconds")}
