"""Declared parameters of an estimator: one declaration gives validation, ``repr``, the docstring's "Parameters"
section, ``get_params`` and the CLI options.

An analyzer lists its parameters once, as :class:`Param` objects in its ``params`` tuple. From that list

- :class:`~cmdtool.analyzers.base.Estimator` checks that the class's keyword-only ``__init__`` (written out, so
  that type checkers and IDEs see it; it stores the values and does nothing else, as scikit-learn's estimators
  do) has exactly these parameters, defaults and order, and gives ``get_params`` / ``set_params`` / ``repr``;
- :func:`validate` checks the values (type, choices, bounds, a custom check) when ``fit`` starts, raising a
  :class:`~cmdtool.errors.ParameterError` that names the library parameter;
- the command line generates its options (``cmdtool decompose`` and ``cmdtool compare``): the help text, the
  default, the help panel. How a parameter is spelled there (a flag other than ``--name``, a short flag, a
  metavar, or no option at all) is the CLI's business: ``cmdtool_cli.param_flags`` keeps that table.

Parameters that several analyzers share (``epochs``, ``device``, DMD's and POD's ``rank``) are the same
:class:`Param` object, so the CLI makes them one flag with one help text.
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
    rank that is an integer or an energy fraction). ``runtime`` parameters change how a fit runs, not what it
    computes (``compare`` reuses results that differ only in them). ``size`` marks the parameter that sets a
    model's size (``compare`` reports it and sizes it to an equal budget).
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
    runtime: bool = False
    size: bool = False

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
               optional=True)
DEVICE = Param("device", "auto", "Where batches are computed: auto (CUDA when present), cpu, cuda or cuda:N.",
               kind=str, types=(object,), check=check_device, runtime=True)


def validate(params: tuple[Param, ...], values: dict) -> None:
    """Check every declared parameter's value (see :meth:`Param.validate`)."""
    for param in params:
        param.validate(values[param.name])


__all__ = ["DEVICE", "EPOCHS", "Param", "check_device", "validate"]
