"""`reconstruct` writes safetensors as the modelled row blocks come (issue #13): the file equals what
safetensors' own writer makes of the whole state dict, for every kind of tensor a store holds (float32, bf16,
float16, a 0-d scalar, integer and bool buffers, a tied weight, an excluded tensor), with blocks that cut
tensors anywhere; and its peak memory does not grow with N (RSS measured in a child process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import cmdtool
from cmdtool.analyzers import get_analyzer
from cmdtool.ingestion.checkpoints import build_state_dict, write_modelled_checkpoint, write_state_dict
from cmdtool.store import from_array


class MixedModel(torch.nn.Module):
    """Every role and dtype the store keeps, with a tied output layer."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(7, 5)
        self.hidden = torch.nn.Linear(5, 6).to(torch.bfloat16)
        self.norm = torch.nn.BatchNorm1d(6)
        self.gate = torch.nn.Linear(6, 3).to(torch.float16)
        self.head = torch.nn.Linear(5, 7, bias=False)
        self.head.weight = self.embed.weight
        self.scale = torch.nn.Parameter(torch.tensor(1.5))            # 0-d
        self.register_buffer("active", torch.tensor([True, False, True]))
        self.register_buffer("frozen_table", torch.randn(4, 2))        # left out with --exclude


@pytest.fixture
def mixed_store(tmp_path):
    torch.manual_seed(0)
    model = MixedModel()
    (tmp_path / "ck").mkdir()
    for epoch in range(1, 5):
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(0.1 * epoch * torch.randn_like(parameter, dtype=torch.float32).to(parameter.dtype))
            model.norm.running_mean.add_(0.05)
            model.norm.num_batches_tracked.add_(3)
            model.active[1] = bool(epoch % 2)
        torch.save(model.state_dict(), tmp_path / "ck" / f"epoch_{epoch}.pt")
    cmdtool.ingest([tmp_path / "ck"], tmp_path / "s.zarr", exclude=("frozen_table",))
    store = cmdtool.open_store(tmp_path / "s.zarr")
    roles = {e.role for e in store.layout.entries}
    assert roles == {"trajectory", "integer", "tied", "excluded"}, roles
    return store


@pytest.mark.parametrize("block_rows", [1, 7, 23, 10_000])
def test_streamed_safetensors_equal_safetensors_own_writer(mixed_store, tmp_path, block_rows):
    store, column = mixed_store, 2
    # modelled values with a fraction the bf16/fp16 casts must round the same way in both writers
    vector = store.read_column(column) * np.float32(1.0 + 1e-3) + np.float32(1e-4)
    blocks = [(slice(r0, min(r0 + block_rows, store.n_rows)), vector[r0:r0 + block_rows])
              for r0 in range(0, store.n_rows, block_rows)]
    metadata = {"format": "pt", "origin": "test"}
    write_modelled_checkpoint(store, column, iter(blocks), tmp_path / "streamed.safetensors", "safetensors",
                              metadata=metadata)
    write_state_dict(build_state_dict(store, vector, column), tmp_path / "whole.safetensors", "safetensors",
                     metadata=metadata)
    streamed, whole = load_file(tmp_path / "streamed.safetensors"), load_file(tmp_path / "whole.safetensors")
    assert sorted(streamed) == sorted(whole)   # safetensors keeps no key order (its loader follows the data)
    for name, tensor in whole.items():
        assert streamed[name].dtype == tensor.dtype and streamed[name].shape == tensor.shape, name
        assert torch.equal(streamed[name], tensor), name
    with safe_open(str(tmp_path / "streamed.safetensors"), framework="pt") as handle:
        assert handle.metadata() == metadata
    assert streamed["frozen_table"].shape == (4, 2) and streamed["head.weight"].data_ptr() != \
        streamed["embed.weight"].data_ptr()
    torch.testing.assert_close(streamed["head.weight"], streamed["embed.weight"], rtol=0, atol=0)
    MixedModel().load_state_dict(streamed, strict=True)
    # the .pt path builds the same state dict from the same blocks, in the source's key order
    write_modelled_checkpoint(store, column, iter(blocks), tmp_path / "from_blocks.pt", "pt")
    from_blocks = torch.load(tmp_path / "from_blocks.pt", weights_only=True)
    reference = build_state_dict(store, vector, column)
    assert list(from_blocks) == list(reference)
    for name, tensor in reference.items():
        assert from_blocks[name].dtype == tensor.dtype and torch.equal(from_blocks[name], tensor), name


def test_cmd_reconstruction_blocks_equal_the_whole_model(mixed_store):
    store = cmdtool.open_store(mixed_store.path, mode="r+")
    cmd = get_analyzer("cmd").from_options({"modes": 2, "samples": 50}).fit(store)
    whole = cmd.reconstruct_epochs(store, [1, 3])
    pieces = list(cmd.reconstruction_blocks(store, [1, 3], block_rows=9))
    assert [rows.start for rows, _ in pieces] == list(range(0, store.n_rows, 9))
    np.testing.assert_array_equal(np.concatenate([values for _, values in pieces]), whole)


RECONSTRUCT_CHILD = r"""
import json, sys
sys.path.insert(0, sys.argv[2])
from _measure import peak_rss_mb
import numpy as np, torch, safetensors.torch
import cmdtool
from cmdtool.analyzers import get_analyzer
from cmdtool.ingestion.checkpoints import write_modelled_checkpoint

store = cmdtool.open_store(sys.argv[1])
cmd = get_analyzer("cmd").load(store, "default")
base = peak_rss_mb()
write_modelled_checkpoint(store, 4, cmd.reconstruction_blocks(store, [4]), sys.argv[3], "safetensors")
print(json.dumps({"growth": peak_rss_mb() - base}))
"""


def _reconstruct_growth(tmp_path, rows: int) -> float:
    t = np.arange(6, dtype=np.float32)
    gains = np.random.default_rng(rows).normal(size=(rows, 2)).astype(np.float32)
    path = tmp_path / f"s{rows}.zarr"
    store = from_array(path, gains[:, :1] * np.sqrt(t + 1) + gains[:, 1:] * np.cos(t), target_chunk_bytes=1 << 20)
    del gains
    get_analyzer("cmd").from_options({"modes": 2, "samples": 200}).fit(store).save("default")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    bench = os.path.join(os.path.dirname(__file__), "..", "..", "bench")
    out = subprocess.run([sys.executable, "-c", RECONSTRUCT_CHILD, str(path), bench,
                          str(tmp_path / f"r{rows}.safetensors")], capture_output=True, text=True, env=env, check=True)
    written = load_file(tmp_path / f"r{rows}.safetensors")["w"]
    np.testing.assert_allclose(written.numpy(), get_analyzer("cmd").load(store, "default").reconstruct_epoch(store, 4))
    return json.loads(out.stdout.strip().splitlines()[-1])["growth"]


@pytest.mark.slow
def test_reconstruct_to_safetensors_peak_is_flat_in_n(tmp_path):
    """250,000 and 8,000,000 rows (1 MB and 32 MB per checkpoint): writing CMD's model of one epoch grows the
    peak by the same amount. Holding the N-vector and a state dict built from it (as `reconstruct` did before)
    is 64 MB more at the larger size; allocator noise between such processes is 10-25 MB
    (tests/passes/test_pass_memory.py)."""
    small, large = _reconstruct_growth(tmp_path, 250_000), _reconstruct_growth(tmp_path, 8_000_000)
    assert large - small < 30, (small, large)
