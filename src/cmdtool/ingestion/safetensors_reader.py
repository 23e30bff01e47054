"""safetensors files read with numpy, so that ingesting them never imports torch (~1 s of start-up).

The format: an 8-byte little-endian header length, a JSON header (``dtype``, ``shape`` and ``data_offsets`` of
each tensor, optional ``__metadata__`` of strings), then the tensors' bytes. The header is checked as the
safetensors library checks it (offsets contiguous from 0, each tensor's byte count matching its shape and dtype,
the data ending exactly at the end of the file), so a damaged file is refused when it is opened, before anything
is written. Tensor data is read with ``pread`` into numpy arrays (a kernel copy: nothing stays mapped or
resident) and converted to float32 exactly as torch's ``.float()`` converts: bfloat16 by a 16-bit shift of its
bits, float16 and float64 by numpy's casts, with float16's signalling NaNs made quiet as torch makes them.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from pathlib import Path

import numpy as np

from ..errors import CheckpointError

HEADER_LIMIT = 100_000_000  # bytes; the safetensors library refuses longer headers
METADATA_KEY = "__metadata__"
# The dtypes ingest stores: the format's code -> (the name a store's layout records, the elements' numpy dtype).
# numpy has no bfloat16: its elements are read as 16-bit integers and widened by bits.
DTYPES = {"F16": ("float16", "<f2"), "BF16": ("bfloat16", "<u2"), "F32": ("float32", "<f4"),
          "F64": ("float64", "<f8"), "BOOL": ("bool", "u1"), "U8": ("uint8", "u1"), "I8": ("int8", "i1"),
          "I16": ("int16", "<i2"), "I32": ("int32", "<i4"), "I64": ("int64", "<i8")}
# The format's other codes, by their size in bits: a header using them is checked and opens, and ingest names the
# tensor's dtype as unsupported (as it does for a torch file's float8 or complex tensor).
OTHER_DTYPE_BITS = {"F8_E4M3": 8, "F8_E5M2": 8, "F8_E8M0": 8, "F6_E2M3": 6, "F6_E3M2": 6, "F4": 4, "U16": 16,
                    "U32": 32, "U64": 64, "C64": 64}
_LITTLE_ENDIAN = sys.byteorder == "little"
_QUIET_BIT = np.uint32(0x00400000)  # the first mantissa bit of a float32 NaN


def float16_to_float32(raw: np.ndarray, out: np.ndarray) -> None:
    """float16 values (any byte order) into the float32 array ``out``, bit for bit as torch's ``.float()``."""
    np.copyto(out, raw, casting="same_kind")
    nan = np.isnan(out)
    if nan.any():  # numpy keeps a signalling NaN signalling; torch's conversion quiets it
        bits = out.view(np.uint32)
        bits[nan] |= _QUIET_BIT


def bfloat16_to_float32(raw: np.ndarray, out: np.ndarray) -> None:
    """bfloat16 values given as their 16-bit patterns (``raw``, unsigned) into the float32 array ``out``: the
    bits shifted into the upper half of a float32, which is exact (and what torch does)."""
    np.left_shift(raw, 16, out=out.view(np.uint32), dtype=np.uint32)


