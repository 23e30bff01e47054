"""Flat float vectors of a model's state dict, in the order cmdtool uses everywhere.

Row i of a trajectory store, of :class:`~cmdtool.analyzers.cmd.online.OnlineCMD` and of everything in
:mod:`cmdtool.training` is the same scalar: floating-point entries in state-dict order, row-major inside each
tensor. Integer entries (``num_batches_tracked``) are not rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Entry:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int
    numel: int


class StateLayout:
    """Where each floating tensor of a state dict lives in the flat vector."""

    def __init__(self, state: dict):
        self.entries: list[Entry] = []
        offset = 0
        for name, value in state.items():
            if torch.is_tensor(value) and value.is_floating_point():
                self.entries.append(Entry(name, tuple(value.shape), value.dtype, offset, value.numel()))
                offset += value.numel()
        self.n_rows = offset
        self.by_name = {entry.name: entry for entry in self.entries}
        self._starts = np.array([entry.offset for entry in self.entries], dtype=np.int64)

    def flatten(self, state: dict, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The floating entries of ``state`` as one CPU vector."""
        out = torch.empty(self.n_rows, dtype=dtype)
        for entry in self.entries:
            out[entry.offset:entry.offset + entry.numel] = state[entry.name].detach().reshape(-1).to("cpu", dtype)
        return out

    def unflatten_into(self, vector: torch.Tensor, state: dict) -> dict:
        """A copy of ``state`` whose floating entries come from ``vector`` (shapes and dtypes of ``state``)."""
        out = dict(state)
        for entry in self.entries:
            value = state[entry.name]
            out[entry.name] = vector[entry.offset:entry.offset + entry.numel].reshape(entry.shape).to(
                value.device, value.dtype)
        return out

    def rows_of(self, names) -> np.ndarray:
        """Boolean mask of the rows belonging to the tensors ``names``."""
        mask = np.zeros(self.n_rows, dtype=bool)
        for name in names:
            entry = self.by_name[name]
            mask[entry.offset:entry.offset + entry.numel] = True
        return mask

    def locate(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(entry position, flat index inside that tensor) of each row."""
        rows = np.asarray(rows, dtype=np.int64)
        which = np.searchsorted(self._starts, rows, side="right") - 1
        return which, rows - self._starts[which]
