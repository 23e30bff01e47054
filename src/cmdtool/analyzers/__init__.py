"""Analyzers: one module per method, listed in :data:`BUILTIN`; other packages add theirs by entry point.

The registry maps a method name to ``"module:Class"`` and imports a module only when its class is asked for
(they import numpy and the standard library at the top: torch, scipy and matplotlib are imported where they are
used, so that ``cmdtool --help`` stays fast; a fit on the CPU imports no torch at all). Its order is
:data:`BUILTIN`'s, then the entry points, then :func:`register`'s. ``decompose``, ``compare``, ``evaluate``,
``reconstruct``, ``report`` and ``export`` read the analyzers from here, so a new analyzer is one module plus its
line in :data:`BUILTIN`.

A third-party package registers a method without touching this package, by an entry point of the group
``cmdtool.analyzers`` (read with :mod:`importlib.metadata` the first time the registry is used), e.g. in its
``pyproject.toml``::

    [project.entry-points."cmdtool.analyzers"]
    ica = "my_package.ica:ICA"

:func:`register` adds one at run time (e.g. in a test).
"""

from __future__ import annotations

import importlib
import warnings
from importlib import metadata

from ..errors import UsageError
from .base import Analyzer, Reconstruction, clone

ENTRY_POINT_GROUP = "cmdtool.analyzers"

# the analyzers of this package, in registry order: method name -> "module:Class"
BUILTIN: dict[str, str] = {
    "cmd": f"{__name__}.cmd.posthoc:PosthocCMD",
    "dmd": f"{__name__}.dmd:DMD",
    "kga": f"{__name__}.kga:KGA",
    "pca": f"{__name__}.pca:PCA",
    "pod": f"{__name__}.pod:POD",
}

_MODULES: dict[str, str] = dict(BUILTIN)  # method name -> "module:Class"; entry points join on first use
_entry_points_read = False


def register(method: str, target: str) -> None:
    """Register ``"module:Class"`` under ``method`` (a bare module name is one of this package's modules, a
    dotted one is imported as written)."""
    module_name, _, class_name = target.partition(":")
    if "." not in module_name:
        module_name = f"{__name__}.{module_name}"
    _registry()[method] = f"{module_name}:{class_name}"


def _registry() -> dict[str, str]:
    """The method table, with the entry points of the ``cmdtool.analyzers`` group added the first time.

    An entry point whose name is already taken is left out with a warning (a built-in method cannot be replaced
    by installing a package; :func:`register` can, on purpose).
    """
    global _entry_points_read
    if not _entry_points_read:
        _entry_points_read = True
        for entry_point in metadata.entry_points(group=ENTRY_POINT_GROUP):
            if entry_point.name in _MODULES:
                warnings.warn(f"the entry point {entry_point.name} = {entry_point.value!r} of group "
                              f"{ENTRY_POINT_GROUP!r} is ignored: the method {entry_point.name!r} is already "
                              f"{_MODULES[entry_point.name]}", RuntimeWarning, stacklevel=2)
                continue
            _MODULES[entry_point.name] = entry_point.value
    return _MODULES


def available_methods() -> list[str]:
    return list(_registry())


def get_analyzer(method: str) -> type[Analyzer]:
    registry = _registry()
    target = registry.get(method)
    if target is None:
        raise UsageError(f"unknown method {method!r}: choose from {', '.join(registry) or 'none'}")
    module_name, _, class_name = target.partition(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    if not (isinstance(cls, type) and issubclass(cls, Analyzer)):
        raise TypeError(f"the method {method!r} names {target}, which is not a cmdtool Analyzer subclass")
    return cls


def analyzer_classes() -> dict[str, type[Analyzer]]:
    """Every registered analyzer class, by method name, in registry order."""
    return {method: get_analyzer(method) for method in _registry()}


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


__all__ = ["BUILTIN", "ENTRY_POINT_GROUP", "Analyzer", "analyzer_classes", "available_methods", "clone",
           "get_analyzer", "load_reconstruction", "reconstructions", "register"]
