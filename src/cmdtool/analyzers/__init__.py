"""Analyzers: one module per method, registered here by its ``method`` name.

A new analyzer is one module with an :class:`~cmdtool.analyzers.base.Analyzer` subclass plus one line in
``_MODULES``.
"""

from __future__ import annotations

import importlib

from ..errors import UsageError
from .base import Analyzer

_MODULES = {
    # method name -> "module:Class"
    "cmd": "cmd:PosthocCMD",
    "dmd": "dmd:DMD",
    "kga": "kga:KGA",
    "pca": "pca:PCA",
}


def register(method: str, target: str) -> None:
    _MODULES[method] = target


def available_methods() -> list[str]:
    return list(_MODULES)


def get_analyzer(method: str) -> type[Analyzer]:
    target = _MODULES.get(method)
    if target is None:
        raise UsageError(f"unknown method {method!r}: choose from {', '.join(_MODULES) or 'none'}")
    module_name, class_name = target.split(":")
    module = importlib.import_module(f".{module_name}", __name__)
    return getattr(module, class_name)


__all__ = ["Analyzer", "available_methods", "get_analyzer", "register"]
