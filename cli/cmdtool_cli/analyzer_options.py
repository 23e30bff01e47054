"""Command-line options generated from the analyzers' declared parameters (``decompose`` and ``compare``).

Every parameter of every registered analyzer becomes one option: its help text, type and default come from its
:class:`~cmdtool.analyzers.params.Param`; a parameter several analyzers share (``--epochs``, ``--rank``) is one
option. Options that belong to some analyzers only are grouped in a help panel named after them ("DMD / KGA /
POD options"). A new analyzer's parameters therefore appear here without any edit: the flag is
``--<name-with-dashes>`` unless the table of :mod:`cmdtool_cli.param_flags` says otherwise.
"""

from __future__ import annotations

import functools
import inspect
from typing import Callable, Optional

import typer

from cmdtool.analyzers import analyzer_classes

from .param_flags import SPELLINGS, Spelling, flags


def merge_params(owners: dict[str, tuple]) -> dict[str, tuple[list[str], list]]:
    """Parameters of several estimators by name, in first-seen order: ``name -> (owners, distinct Params)``.

    A name that several analyzers declare with the same :class:`~cmdtool.analyzers.params.Param` becomes one flag
    with one help text; one declared with different types is a programming error.
    """
    merged: dict[str, tuple[list[str], list]] = {}
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


def analyzer_parameters(own_defaults: bool = False) -> list[inspect.Parameter]:
    """One keyword parameter with a ``typer.Option`` per analyzer parameter.

    ``own_defaults=False``: the declared default (shown in ``--help``) when every analyzer that has the parameter
    declares the same one. ``own_defaults=True``: None, meaning "each method's own default", so that a caller can
    tell the values the user typed (``compare`` keeps explicit sizes).
    """
    classes = analyzer_classes()
    merged = merge_params({method: cls.params for method, cls in classes.items()})
    out = []
    for name, (owners, params) in merged.items():
        param = params[0]
        spelling = SPELLINGS.get(name, Spelling())
        if spelling.hidden:
            continue
        defaults = {repr(p.default) for p in params}
        shared_default = not own_defaults and len(defaults) == 1
        default = param.default if shared_default else None
        help_text = " ".join(dict.fromkeys(p.help for p in params))
        if not shared_default:
            help_text += " Default: each method's own" + (f" ({param.default})." if len(defaults) == 1 and
                                                          param.default is not None else ".")
        everyone = len(owners) == len(classes)
        panel = None if everyone else " / ".join(classes[m].title or m for m in owners) + " options"
        annotation = param.kind if default is not None else Optional[param.kind]
        option = typer.Option(default, *flags(name), help=help_text, rich_help_panel=panel,
                              metavar=spelling.metavar, show_default=default is not None)
        out.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation))
    return out


def with_analyzer_options(command: Callable, own_defaults: bool = False) -> Callable:
    """``command`` (whose last parameter is ``**options``) with the analyzer options in its signature, placed
    before its ``store`` parameter; it receives them in ``options``."""
    signature = inspect.signature(command)
    own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in signature.parameters.values()
           if p.kind is not inspect.Parameter.VAR_KEYWORD]
    at = next((k for k, p in enumerate(own) if p.name == "store"), len(own))
    generated = analyzer_parameters(own_defaults)
    parameters = own[:at] + generated + own[at:]

    @functools.wraps(command)
    def wrapper(**kwargs):
        return command(**kwargs)

    wrapper.__signature__ = signature.replace(parameters=parameters)
    wrapper.__annotations__ = {**command.__annotations__, **{p.name: p.annotation for p in generated}}
    return wrapper


__all__ = ["analyzer_parameters", "merge_params", "with_analyzer_options"]
