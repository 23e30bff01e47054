"""Every path-to-zarr step of the store: a local folder is a zarr ``LocalStore``, an fsspec URL
(``s3://bucket/run.zarr``) a zarr ``FsspecStore`` (docs/store.md, "Stores on shared or object storage"); the
codecs, and the creation of the store's arrays and coordinates (shared by a new store, a rechunk and a
format migration).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec
from zarr.storage import LocalStore

from ..errors import UsageError
from . import format as fmt
from .layout import Layout
from .location import RemotePath, store_location


def zarr_store(path: str | os.PathLike | RemotePath, read_only: bool = False):
    """The zarr storage object for a folder or fsspec URL (the one place that maps a store path to zarr storage:
    a Dask worker given the same string opens the same storage)."""
    location = store_location(path)
    if isinstance(location, RemotePath):
        from zarr.storage import FsspecStore

        location.fs  # a one-line error if the protocol's package is missing
        return FsspecStore.from_url(location.url, read_only=read_only)
    return LocalStore(location, read_only=read_only)


def open_zarr_group(path: str | os.PathLike, mode: str = "r", attributes: dict | None = None) -> zarr.Group:
    """Open (``"r"``, ``"r+"``) or create (``"a"``, with ``attributes`` written in the same file) a group."""
    kwargs = {"attributes": attributes} if attributes is not None else {}
    return zarr.open_group(store=zarr_store(path, read_only=(mode == "r")), mode=mode, **kwargs)


def compressors(codec: str = fmt.DEFAULT_CODEC):
    """Chunk codecs. ``"lz4"``: bit-shuffled LZ4 (a weight's high bits change little from one checkpoint to the
    next, and bit shuffle puts them side by side); ``"none"``: no compression (docs/performance.md, "Ingest",
    measures both on trained weights). Either way a crc32c checksum follows, so that a damaged chunk is reported
    instead of being read as garbage."""
    if codec == "lz4":
        return [BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle"), Crc32cCodec()]
    if codec == "none":
        return [Crc32cCodec()]
    raise UsageError(f"unknown codec {codec!r}: choose one of {', '.join(fmt.CODECS)}")


def codec_of(array: zarr.Array) -> str:
    """The ``--codec`` name an existing array was written with."""
    return "lz4" if any(isinstance(c, BloscCodec) for c in array.compressors) else "none"


def writable(array: zarr.Array) -> zarr.Array:
    """Write every chunk, even one that is all zeros: zarr skips those by default, and then a chunk that is
    missing on disk (deleted, lost) could not be told from one that was never written (`cmdtool verify`)."""
    return array.with_config({"write_empty_chunks": True})


def default_chunk_rows(chunk_columns: int, n_columns: int, target_chunk_bytes: int = fmt.TARGET_CHUNK_BYTES) -> int:
    """Rows per chunk for the analyses' read pattern (row blocks over every column): about
    ``target_chunk_bytes`` per chunk, but never more rows than a read block over all ``n_columns`` holds
    (``R x T x 4 <= READ_BLOCK_BYTES``), since a block is a whole number of chunk rows. Without that cap a
    narrow chunk (``Tc = 1``: 2M rows) would make the smallest block over 90 columns 720 MB."""
    rows = target_chunk_bytes // (4 * max(chunk_columns, 1))
    rows = min(rows, fmt.READ_BLOCK_BYTES // (4 * max(n_columns, chunk_columns, 1)))
    return int(max(64, rows))


def create_column_arrays(path: Path, n_rows: int, n_integer_rows: int, chunks: tuple[int, int], codec: str,
                         n_columns: int = 0, with_epoch: bool = True) -> None:
    """``trajectories`` (and ``integer_values``) with their dimension names, and the ``epoch`` coordinate,
    ``n_columns`` wide, in the folder ``path`` (a store, or a rechunk's staging group). Overwrites what a killed
    creation left there."""
    chunk_rows, chunk_columns = chunks
    zarr.create_array(store=zarr_store(path / fmt.TRAJECTORIES), shape=(n_rows, n_columns),
                      chunks=(chunk_rows, chunk_columns), dtype="float32", compressors=compressors(codec),
                      fill_value=0.0, dimension_names=fmt.DIMS_TRAJECTORIES, overwrite=True,
                      attributes={"coordinates": fmt.TENSOR_INDEX})
    if n_integer_rows:
        zarr.create_array(store=zarr_store(path / fmt.INTEGER_VALUES), shape=(n_integer_rows, n_columns),
                          chunks=(n_integer_rows, chunk_columns), dtype="int64", compressors=compressors(codec),
                          fill_value=0, dimension_names=fmt.DIMS_INTEGER_VALUES, overwrite=True)
    if with_epoch:
        create_epoch_coordinate(path, n_columns)


def create_epoch_coordinate(path: Path, n_columns: int) -> zarr.Array:
    return writable(zarr.create_array(
        store=zarr_store(path / fmt.EPOCH), shape=(n_columns,), chunks=(4096,), dtype="int64",
        compressors=compressors(), fill_value=0, dimension_names=(fmt.EPOCH,), overwrite=True,
        attributes={"long_name": "checkpoint label (epoch or step)"}))


def write_row_coordinates(path: Path, layout: Layout, codec: str = fmt.DEFAULT_CODEC) -> None:
    """The ``tensor`` names and the per-row ``tensor_index`` coordinate (written in slices: N can be 1e9)."""
    entries = layout.trajectory_entries
    names = zarr.create_array(store=zarr_store(path / fmt.TENSOR), shape=(len(entries),),
                              chunks=(max(1, len(entries)),), dtype=str, dimension_names=(fmt.TENSOR,),
                              overwrite=True, attributes={"long_name": "trajectory tensor name"})
    names[:] = np.array([e.name for e in entries], dtype=object)
    n_rows = layout.n_rows
    chunk = int(min(max(n_rows, 1), 4 * 1024**2))
    index = writable(zarr.create_array(
        store=zarr_store(path / fmt.TENSOR_INDEX), shape=(n_rows,), chunks=(chunk,), dtype="int32",
        compressors=compressors(), fill_value=0, dimension_names=(fmt.DIMS_TRAJECTORIES[0],), overwrite=True,
        attributes={"long_name": "index into `tensor` of the tensor holding this row"}))
    stops = np.array([e.stop for e in entries], dtype=np.int64)
    for start in range(0, n_rows, chunk):
        rows = np.arange(start, min(start + chunk, n_rows), dtype=np.int64)
        index[start:start + len(rows)] = np.searchsorted(stops, rows, side="right").astype(np.int32)
