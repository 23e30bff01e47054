"""The trajectory store: a zarr v3 group holding W (N parameters x T checkpoints) and everything about it.

Commit protocol. The root group's ``cmdtool`` attribute (layout, time axis, revision) is the single source of
truth; zarr writes it atomically (temporary file + rename). ``trajectories`` may hold more columns than the time
axis lists: columns beyond ``len(time_axis)`` are uncommitted scratch that the next writer removes. Readers
snapshot the time axis when the store is opened, so they see the old T or the new T, never a mix.

Every path-to-zarr step goes through :func:`zarr_store` / :func:`open_zarr_group`: a local folder is a zarr
``LocalStore``, an fsspec URL (``s3://bucket/run.zarr``) a zarr ``FsspecStore`` (docs/store.md, "Stores on shared or
object storage"). On an object store every zarr.json is one object, written whole by one PUT, so the commit points
above (the root attribute, the results index) stay atomic there; what needs a rename (rechunk) is refused.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import re
from pathlib import Path
from typing import Iterator

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec
from zarr.storage import LocalStore

from ..errors import CorruptionError, StoreError, UsageError
from . import format as fmt
from .layout import Layout, TimeRecord
from .location import RemotePath, default_store_path, store_location
from .lock import file_lock
from .chunk_files import ArrayDocument, ChunkDamage
from .metadata import StoreAttributes, check_store_folder, store_attributes


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


def lock_path(store_path: Path, name: str) -> Path:
    """The file that is flock'ed for lock ``name``: the ``zarr.json`` of the empty group ``locks/<name>``, so
    that a zarr or xarray reader sees only zarr nodes in the store. Created (with valid group metadata) on first
    use; never rewritten afterwards, so its inode, which the lock is attached to, stays the same."""
    folder = store_path / fmt.LOCKS / name
    target = folder / "zarr.json"
    if not target.is_file():
        for group in (store_path / fmt.LOCKS, folder):
            group.mkdir(parents=True, exist_ok=True)
            meta = group / "zarr.json"
            body = json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {
                "cmdtool": "advisory lock (flock on this file); see docs/store.md"}}).encode()
            try:  # O_EXCL: never replace a file another process may hold a lock on
                fd = os.open(meta, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                continue
            try:
                os.write(fd, body)
            finally:
                os.close(fd)
    return target


def store_lock(store_path: Path | RemotePath, name: str, wait: float = 0.0):
    what = f"store {store_path}" if name == fmt.INGEST_LOCK else f"results of {store_path}"
    if isinstance(store_path, RemotePath):
        from .remote_lock import lease_lock

        return lease_lock(store_path / fmt.LOCKS / name / "lease.json", what, wait=wait)
    return file_lock(lock_path(store_path, name), what, wait=wait)


def _writable(array: zarr.Array) -> zarr.Array:
    """Write every chunk, even one that is all zeros: zarr skips those by default, and then a chunk that is
    missing on disk (deleted, lost) could not be told from one that was never written (`cmdtool verify`)."""
    return array.with_config({"write_empty_chunks": True})


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def open_store(path: str | os.PathLike | None = None, mode: str = "r") -> "TrajectoryStore":
    """Open an existing trajectory store (``mode="r"`` to read, ``"r+"`` to write results)."""
    return TrajectoryStore(path, mode=mode)


class TrajectoryStore(StoreAttributes):
    """A trajectory store on disk. See ``docs/store.md`` for the format.

    Attributes
    ----------
    path : Path
    layout : Layout            tensors, their shapes, dtypes and rows
    time_axis : list[TimeRecord]  one record per committed column
    """

    def __init__(self, path: str | os.PathLike | None = None, mode: str = "r"):
        self.path = store_location(path) if path is not None else default_store_path()
        check_store_folder(self.path)
        self.mode = mode
        self._open_group()
        if mode != "r" and self.format_version < fmt.FORMAT_VERSION:
            from .migrate import migrate

            if isinstance(self.path, RemotePath):
                raise UsageError(f"store {self.path} has format version {self.format_version}; migrate a local "
                                 f"copy with `cmdtool migrate` and upload it (no in-place migration on object "
                                 f"storage)")

            migrate(self)  # a writer upgrades an older store first (docs/store.md, "Format versions")

    def _open_group(self) -> None:
        self._arrays: dict[str, zarr.Array] = {}  # opened once: a read would otherwise re-parse the metadata
        self._generation = None
        self._trajectory_files: ArrayDocument | None = None
        if self.mode != "r" and isinstance(self.path, Path):  # no rechunk swap on object storage (refused there)
            from .rechunk import recover_swap

            recover_swap(self.path)
        try:
            self.group = open_zarr_group(self.path, "r" if self.mode == "r" else "r+")
        except Exception as exc:  # zarr raises many types for a broken group
            raise StoreError(f"cannot open store {self.path}: {exc}") from None
        self._load_attrs()

    # ----------------------------------------------------------------- metadata
    def _load_attrs(self) -> None:
        meta = store_attributes(self.path, self.group.attrs)
        self.meta = meta
        self.layout = Layout.from_json(meta["layout"])
        self.time_axis = [TimeRecord.from_json(r) for r in meta["time_axis"]]

    @property
    def chunk_shape(self) -> tuple[int, int]:
        """``(R, Tc)`` of ``trajectories``, read from the array itself (a rechunk changes it)."""
        return tuple(int(c) for c in self.trajectories.chunks)

    @property
    def codec(self) -> str:
        return codec_of(self.trajectories)

    @property
    def labels(self) -> np.ndarray:
        return np.array([r.label for r in self.time_axis], dtype=np.int64)

    def _array(self, name: str) -> zarr.Array:
        if name not in self._arrays:
            if name == fmt.TRAJECTORIES:
                self._generation = self._array_generation()
            folder = self.path / name
            try:
                self._arrays[name] = _writable(self.group[name])
            except KeyError:
                # a rechunk killed between its two renames: read the complete staged copy (a writer's open
                # finishes the swap)
                from .rechunk import STAGED_ARRAYS, _staging_complete

                staged = self.path / fmt.STAGING
                if isinstance(self.path, RemotePath) or name not in STAGED_ARRAYS or not _staging_complete(staged):
                    raise
                self._arrays[name] = _writable(open_zarr_group(staged, "r")[name])
                folder = staged / name
            if name == fmt.TRAJECTORIES:
                self._trajectory_files = self._chunk_files(folder)
        return self._arrays[name]

    def _chunk_files(self, folder) -> ArrayDocument | None:
        """The array's chunk files read directly (about half of zarr's CPU time per block: chunk_files.py) for a
        local store in cmdtool's codecs; None (read through zarr) on object storage, where zarr's concurrent
        requests matter more than the decoding."""
        if isinstance(self.path, RemotePath):
            return None
        document = ArrayDocument.read(folder)
        return document if document.numeric and len(document.shape) == 2 else None

    def _array_generation(self) -> int | None:
        """Identity of the ``trajectories`` folder: a rechunk swaps in another one (chunk files of another grid).
        Object stores are never rechunked in place (refused), so their identity is constant."""
        if isinstance(self.path, RemotePath):
            return None
        try:
            return os.stat(self.path / fmt.TRAJECTORIES).st_ino
        except OSError:
            return None

    @property
    def trajectories(self) -> zarr.Array:
        return self._array(fmt.TRAJECTORIES)

    @property
    def integer_values(self) -> zarr.Array | None:
        if self.layout.n_integer_rows == 0 or fmt.INTEGER_VALUES not in self.group:
            return None
        return self._array(fmt.INTEGER_VALUES)

    def describe_labels(self) -> str:
        labels = self.labels
        if len(labels) == 0:
            return "the store has no checkpoints"
        return f"available epochs: {labels[0]}..{labels[-1]} ({len(labels)} checkpoints)"

    def column_of(self, label: int) -> int:
        """Column index of an epoch label (labels are what users type, never positions)."""
        hits = np.flatnonzero(self.labels == int(label))
        if len(hits) == 0:
            raise UsageError(f"epoch {label} is not in the store; {self.describe_labels()}")
        return int(hits[0])

    def resolve_epochs(self, spec: str | None) -> slice:
        """Columns of an epoch window ``"A:B"`` (labels, both ends inclusive, either end optional)."""
        n = self.n_checkpoints
        if n == 0:
            raise UsageError(f"store {self.path} holds no checkpoints yet")
        if spec is None or spec.strip() in ("", ":"):
            return slice(0, n)
        match = re.fullmatch(r"\s*(-?\d+)?\s*:\s*(-?\d+)?\s*", spec)
        if not match:
            raise UsageError(f"cannot read epoch window {spec!r}: use A:B with epoch labels, e.g. 10:80")
        labels = self.labels
        lo = int(match.group(1)) if match.group(1) else labels[0]
        hi = int(match.group(2)) if match.group(2) else labels[-1]
        cols = np.flatnonzero((labels >= lo) & (labels <= hi))
        if len(cols) == 0:
            raise UsageError(f"epoch window {spec} selects no checkpoint; {self.describe_labels()}")
        return slice(int(cols[0]), int(cols[-1]) + 1)

    # ----------------------------------------------------------------- reading
    def _read(self, rows: slice, cols: slice, empty=np.empty) -> np.ndarray:
        """``W[rows, cols]``; a local store allocates the result with ``empty(shape, dtype)`` (the reader's
        reused block arrays)."""
        array = self.trajectories
        if self._array_generation() != self._generation:  # one stat per block
            raise StoreError(f"store {self.path} was rechunked while this command was reading it; "
                             f"run the command again")
        try:
            if self._trajectory_files is not None:
                return self._trajectory_files.read_region(rows, cols, empty)
            return array[rows, cols]
        except ChunkDamage as exc:
            problem = "failed its checksum (the file is damaged)" if exc.problem == "checksum" else \
                "is missing" if exc.problem == "missing" else f"is {exc.problem}"
            raise self._damaged(rows, cols, problem) from None
        except ValueError as exc:
            if "checksum" in str(exc).lower():
                raise self._damaged(rows, cols, "failed its checksum (the file is damaged)") from None
            raise

    def write_region(self, rows: slice, cols: slice, values: np.ndarray) -> None:
        """``trajectories[rows, cols] = values`` (``values`` may be a strided view): the chunk files written
        directly for a local store (chunk_files.py), through zarr on object storage."""
        array = self.trajectories
        if self._trajectory_files is not None:
            self._trajectory_files.write_region(rows, cols, values, array.shape)
        else:
            array[rows, cols] = np.ascontiguousarray(values)

    def _damaged(self, rows: slice, cols: slice, problem: str) -> CorruptionError:
        return CorruptionError(
            f"store {self.path}: a chunk of '{fmt.TRAJECTORIES}' in rows {rows.start}..{rows.stop - 1}, "
            f"columns {cols.start}..{cols.stop - 1} {problem}; run `cmdtool verify` for the full list")

    def default_block_rows(self, n_cols: int, block_bytes: int = 128 * 1024**2) -> int:
        """Rows per block: a whole number of chunk rows, about ``block_bytes`` of float32."""
        chunk_rows = self.chunk_shape[0]
        per_row = 4 * max(n_cols, 1)
        chunks = max(1, block_bytes // (per_row * chunk_rows))
        return int(chunks * chunk_rows)

    def iter_blocks(self, columns: slice | None = None, rows: slice | None = None,
                    block_rows: int | None = None, block_bytes: int = 128 * 1024**2,
                    device=None, dtype=None, prefetch: int = 2, reuse_arrays: bool = False) -> Iterator["RowBlock"]:
        """Yield consecutive row blocks ``W[r0:r1, columns]``.

        Blocks are read ahead in a background thread (``prefetch`` blocks) so that decompression overlaps
        compute. With ``device`` (a torch device or string) each block arrives as a torch tensor on that
        device (pinned memory and an asynchronous copy for CUDA); otherwise as a float32 numpy array.
        ``reuse_arrays`` reads blocks into the arrays of blocks the consumer released (:meth:`RowBlock.release`;
        less CPU, up to two blocks more resident; :class:`~cmdtool.store.reader.BlockArrays`).
        """
        from .reader import iter_row_blocks

        columns = columns if columns is not None else slice(0, self.n_checkpoints)
        rows = rows if rows is not None else slice(0, self.n_rows)
        n_cols = columns.stop - columns.start
        block_rows = block_rows or self.default_block_rows(n_cols, block_bytes)
        return iter_row_blocks(self._read, rows, columns, block_rows, device=device, dtype=dtype,
                               prefetch=prefetch, reuse_arrays=reuse_arrays)

    def read_rows(self, indices, columns: slice | None = None) -> np.ndarray:
        """Gather rows (any order, e.g. a sample) as a (len(indices), T) float32 array.

        Reads only the chunk rows that hold a requested row, one chunk row at a time.
        """
        indices = np.asarray(indices, dtype=np.int64)
        columns = columns if columns is not None else slice(0, self.n_checkpoints)
        out = np.empty((len(indices), columns.stop - columns.start), dtype=np.float32)
        if len(indices) == 0:
            return out
        chunk_rows = self.chunk_shape[0]
        order = np.argsort(indices, kind="stable")
        sorted_idx = indices[order]
        chunk_ids = sorted_idx // chunk_rows
        for cid in np.unique(chunk_ids):
            sel = np.flatnonzero(chunk_ids == cid)
            r0 = int(cid * chunk_rows)
            block = self._read(slice(r0, min(r0 + chunk_rows, self.n_rows)), columns)
            out[order[sel]] = block[sorted_idx[sel] - r0]
        return out

    def read_region(self, rows: slice, columns: slice) -> np.ndarray:
        """``W[rows, columns]`` as a float32 array (memory: its size; callers size it)."""
        return self._read(rows, columns)

    def read_columns(self, columns: slice) -> np.ndarray:
        """All N values of consecutive checkpoints, (N, k) float32 (memory N·k: callers size k)."""
        return self._read(slice(0, self.n_rows), columns)

    def read_column(self, column: int) -> np.ndarray:
        """All N values of one checkpoint, float32 (e.g. for reconstruction)."""
        return self.read_columns(slice(column, column + 1))[:, 0]

    def read_integer_column(self, column: int) -> np.ndarray | None:
        arr = self.integer_values
        if arr is None or self.layout.n_integer_rows == 0:
            return None
        return arr[:, column]

    # ----------------------------------------------------------------- writing
    @contextlib.contextmanager
    def ingest_lock(self, wait: float = 0.0):
        with store_lock(self.path, fmt.INGEST_LOCK, wait=wait):
            yield

    def commit(self, time_axis: list[TimeRecord], bump_revision: bool = True, **extra) -> None:
        """Atomically publish a new time axis (and any other metadata keys)."""
        meta = dict(self.meta)
        meta.update(extra)
        meta["time_axis"] = [r.to_json() for r in time_axis]
        meta["revision"] = self.revision + int(bump_revision)
        meta["modified_at"] = now_iso()
        self.group.attrs[fmt.ATTRS_KEY] = meta
        self._load_attrs()

    def restore(self, meta: dict) -> None:
        """Publish metadata read earlier (a copy of ``store.meta``) again, as one atomic write: after a failed
        write the store reads exactly as it did then (revision included)."""
        self.group.attrs[fmt.ATTRS_KEY] = meta
        self._load_attrs()

    def _column_arrays(self) -> list[zarr.Array]:
        arrays = [self.trajectories, self.epoch_coordinate]
        return arrays + ([self.integer_values] if self.integer_values is not None else [])

    def resize_columns(self, n_columns: int) -> None:
        """Make every array with an epoch dimension ``n_columns`` wide (a shrink deletes the chunks past it)."""
        for array in self._column_arrays():
            if array.shape[-1] != n_columns:
                array.resize(array.shape[:-1] + (n_columns,))

    def write_labels(self, start: int, labels) -> None:
        """Epoch labels of columns ``start..`` into the ``epoch`` coordinate array (what xarray shows)."""
        labels = np.asarray(labels, dtype=np.int64)
        if len(labels):
            self.epoch_coordinate[start:start + len(labels)] = labels

    def drop_scratch_columns(self) -> None:
        """Shrink the arrays to the committed columns (a killed writer may have left wider ones), so that a
        reader of the raw arrays (xarray, dask) sees exactly the committed store. Needs the ingest lock."""
        self.resize_columns(self.n_checkpoints)

    @property
    def epoch_coordinate(self) -> zarr.Array:
        return self._array(fmt.EPOCH)

    @property
    def results(self):
        from .results import ResultsCatalog

        return ResultsCatalog(self)

    # ----------------------------------------------------------------- creation
    @classmethod
    def create(cls, path: str | os.PathLike, layout: Layout, chunk_columns: int,
               target_chunk_bytes: int = fmt.TARGET_CHUNK_BYTES, extra: dict | None = None,
               codec: str = fmt.DEFAULT_CODEC, chunk_rows: int | None = None) -> "TrajectoryStore":
        """Create an empty store (T = 0) for checkpoints of the given layout.

        The arrays are written first and the root group's metadata (with the ``cmdtool`` attribute) last, in one
        file: a store killed while being created has no root metadata and is created again by the next run."""
        path = store_location(path)
        if not is_creatable(path):
            raise UsageError(f"{path} exists and is not a trajectory store; choose another --store")
        n_rows = layout.n_rows
        chunk_columns = int(max(1, min(chunk_columns, fmt.MAX_CHUNK_COLUMNS)))
        if chunk_rows is None:
            chunk_rows = int(max(64, target_chunk_bytes // (4 * chunk_columns)))
            chunk_rows = min(chunk_rows, default_chunk_rows(chunk_columns, chunk_columns, target_chunk_bytes))
        chunk_rows = int(min(chunk_rows, max(n_rows, 1)))
        create_column_arrays(path, n_rows, layout.n_integer_rows, (chunk_rows, chunk_columns), codec)
        write_row_coordinates(path, layout, codec)
        open_zarr_group(path / fmt.RESULTS, "a", attributes={"index": {}})
        meta = {
            "format_version": fmt.FORMAT_VERSION,
            "created_at": now_iso(),
            "modified_at": now_iso(),
            "revision": 0,
            "chunk_shape": [chunk_rows, chunk_columns],
            "layout": layout.to_json(),
            "time_axis": [],
            **(extra or {}),
        }
        open_zarr_group(path, "a", attributes={fmt.ATTRS_KEY: meta})
        return cls(path, mode="r+")

    def __repr__(self) -> str:
        return f"TrajectoryStore({str(self.path)!r}, N={self.n_rows}, T={self.n_checkpoints})"


# Entries a store's folder may hold before its root metadata exists: lock groups (taken before creation) and the
# arrays of a creation that was killed before it finished.
_CREATION_ENTRIES = {fmt.LOCKS, fmt.TRAJECTORIES, fmt.INTEGER_VALUES, fmt.EPOCH, fmt.TENSOR, fmt.TENSOR_INDEX,
                     fmt.RESULTS, *fmt.V1_LOCK_FILES}


def is_creatable(path: Path | RemotePath) -> bool:
    """Whether a new store may be created at ``path``: absent, empty, or holding only what an interrupted
    creation by cmdtool leaves (never a folder with anything else in it)."""
    if isinstance(path, RemotePath):
        if path.is_file():  # an object of that very name
            return False
        return not (path / "zarr.json").exists() and all(p.name in _CREATION_ENTRIES for p in path.iterdir())
    if not path.exists():
        return True
    return path.is_dir() and not (path / "zarr.json").exists() and \
        all(p.name in _CREATION_ENTRIES for p in path.iterdir())


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
    return _writable(zarr.create_array(
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
    index = _writable(zarr.create_array(
        store=zarr_store(path / fmt.TENSOR_INDEX), shape=(n_rows,), chunks=(chunk,), dtype="int32",
        compressors=compressors(), fill_value=0, dimension_names=(fmt.DIMS_TRAJECTORIES[0],), overwrite=True,
        attributes={"long_name": "index into `tensor` of the tensor holding this row"}))
    stops = np.array([e.stop for e in entries], dtype=np.int64)
    for start in range(0, n_rows, chunk):
        rows = np.arange(start, min(start + chunk, n_rows), dtype=np.int64)
        index[start:start + len(rows)] = np.searchsorted(stops, rows, side="right").astype(np.int32)


class RowBlock:
    """Rows ``start:stop`` of W (over the requested columns) as ``data`` (numpy array or torch tensor).

    A block read with ``iter_blocks(reuse_arrays=True)`` lends its memory: :meth:`release` (or the end of a
    ``with block:``) gives it back to the reader, which may then read a later block into it; ``data`` is None
    from then on. A block never released keeps its memory for itself."""

    __slots__ = ("start", "stop", "data", "_give_back")

    def __init__(self, start: int, stop: int, data, give_back=None):
        self.start, self.stop, self.data = start, stop, data
        self._give_back = give_back

    def release(self) -> None:
        """Done with ``data``: the reader may read into its memory again (with ``reuse_arrays``)."""
        give_back, self._give_back, self.data = self._give_back, None, None
        if give_back is not None:
            give_back()

    def __enter__(self) -> "RowBlock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __iter__(self):  # allows ``for start, stop, data in store.iter_blocks()``
        return iter((self.start, self.stop, self.data))


def from_array(path: str | os.PathLike, trajectories: np.ndarray, labels=None,
               tensors: dict[str, tuple[int, ...]] | None = None, chunk_columns: int | None = None,
               target_chunk_bytes: int = fmt.TARGET_CHUNK_BYTES) -> TrajectoryStore:
    """Create a store directly from an in-memory (N, T) array (synthetic data, tests, benchmarks).

    ``tensors`` maps names to shapes whose sizes add up to N (default: one tensor ``"w"`` of shape (N,)).
    """
    from .layout import Layout, TensorEntry, tensor_kind

    values = np.asarray(trajectories, dtype=np.float32)
    n_rows, n_cols = values.shape
    tensors = tensors or {"w": (n_rows,)}
    entries, offset = [], 0
    for name, shape in tensors.items():
        numel = int(np.prod(shape)) if len(shape) else 1
        entries.append(TensorEntry(name, tuple(shape), "float32", tensor_kind(name), "trajectory", offset, numel))
        offset += numel
    if offset != n_rows:
        raise ValueError(f"tensor sizes add up to {offset}, the array has {n_rows} rows")
    labels = list(range(n_cols)) if labels is None else [int(x) for x in labels]
    store = TrajectoryStore.create(path, Layout(entries), chunk_columns or min(n_cols, fmt.MAX_CHUNK_COLUMNS),
                                   target_chunk_bytes=target_chunk_bytes)
    store.resize_columns(n_cols)
    store.trajectories[:, :] = values
    store.write_labels(0, labels)
    axis = [TimeRecord(label=label, source="<array>", size=4 * n_rows, mtime=0.0, digest="", ingested_at=now_iso(),
                       nonfinite=int(values[:, i].size - np.count_nonzero(np.isfinite(values[:, i]))))
            for i, label in enumerate(labels)]
    store.commit(axis)
    return store
