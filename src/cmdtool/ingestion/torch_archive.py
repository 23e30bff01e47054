"""Tensors inside a ``torch.save`` zip archive, found and replaced without unpickling the archive's objects.

A torch file is a zip archive: ``<archive>/data.pkl`` pickles the saved object, and each tensor's storage is a
raw entry ``<archive>/data/<key>``. Some files a reconstruction must rewrite pickle classes of the library that
wrote them (DeepSpeed's ZeRO optimizer partitions name DeepSpeed's enums and named tuples), which the
weights-only loader refuses and which must not be imported or run here. :func:`scan` walks ``data.pkl`` with an
unpickler whose every class is an inert stand-in (:class:`Opaque`), so that the plain containers (dicts, lists,
numbers) and the tensors' places (:class:`TensorRef`) can be read, and nothing from the file runs.
:func:`write_replacing` copies the archive entry by entry, with chosen tensor storages' bytes replaced.
"""

from __future__ import annotations

import pickle
import shutil
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import CheckpointError
from ..utils.output_folder import write_atomically

# the storage classes a torch file names, as numpy dtypes (those a float partition can hold)
_STORAGE_DTYPES = {"FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
                   "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
                   "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_}


class Opaque:
    """Stands for an instance of a class the archive names: keeps its constructor arguments and state, runs
    nothing."""

    qualified_name = "?"

    def __new__(cls, *args, **kwargs):
        self = object.__new__(cls)
        self.args = args
        return self

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state

    def __repr__(self) -> str:
        return f"<{self.qualified_name}{self.args!r}>"


@dataclass(frozen=True)
class StorageRef:
    key: str
    dtype: np.dtype | None  # None: a storage class outside _STORAGE_DTYPES


@dataclass(frozen=True)
class TensorRef:
    """Where a pickled tensor's values are: ``storage``'s entry, from element ``offset``, with ``size`` and
    ``stride``."""

    storage: StorageRef
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]

    @property
    def numel(self) -> int:
        return int(np.prod(self.size, dtype=np.int64))

    @property
    def contiguous(self) -> bool:
        expected, step = [], 1
        for extent in reversed(self.size):
            expected.append(step)
            step *= extent
        return tuple(reversed(expected)) == tuple(self.stride) or self.numel <= 1


def _rebuild_tensor(storage, offset, size, stride, *_):
    return TensorRef(storage, int(offset), tuple(size), tuple(stride))


def _rebuild_parameter(tensor, *_):
    return tensor


class _InertUnpickler(pickle.Unpickler):
    """Plain containers are themselves, a tensor is a :class:`TensorRef`, every other class an :class:`Opaque`."""

    def __init__(self, file):
        super().__init__(file)
        self._opaque: dict[tuple[str, str], type] = {}

    def find_class(self, module: str, name: str):
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "torch" and name.endswith("Storage"):
            return name
        key = (module, name)
        if key not in self._opaque:
            self._opaque[key] = type(name, (Opaque,), {"qualified_name": f"{module}.{name}"})
        return self._opaque[key]

    def persistent_load(self, pid):
        kind, storage_type, key, *_ = pid
        if kind != "storage":
            raise pickle.UnpicklingError(f"unknown persistent id {kind!r}")
        return StorageRef(str(key), _STORAGE_DTYPES.get(storage_type) if isinstance(storage_type, str) else None)


def _archive_prefix(archive: zipfile.ZipFile, path: Path) -> str:
    pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
        raise CheckpointError(f"{path}: not a torch zip archive (no single data.pkl)")
    return pickles[0][:-len("data.pkl")]


def scan(path: Path):
    """The object saved in the torch file ``path``, with tensors as :class:`TensorRef` and every class instance
    as an :class:`Opaque` (nothing from the file is imported or run)."""
    try:
        with zipfile.ZipFile(path) as archive:
            prefix = _archive_prefix(archive, path)
            with archive.open(prefix + "data.pkl") as pickled:
                return _InertUnpickler(pickled).load()
    except (zipfile.BadZipFile, pickle.UnpicklingError, EOFError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: not a readable torch file ({exc})") from None


def read_tensor(path: Path, ref: TensorRef) -> np.ndarray:
    """The values of a contiguous tensor of the archive, as a flat numpy array."""
    _check_plain(path, ref)
    with zipfile.ZipFile(path) as archive:
        data = archive.read(_archive_prefix(archive, path) + "data/" + ref.storage.key)
    itemsize = np.dtype(ref.storage.dtype).itemsize
    return np.frombuffer(data, dtype=ref.storage.dtype, count=ref.numel, offset=ref.offset * itemsize).copy()


def _check_plain(path: Path, ref: TensorRef) -> None:
    if ref.storage.dtype is None or not ref.contiguous:
        raise CheckpointError(f"{path}: a tensor to replace is not a plain contiguous tensor")


def write_replacing(source: Path, target: Path, replacements: list[tuple[TensorRef, np.ndarray]]) -> None:
    """Copy the torch archive ``source`` to ``target`` (atomically) with each ``(tensor, values)`` of
    ``replacements`` holding ``values`` (cast to the tensor's dtype; the same element count). Entries are
    copied as stored, one at a time; the storages replaced are read whole."""
    by_key: dict[str, list[tuple[TensorRef, np.ndarray]]] = {}
    for ref, values in replacements:
        _check_plain(source, ref)
        if np.size(values) != ref.numel:
            raise ValueError(f"{ref.numel} values expected, {np.size(values)} given")
        by_key.setdefault(ref.storage.key, []).append((ref, values))

    def write(temporary: Path) -> None:
        with zipfile.ZipFile(source) as archive, zipfile.ZipFile(temporary, "w", zipfile.ZIP_STORED) as out:
            prefix = _archive_prefix(archive, source)
            for info in archive.infolist():
                key = info.filename[len(prefix + "data/"):] if info.filename.startswith(prefix + "data/") else None
                if key in by_key:
                    data = bytearray(archive.read(info))
                    for ref, values in by_key[key]:
                        dtype = np.dtype(ref.storage.dtype)
                        view = np.frombuffer(data, dtype=dtype, count=ref.numel, offset=ref.offset * dtype.itemsize)
                        np.copyto(view, np.asarray(values).reshape(-1), casting="unsafe")
                    out.writestr(info.filename, bytes(data))
                else:
                    with archive.open(info) as part, out.open(info.filename, "w", force_zip64=True) as copy:
                        shutil.copyfileobj(part, copy, 1 << 20)

    write_atomically(target, write)
