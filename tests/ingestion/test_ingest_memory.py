"""Ingest memory: a checkpoint larger than the budget streams through in row slabs, under an RSS ceiling of
budget + largest tensor (+ zarr's fixed encode buffers), measured in a fresh process; values stay exact."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import cmdtool

MiB = 1024**2
TENSORS, SIDE = 24, 2048              # 24 tensors of 2048 x 2048 float32: 16 MiB each, 384 MiB per checkpoint
BUDGET = 16 * MiB
LARGEST = 4 * SIDE * SIDE
# zarr encodes the chunks of one write (16 MiB of values) concurrently, each with its compressed copy: a fixed cost
# that depends on neither the checkpoint nor the budget (measured: 100-125 MiB with 8 MiB chunks).
FIXED_OVERHEAD = 160 * MiB

CHILD = r"""
import json, sys
sys.path.insert(0, sys.argv[4])
from _measure import peak_rss_mb
import cmdtool, torch, zarr, safetensors.torch  # imports are the baseline, not the ingest
base = peak_rss_mb()
cmdtool.ingest([sys.argv[1]], sys.argv[2], memory_budget=int(sys.argv[3]))
print(json.dumps({"base_mb": base, "peak_mb": peak_rss_mb()}))
"""


def big_checkpoint(folder, fmt: str):
    from safetensors.torch import save_file

    folder.mkdir()
    generator = torch.Generator().manual_seed(0)
    state = {f"blocks.{i}.weight": torch.randn(SIDE, SIDE, generator=generator) for i in range(TENSORS)}
    state["head.bias"] = torch.randn(10, generator=generator)
    path = folder / f"epoch_1.{fmt}"
    save_file(state, str(path)) if fmt == "safetensors" else torch.save(state, path)
    return state, path


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_checkpoint_larger_than_the_budget_ingests_under_an_rss_ceiling(tmp_path, fmt):
    state, path = big_checkpoint(tmp_path / "ck", fmt)
    checkpoint_bytes = path.stat().st_size
    assert checkpoint_bytes > 20 * BUDGET
    bench = os.path.join(os.path.dirname(__file__), "..", "..", "bench")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "ck"), str(tmp_path / "s.zarr"), str(BUDGET),
                          bench], capture_output=True, text=True, env=env, check=True)
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    growth = (measured["peak_mb"] - measured["base_mb"]) * MiB
    ceiling = BUDGET + LARGEST + FIXED_OVERHEAD
    print(f"peak growth {growth / MiB:.0f} MiB, ceiling {ceiling / MiB:.0f} MiB, "
          f"checkpoint {checkpoint_bytes / MiB:.0f} MiB")
    assert growth < ceiling < checkpoint_bytes / 2, (growth / MiB, ceiling / MiB)

    store = cmdtool.open_store(tmp_path / "s.zarr")
    assert store.chunk_shape[1] == 1  # one checkpoint per chunk column: `cmdtool rechunk` widens it later
    for entry in store.layout.trajectory_entries[:: 5]:
        np.testing.assert_array_equal(store.trajectories[entry.offset:entry.stop, 0],
                                      state[entry.name].reshape(-1).numpy())
