"""Declared parameters of an estimator: one declaration gives ``__init__``, validation, ``repr`` and CLI flags.

An analyzer lists its parameters once, as :class:`Param` objects in its ``params`` tuple. From that list

- :class:`~cmdtool.analyzers.base.Estimator` builds the keyword-only ``__init__`` (it stores the values and does
  nothing else, as scikit-learn's estimators do) and its signature, so ``help()`` and ``inspect`` show them;
- :func:`validate` checks the values (type, choices, bounds, a custom check) when ``fit`` starts, raising a
  :class:`~cmdtool.errors.ParameterError` that names the library parameter;
- the command line generates its options (``cmdtool decompose`` and ``cmdtool compare``): the flag, the help
  text, the default, the help panel; the CLI spells the parameter of an error as that flag.

Parameters that several analyzers share (``epochs``, ``device``, DMD's and POD's ``rank``) are the same
:class:`Param` object, so they become one flag with one help text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ..errors import ParameterError


@dataclass(frozen=True)
class Param:
    """One parameter of an estimator.

    ``kind`` is the type of a value (``int``, ``float``, ``str``, ``bool``; the CLI flag's type too), ``types``
    the Python types accepted when they are more than ``kind`` (e.g. a rank: int, float or str); ``optional``
    allows None.
    ``choices`` lists the allowed values; ``minimum`` / ``above`` are inclusive / exclusive lower bounds.
    ``check(value)`` may raise a :class:`~cmdtool.errors.ParameterError` for rules the fields cannot say (e.g. a
    rank that is an integer or an energy fraction). ``flag`` is the CLI spelling when it is not
    ``--<name-with-dashes>`` (e.g. ``"--exact/--projected"``), ``short`` an extra short flag. ``runtime``
    parameters change how a fit runs, not what it computes (``compare`` reuses results that differ only in
    them). ``size`` marks the parameter that sets a model's size (``compare`` reports it and sizes it to an equal
    budget). ``cli=False`` keeps a parameter off the command line.
    """

    name: str
    default: Any
    help: str
    kind: type = str
    types: tuple = ()
    optional: bool = False
    choices: tuple = ()
    minimum: float | None = None
    above: float | None = None
    check: Callable[[Any], None] | None = None
    flag: str | None = None
    short: str | None = None
    runtime: bool = False
    size: bool = False
    cli: bool = True
    metavar: str | None = None

    @property
    def flags(self) -> list[str]:
        """The CLI spellings: the long flag (or ``--on/--off`` pair) and the optional short one."""
        out = [self.flag or "--" + self.name.replace("_", "-")]
        return out + ([self.short] if self.short else [])

    def validate(self, value) -> None:
        """Raise :class:`~cmdtool.errors.ParameterError` when ``value`` is not allowed."""
        if value is None:
            if self.optional:
                return
            raise ParameterError("{%s} must be given (got None)" % self.name, self.name)
        value = _parsed_number(value, self.kind)
        if not any(_is_kind(value, kind) for kind in self.types or (self.kind,)):
            words = " or ".join(_KIND_WORDS.get(kind, kind.__name__) for kind in self.types or (self.kind,))
            raise ParameterError("{%s} must be %s, got {value!r}" % (self.name, words), self.name, value=value)
        if self.choices and value not in self.choices:
            raise ParameterError("unknown {%s} {value!r}: choose %s" % (self.name, " or ".join(self.choices)),
                                 self.name, value=value)
        if self.minimum is not None and value < self.minimum:
            raise ParameterError("{%s} must be at least {bound} (got {value})" % self.name, self.name,
                                 bound=_plain(self.minimum), value=value)
        if self.above is not None and not value > self.above:
            raise ParameterError("{%s} must be greater than {bound} (got {value})" % self.name, self.name,
                                 bound=_plain(self.above), value=value)
        if self.check is not None:
            self.check(value)


_KIND_WORDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _is_kind(value, kind) -> bool:
    if kind is bool:
        return isinstance(value, (bool, np.bool_))
    if isinstance(value, (bool, np.bool_)):
        return kind is object
    if kind is int:
        return isinstance(value, (int, np.integer))
    if kind is float:
        return isinstance(value, (int, float, np.integer, np.floating))
    return kind is object or isinstance(value, kind)


def _parsed_number(value, kind):
    """A number written as text (as options given on a command line or in a dict of strings are) read as the
    number it is, for the checks; anything else unchanged."""
    if kind in (int, float) and isinstance(value, str):
        try:
            return kind(value.strip())
        except ValueError:
            return value
    return value


def _plain(number) -> str:
    return str(int(number)) if float(number).is_integer() else str(number)


def check_device(value) -> None:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (a ``torch.device`` passes; CUDA's presence is checked when a pass
    starts)."""
    if isinstance(value, str) and not re.fullmatch(r"\s*(auto|cpu|cuda(:\d+)?)\s*", value.lower()):
        raise ParameterError("unknown {device} {value!r}: use auto, cpu, cuda or cuda:N", "device", value=value)


# shared by every analyzer: one flag each on the command line
EPOCHS = Param("epochs", None, "Epoch window A:B of labels to fit on (inclusive; either end may be left out).",
               optional=True, metavar="A:B")
DEVICE = Param("device", "auto", "Where batches are computed: auto (CUDA when present), cpu, cuda or cuda:N.",
               kind=str, types=(object,), check=check_device, runtime=True)


def validate(params: tuple[Param, ...], values: dict) -> None:
    """Check every declared parameter's value (see :meth:`Param.validate`)."""
    for param in params:
        param.validate(values[param.name])


def merge_params(owners: dict[str, tuple[Param, ...]]) -> dict[str, tuple[list[str], list[Param]]]:
    """Parameters of several estimators by name, in first-seen order: ``name -> (owners, distinct Params)``.

    Used by the CLI to turn the parameters of every registered analyzer into one set of flags: a name that
    several analyzers declare with the same :class:`Param` becomes one flag with one help text.
    """
    merged: dict[str, tuple[list[str], list[Param]]] = {}
    for owner, params in owners.items():
        for param in params:
            names, distinct = merged.setdefault(param.name, ([], []))
            names.append(owner)
            if param not in distinct:
                distinct.append(param)
    for name, (_, distinct) in merged.items():
        kinds = {p.kind for p in distinct}
        if len(kinds) > 1:
            raise TypeError(f"parameter {name!r} is declared with different types: {sorted(k.__name__ for k in kinds)}")
    return merged


__all__ = ["DEVICE", "EPOCHS", "Param", "check_device", "merge_params", "validate"]
