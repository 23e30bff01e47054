"""Modelled weights back into a checkpoint that loads with ``model.load_state_dict(sd, strict=True)``.

A reconstructed checkpoint has the source's keys in the source's order, the same shapes and dtypes (cast back
from the store's float32), integer entries (``num_batches_tracked``) as stored for that epoch, and every
tensor that ingest left out (``--exclude``) copied from the source checkpoint recorded in the time axis.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..errors import CheckpointError, UsageError
from ..ingest.formats import OpenCheckpoint, torch_dtype
from ..ingest.ingest import open_recorded_source
from ..output_folder import write_atomically

FORMATS = ("pt", "safetensors")


def source_format(store, column: int) -> str:
    """Default output format: the source's (safetensors stays safetensors; torch files and shards give .pt)."""
    source = store.time_axis[column].source
    return "safetensors" if source.endswith(".safetensors") else "pt"


def _open_source(store, column: int) -> OpenCheckpoint:
    return open_recorded_source(store, column)


def build_state_dict(store, vector: np.ndarray, column: int) -> dict[str, torch.Tensor]:
    """State dict of one epoch from a modelled N-vector (float32) and the store's layout."""
    vector = np.asarray(vector, dtype=np.float32)
    if vector.shape != (store.n_rows,):
        raise ValueError(f"expected an N-vector of {store.n_rows} values, got shape {vector.shape}")
    layout = store.layout
    integers = store.read_integer_column(column) if layout.n_integer_rows else None
    excluded = [e for e in layout.entries if e.role == "excluded"]
    source = _open_source(store, column) if excluded else None
    values = torch.from_numpy(vector)
    state: dict[str, torch.Tensor] = {}
    try:
        for entry in layout.entries:
            dtype = torch_dtype(entry.dtype)
            if entry.role == "trajectory":
                tensor = values[entry.offset:entry.stop].reshape(entry.shape).to(dtype)
            elif entry.role == "integer":
                tensor = torch.from_numpy(np.asarray(integers[entry.offset:entry.stop])).reshape(entry.shape)
                tensor = tensor.to(dtype)
            elif entry.role == "tied":  # stored once, under the tensor it is tied to (an earlier entry)
                tensor = state[entry.tied_to]
            else:
                tensor = source.tensor(entry.name)
                if tuple(tensor.shape) != tuple(entry.shape) or tensor.dtype != dtype:
                    raise CheckpointError(f"{store.time_axis[column].source}: tensor {entry.name!r} no longer "
                                          f"matches the store's layout (shape or dtype changed)")
            # own storage per tensor: safetensors refuses views that share memory
            state[entry.name] = tensor.detach().clone().contiguous()
    finally:
        if source is not None:
            source.close()
    return state


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
