"""Analyzers: one module per method; the registry finds them.

Every module of this package is imported once, when the package is (they import numpy and the standard library
only at the top: torch, scipy and matplotlib are imported where they are used, so that ``cmdtool --help`` stays
fast). Each :class:`~cmdtool.analyzers.base.Analyzer` subclass with a ``method`` name that a module defines is
registered under that name, in the order of the module names (cmd, dmd, kga, pca, pod, ...). A new analyzer is
therefore one module: ``decompose``, ``compare``, ``evaluate``, ``reconstruct``, ``report`` and ``export`` read it
from here. :func:`register` adds one defined elsewhere (e.g. in a plug-in or a test).
"""

from __future__ import annotations

import importlib
import pkgutil

from ..errors import UsageError
from .base import Analyzer, Reconstruction

_MODULES: dict[str, str] = {}  # method name -> "module:Class"


def register(method: str, target: str) -> None:
    """Register ``"module:Class"`` under ``method`` (a bare module name is one of this package's modules, a
    dotted one is imported as written)."""
    _MODULES[method] = target


def _discover() -> None:
    # subpackages (cmd/) are walked too; names sort as cmd, cmd.drift, ..., dmd, kga, pca, pod
    for info in sorted(pkgutil.walk_packages(__path__, f"{__name__}."), key=lambda m: m.name):
        module = importlib.import_module(info.name)
        for value in vars(module).values():
            if (isinstance(value, type) and issubclass(value, Analyzer) and value.method
                    and value.__module__ == module.__name__):
                if value.method in _MODULES:
                    raise TypeError(f"two analyzers are named {value.method!r}: {_MODULES[value.method]} and "
                                    f"{info.name}:{value.__name__}")
                _MODULES[value.method] = f"{info.name}:{value.__name__}"


def available_methods() -> list[str]:
    return list(_MODULES)


def get_analyzer(method: str) -> type[Analyzer]:
    target = _MODULES.get(method)
    if target is None:
        raise UsageError(f"unknown method {method!r}: choose from {', '.join(_MODULES) or 'none'}")
    module_name, class_name = target.split(":")
    # a bare module name is one of this package's; a dotted one is imported as written (a plug-in)
    module = importlib.import_module(module_name if "." in module_name else f".{module_name}",
                                     None if "." in module_name else __name__)
    return getattr(module, class_name)


def analyzer_classes() -> dict[str, type[Analyzer]]:
    """Every registered analyzer class, by method name, in registry order."""
    return {method: get_analyzer(method) for method in _MODULES}


def reconstructions() -> dict[str, tuple[type[Analyzer], Reconstruction]]:
    """Every modelled checkpoint the registered analyzers give, by its name (``cmd``, ``cmd-online``, ``dmd``...)."""
    out = {}
    for cls in analyzer_classes().values():
        for reconstruction in cls.reconstructions:
            out[reconstruction.name] = (cls, reconstruction)
    return out


def load_reconstruction(store, name: str, result_name: str = "default", loaded: dict | None = None):
    """The fitted analyzer that gives the reconstruction ``name`` (from its saved result ``result_name``) and
    the :class:`~cmdtool.analyzers.base.Reconstruction`; a usage error names the command that makes what is
    missing. ``loaded`` caches analyzers by method across calls (cmd and cmd-online share one)."""
    known = reconstructions()
    if name not in known:
        raise UsageError(f"unknown method {name!r}: choose from {', '.join(known)}")
    cls, reconstruction = known[name]
    hint = f"{cls.command()} {reconstruction.produce}".strip()
    loaded = {} if loaded is None else loaded
    if cls.method not in loaded:
        if not store.results.exists(cls.method, result_name):
            raise UsageError(f"method {name}: no {cls.method} result named {result_name!r} in {store.path}; run "
                             f"`{hint}` first")
        loaded[cls.method] = cls.load(store, result_name)
    analyzer = loaded[cls.method]
    if not reconstruction.available(analyzer):
        raise UsageError(f"method {name}: the {cls.title or cls.method} result {result_name!r} has no "
                         f"{reconstruction.label} model; run `{hint}` first")
    return analyzer, reconstruction


_discover()

__all__ = ["Analyzer", "analyzer_classes", "available_methods", "get_analyzer", "load_reconstruction",
           "reconstructions", "register"]
