"""Upgrade a store written by an older cmdtool to the current format, in place (docs/store.md, "Format versions").

Format 1 -> 2 adds what the Pangeo stack needs and changes no value: ``dimension_names`` on the arrays, the
``epoch`` / ``tensor`` / ``tensor_index`` coordinate arrays, ``results`` (and each ``results/<kind>``) as zarr
groups, and the locks as zarr groups under ``locks/`` instead of the plain ``.ingest.lock`` / ``.results.lock``
files in the root. It runs the first time a store is opened for writing (any command that writes: ingest,
decompose, rechunk, ... or ``cmdtool migrate``); reading a format-1 store needs no migration.

Crash safety: everything is written before the root attribute's ``format_version`` changes (the commit point).
A migration killed before that leaves a format-1 store with some extra arrays, which format-1 readers ignore and
the next migration overwrites; after it, the old lock files are removed.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from . import format as fmt
from .lock import file_lock


def migrate(store) -> bool:
    """Bring ``store`` (opened with ``mode="r+"``) to :data:`~cmdtool.store.format.FORMAT_VERSION`.

    Returns True when something was upgraded, False when the store was already current."""
    from .lock import store_lock
    from .zarr_access import open_zarr_group, write_row_coordinates

    path = store.path
    with contextlib.ExitStack() as held:
        # Exclude writers of both generations: format-1 cmdtool locks the root files, this one the lock groups.
        for name in fmt.V1_LOCK_FILES:
            if (path / name).exists():
                held.enter_context(file_lock(path / name, f"store {path}"))
        held.enter_context(store_lock(path, fmt.INGEST_LOCK))
        held.enter_context(store_lock(path, fmt.RESULTS_LOCK, wait=30))
        store._open_group()  # re-read under the locks: another process may have migrated it meanwhile
        if store.format_version >= fmt.FORMAT_VERSION:
            return False
        _add_dimension_names(path / fmt.TRAJECTORIES, fmt.DIMS_TRAJECTORIES, {"coordinates": fmt.TENSOR_INDEX})
        if (path / fmt.INTEGER_VALUES / "zarr.json").is_file():
            _add_dimension_names(path / fmt.INTEGER_VALUES, fmt.DIMS_INTEGER_VALUES)
        _create_epoch_coordinate(store)
        write_row_coordinates(path, store.layout)
        results = path / fmt.RESULTS
        if not (results / "zarr.json").is_file():
            open_zarr_group(results, "a", attributes={"index": {}})
        for kind in (p for p in results.iterdir() if p.is_dir()):
            if not (kind / "zarr.json").is_file():
                open_zarr_group(kind, "a")
        store._open_group()
        store.drop_scratch_columns()
        store.commit(store.time_axis, bump_revision=False, format_version=fmt.FORMAT_VERSION,
                     migrated_from=store.format_version)
    for name in fmt.V1_LOCK_FILES:  # only after the commit: until then format-1 writers still need them
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path / name)
    return True


def _add_dimension_names(array_folder: Path, names: tuple[str, ...], attributes: dict | None = None) -> None:
    """Write ``dimension_names`` (and attributes) into an array's metadata, replacing the file atomically."""
    meta_path = array_folder / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["dimension_names"] = list(names)
    if attributes:
        meta["attributes"] = {**meta.get("attributes", {}), **attributes}
    temporary = meta_path.with_name(f".zarr.json.migrating-{os.getpid()}")
    temporary.write_text(json.dumps(meta, indent=2))
    os.replace(temporary, meta_path)


def _create_epoch_coordinate(store) -> None:
    from .zarr_access import create_epoch_coordinate

    epoch = create_epoch_coordinate(store.path, store.trajectories.shape[1])
    if store.n_checkpoints:
        epoch[:store.n_checkpoints] = store.labels