class SafetensorsFile:
    """One safetensors file, its header checked and parsed; tensor data read on demand. Close it when done."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        except OSError as exc:
            raise self._unreadable(exc.strerror or str(exc)) from None
        self._lock = threading.Lock()  # for the seek-and-read fallback where there is no preadv
        try:
            self.metadata, self.tensors = self._read_header()
        except BaseException:
            self.close()
            raise

    def _unreadable(self, why: str) -> CheckpointError:
        error = CheckpointError(f"{self.path}: not a readable safetensors file ({why})")
        error.reason = why  # for callers that say it in their own words
        return error

    def _read_header(self) -> tuple[dict[str, str] | None, dict[str, SafetensorsTensor]]:
        size = os.fstat(self._fd).st_size
        if size < 8:
            raise self._unreadable(f"{size} bytes, shorter than the header's length field")
        length = int.from_bytes(self._pread(8, 0), "little")
        if length > HEADER_LIMIT:
            raise self._unreadable(f"header of {length:,} bytes, over the format's limit")
        if 8 + length > size:
            raise self._unreadable(f"header of {length:,} bytes in a file of {size:,}")
        text = self._pread(length, 8)
        try:
            header = json.loads(text.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise self._unreadable(f"header is not JSON: {str(exc).splitlines()[0]}") from None
        if not text.startswith(b"{") or not isinstance(header, dict):
            raise self._unreadable("header is not a JSON object")
        metadata = header.pop(METADATA_KEY, None)
        if metadata is not None and not (isinstance(metadata, dict) and
                                         all(isinstance(v, str) for v in metadata.values())):
            raise self._unreadable(f"{METADATA_KEY} is not an object of strings")
        tensors = {key: self._tensor(key, entry, 8 + length) for key, entry in header.items()}
        end = 0  # the tensors' bytes, in file order, must follow each other from the start of the data
        for tensor in sorted(tensors.values(), key=lambda t: (t.begin, t.end)):
            if tensor.begin != end:
                raise self._unreadable(f"tensor {tensor.key!r} starts at byte {tensor.begin:,} of the data, "
                                       f"not at {end:,}")
            end = tensor.end
        if 8 + length + end != size:
            raise self._unreadable(f"the header places data up to byte {8 + length + end:,}; the file has "
                                   f"{size:,} (truncated or damaged)")
        return metadata, tensors

    def _tensor(self, key: str, entry, data_start: int) -> SafetensorsTensor:
        def count(value) -> bool:
            return isinstance(value, int) and not isinstance(value, bool) and value >= 0

        if not isinstance(entry, dict):
            raise self._unreadable(f"tensor {key!r} is described by a {type(entry).__name__}, not an object")
        code, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not (isinstance(shape, list) and all(count(s) for s in shape)):
            raise self._unreadable(f"tensor {key!r} has no valid shape")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(count(o) for o in offsets)
                and offsets[0] <= offsets[1]):
            raise self._unreadable(f"tensor {key!r} has no valid data_offsets")
        if code in DTYPES:
            bits = 8 * np.dtype(DTYPES[code][1]).itemsize
        elif code in OTHER_DTYPE_BITS:
            bits = OTHER_DTYPE_BITS[code]
        else:
            raise self._unreadable(f"tensor {key!r} has an unknown dtype {code!r}")
        numel = 1
        for s in shape:
            numel *= s
        if numel * bits % 8 or offsets[1] - offsets[0] != numel * bits // 8:
            raise self._unreadable(f"tensor {key!r}: {offsets[1] - offsets[0]:,} bytes for shape {tuple(shape)} "
                                   f"of {code}")
        return SafetensorsTensor(self, key, code, tuple(shape), numel, offsets[0], offsets[1], data_start)

    def keys(self) -> list[str]:
        """The tensors' names, sorted (the order in which the safetensors library lists them)."""
        return sorted(self.tensors)

    def _pread(self, nbytes: int, offset: int) -> bytes:
        data = bytearray(nbytes)
        self.read_into(memoryview(data), offset)
        return bytes(data)

    def read_into(self, view: memoryview, offset: int) -> None:
        """Fill the writable buffer ``view`` with the file's bytes from ``offset``."""
        view = view.cast("B")
        while view.nbytes:
            if hasattr(os, "preadv"):
                done = os.preadv(self._fd, [view], offset)
            else:  # pragma: no cover - Windows
                with self._lock:
                    os.lseek(self._fd, offset, os.SEEK_SET)
                    chunk = os.read(self._fd, view.nbytes)
                view[:len(chunk)] = chunk
                done = len(chunk)
            if done <= 0:
                raise CheckpointError(f"{self.path}: ends at byte {offset:,}, inside the data its header "
                                      f"describes (changed while being read?)")
            view, offset = view[done:], offset + done

    def close(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


class SafetensorsTensor:
    """One tensor of a :class:`SafetensorsFile`: its header entry, and its elements read on demand."""

    __slots__ = ("file", "key", "code", "shape", "numel", "begin", "end", "data_start")

    def __init__(self, file: SafetensorsFile, key: str, code: str, shape: tuple[int, ...], numel: int,
                 begin: int, end: int, data_start: int):
        self.file, self.key, self.code, self.shape, self.numel = file, key, code, shape, numel
        self.begin, self.end, self.data_start = begin, end, data_start

    @property
    def dtype_name(self) -> str | None:
        """The dtype's name as a store's layout records it (``"bfloat16"``); None for a dtype ingest does not
        store."""
        return DTYPES[self.code][0] if self.code in DTYPES else None

    def raw(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Elements ``start:stop`` of the flattened tensor as stored (bfloat16 as unsigned 16-bit patterns)."""
        if self.code not in DTYPES:
            raise CheckpointError(f"{self.file.path}: tensor {self.key!r} has unsupported dtype {self.code}")
        stop = self.numel if stop is None else stop
        raw = np.empty(stop - start, dtype=DTYPES[self.code][1])
        if raw.size:
            self.file.read_into(memoryview(raw), self.data_start + self.begin + start * raw.itemsize)
        return raw

    def read_float32(self, start: int, stop: int, out: np.ndarray) -> None:
        """Elements ``start:stop`` of the flattened (floating) tensor into the float32 array ``out``."""
        if stop <= start:
            return
        if self.code == "F32" and _LITTLE_ENDIAN and out.flags.c_contiguous:
            self.file.read_into(memoryview(out), self.data_start + self.begin + start * 4)  # no conversion
            return
        raw = self.raw(start, stop)
        if self.code == "BF16":
            bfloat16_to_float32(raw, out)
        elif self.code == "F16":
            float16_to_float32(raw, out)
        else:
            with np.errstate(over="ignore", invalid="ignore"):  # float64 beyond float32's range is inf, silently
                np.copyto(out, raw, casting="unsafe")

    def read_int64(self, out: np.ndarray) -> None:
        """The whole (integer or bool) tensor into the int64 array ``out``; a bool byte other than 0 is 1."""
        raw = self.raw()
        np.copyto(out, raw != 0 if self.code == "BOOL" else raw, casting="same_kind")

    def torch(self):
        """The tensor as a torch tensor of its own dtype (a copy), for callers that use torch anyway."""
        import torch

        raw = self.raw()
        raw = raw.astype(raw.dtype.newbyteorder("="), copy=False)
        if self.code == "BF16":
            tensor = torch.from_numpy(raw.view(np.int16)).view(torch.bfloat16)
        elif self.code == "BOOL":
            tensor = torch.from_numpy(raw).view(torch.bool)
        else:
            tensor = torch.from_numpy(raw)
        return tensor.reshape(self.shape)
