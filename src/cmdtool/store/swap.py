"""The swap of a rechunk's staged arrays into the store, and its recovery: one ``renameat2(RENAME_EXCHANGE)`` per
array where the filesystem has it (atomic), else two renames, which a writer's next open finishes when a kill cut
them in half (:func:`recover_swap`)."""

from __future__ import annotations

import os
from pathlib import Path

from ..utils import os_calls
from . import format as fmt

STAGED_ARRAYS = (fmt.TRAJECTORIES, fmt.INTEGER_VALUES)


def swap_in(store_path: Path, name: str) -> None:
    """Put ``staging/<name>`` in place of ``<name>``; the old array ends up in the staging group."""
    live, staged, old = store_path / name, store_path / fmt.STAGING / name, store_path / fmt.STAGING / f"{name}.old"
    if os_calls.exchange_paths(live, staged):  # atomic where the system and filesystem have renameat2
        return
    os.rename(live, old)  # a kill between these two renames is finished by recover_swap()
    os.rename(staged, live)


def recover_swap(store_path: Path) -> None:
    """Finish a two-rename swap that a kill cut in half (the array missing, its complete staged copy present)."""
    staging = store_path / fmt.STAGING
    for name in STAGED_ARRAYS:
        if not (store_path / name).exists() and (staging / name / "zarr.json").is_file() and staging_complete(staging):
            os.rename(staging / name, store_path / name)


def staging_complete(staging: Path) -> bool:
    import json

    try:
        return bool(json.loads((staging / "zarr.json").read_text())["attributes"].get("complete"))
    except (OSError, ValueError, KeyError):
        return False
