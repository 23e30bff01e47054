"""Safe readers for checkpoints: torch pickles (weights only), safetensors, sharded folders, DeepSpeed folders
and PyTorch distributed checkpoints (DCP). docs/formats.md describes every layout.

Nothing here executes code from a checkpoint: torch files are always loaded with ``weights_only=True`` (plus an
allow-list of plain-data classes, :data:`SAFE_GLOBALS`), safetensors holds no code at all, and a DCP folder's
``.metadata`` pickle is read by an unpickler that builds only DCP's own metadata classes.
"""

from __future__ import annotations

import argparse
import contextlib
import contextvars
import datetime
import decimal
import fractions
import functools
import json
import math
import os
import pathlib
import pickle
import re
import sys
import uuid
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator

import numpy as np

from ..errors import CheckpointError, UsageError, first_line
from ..utils.os_calls import release_mapped_pages
from ..utils.units import natural_key
from .safetensors_reader import SafetensorsFile, SafetensorsTensor

if TYPE_CHECKING:
    import torch

# ".pth.tar": torchvision-reference / timm / pytorch-examples checkpoints (plain torch.save zips despite the name)
TORCH_SUFFIXES = (".pth.tar", ".pt", ".pth", ".bin", ".ckpt", ".tar")
SAFETENSORS_SUFFIX = ".safetensors"
CHECKPOINT_SUFFIXES = TORCH_SUFFIXES + (SAFETENSORS_SUFFIX,)
# Keys under which training frameworks wrap the model's state dict, in order of preference.
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "network")
# Standard-library classes that training scripts and trainers put beside the weights and that the weights-only
# loader may build: torchvision references and timm store their argparse arguments under "args"; Lightning's
# save_hyperparameters() keeps its arguments as given (a pathlib.Path data_dir, a Namespace, a datetime).
# Unpickling one calls its constructor with the file's data (a path's parts, a date's bytes, a number's text) or
# sets plain attributes: nothing of the file's is run and no other code is reached. Torch itself already allows
# OrderedDict, Counter, set, complex and bytearray. Anything else is refused with its name, or taken when the
# user names it (--allow-global, :func:`allowed_globals`). Each entry is (class, the name pickles write for it);
# a path of the other operating system is read as its pure path (a WindowsPath cannot be built on Linux).
SAFE_GLOBALS = [
    *((cls, f"{module}.{cls.__name__}")
      for module in ("pathlib", "pathlib._local")  # the module Python 3.13+ records for the path classes
      for cls in (pathlib.PurePath, pathlib.PurePosixPath, pathlib.PureWindowsPath, pathlib.Path)),
    *((pathlib.PosixPath if os.name != "nt" else pathlib.PurePosixPath, f"{module}.PosixPath")
      for module in ("pathlib", "pathlib._local")),
    *((pathlib.WindowsPath if os.name == "nt" else pathlib.PureWindowsPath, f"{module}.WindowsPath")
      for module in ("pathlib", "pathlib._local")),
    *((cls, f"{cls.__module__}.{cls.__qualname__}") for cls in (
        argparse.Namespace, frozenset, slice, range,
        datetime.date, datetime.datetime, datetime.time, datetime.timedelta, datetime.timezone,
        decimal.Decimal, fractions.Fraction, uuid.UUID)),
]
# Modules whose classes exist to run code, open files or processes, or import: never allowed, even when named.
NEVER_ALLOWED_MODULES = frozenset({
    "builtins", "os", "posix", "nt", "sys", "subprocess", "shutil", "importlib", "pickle", "marshal", "socket",
    "ctypes", "runpy", "code", "codeop", "pty", "multiprocessing", "threading", "asyncio", "io", "operator",
    "functools", "types", "codecs", "signal", "webbrowser", "tempfile"})
