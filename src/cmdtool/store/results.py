"""Analysis results inside the store, committed atomically.

Each result is a zarr group written under ``results/<kind>/<name>@<id>``; the ``results`` group's ``index``
attribute maps ``<kind>/<name>`` to that folder. A result becomes visible only when the index is rewritten
(one atomic file write) after every array is on disk, so a crash never exposes a half-written result;
folders that no index entry names are leftovers of an interrupted run and are removed at the next commit.
On an object store (S3) the same protocol holds without renames: the result is written under its fresh key and
the index object (``results/zarr.json``, one PUT, atomic per object) is rewritten last.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import numpy as np
import zarr

from ..errors import CorruptionError, UsageError
from . import format as fmt
from .chunk_files import ArrayDocument, ChunkDamage
from .location import RemotePath
from .metadata import results_index
from ..utils.units import now_iso
from .lock import store_lock
from .zarr_access import compressors, open_zarr_group


def jsonable(value):
    """``value`` with numpy types, paths and non-finite floats turned into what JSON holds (NaN/Inf -> null)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None  # JSON has no NaN; a missing number is reported as null
    if isinstance(value, Path):
        return str(value)
    return value


class Result:
    """A committed result: named arrays (read lazily) and its json attributes."""

    def __init__(self, kind: str, name: str, group: zarr.Group, folder=None):
        self.kind, self.name, self.group = kind, name, group
        self.folder = folder   # a local folder: row ranges of its arrays are read from the chunk files directly
        self.attrs = dict(group.attrs)

    def __contains__(self, key: str) -> bool:
        return key in self.group

    def array(self, key: str):
        """The array ``key``, read lazily: a zarr array, whose row ranges a local result reads from the chunk
        files directly (:class:`RowRanges`; through zarr, a reconstruction in blocks would hold zarr's buffers
        beside the blocks)."""
        array = self.group[key]
        if self.folder is None or array.ndim not in (1, 2):
            return array
        document = ArrayDocument.read(self.folder / key)
        return RowRanges(array, document) if document.numeric else array

    def __getitem__(self, key: str) -> np.ndarray:
        return self.group[key][...]

    def keys(self) -> list[str]:
        return sorted(self.group.array_keys())

    @property
    def config(self) -> dict:
        return self.attrs.get("config", {})

    @property
    def metrics(self) -> dict:
        return self.attrs.get("metrics", {})


