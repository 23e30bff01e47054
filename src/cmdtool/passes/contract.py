"""The pass contract: the :class:`Block` every accumulator of a pass sees, the :class:`Accumulator` base, the
:class:`PassContext` that ``start`` is told, and :func:`merged`. Both engines, the in-process one
(:mod:`.local`) and the Dask one (:mod:`.dask_engine`), run accumulators through these; the contract itself is
described in :mod:`.local`.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field

import numpy as np

from ..utils.device import CPU, computes_in_numpy
from .host_float64 import chunk_rows, is_numpy, to_float64_


class MemoryOutputs:
    """Per-row outputs of accumulators that return them rather than save them (modelled checkpoints, averages):
    numpy arrays, where every block runs in this process (the threads of :func:`run_blocks_side_by_side` share
    them). The Dask engine gives zarr arrays that its workers can write instead
    (:class:`cmdtool.passes.dask_engine.ScratchOutputs`)."""

    def __init__(self):
        self.arrays: list[np.ndarray] = []

    def create(self, shape: tuple, dtype, chunks: tuple):
        array = np.empty(shape, dtype=dtype)
        self.arrays.append(array)
        return array

    def close(self) -> None:
        pass


@dataclass
class PassContext:
    """What ``start`` is told about the pass: the store, the window's columns, the compute device, the rows of
    every block but the last (per-row outputs are chunked by it) and where returned per-row outputs live."""

    store: object
    columns: slice
    device: object
    block_rows: int
    outputs: object = field(default_factory=MemoryOutputs)

    @property
    def n_rows(self) -> int:
        return self.store.n_rows

    @property
    def n_cols(self) -> int:
        return self.columns.stop - self.columns.start

    def output_chunks(self, *tail: int) -> tuple:
        """Chunk shape of a per-row output array: one chunk per block, so that writers never share a chunk."""
        return (max(1, min(self.block_rows, self.n_rows)), *tail)

    def row_output(self, *tail: int, dtype=np.float32):
        """An ``(n_rows, *tail)`` array that ``update`` fills by row ranges and the caller reads after the pass
        (``np.asarray(out[...])`` in ``finish``): numpy in process, a scratch zarr array on a cluster."""
        return self.outputs.create((self.n_rows, *tail), np.dtype(dtype), self.output_chunks(*tail))


class Block:
    """Rows ``start:stop`` of W over the pass's columns, as every accumulator of the pass sees them.

    ``values`` is float32 on the compute device (rows with NaN/Inf zeroed), ``finite`` flags the rows without
    NaN/Inf, both numpy arrays on the CPU (a CPU pass imports no torch) and torch tensors on a torch device, and
    ``nonfinite_values`` keeps those rows as stored (what a reconstruction that gives back the stored values
    needs). :meth:`float64` is one float64 copy shared by the accumulators of the pass (read only), written into
    a buffer that the pass reuses from block to block instead of allocating (and page-faulting) a new one; on the
    CPU, accumulators read :meth:`float64_chunks` instead (numpy, cache-sized chunks: see
    :mod:`~cmdtool.passes.host_float64`), so that no whole float64 copy of the block is made.
    """

    __slots__ = ("start", "stop", "values", "finite", "nonfinite", "nonfinite_values", "_buffers", "_float64",
                 "_release")

    def __init__(self, start: int, stop: int, values, buffers: "BlockBuffers | None" = None, release=None):
        self.start, self.stop = int(start), int(stop)
        self._buffers = buffers
        self._release = release
        self._float64 = None
        # a row with NaN/Inf has a non-finite sum: one reduction finds them, an elementwise isfinite of the block
        # costs as much as the rest of a Gram pass; rows whose finite values overflow the sum are checked exactly
        if is_numpy(values):
            finite = np.isfinite(values.sum(axis=1))
            if not finite.all():
                suspect = np.flatnonzero(~finite)
                finite[suspect] = np.isfinite(values[suspect]).all(axis=1)
            self.nonfinite = int((~finite).sum())
            self.nonfinite_values = values[~finite] if self.nonfinite else None
            if self.nonfinite:
                values = np.where(finite[:, None], values, values.dtype.type(0))
            self.values, self.finite = values, finite
            return
        import torch

        finite = torch.isfinite(values.sum(dim=1))
        if not bool(finite.all()):
            suspect = (~finite).nonzero().squeeze(1)
            finite[suspect] = torch.isfinite(values.index_select(0, suspect)).all(dim=1)
        self.nonfinite = int((~finite).sum()) if not bool(finite.all()) else 0
        self.nonfinite_values = values[~finite] if self.nonfinite else None
        if self.nonfinite:
            values = torch.where(finite[:, None], values, torch.zeros((), dtype=values.dtype, device=values.device))
        self.values, self.finite = values, finite

    @property
    def rows(self) -> int:
        return self.stop - self.start

    def release(self) -> None:
        """Every accumulator is done with the block: the reader may read a later block into its memory
        (:meth:`~cmdtool.store.store.RowBlock.release`). ``values`` must not be used afterwards."""
        release, self._release = self._release, None
        if release is not None:
            release()

    def float64(self):
        """The block in float64 (shared, do not modify: accumulators that change values work on a copy)."""
        if self._float64 is None and self.on_cpu:
            if self._buffers is None:
                self._float64 = self.values.astype(np.float64)
            else:
                self._float64 = self._buffers.get("float64", self.values.shape, np.float64, CPU)
                np.copyto(self._float64, self.values)
        if self._float64 is None:
            import torch

            if self._buffers is None:
                self._float64 = self.values.to(torch.float64)
            else:
                self._float64 = self._buffers.get("float64", self.values.shape, torch.float64, self.values.device)
                to_float64_(self._float64, self.values)
        return self._float64

    @property
    def on_cpu(self) -> bool:
        """The block is numpy (a CPU pass): accumulators take their numpy branch, else their torch one (a GPU, or
        a ``torch.device("cpu")`` given by a caller)."""
        return is_numpy(self.values)

    def float64_chunks(self):
        """``(r0, r1, x)`` for consecutive row chunks of a CPU block: ``x`` is rows ``r0:r1`` (block-relative) as a
        float64 numpy array, converted into one buffer reused by every chunk and accumulator (overwritten by the
        next chunk: use it before asking for the next one; accumulators may change it in place)."""
        values = self.values
        rows = min(chunk_rows(values.shape[1]), max(self.rows, 1))
        if self._buffers is None:
            buffer = np.empty((rows, values.shape[1]))
        else:
            buffer = self._buffers.get("float64_chunk", (rows, values.shape[1]), np.float64, CPU)
        for r0 in range(0, self.rows, rows):
            r1 = min(r0 + rows, self.rows)
            chunk = buffer[:r1 - r0]
            np.copyto(chunk, values[r0:r1])
            yield r0, r1, chunk


class BlockBuffers:
    """Scratch arrays reused from block to block (named, grown when a larger shape is asked for): numpy arrays
    on the CPU (``dtype`` a numpy dtype), torch tensors on a GPU."""

    def __init__(self):
        self._tensors: dict = {}

    def get(self, name: str, shape, dtype, device):
        rows, *tail = shape
        if computes_in_numpy(device):
            held = self._tensors.get(name)
            if held is None or held.shape[0] < rows or list(held.shape[1:]) != tail or held.dtype != dtype:
                held = self._tensors[name] = np.empty((rows, *tail), dtype=dtype)
            return held[:rows]
        import torch

        held = self._tensors.get(name)
        if held is None or held.shape[0] < rows or list(held.shape[1:]) != tail or held.dtype != dtype \
                or held.device != device:
            held = self._tensors[name] = torch.empty((rows, *tail), dtype=dtype, device=device)
        return held[:rows]


class Accumulator:
    """Base of a pass's reduction (see the module note for the contract).

    Attributes whose names start with ``_scratch`` are per-process working memory (reused buffers) and those named
    in ``client_only`` are needed by ``start`` alone (the result writer): neither is pickled, so a partial travels
    without them.
    """

    client_only: tuple[str, ...] = ()
    # whether blocks of this accumulator gain from running side by side in threads (run_blocks_side_by_side):
    # not when its work per block is many small torch calls, which hold the interpreter lock between them
    side_by_side: bool = True

    def start(self, ctx: PassContext) -> None:
        pass

    def update(self, block: Block) -> None:
        raise NotImplementedError

    def merge(self, other: "Accumulator") -> None:
        """Add ``other``'s reductions (an accumulator with per-row outputs only has nothing to add)."""

    def finish(self) -> None:
        pass

    def partial(self) -> "Accumulator":
        """An empty partial of this pass (call right after ``start``): a pickled copy, as a worker receives it."""
        return pickle.loads(pickle.dumps(self))

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_scratch") and k not in self.client_only}

    def _scratch(self, name: str, shape, dtype, device):
        """A reusable working array of this accumulator (not part of its state; see :class:`BlockBuffers`)."""
        buffers = self.__dict__.setdefault("_scratch_buffers", BlockBuffers())
        return buffers.get(name, shape, dtype, device)


def add_reductions(target: Accumulator, other: Accumulator, names) -> None:
    """``target.name += other.name`` for each named reduction (tensors, arrays or numbers): the usual ``merge``."""
    for name in names:
        setattr(target, name, getattr(target, name) + getattr(other, name))


@dataclass
class PassStats:
    rows: int
    nonfinite_rows: int
    seconds: float
    bytes_read: int


def merged(partials: list[Accumulator]) -> Accumulator:
    """One accumulator holding the reductions of all ``partials`` (merged left to right)."""
    first, *rest = partials
    for other in rest:
        first.merge(other)
    return first
