"""Modelled weights back into a checkpoint that loads with ``model.load_state_dict(sd, strict=True)``.

A reconstructed checkpoint has the source's keys in the source's order, the same shapes and dtypes (cast back
from the store's float32), integer entries (``num_batches_tracked``) as stored for that epoch, and every
tensor that ingest left out (``--exclude``) copied from the source checkpoint recorded in the time axis.
"""

from __future__ import annotations

import bisect
import json
import os
import struct
from pathlib import Path

import numpy as np
import torch

from ..errors import CheckpointError, UsageError
from .formats import OpenCheckpoint, torch_dtype
from .ingest import open_recorded_source
from ..store.layout import numel_of
from ..utils.output_folder import write_atomically

FORMATS = ("pt", "safetensors")


def _open_source(store, column: int) -> OpenCheckpoint:
    return open_recorded_source(store, column)


def build_state_dict(store, vector: np.ndarray, column: int) -> dict[str, torch.Tensor]:
    """State dict of one epoch from a modelled N-vector (float32) and the store's layout."""
    vector = np.asarray(vector, dtype=np.float32)
    if vector.shape != (store.n_rows,):
        raise ValueError(f"expected an N-vector of {store.n_rows} values, got shape {vector.shape}")
    return state_dict_from_blocks(store, column, [(slice(0, store.n_rows), vector)])


def state_dict_from_blocks(store, column: int, blocks) -> dict[str, torch.Tensor]:
    """State dict of one epoch from its modelled values as row blocks ``(rows, float32 values)`` (any order):
    each tensor is allocated once in its own dtype and filled, so the memory is one model plus one block."""
    layout = store.layout
    state = {e.name: torch.empty(e.shape, dtype=torch_dtype(e.dtype)) for e in layout.trajectory_entries}
    for entry, first, values in _trajectory_pieces(layout, blocks):
        state[entry.name].view(-1)[first:first + len(values)] = torch.from_numpy(values)  # casts to the dtype
    state.update(_other_tensors(store, column))
    # the source's order; a tied tensor gets its own copy (safetensors refuses tensors that share memory)
    ordered = {}
    for entry in layout.entries:
        ordered[entry.name] = state[entry.tied_to].clone() if entry.role == "tied" else state[entry.name]
    return ordered


def _trajectory_pieces(layout, blocks):
    """Split row blocks ``(rows, values)`` (values (len,) or (len, 1)) over the trajectory tensors: yields
    ``(entry, first element within the tensor, float32 values)``."""
    entries = sorted(layout.trajectory_entries, key=lambda e: e.offset)
    starts = [e.offset for e in entries]
    for rows, values in blocks:
        values = np.asarray(values, dtype=np.float32).reshape(-1)
        if len(values) != rows.stop - rows.start:
            raise ValueError(f"a block of rows {rows.start}..{rows.stop} holds {len(values)} values")
        at = max(bisect.bisect_right(starts, rows.start) - 1, 0)
        while at < len(entries) and entries[at].offset < rows.stop:
            entry = entries[at]
            lo, hi = max(entry.offset, rows.start), min(entry.stop, rows.stop)
            if lo < hi:
                yield entry, lo - entry.offset, values[lo - rows.start:hi - rows.start]
            at += 1


def _other_tensors(store, column: int) -> dict[str, torch.Tensor]:
    """The tensors that are not trajectory rows: integer entries (as stored for that epoch) and the excluded
    ones, copied from the source checkpoint recorded in the time axis."""
    layout = store.layout
    integers = store.read_integer_column(column) if layout.n_integer_rows else None
    excluded = [e for e in layout.entries if e.role == "excluded"]
    tensors: dict[str, torch.Tensor] = {}
    for entry in layout.entries:
        if entry.role == "integer":
            tensors[entry.name] = torch.from_numpy(np.array(integers[entry.offset:entry.stop])).reshape(
                entry.shape).to(torch_dtype(entry.dtype))
    if not excluded:
        return tensors
    source = _open_source(store, column)
    try:
        for entry in excluded:
            tensor = source.tensor(entry.name)
            if tuple(tensor.shape) != tuple(entry.shape) or tensor.dtype != torch_dtype(entry.dtype):
                raise CheckpointError(f"{store.time_axis[column].source}: tensor {entry.name!r} no longer "
                                      f"matches the store's layout (shape or dtype changed)")
            tensors[entry.name] = tensor.detach().clone().contiguous()
    finally:
        source.close()
    return tensors