# Names added by the user for the current block (allowed_globals): a context variable, never process-wide.
_USER_GLOBALS: contextvars.ContextVar[tuple] = contextvars.ContextVar("cmdtool_user_safe_globals", default=())
DEEPSPEED_MODEL_FILE = "mp_rank_00_model_states.pt"
DCP_METADATA = ".metadata"

# dtypes by the names a store's layout records (torch's names without "torch.")
FLOAT_DTYPES = {"float16", "bfloat16", "float32", "float64"}
INTEGER_DTYPES = {"bool", "uint8", "int8", "int16", "int32", "int64"}

SAFE_RESAVE = ("re-save it as a plain state dict (torch.save(model.state_dict(), path)) or as safetensors "
               "(safetensors.torch.save_file(model.state_dict(), path))")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def torch_dtype(name: str) -> torch.dtype:
    import torch

    return getattr(torch, name)


def role_of_dtype(name: str) -> str | None:
    if name in FLOAT_DTYPES:
        return "trajectory"
    if name in INTEGER_DTYPES:
        return "integer"
    return None


def _is_torch_tensor(value) -> bool:
    """Whether ``value`` is a torch tensor, without importing torch: one exists only once torch is imported."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


def needs_torch(source: CheckpointSource) -> bool:
    """Whether reading ``source`` imports torch: torch files, DeepSpeed and DCP folders, a sharded folder with
    torch shards. safetensors files are read with numpy (:mod:`.safetensors_reader`)."""
    return source.format not in ("safetensors", "sharded") or \
        any(f.name.endswith(TORCH_SUFFIXES) for f in source.files)


@dataclass
class CheckpointSource:
    """One checkpoint: a file, or a folder of shards with an index json (``files`` lists every file read)."""

    path: Path
    format: str  # "torch" | "safetensors" | "sharded" | "deepspeed" | "dcp"
    files: list[Path] = field(default_factory=list)
    label: int | None = None
    name: str = ""
    folder: Path | None = None  # the checkpoint folder, when the checkpoint is one (checkpoint-N/, global_stepN/)
    label_text: str = ""        # what labels are read from: the path relative to the folder the user named
    named: bool = False         # the user named this checkpoint itself (not a folder holding it)
    origin: str = ""            # the URL a checkpoint staged from object storage was listed at (ingestion/remote.py)
    folder_origin: str = ""     # the URL of its checkpoint folder, if any

    @property
    def size(self) -> int:
        return sum(f.stat().st_size for f in self.files)

    @property
    def mtime(self) -> float:
        return max(f.stat().st_mtime for f in self.files)


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: str  # the name a store's layout records: "float32", "bfloat16", "int64", ...
    tied_to: str | None = None  # an earlier tensor this one shares its storage with (tied weights)


class OpenCheckpoint:
    """A checkpoint opened for reading: metadata at once, tensor data on demand (memory-mapped when possible)."""

    def __init__(self, source: CheckpointSource, strip_prefixes: tuple[str, ...] = ()):
        self.source = source
        # (name, part): a torch tensor (torch files), a SafetensorsTensor or a _DcpTensor
        self._parts: list[tuple[str, object]] = []
        self._handles: list[SafetensorsFile] = []
        try:
            if source.format == "torch":
                self._open_torch(source.path)
            elif source.format == "safetensors":
                self._open_safetensors(source.path)
            elif source.format == "sharded":
                self._open_sharded(source.path)
            elif source.format == "deepspeed":
                self._open_deepspeed(source)
            elif source.format == "dcp":
                self._open_dcp(source.path)
            else:  # pragma: no cover - discover() only makes the formats above
                raise CheckpointError(f"{source.path}: unknown checkpoint format {source.format}")
        except CheckpointError:
            self.close()
            raise
        if not self._parts:
            self.close()
            raise CheckpointError(f"{source.path}: holds no tensors")
        if strip_prefixes:
            self._parts = [(strip_prefix(name, strip_prefixes), part) for name, part in self._parts]
        self._by_name = dict(self._parts)
        self._mapped = _MappedFiles(source.files)

    # -------------------------------------------------------------- formats
    def _open_torch(self, path: Path) -> None:
        obj = load_torch_file(path)
        state = unwrap_state_dict(obj, path)
        for name, value in state.items():
            self._parts.append((name, value))

    def _open_safetensors(self, path: Path) -> None:
        handle = SafetensorsFile(path)  # a damaged header is refused here, naming the file
        self._handles.append(handle)
        for key in handle.keys():
            self._parts.append((key, handle.tensors[key]))

    def _open_deepspeed(self, source: CheckpointSource) -> None:
        """DeepSpeed ``global_stepN/mp_rank_00_model_states.pt``: the weights are under ``module``."""
        folder = source.path
        others = sorted(p.name for p in folder.glob("mp_rank_*_model_states.pt") if p.name != DEEPSPEED_MODEL_FILE)
        if others:
            raise CheckpointError(f"{folder}: a model-parallel DeepSpeed checkpoint ({DEEPSPEED_MODEL_FILE} and "
                                  f"{others[0]}); not supported: convert it to one state dict first")
        path = folder / DEEPSPEED_MODEL_FILE
        obj = load_torch_file(path)
        state = unwrap_state_dict(obj, path)
        shapes = {}
        for group in (obj.get("param_shapes") or []) if isinstance(obj, dict) else []:
            if isinstance(group, dict):
                shapes.update(group)
        empty = [k for k, v in state.items() if v.numel() == 0 and math.prod(shapes.get(k, (0,)))]
        if empty:
            raise CheckpointError(
                f"{path}: the weights are partitioned by ZeRO stage 3 ({empty[0]} is empty here); convert each "
                f"checkpoint with the script DeepSpeed saved beside them, e.g. python {folder.parent}/zero_to_fp32.py "
                f"{folder.parent} {folder.name}_fp32 -t {folder.name}, then ingest the converted folders")
        for name, value in state.items():
            self._parts.append((name, value))

    def _open_dcp(self, folder: Path) -> None:
        """A ``torch.distributed.checkpoint`` folder: tensors listed by its metadata, read on demand in one
        process (no process group); the model's tensors are taken from under a wrapper key when the saved dict
        held several things (``{"model": ..., "optim": ...}``)."""
        reader = DcpFolder(folder)
        for name, fqn in reader.model_tensors():
            self._parts.append((name, _DcpTensor(reader, fqn)))

    def _open_sharded(self, folder: Path) -> None:
        index_path = find_index(folder)
        try:
            index = json.loads(index_path.read_text())
            weight_map = index["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except Exception as exc:
            raise CheckpointError(f"{index_path}: not a valid shard index ({first_line(exc)})") from None
        root = folder.resolve()
        shards: dict[str, list[str]] = {}
        for key, shard in weight_map.items():
            shards.setdefault(shard, []).append(key)
        opened: dict[str, dict] = {}
        for shard in shards:
            shard_path = (folder / shard)
            # An index may not name files outside its folder (no ../ or absolute paths, no escaping symlinks).
            if Path(shard).is_absolute() or ".." in Path(shard).parts or shard_path.resolve().parent != root:
                raise CheckpointError(f"{index_path}: shard {shard!r} lies outside the checkpoint folder; refused")
            if not shard_path.is_file():
                raise CheckpointError(f"{index_path}: shard {shard!r} is missing")
            if shard.endswith(SAFETENSORS_SUFFIX):
                sub = OpenCheckpoint(CheckpointSource(shard_path, "safetensors", [shard_path]))
            elif shard.endswith(TORCH_SUFFIXES):
                sub = OpenCheckpoint(CheckpointSource(shard_path, "torch", [shard_path]))
            else:
                raise CheckpointError(f"{index_path}: shard {shard!r} is neither safetensors nor a torch file")
            self._handles.extend(sub._handles)
            opened[shard] = dict(sub._parts)
        for key, shard in weight_map.items():
            if key not in opened[shard]:
                raise CheckpointError(f"{index_path}: tensor {key!r} is not in shard {shard!r}")
            self._parts.append((key, opened[shard][key]))

    # -------------------------------------------------------------- access
    def infos(self) -> list[TensorInfo]:
        out = []
        tied = self.tied()
        for name, part in self._parts:
            if isinstance(part, SafetensorsTensor):
                if part.dtype_name is None:
                    raise CheckpointError(f"{part.file.path}: tensor {part.key!r} has unsupported dtype {part.code}")
                out.append(TensorInfo(name, part.shape, part.dtype_name))
            elif _is_torch_tensor(part):
                out.append(TensorInfo(name, tuple(part.shape), dtype_name(part.dtype), tied.get(name)))
            elif isinstance(part, _DcpTensor):
                out.append(TensorInfo(name, part.shape, dtype_name(part.dtype)))
            else:
                raise CheckpointError(f"{self.source.path}: entry {name!r} is a {type(part).__name__}, "
                                      f"not a tensor")
        return out

    def tensor(self, name: str) -> torch.Tensor:
        """Tensor ``name`` as a torch tensor (imports torch): for callers that work in torch."""
        return self._materialise(name, self._by_name[name])

    def read_into(self, name: str, start: int, stop: int, out: np.ndarray) -> None:
        """Elements ``start:stop`` of tensor ``name`` (flattened) into the float32 numpy array ``out``. A
        safetensors tensor is read and converted with numpy (:mod:`.safetensors_reader`). A float32 tensor
        mapped from a torch file is read with ``pread`` (a kernel copy: no page faults, nothing left resident);
        anything else is copied from memory, converting the dtype, and its pages released."""
        found = self._by_name[name]
        if isinstance(found, SafetensorsTensor):
            found.read_float32(start, stop, out)
            return
        import torch

        part = self._materialise(name, found).detach().reshape(-1)[start:stop]
        if part.dtype == torch.float32 and part.is_contiguous() and part.numel() and \
                self._mapped.read_into(part.data_ptr(), out):
            return
        torch.from_numpy(out).copy_(part)  # casts bf16/fp16/fp64 -> float32
        self.release(part)

    def read_integers_into(self, name: str, out: np.ndarray) -> None:
        """The whole integer or bool tensor ``name`` (flattened) into the int64 numpy array ``out``."""
        found = self._by_name[name]
        if isinstance(found, SafetensorsTensor):
            found.read_int64(out)
            return
        import torch

        torch.from_numpy(out).copy_(self._materialise(name, found).detach().reshape(-1))

    def release(self, tensor: torch.Tensor) -> None:
        """Done reading ``tensor`` (a tensor of this checkpoint or a contiguous part of one): drop the pages it
        was read from out of this process when they are a memory map of the checkpoint's files (a re-read maps
        them again from the page cache). Without this, the mapped pages of every tensor read would stay in the
        process's resident memory until the file is closed: a whole checkpoint."""
        if tensor.is_contiguous() and tensor.numel():
            self._mapped.release(tensor.data_ptr(), tensor.numel() * tensor.element_size())

    def tied(self) -> dict[str, str]:
        """{name: earlier name} for tensors that share storage with an earlier one (tied weights, e.g. a language
        model's output layer and its embedding). Only torch files can hold such views."""
        seen: dict[tuple, str] = {}
        tied = {}
        for name, part in self._parts:
            if not _is_torch_tensor(part) or part.numel() == 0:
                continue
            key = (part.untyped_storage().data_ptr(), part.storage_offset(), tuple(part.shape), part.stride(),
                   part.dtype)
            if key in seen:
                tied[name] = seen[key]
            else:
                seen[key] = name
        return tied

    def _materialise(self, name: str, part) -> torch.Tensor:
        if isinstance(part, _DcpTensor):
            return part.load()
        if isinstance(part, SafetensorsTensor):
            return part.torch()
        return part

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name, part in self._parts:
            yield name, self._materialise(name, part)

    def close(self) -> None:
        if hasattr(self, "_mapped"):
            self._mapped.close()
        for handle in self._handles:
            handle.close()
        self._parts = []
        self._by_name = {}
        self._handles = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


