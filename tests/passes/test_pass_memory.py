"""Peak memory of the streaming passes is flat in N (issue #13): the same passes over a store 12x larger reach
the same peak, because every buffer is bounded by the block size (and the CPU float64 work by the chunk size),
never by the number of rows. Each size runs in a fresh interpreter (its own VmHWM); no timing is measured."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from cmdtool.store import from_array

N_COLS = 6
BLOCK_BYTES = 2 * 1024**2

PASSES_CHILD = r"""
import json, sys
sys.path.insert(0, sys.argv[2])
from _measure import peak_rss_mb
import numpy as np, torch, zarr
import cmdtool
from cmdtool.analyzers.cmd.posthoc import modelled_entries
from cmdtool.analyzers.cmd.fit_pass import FitPass
from cmdtool.analyzers.kga import KWMMasks
from cmdtool.analyzers.linear_models import RowProjection
from cmdtool.passes.local import GramAccumulator, RowGather, stream

store = cmdtool.open_store(sys.argv[1], mode="r+")
block = int(sys.argv[3])
n, t = store.n_rows, store.n_checkpoints
rng = np.random.default_rng(0)
refs = np.array([0, n // 3, 2 * n // 3])
trajectories = store.read_rows(refs)
base = peak_rss_mb()
growth = {}
stream(store, [GramAccumulator(), RowGather(np.arange(0, n, n // 500))], block_bytes=block)
growth["gram+sample"] = peak_rss_mb() - base
writer = store.results.writer("memory", "staged")
stream(store, [FitPass(writer, store.layout, modelled_entries(store.layout, "source"), refs, trajectories,
                       (refs, trajectories, 3))], block_bytes=block)
growth["cmd fit"] = peak_rss_mb() - base
matrix = rng.normal(size=(t, 4)) + 1j * rng.normal(size=(t, 4))
stream(store, [RowProjection(writer, "modes", matrix), RowProjection(writer, "directions", matrix.real, centre=True),
               KWMMasks(writer, matrix[:, :2], 0.5, np.array([n]))], block_bytes=block)
growth["projections+masks"] = peak_rss_mb() - base
writer.discard()
print(json.dumps(growth))
"""


def _growth(tmp_path, rows: int) -> dict:
    """Peak RSS growth (MB) of the passes over a fresh store of ``rows`` rows, measured in a child process."""
    t = np.arange(N_COLS, dtype=np.float32)
    gains = np.random.default_rng(rows).normal(size=(rows, 2)).astype(np.float32)
    W = gains[:, :1] * np.sqrt(t + 1) + gains[:, 1:] * np.cos(t) + np.float32(0.01) * t
    path = tmp_path / f"s{rows}.zarr"
    from_array(path, W, target_chunk_bytes=BLOCK_BYTES // 4)
    del W, gains
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    bench = os.path.join(os.path.dirname(__file__), "..", "..", "bench")
    out = subprocess.run([sys.executable, "-c", PASSES_CHILD, str(path), bench, str(BLOCK_BYTES)],
                         capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_pass_peak_memory_is_flat_in_n(tmp_path):
    """250,000 and 3,000,000 rows x 6 (6 MB and 72 MB of float32; 3 and 35 blocks of 2 MiB): the Gram+sampling,
    CMD fit (online CMD included) and projection+mask passes grow the peak by the same amount at both sizes.

    Measured on the shared development machine: growth 23/75 MB (small) and 36/98 MB (large) for the Gram and
    the fit passes, i.e. 13-23 MB more at 12x the rows (allocator state; 16-27 MB more before the reader fixed
    glibc's mmap threshold). The bound catches a copy of W (66 MB more at the larger size) or two N-long float64
    vectors (44 MB) on top of that; it is absolute because allocator noise between two runs of such small
    processes is 10-25 MB (tests/store/test_rechunk.py)."""
    small, large = _growth(tmp_path, 250_000), _growth(tmp_path, 3_000_000)
    for step in small:
        assert large[step] - small[step] < 40, (step, small, large)
