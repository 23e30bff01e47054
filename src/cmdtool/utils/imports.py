"""Importing what a user names on the command line (a metric function, a class to allow when unpickling), with
the working directory on the import path as ``python -m`` puts it there, for the import only."""

from __future__ import annotations

import contextlib
import importlib
import os
import sys

from ..errors import UsageError


@contextlib.contextmanager
def working_directory_importable():
    """``sys.path`` with the working directory first (as ``python -m`` has it) inside the block, and exactly as
    before after it: a module beside the user's shell imports, and the process keeps its own path."""
    saved = list(sys.path)
    cwd = os.getcwd()
    if "" not in sys.path and cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        yield
    finally:
        sys.path[:] = saved


def import_global(name: str, what: str):
    """The object named ``module.Name`` (or ``module.Outer.Inner``, or ``module:Name``), imported with
    :func:`working_directory_importable`; a one-line :class:`UsageError` naming ``what`` when it is not there.
    Importing a module runs its import-time code: only for names the user gave."""
    module_part, colon, attr_part = name.partition(":")
    if colon:
        candidates = [(module_part, attr_part.split("."))]
    else:
        parts = name.split(".")
        candidates = [(".".join(parts[:k]), parts[k:]) for k in range(len(parts) - 1, 0, -1)]
    if not all(candidates[0]) or not all(candidates[0][1]):
        raise UsageError(f"{what} {name!r}: write module.Name, e.g. mypackage.config.Settings")
    last_error = None
    with working_directory_importable():
        for module_name, attrs in candidates:
            try:
                obj = importlib.import_module(module_name)
            except ModuleNotFoundError as exc:
                if exc.name and module_name.startswith(exc.name):
                    last_error = exc  # this prefix is not a module: try a shorter one
                    continue
                raise UsageError(f"{what} {name!r}: cannot import {module_name}: {type(exc).__name__}: "
                                 f"{exc}") from None
            except Exception as exc:  # noqa: BLE001 - any import-time failure of user code is one line
                raise UsageError(f"{what} {name!r}: cannot import {module_name}: {type(exc).__name__}: "
                                 f"{exc}") from None
            for attr in attrs:
                obj = getattr(obj, attr, None)
                if obj is None:
                    raise UsageError(f"{what} {name!r}: {module_name} has no {'.'.join(attrs)}")
            return obj
    raise UsageError(f"{what} {name!r}: no module {candidates[-1][0]!r} ({last_error}); run from the folder "
                     f"that holds it or put it on PYTHONPATH")
