"""Small parsing and formatting helpers shared by the library and the CLI."""

from __future__ import annotations

import datetime as _dt
import re

from ..errors import UsageError

_SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1000, "kib": 1024, "m": 1024**2, "mb": 1000**2,
               "mib": 1024**2, "g": 1024**3, "gb": 1000**3, "gib": 1024**3, "t": 1024**4, "tb": 1000**4,
               "tib": 1024**4}


def parse_size(text: str | int) -> int:
    """Parse a byte size such as ``"512MiB"``, ``"2G"`` or ``1048576``."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not match or match.group(2).lower() not in _SIZE_UNITS:
        raise UsageError(f"cannot read size {text!r}: use a number with an optional unit, e.g. 512MiB or 2G")
    value = int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])
    if value <= 0:
        raise UsageError(f"size must be positive, got {text!r}")
    return value


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def natural_key(text: str) -> list:
    """Sort key that orders ``epoch_2`` before ``epoch_10``."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", text)]


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
