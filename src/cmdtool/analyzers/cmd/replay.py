"""CMD's models at given epochs (paper 000 Eq. 7): the post-hoc model from the stored coefficients, and online
CMD at intermediate epochs by replaying the sums of Eqs. 8-10 in one pass.

On the CPU the replay is numpy (no torch); torch is imported where a GPU replay runs, not with the module (the
registry imports every analyzer module).
"""

from __future__ import annotations

import numpy as np

from .math import affine_from_sums, pin_reference_rows
from ...passes.contract import Accumulator
from ...passes.host_float64 import clamp_min, float32_numpy, float64, like, where
from ...utils.device import computes_in_numpy


def affine_model(store, modes, A, B, reference_trajectories, columns, steps, block_rows: int = 1 << 20,
                 rows: slice | None = None) -> np.ndarray:
    """Eq. 7 at several epochs, (rows, k) float32: a_i r_{mode_i}(t) + b_i read in row blocks (``modes``, ``A``,
    ``B`` lazy N-long arrays; ``steps`` the epochs' positions in the references; ``rows`` a range of store rows,
    default all); rows CMD does not model (mode < 0) keep their stored values."""
    reference_values = np.asarray(reference_trajectories)[:, steps].astype(np.float64)   # M × k
    rows = rows if rows is not None else slice(0, store.n_rows)
    out = np.empty((rows.stop - rows.start, len(columns)), dtype=np.float32)
    for r0 in range(rows.start, rows.stop, block_rows):
        r1 = min(r0 + block_rows, rows.stop)
        mode = np.asarray(modes[r0:r1]).astype(np.int64)
        value = (A[r0:r1].astype(np.float64)[:, None] * reference_values[np.maximum(mode, 0)]
                 + B[r0:r1].astype(np.float64)[:, None])
        kept = np.flatnonzero(mode < 0)
        if kept.size:
            # only the rows between the first and last kept one, only the asked columns: BatchNorm statistics
            # are a few rows here and there, and a whole block over the columns' span can be hundreds of MB
            span = slice(r0 + int(kept[0]), r0 + int(kept[-1]) + 1)
            stored = np.concatenate([store.read_region(span, slice(c, c + 1)) for c in columns], axis=1)
            value[kept] = stored[kept - int(kept[0])]
        out[r0 - rows.start:r1 - rows.start] = value
    return out


class OnlineReplay(Accumulator):
    """Online models at intermediate epochs (only the last epoch's coefficients are stored): the sums of
    Eqs. 8-10 over epochs 1..t for every requested t, as cumulative sums along each block, then Eq. 7.

    Writes rows of ``out`` (N×k float32; default a new numpy array, a zarr array when blocks run in other
    processes); nothing to merge."""

    def __init__(self, modes, reference_indices, reference_trajectories, steps, out=None):
        self.modes = modes
        self.reference_indices = np.asarray(reference_indices, dtype=np.int64)
        self.reference_trajectories = reference_trajectories
        self.steps = np.asarray(steps, dtype=np.int64)
        self.out = out

    def start(self, ctx):
        if computes_in_numpy(ctx.device):
            self.refs = np.asarray(self.reference_trajectories, dtype=np.float64)
        else:
            import torch

            self.refs = torch.as_tensor(self.reference_trajectories, dtype=torch.float64, device=ctx.device)
        self.returned = self.out is None  # the pass's own output, handed back by finish as numpy
        if self.returned:
            self.out = ctx.row_output(len(self.steps), dtype=np.float32)

    def update(self, block):
        start, stop = block.start, block.stop
        x = block.float64()
        mode = like(np.asarray(self.modes[start:stop]).astype(np.int64), x)
        safe = clamp_min(mode, 0)
        steps = like(self.steps, x)
        refs = self.refs[safe]
        shift = x[:, :1]
        u = x - shift
        v = refs - refs[:, :1]
        count = float64(steps + 1)[None, :]
        a, b = affine_from_sums(count, u.cumsum(1)[:, steps], (u * v).cumsum(1)[:, steps],
                                v.cumsum(1)[:, steps], (v * v).cumsum(1)[:, steps], shift, refs[:, :1])
        pin_reference_rows(self.reference_indices, start, stop, a=a, b=b)
        value = a * refs[:, steps] + b
        value = where(mode[:, None] >= 0, value, x[:, steps])
        if block.nonfinite:
            # the pass zeroed rows holding NaN/Inf; give back their stored values at these epochs
            value[~block.finite] = float64(block.nonfinite_values[:, steps])
        self.out[start:stop] = float32_numpy(value)

    def finish(self):
        if self.returned:
            self.out = np.asarray(self.out[...])
