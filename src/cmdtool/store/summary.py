"""A summary of a store (what `cmdtool info` prints)."""

from __future__ import annotations

import os

from . import format as fmt
from .metadata import StoreMetadata


def folder_bytes(path) -> int:
    if hasattr(path, "size_of_tree"):  # a RemotePath (object storage)
        return path.size_of_tree()
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except OSError:
                pass
    return total


def store_metadata(path=None):
    """The :class:`StoreMetadata` of the store at ``path`` (default: ``$CMDTOOL_STORE`` or ./cmdtool.zarr), or
    the store opened read-only where its documents alone cannot answer (mid-rechunk): both have the attributes
    ``info`` and ``verify`` read."""
    from .location import default_store_path, store_location

    location = store_location(path) if path is not None else default_store_path()
    view = StoreMetadata.read(location)
    if view is None:
        from .store import open_store

        view = open_store(location)
    return view


def summarize_store(path=None) -> dict:
    """:func:`summarize` of the store at ``path`` (default: ``$CMDTOOL_STORE`` or ./cmdtool.zarr), read from its
    metadata documents alone (no zarr import: a fast ``cmdtool info``)."""
    return summarize(store_metadata(path))


def _analyses(store) -> list[tuple[str, str, dict]]:
    if isinstance(store, StoreMetadata):
        return store.analyses()
    out = []
    for kind, name in store.results.list():
        try:
            attrs = store.results.get(kind, name).attrs
        except Exception:  # noqa: BLE001 - a damaged result is listed, not fatal
            attrs = {}
        out.append((kind, name, attrs))
    return out


def summarize(store) -> dict:
    layout, axis = store.layout, store.time_axis
    n_rows, n_cols = store.n_rows, store.n_checkpoints
    traj_bytes = folder_bytes(store.path / fmt.TRAJECTORIES)
    raw = 4 * n_rows * n_cols
    tensors = []
    for entry in layout.entries:
        tensors.append({"name": entry.name, "shape": list(entry.shape), "dtype": entry.dtype, "kind": entry.kind,
                        "role": entry.role, "numel": entry.numel,
                        "rows": [entry.offset, entry.stop] if entry.role == "trajectory" else None,
                        **({"tied_to": entry.tied_to} if entry.role == "tied" else {})})
    dtypes = sorted({e.dtype for e in layout.trajectory_entries})
    results = []
    for kind, name, attrs in _analyses(store):
        results.append({"method": kind, "name": name, "created_at": attrs.get("created_at"),
                        "store_revision": attrs.get("store_revision"),
                        "stale": attrs.get("store_revision") not in (None, store.revision)})
    return {
        "store": str(store.path),
        "format_version": store.meta["format_version"],
        "revision": store.revision,
        "parameters": n_rows,
        "tensors": sum(1 for e in layout.entries if e.role == "trajectory"),
        "integer_tensors": sum(1 for e in layout.entries if e.role == "integer"),
        "excluded_tensors": [e.name for e in layout.entries if e.role == "excluded"],
        # tensors sharing storage with an earlier one (tied weights): stored and counted once, under that name
        "tied_tensors": [{"name": e.name, "tied_to": e.tied_to} for e in layout.tied_entries],
        "checkpoints": n_cols,
        "labels": {"first": axis[0].label if axis else None, "last": axis[-1].label if axis else None},
        "source_dtypes": dtypes,
        "chunk_shape": list(store.chunk_shape),
        "codec": store.codec,
        # narrow chunks (a small ingest budget for a large model) make every pass read many small pieces
        "rechunk_suggested": n_cols > 1 and store.chunk_shape[1] < min(n_cols, fmt.MAX_CHUNK_COLUMNS) // 4,
        "bytes_raw_float32": raw,
        "bytes_on_disk": folder_bytes(store.path),
        "trajectory_bytes_on_disk": traj_bytes,
        "compression_ratio": (raw / traj_bytes) if traj_bytes else None,
        "nonfinite_values": sum(r.nonfinite for r in axis),
        "nonfinite_by_epoch": {str(r.label): r.nonfinite for r in axis if r.nonfinite},
        "layers": tensors,
        "analyses": results,
    }