def write_state_dict(state: dict[str, torch.Tensor], path: str | os.PathLike, fmt: str,
                     metadata: dict[str, str] | None = None) -> Path:
    """Write atomically (temporary file in the same folder, then rename): a crash leaves no partial file.

    The file gets the usual permissions (0666 less the umask). ``metadata``: the safetensors header metadata
    (the source's, to keep e.g. ``{"format": "pt"}``; default ``{"format": "pt"}``, which Hugging Face loaders
    expect)."""
    if fmt not in FORMATS:
        raise UsageError(f"unknown checkpoint format {fmt!r}: choose pt or safetensors")

    def write(temporary: str) -> None:
        if fmt == "safetensors":
            from safetensors.torch import save_file

            save_file(state, temporary, metadata=metadata if metadata is not None else {"format": "pt"})
        else:
            torch.save(state, temporary)

    return write_atomically(path, write)


def write_modelled_checkpoint(store, column: int, blocks, path: str | os.PathLike, fmt: str,
                              metadata: dict[str, str] | None = None, rename: dict[str, str] | None = None) -> Path:
    """Write one epoch's checkpoint from its modelled values as row blocks ``(rows, float32 values)`` in store
    order (:meth:`~cmdtool.analyzers.base.Analyzer.reconstruction_blocks`), atomically.

    safetensors is written as the blocks come (the header first: every size is known from the layout), so the
    memory is one block whatever the model's size. ``.pt`` needs the whole state dict for ``torch.save``: one
    model in its own dtypes, plus one block. ``rename``: {store name: name written} for the names that change
    (a prefix put back or stripped).
    """
    rename = rename or {}
    if fmt != "safetensors":
        state = state_dict_from_blocks(store, column, blocks)
        return write_state_dict({rename.get(k, k): v for k, v in state.items()}, path, fmt)
    layout = store.layout
    header, positions = _safetensors_header(layout, metadata if metadata is not None else {"format": "pt"}, rename)
    tied = {}
    for entry in layout.entries:
        if entry.role == "tied":
            tied.setdefault(entry.tied_to, []).append(entry.name)

    def put(fh, data_start: int, name: str, first_byte: int, raw: np.ndarray) -> None:
        for target in (name, *tied.get(name, ())):
            fh.seek(data_start + positions[target] + first_byte)
            fh.write(memoryview(raw))

    def write(temporary: str) -> None:
        with open(temporary, "wb") as fh:
            fh.write(struct.pack("<Q", len(header)))
            fh.write(header)
            data_start = 8 + len(header)
            for entry, first, values in _trajectory_pieces(layout, blocks):
                dtype = torch_dtype(entry.dtype)
                piece = torch.from_numpy(values).to(dtype)
                put(fh, data_start, entry.name, first * dtype.itemsize, _raw_bytes(piece))
            for name, tensor in _other_tensors(store, column).items():
                put(fh, data_start, name, 0, _raw_bytes(tensor))

    return write_atomically(path, write)


# safetensors' names of the dtypes a store holds (its format's "dtype" field)
_SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                       torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                       torch.uint8: "U8", torch.bool: "BOOL"}


def _safetensors_header(layout, metadata: dict[str, str], rename: dict[str, str] | None = None) \
        -> tuple[bytes, dict[str, int]]:
    """The safetensors header (JSON, padded with spaces to 8 bytes as safetensors writes it) of the layout's
    tensors in the source's order (named ``rename.get(name, name)``), and each tensor's byte offset in the data
    that follows (by store name)."""
    rename = rename or {}
    header: dict = {"__metadata__": {str(k): str(v) for k, v in metadata.items()}} if metadata else {}
    positions, offset = {}, 0
    for entry in layout.entries:
        dtype = torch_dtype(entry.dtype)
        if dtype not in _SAFETENSORS_DTYPES:
            raise UsageError(f"tensor {entry.name!r} has dtype {entry.dtype}, which safetensors cannot hold; "
                             "use --format pt")
        size = numel_of(entry.shape) * dtype.itemsize
        header[rename.get(entry.name, entry.name)] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(entry.shape),
                              "data_offsets": [offset, offset + size]}
        positions[entry.name] = offset
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    return text + b" " * (-len(text) % 8), positions


def _raw_bytes(tensor: torch.Tensor) -> np.ndarray:
    """A tensor's bytes in memory order (little-endian, as safetensors stores them), any dtype."""
    flat = tensor.detach().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy() if flat.numel() else np.empty(0, dtype=np.uint8)
