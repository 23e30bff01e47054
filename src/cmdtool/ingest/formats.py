"""Safe readers for checkpoint files: torch pickles (weights only), safetensors, and sharded folders.

Nothing here executes code from a checkpoint: torch files are always loaded with ``weights_only=True`` and
safetensors holds no code at all.
"""

from __future__ import annotations

import json
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from ..errors import CheckpointError

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
SAFETENSORS_SUFFIX = ".safetensors"
CHECKPOINT_SUFFIXES = TORCH_SUFFIXES + (SAFETENSORS_SUFFIX,)
# Keys under which training frameworks wrap the model's state dict, in order of preference.
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "network")

FLOAT_DTYPES = {torch.float16, torch.bfloat16, torch.float32, torch.float64}
INTEGER_DTYPES = {torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64}

SAFE_RESAVE = ("re-save it as a plain state dict (torch.save(model.state_dict(), path)) or as safetensors "
               "(safetensors.torch.save_file(model.state_dict(), path))")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def torch_dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def role_of_dtype(dtype: torch.dtype) -> str | None:
    if dtype in FLOAT_DTYPES:
        return "trajectory"
    if dtype in INTEGER_DTYPES:
        return "integer"
    return None


@dataclass
class CheckpointSource:
    """One checkpoint: a file, or a folder of shards with an index json (``files`` lists every file read)."""

    path: Path
    format: str  # "torch" | "safetensors" | "sharded"
    files: list[Path] = field(default_factory=list)
    label: int | None = None
    name: str = ""

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
    dtype: torch.dtype


class OpenCheckpoint:
    """A checkpoint opened for reading: metadata at once, tensor data on demand (memory-mapped when possible)."""

    def __init__(self, source: CheckpointSource):
        self.source = source
        self._parts: list[tuple[str, object]] = []  # (name, tensor or (safe_open handle, key))
        self._handles: list = []
        try:
            if source.format == "torch":
                self._open_torch(source.path)
            elif source.format == "safetensors":
                self._open_safetensors(source.path)
            elif source.format == "sharded":
                self._open_sharded(source.path)
            else:  # pragma: no cover - discover() only makes the three above
                raise CheckpointError(f"{source.path}: unknown checkpoint format {source.format}")
        except CheckpointError:
            self.close()
            raise
        if not self._parts:
            self.close()
            raise CheckpointError(f"{source.path}: holds no tensors")

    # -------------------------------------------------------------- formats
    def _open_torch(self, path: Path) -> None:
        obj = load_torch_file(path)
        state = unwrap_state_dict(obj, path)
        for name, value in state.items():
            self._parts.append((name, value))

    def _open_safetensors(self, path: Path) -> None:
        from safetensors import safe_open

        try:
            handle = safe_open(str(path), framework="pt", device="cpu")
            keys = list(handle.keys())
        except Exception as exc:  # SafetensorError, OSError, ...
            raise CheckpointError(f"{path}: not a readable safetensors file ({_first_line(exc)})") from None
        self._handles.append(handle)
        for key in keys:
            self._parts.append((key, (handle, key)))

    def _open_sharded(self, folder: Path) -> None:
        index_path = find_index(folder)
        try:
            index = json.loads(index_path.read_text())
            weight_map = index["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except Exception as exc:
            raise CheckpointError(f"{index_path}: not a valid shard index ({_first_line(exc)})") from None
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
        for name, part in self._parts:
            if isinstance(part, tuple):
                handle, key = part
                sl = handle.get_slice(key)
                dtype = _safetensors_dtype(sl.get_dtype(), self.source.path, key)
                out.append(TensorInfo(name, tuple(int(s) for s in sl.get_shape()), dtype))
            elif isinstance(part, torch.Tensor):
                out.append(TensorInfo(name, tuple(part.shape), part.dtype))
            else:
                raise CheckpointError(f"{self.source.path}: entry {name!r} is a {type(part).__name__}, "
                                      f"not a tensor")
        return out

    def tensor(self, name: str) -> torch.Tensor:
        return self._materialise(name, dict(self._parts)[name])

    def _materialise(self, name: str, part) -> torch.Tensor:
        if isinstance(part, tuple):
            handle, key = part
            try:
                return handle.get_tensor(key)
            except Exception as exc:
                raise CheckpointError(f"{self.source.path}: cannot read tensor {name!r} "
                                      f"({_first_line(exc)})") from None
        return part

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name, part in self._parts:
            yield name, self._materialise(name, part)

    def close(self) -> None:
        self._parts = []
        self._handles = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


_SAFETENSORS_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
                       "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16,
                       "I32": torch.int32, "I64": torch.int64}


def _safetensors_dtype(code: str, path: Path, key: str) -> torch.dtype:
    if code not in _SAFETENSORS_DTYPES:
        raise CheckpointError(f"{path}: tensor {key!r} has unsupported dtype {code}")
    return _SAFETENSORS_DTYPES[code]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def load_torch_file(path: Path):
    """``torch.load`` with ``weights_only=True`` (never runs pickled code), memory-mapped when possible."""
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file (0 bytes)")
    try:
        mmap = zipfile.is_zipfile(path)  # the modern format can be memory-mapped; the legacy one cannot
    except Exception:  # noqa: BLE001 - a damaged header can make zipfile raise instead of answering False
        mmap = False
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        if "weights only" in str(exc).lower() or "weights_only" in str(exc).lower():
            raise CheckpointError(
                f"{path}: refused: unpickling it would run code or build Python objects beyond tensors "
                f"(nothing was executed); {SAFE_RESAVE}") from None
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({_first_line(exc)})") from None
    except Exception as exc:  # truncated zip, random bytes, legacy-format garbage...
        raise CheckpointError(f"{path}: not a readable torch checkpoint, truncated or damaged "
                              f"({_first_line(exc)})") from None


def unwrap_state_dict(obj, path: Path) -> dict:
    """The model state dict inside a loaded object: a plain one, or one wrapped by a framework (Lightning)."""
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
        raise CheckpointError(f"{index_path}: not a valid shard index ({_first_line(exc)})") from None
    files = [index_path]
    for name in names:
        if not isinstance(name, str) or Path(name).is_absolute() or ".." in Path(name).parts:
            raise CheckpointError(f"{index_path}: shard {name!r} lies outside the checkpoint folder; refused")
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{index_path}: shard {name!r} is missing")
        files.append(path)
    return files