class ResultWriter:
    """Stage a result's arrays; :meth:`commit` publishes them atomically."""

    def __init__(self, catalog: "ResultsCatalog", kind: str, name: str):
        self.catalog, self.kind, self.name = catalog, kind, name
        self.folder = f"{kind}/{name}@{uuid.uuid4().hex[:12]}"
        self.path = catalog.root / self.folder
        # results/<kind> is a group too, so that a reader walking the hierarchy meets only zarr nodes
        open_zarr_group(catalog.root / kind, "a")
        self.group = open_zarr_group(self.path, "a")
        self.attrs: dict = {}

    def create(self, key: str, shape, dtype, chunks=None, compress: bool = True):
        """An empty array to fill block by block (large per-row outputs). ``compress=False`` keeps only the
        crc32c checksum: dense float projections (PCA directions, DMD modes) barely shrink under LZ4, which
        doubles the cost of writing them. In a local store, writes of row ranges go to the chunk files directly
        (:class:`RowRanges`)."""
        if chunks is None:
            rows = max(1, min(int(shape[0]) if shape else 1, (4 * 1024**2) // max(np.dtype(dtype).itemsize, 1)))
            chunks = (rows,) + tuple(shape[1:])
        array = self.group.create_array(key, shape=tuple(shape), dtype=dtype, chunks=chunks,
                                        compressors=compressors() if compress else compressors()[-1:],
                                        fill_value=0, config={"write_empty_chunks": True})
        if isinstance(self.path, RemotePath) or len(shape) not in (1, 2):
            return array
        return RowRanges(array, ArrayDocument.read(self.path / key))

    def put(self, key: str, value) -> None:
        value = np.asarray(value)
        arr = self.create(key, value.shape, value.dtype, chunks=value.shape if value.size else None)
        if value.size:
            arr[...] = value

    def commit(self, name: str | None = None) -> Result:
        """Publish under ``name`` (default: the name given at creation), replacing any result of that name."""
        if name is not None:
            self.catalog._check_name(name)
            self.name = name
        self.attrs.setdefault("created_at", now_iso())
        self.group.attrs.update(jsonable(self.attrs))
        return self.catalog._publish(self)

    def discard(self) -> None:
        remove_tree(self.path)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.discard()
        return False


class RowRanges:
    """A result array in a local folder whose row ranges (``out[start:stop]``, what passes and reconstructions
    do once per block) are read, and written (``out[start:stop] = values``), from and to its chunk files
    directly (:mod:`~cmdtool.store.chunk_files`); anything else is the zarr array's. Through zarr, writing
    per-row outputs costs a directions pass about as much as its reads, and zarr's buffers grow the peak with N."""

    def __init__(self, array: zarr.Array, document: ArrayDocument):
        self.array, self.document = array, document

    def __setitem__(self, key, values) -> None:
        if not (isinstance(key, slice) and key.step in (None, 1)):
            self.array[key] = values
            return
        start, stop, _ = key.indices(self.array.shape[0])
        values = np.asarray(values, dtype=self.array.dtype)
        if self.array.ndim == 1:
            self.document.write_region(slice(start, stop), slice(0, 1), values.reshape(-1, 1),
                                       (self.array.shape[0], 1), chunk_shape=(self.document.chunk_shape[0], 1))
        else:
            self.document.write_region(slice(start, stop), slice(0, self.array.shape[1]),
                                       np.broadcast_to(values, (stop - start, self.array.shape[1])),
                                       self.array.shape)

    def __getitem__(self, key):
        if not (isinstance(key, slice) and key.step in (None, 1)):
            return self.array[key]
        start, stop, _ = key.indices(self.array.shape[0])
        if stop <= start:
            return self.array[key]
        try:
            if self.array.ndim == 1:
                return self.document.read_region(slice(start, stop), slice(0, 1))[:, 0]
            return self.document.read_region(slice(start, stop), slice(0, self.array.shape[1]))
        except ChunkDamage as exc:
            if exc.problem == "missing":  # a chunk zarr left unwritten (all fill values, older results): zarr's
                return self.array[key]
            problem = "failed its checksum (the file is damaged)" if exc.problem == "checksum" else \
                f"is {exc.problem}"
            raise CorruptionError(f"result array {self.document.folder}: chunk {exc.index} {problem}; run "
                                  "`cmdtool verify` for the full list") from None

    def __getattr__(self, name):
        if name in ("array", "document") or name.startswith("__"):  # not set yet (unpickling), or protocol
            raise AttributeError(name)
        return getattr(self.array, name)

    def __array__(self, dtype=None, copy=None):
        return np.asarray(self.array[...], dtype=dtype)

    def __len__(self) -> int:
        return len(self.array)


class ResultsCatalog:
    def __init__(self, store):
        self.store = store
        self.root = store.path / fmt.RESULTS

    def _index(self) -> dict:
        return results_index(self.root)

    def list(self, kind: str | None = None) -> list[tuple[str, str]]:
        """(kind, name) of every committed result, optionally of one kind."""
        out = [tuple(key.split("/", 1)) for key in sorted(self._index())]
        return [(k, n) for k, n in out if kind is None or k == kind]

    def exists(self, kind: str, name: str) -> bool:
        return f"{kind}/{name}" in self._index()

    def get(self, kind: str, name: str) -> Result:
        folder = self._index().get(f"{kind}/{name}")
        if folder is None:
            have = ", ".join(n for k, n in self.list(kind)) or "none"
            raise UsageError(f"no {kind} result named {name!r} in {self.store.path} (present: {have})")
        group = open_zarr_group(self.root / folder, "r")
        return Result(kind, name, group, None if isinstance(self.root, RemotePath) else self.root / folder)

    def writer(self, kind: str, name: str) -> ResultWriter:
        if self.store.mode == "r":
            raise UsageError("store was opened read-only; open it with mode='r+' to save results")
        self._check_name(name)
        self.root.mkdir(exist_ok=True)
        return ResultWriter(self, kind, name)

    @staticmethod
    def _check_name(name: str) -> None:
        import re

        if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", name or ""):
            raise UsageError(f"invalid result name {name!r}: use letters, digits, '.', '-' and '_'")

    def delete(self, kind: str, name: str) -> None:
        with store_lock(self.store.path, fmt.RESULTS_LOCK, wait=30):
            index = self._index()
            folder = index.pop(f"{kind}/{name}", None)
            self._write_index(index)
            if folder:
                remove_tree(self.root / folder)

    def _write_index(self, index: dict) -> None:
        group = open_zarr_group(self.root, "a")
        group.attrs["index"] = index  # one atomic file write: the commit point

    def _publish(self, writer: ResultWriter) -> Result:
        with store_lock(self.store.path, fmt.RESULTS_LOCK, wait=30):
            index = self._index()
            replaced = index.get(f"{writer.kind}/{writer.name}")
            index[f"{writer.kind}/{writer.name}"] = writer.folder
            self._write_index(index)
            if replaced:
                remove_tree(self.root / replaced)
            self._collect_garbage(index)
        return self.get(writer.kind, writer.name)

    def _collect_garbage(self, index: dict) -> None:
        """Remove result folders that no index entry names and that are over an hour old (interrupted runs;
        a younger one may belong to a run still writing)."""
        live = set(index.values())
        for kind_dir in self.root.iterdir():
            if not kind_dir.is_dir():
                continue
            for folder in kind_dir.iterdir():
                rel = f"{kind_dir.name}/{folder.name}"
                if folder.is_dir() and "@" in folder.name and rel not in live and not _recent(folder):
                    remove_tree(folder)


def remove_tree(folder: Path | RemotePath) -> None:
    if isinstance(folder, RemotePath):
        folder.remove_tree()
    else:
        shutil.rmtree(folder, ignore_errors=True)


def _recent(folder: Path | RemotePath, seconds: float = 3600) -> bool:
    """Whether ``folder`` was written in the last ``seconds`` (on an object store: its group object's time; an
    object store's "folder" has none)."""
    import time

    try:
        if isinstance(folder, RemotePath):
            info = (folder / "zarr.json").stat()
            modified = info.get("LastModified") or info.get("mtime") or info.get("updated")
            if modified is None:
                return True  # unknown age: keep it
            stamp = modified.timestamp() if hasattr(modified, "timestamp") else float(modified)
            return time.time() - stamp < seconds
        return time.time() - os.path.getmtime(folder) < seconds
    except (OSError, ValueError, TypeError):
        return not isinstance(folder, Path)