class _MappedFiles:
    """Where this process maps some files (``/proc/self/maps``): to read a mapped tensor's bytes with ``pread``
    instead of page faults, and to hand mapped pages back with ``madvise(MADV_DONTNEED)``. Only file-backed pages
    are ever released: for those the call just unmaps them (the data stay in the file and the page cache);
    anonymous memory is never touched. Where there is no ``/proc`` (not Linux) neither is used and reads go
    through the mapping as before."""

    def __init__(self, files):
        self.files = {str(Path(f).resolve()) for f in files}
        self.ranges: list[tuple[int, int, int, str]] | None = None  # (start, stop, file offset, path)
        self.descriptors: dict[str, int] = {}

    def _load(self) -> list[tuple[int, int, int, str]]:
        """The lines of ``/proc/self/maps`` that end with one of the files (found by string search: the file
        has thousands of lines once torch is loaded, and is read once per checkpoint)."""
        try:
            with open("/proc/self/maps") as maps:
                text = maps.read()
        except OSError:
            return []
        ranges = []
        for path in self.files:
            at = text.find(f" {path}\n")
            while at >= 0:
                fields = text[text.rfind("\n", 0, at) + 1:at].split()  # address perms offset dev inode
                lo, hi = fields[0].split("-")
                ranges.append((int(lo, 16), int(hi, 16), int(fields[2], 16), path))
                at = text.find(f" {path}\n", at + 1)
        return ranges

    def _ranges_at(self, address: int) -> list[tuple[int, int, int, str]]:
        if self.ranges is None or not any(lo <= address < hi for lo, hi, _, _ in self.ranges):
            self.ranges = self._load()  # mapped lazily (a shard, a DCP file): look again
        return self.ranges

    def read_into(self, address: int, out) -> bool:
        """Fill the writable buffer ``out`` with the mapped bytes at ``address`` by reading the file; False when
        they are not (wholly) in a mapping of these files."""
        nbytes = memoryview(out).nbytes
        for lo, hi, file_offset, path in self._ranges_at(address):
            if lo <= address and address + nbytes <= hi:
                if path not in self.descriptors:
                    self.descriptors[path] = os.open(path, os.O_RDONLY)
                view, offset = memoryview(out).cast("B"), file_offset + address - lo
                while view.nbytes:
                    done = os.preadv(self.descriptors[path], [view], offset)
                    if done <= 0:
                        return False
                    view, offset = view[done:], offset + done
                return True
        return False

    def release(self, address: int, nbytes: int) -> None:
        page = _page_size()
        for lo, hi, _, _ in self._ranges_at(address):
            start, stop = max(lo, address // page * page), min(hi, -(-(address + nbytes) // page) * page)
            if start < stop:
                release_mapped_pages(start, stop - start)  # where unavailable, the pages stay resident

    def close(self) -> None:
        for fd in self.descriptors.values():
            os.close(fd)
        self.descriptors = {}


@functools.lru_cache(maxsize=1)
def _page_size() -> int:
    import mmap

    return mmap.PAGESIZE


@contextlib.contextmanager
def allowed_globals(names: Iterable[str] = ()):
    """Let the weights-only loader also build the classes or functions ``names`` (``module.Name``) inside this
    block, in this thread of control only: the user's own classes that their checkpoints pickle beside the
    weights, on the user's own responsibility (as ``torch.serialization.add_safe_globals``, but scoped).

    Each name is imported (its module's import-time code runs, as it would in the user's training script); an
    object built from a file then runs whatever that class does when constructed or given its state. Never
    name a class whose construction does more than store data."""
    from ..utils.imports import import_global

    objects = []
    for name in dict.fromkeys(names):
        if name.split(".")[0].split(":")[0] in NEVER_ALLOWED_MODULES:
            raise UsageError(f"--allow-global {name!r}: classes of {name.split('.')[0]} run code or reach the "
                             f"system; refused")
        obj = import_global(name, "--allow-global")
        if obj.__module__.split(".")[0] in NEVER_ALLOWED_MODULES if isinstance(obj, type) else False:
            raise UsageError(f"--allow-global {name!r}: a class of {obj.__module__}, which runs code or reaches "
                             f"the system; refused")
        if not isinstance(obj, type):
            raise UsageError(f"--allow-global {name!r}: a {type(obj).__name__}, not a class; only classes can be "
                             f"allowed")
        objects.append((obj, f"{obj.__module__}.{obj.__qualname__}"))
        if objects[-1][1] != name:
            objects.append((obj, name))  # the name given as well, when it is an alias of where the class lives
    objects = tuple(objects)
    token = _USER_GLOBALS.set(_USER_GLOBALS.get() + objects)
    try:
        yield [name for _, name in objects]
    finally:
        _USER_GLOBALS.reset(token)


def safe_globals() -> list:
    """The allow-list in force: :data:`SAFE_GLOBALS` plus what :func:`allowed_globals` added here."""
    return list(SAFE_GLOBALS) + list(_USER_GLOBALS.get())


def load_torch_file(path: Path):
    """``torch.load`` with ``weights_only=True`` (never runs pickled code) and the allow-list
    (:func:`safe_globals`), memory-mapped when possible."""
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({first_line(exc)})") from None
    if size == 0:
        raise CheckpointError(f"{path}: empty file (0 bytes)")
    try:
        mmap = zipfile.is_zipfile(path)  # the modern format can be memory-mapped; the legacy one cannot
    except Exception:  # noqa: BLE001 - a damaged header can make zipfile raise instead of answering False
        mmap = False
    import torch

    try:
        with torch.serialization.safe_globals(safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        if "weights only" in str(exc).lower() or "weights_only" in str(exc).lower():
            offending = _unsafe_globals(path, exc)
            what = ", ".join(offending[:3]) if offending else "Python objects beyond tensors"
            trust = (f"; or, if you trust the class and it only holds data, pass --allow-global {offending[0]} "
                     f"(see docs/formats.md)") if offending and _may_be_allowed(offending[0]) else ""
            raise CheckpointError(
                f"{path}: refused: unpickling it needs {what}, which could run code (nothing was executed); "
                f"{SAFE_RESAVE}{trust}") from None
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({first_line(exc)})") from None
    except Exception as exc:  # truncated zip, random bytes, legacy-format garbage...
        detail = first_line(exc)
        if "mmap can only be used" in detail:  # zip trailer intact, archive header not: torch's advice misleads
            detail = "the zip archive's header is damaged"
        raise CheckpointError(f"{path}: not a readable torch checkpoint, truncated or damaged ({detail})") from None


def _may_be_allowed(name: str) -> bool:
    """Whether ``--allow-global NAME`` could be accepted (so the refusal may suggest it): a class by its name
    (capitalised, as classes are), outside :data:`NEVER_ALLOWED_MODULES`."""
    module, _, last = name.rpartition(".")
    return bool(module) and last[:1].isupper() and module.split(".")[0] not in NEVER_ALLOWED_MODULES


def _unsafe_globals(path: Path, exc: BaseException) -> list[str]:
    """The globals a refused file would need (read from the pickle's opcodes, never by running them)."""
    import torch

    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:  # noqa: BLE001 - legacy (non-zip) files: fall back to the loader's message
        found = re.findall(r"GLOBAL ([\w.]+)", str(exc))
    allowed = {name for _, name in safe_globals()}
    return [name for name in dict.fromkeys(found) if name not in allowed]


def strip_prefix(name: str, prefixes: tuple[str, ...]) -> str:
    """``name`` without the first of ``prefixes`` it starts with (``module.`` of DataParallel/DDP)."""
    for prefix in prefixes:
        if prefix and name.startswith(prefix):
            return name[len(prefix):]
    return name


def safetensors_metadata(source: Path) -> dict[str, str] | None:
    """The header metadata of a safetensors checkpoint (of its first shard for a sharded folder), else None."""
    if source.is_dir():
        shards = sorted(source.glob(f"*{SAFETENSORS_SUFFIX}"))
        if not shards:
            return None
        source = shards[0]
    if not source.name.endswith(SAFETENSORS_SUFFIX) or not source.is_file():
        return None
    try:
        with SafetensorsFile(source) as handle:
            return handle.metadata
    except CheckpointError:  # the source changed or vanished: write the default metadata instead
        return None


def unwrap_state_dict(obj, path: Path) -> dict:
    """The model state dict inside a loaded object: a plain one, or one wrapped by a framework (Lightning)."""
    import torch

    if isinstance(obj, dict):
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
        for key in WRAPPER_KEYS:
            inner = obj.get(key)
            if isinstance(inner, dict) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                return inner
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors and len(tensors) == len(obj):
            return tensors
        keys = ", ".join(map(str, list(obj)[:8]))
        raise CheckpointError(f"{path}: no state dict found (top-level keys: {keys}); expected a dict of tensors "
                              f"or one under {'/'.join(WRAPPER_KEYS)}")
    if isinstance(obj, torch.nn.Module):  # pragma: no cover - weights_only refuses modules
        return obj.state_dict()
    raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict")


def find_index(folder: Path) -> Path:
    candidates = sorted(folder.glob("*.index.json"))
    if not candidates:
        raise CheckpointError(f"{folder}: no *.index.json shard index")
    if len(candidates) > 1:
        names = ", ".join(c.name for c in candidates)
        raise CheckpointError(f"{folder}: several shard indexes ({names}); keep one per checkpoint folder")
    return candidates[0]


def shard_files(folder: Path) -> list[Path]:
    index_path = find_index(folder)
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
        names = list(dict.fromkeys(weight_map.values()))
    except Exception as exc:
        raise CheckpointError(f"{index_path}: not a valid shard index ({first_line(exc)})") from None
    files = [index_path]
    for name in names:
        if not isinstance(name, str) or Path(name).is_absolute() or ".." in Path(name).parts:
            raise CheckpointError(f"{index_path}: shard {name!r} lies outside the checkpoint folder; refused")
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{index_path}: shard {name!r} is missing")
        files.append(path)
    return files


# ------------------------------------------------------------------------------------------ DCP (FSDP) folders
# The only classes a DCP ``.metadata`` pickle may build: DCP's own metadata records, torch.Size, dtypes and
# layouts, and paths. Each is plain data; none runs code when built.
_DCP_METADATA_GLOBALS = {
    ("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")
} | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
     ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
     ("collections", "OrderedDict")}


class _DcpMetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        import torch

        if (module, name) in _DCP_METADATA_GLOBALS or (module == "torch" and isinstance(getattr(torch, name, None),
                                                                                         torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of DCP metadata")


class DcpFolder:
    """One DCP checkpoint folder read in this process (no process group), through DCP's own file reader."""

    def __init__(self, folder: Path):
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        self.folder = folder
        try:
            with open(folder / DCP_METADATA, "rb") as handle:
                self.metadata = _DcpMetadataUnpickler(handle).load()
            entries = self.metadata.state_dict_metadata
        except Exception as exc:  # noqa: BLE001 - damaged, foreign or refused metadata
            raise CheckpointError(f"{folder / DCP_METADATA}: not readable DCP metadata ({first_line(exc)}); "
                                  f"refused") from None
        needed: dict[Path, int] = {}  # data file -> the bytes the metadata says it holds at least
        for info in (self.metadata.storage_data or {}).values():
            relative = Path(str(getattr(info, "relative_path", "")))
            if relative.is_absolute() or ".." in relative.parts or len(relative.parts) != 1:
                raise CheckpointError(f"{folder}: DCP metadata names a data file outside the folder "
                                      f"({relative}); refused")
            end = int(getattr(info, "offset", 0) or 0) + int(getattr(info, "length", 0) or 0)
            needed[folder / relative] = max(needed.get(folder / relative, 0), end)
        for path, end in needed.items():  # a missing or cut data file is named before anything is read
            if not path.is_file():
                raise CheckpointError(f"{path}: missing (the DCP metadata lists it)")
            size = path.stat().st_size
            if size < end:
                raise CheckpointError(f"{path}: truncated or empty ({size:,} bytes; the DCP metadata places data "
                                      f"up to byte {end:,})")
        self.data_files = sorted(needed, key=lambda p: natural_key(p.name))
        self.tensors = {fqn: md for fqn, md in entries.items() if isinstance(md, TensorStorageMetadata)}
        self.paths = dict(getattr(self.metadata, "planner_data", None) or {})
        self._reader_class = FileSystemReader
        self._loaded: dict[str, torch.Tensor] | None = None

    def model_tensors(self) -> list[tuple[str, str]]:
        """(name, fqn) of the model's tensors: those under the first wrapper key of the saved dict when it held
        several top-level entries (``{"model": sd, "optim": osd}``), else every tensor."""
        paths = {fqn: tuple(self.paths.get(fqn, (fqn,))) for fqn in self.tensors}
        tops = {path[0] for path in paths.values()}
        for key in WRAPPER_KEYS:
            inner = [(str(path[1]), fqn) for fqn, path in paths.items() if path[0] == key and len(path) == 2]
            if inner and (len(tops) > 1 or all(len(p) == 2 for p in paths.values())):
                return inner
        return [(fqn, fqn) for fqn in self.tensors]

    def load(self, fqn: str) -> torch.Tensor:
        if self._loaded is None:  # every model tensor in one read plan (DCP reassembles sharded chunks)
            import warnings

            import torch
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.api import CheckpointException

            wanted = {f: torch.empty(tuple(md.size), dtype=md.properties.dtype)
                      for _, f in self.model_tensors() for md in (self.tensors[f],)}
            reader = self._reader_class(str(self.folder))
            reader.read_metadata = lambda *args, **kwargs: self.metadata  # never the unrestricted pickle.load
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # "no process group: loading in one process" is the point
                    dcp.load(wanted, storage_reader=reader, no_dist=True)
            except (Exception, CheckpointException) as exc:  # noqa: BLE001 - damaged .distcp files
                # DCP's CheckpointException derives from BaseException and carries each rank's exception
                cause = next(iter(exc.failures.values()))[0] if isinstance(exc, CheckpointException) and \
                    exc.failures else exc
                where = self.data_files[0] if len(self.data_files) == 1 else self.folder
                detail = first_line(cause)
                if "weights only load failed" in detail.lower():  # torch's advice (weights_only=False) misleads
                    detail = "a tensor record does not unpickle"
                if detail != type(cause).__name__:
                    detail = f"{type(cause).__name__}: {detail}"
                raise CheckpointError(f"{where}: damaged DCP data, cannot read it ({detail})") from None
            self._loaded = wanted
        return self._loaded[fqn]


class _DcpTensor:
    __slots__ = ("folder", "fqn", "shape", "dtype")

    def __init__(self, folder: DcpFolder, fqn: str):
        md = folder.tensors[fqn]
        self.folder, self.fqn = folder, fqn
        self.shape, self.dtype = tuple(int(s) for s in md.size), md.properties.dtype

    def load(self) -> torch.Tensor:
        return self.folder.load(self.fqn)
