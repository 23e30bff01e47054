"""How the library's analyzer parameters are spelled on the command line: the CLI's own table.

The library declares a parameter by its name (:class:`~cmdtool.analyzers.params.Param`); the CLI writes it as
``--<name-with-dashes>`` unless :data:`SPELLINGS` gives another flag, a short flag, a metavar, or hides it. The
generated ``decompose`` / ``compare`` options and the error messages (a :class:`~cmdtool.errors.ParameterError`
names the flag) both read this table, so a parameter has one spelling everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Spelling:
    """How a library parameter is written on the command line, when not as ``--<name-with-dashes>``.

    ``flag`` replaces the long flag (e.g. a ``--on/--off`` pair), ``short`` adds a short flag, ``metavar`` names
    the value in ``--help``; ``hidden`` keeps the parameter off the command line (the library default applies).
    """

    flag: str | None = None
    short: str | None = None
    metavar: str | None = None
    hidden: bool = False


# by library parameter name (the same name in every analyzer that declares it)
SPELLINGS: dict[str, Spelling] = {
    "modes": Spelling(short="-M"),
    "samples": Spelling(short="-K"),
    "warmup": Spelling(short="-F"),
    "block_bytes": Spelling(hidden=True),
    "epochs": Spelling(metavar="A:B"),
    "rank": Spelling(metavar="R"),
    "exact": Spelling(flag="--exact/--projected"),
}


def flags(name: str) -> list[str]:
    """The CLI spellings of parameter ``name``: the long flag (or ``--on/--off`` pair) and the optional short one."""
    spelling = SPELLINGS.get(name, Spelling())
    out = [spelling.flag or "--" + name.replace("_", "-")]
    return out + ([spelling.short] if spelling.short else [])


def long_flag(name: str) -> str:
    """The flag of parameter ``name`` as one word, for messages (``--exact`` of ``--exact/--projected``)."""
    return flags(name)[0].split("/")[0]


__all__ = ["SPELLINGS", "Spelling", "flags", "long_flag"]
