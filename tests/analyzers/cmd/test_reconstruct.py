"""Reconstructed checkpoints load into the model they came from; the decompose and reconstruct commands."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cmdtool.analyzers import get_analyzer
from cmdtool.analyzers.cmd.posthoc import PosthocCMD
from cmdtool.ingestion import ingest
from cmdtool.ingestion.checkpoints import build_state_dict
from cmdtool.store import open_store
from cmdtool_cli.app import app

from tests.conftest import small_cnn, write_checkpoints

runner = CliRunner()


def decomposed_store(tmp_path, **kwargs):
    ingest_options = kwargs.pop("ingest_options", {})
    states = write_checkpoints(tmp_path / "ckpts", **kwargs)
    ingest([tmp_path / "ckpts"], tmp_path / "run.zarr", **ingest_options)
    store = open_store(tmp_path / "run.zarr", mode="r+")
    PosthocCMD(modes=3, samples=100, warmup=4).fit(store).save("default")
    return store, states


def load_checkpoint(path):
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, weights_only=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_reconstructed_state_dict_loads_strictly_with_source_dtypes(tmp_path, dtype):
    store, states = decomposed_store(tmp_path, n_epochs=8, dtype=dtype)
    cmd = get_analyzer("cmd").load(store, "default")
    for column in (0, 7):
        state = build_state_dict(store, cmd.reconstruct_epoch(store, column), column)
        source = states[column]
        assert list(state) == list(source)
        for key, value in source.items():
            assert state[key].dtype == value.dtype and state[key].shape == value.shape
        assert torch.equal(state["1.num_batches_tracked"], source["1.num_batches_tracked"])
        # BatchNorm running statistics come back exactly (kept from the source under --bn-stats source)
        assert torch.equal(state["1.running_var"], source["1.running_var"])
        model = small_cnn()
        model.load_state_dict(state, strict=True)
    # the modelled weights are a*r+b cast to the source dtype
    vector = cmd.reconstruct_epoch(store, 7)
    entry = store.layout.by_name()["0.weight"]
    expected = torch.from_numpy(vector[entry.offset:entry.stop]).reshape(entry.shape).to(dtype)
    assert torch.equal(state["0.weight"], expected)


def test_excluded_tensors_are_copied_from_the_source(tmp_path):
    store, states = decomposed_store(tmp_path, n_epochs=6, ingest_options={"exclude": ("4.*",)})
    cmd = get_analyzer("cmd").load(store, "default")
    state = build_state_dict(store, cmd.reconstruct_epoch(store, 5), 5)
    assert torch.equal(state["4.weight"], states[5]["4.weight"]) and torch.equal(state["4.bias"], states[5]["4.bias"])
    small_cnn().load_state_dict(state, strict=True)


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_decompose_then_reconstruct(tmp_path):
    write_checkpoints(tmp_path / "ckpts", n_epochs=10, fmt="safetensors")
    store = str(tmp_path / "run.zarr")
    assert runner.invoke(app, ["ingest", str(tmp_path / "ckpts"), "--store", store, "-q"]).exit_code == 0

    result = runner.invoke(app, ["reconstruct", "--epoch", "10", "--store", store])
    assert result.exit_code == 2
    assert "cmdtool decompose --modes 10" in result.output

    result = runner.invoke(app, ["decompose", "--modes", "3", "--samples", "100", "--store", store, "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["method"] == "cmd" and summary["modes"] == 3 and len(summary["mode_sizes"]) == 3
    assert 0 < summary["relative_error"] < summary["relative_error_motion"] < 1

    result = runner.invoke(app, ["decompose", "--modes", "3", "--samples", "100", "--store", store])
    assert result.exit_code == 0 and "reference weight" in result.output and "relative error" in result.output

    out = tmp_path / "out"
    result = runner.invoke(app, ["reconstruct", "--epoch", "10", "--epoch", "4", "--store", store, "--out",
                                 str(out), "--json"])
    assert result.exit_code == 0, result.output
    written = json.loads(result.stdout)
    assert [w["epoch"] for w in written] == [10, 4]
    assert written[0]["path"] == str(out / "cmd_default_epoch10.safetensors")  # the source's format
    for record in written:
        small_cnn().load_state_dict(load_checkpoint(record["path"]), strict=True)

    result = runner.invoke(app, ["reconstruct", "--epoch", "10", "--store", store, "--format", "pt", "--out",
                                 str(tmp_path / "one.pt")])
    assert result.exit_code == 0 and (tmp_path / "one.pt").is_file()
    assert not list(tmp_path.glob(".one.pt.*"))  # no temporary left behind

    result = runner.invoke(app, ["reconstruct", "--epoch", "99", "--store", store])
    assert result.exit_code == 2 and "epoch 99 is not in the store" in result.output and "1..10" in result.output

    result = runner.invoke(app, ["reconstruct", "--epoch", "10", "--variant", "online", "--store", store])
    assert result.exit_code == 2 and "--warmup" in result.output

    result = runner.invoke(app, ["decompose", "--modes", "3", "--samples", "100", "--warmup", "4", "--store",
                                 store, "-q"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["reconstruct", "--epoch", "2", "--epoch", "7", "--variant", "online", "--store",
                                 store, "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    online = json.loads(result.stdout)
    assert online[0]["path"].endswith("cmd-online_default_epoch2.safetensors")
    st = open_store(store)
    source_epoch2 = load_checkpoint(st.time_axis[st.column_of(2)].source)
    rebuilt = load_checkpoint(online[0]["path"])
    for key, value in source_epoch2.items():  # epoch 2 is inside the warm-up: the original weights
        assert torch.equal(rebuilt[key], value)

    result = runner.invoke(app, ["reconstruct", "--epoch", "10", "--variant", "sideways", "--store", store])
    assert result.exit_code == 2 and "posthoc or online" in result.output


def test_cli_decompose_bad_warmup_is_a_usage_error(random_store):
    store, _ = random_store
    result = runner.invoke(app, ["decompose", "--warmup", "99", "--store", str(store.path)])
    assert result.exit_code == 2 and "--warmup" in result.output


def test_reconstruct_at_every_epoch_matches_dense_model(tmp_path):
    store, states = decomposed_store(tmp_path, n_epochs=7)
    cmd = get_analyzer("cmd").load(store, "default")
    W = np.stack([store.read_column(c) for c in range(store.n_checkpoints)], axis=1)
    mode = np.asarray(cmd.mode_[:])
    A, B, R = cmd.A_[:].astype(np.float64), cmd.B_[:].astype(np.float64), cmd.reference_trajectories_
    for column in range(store.n_checkpoints):
        dense = np.where(mode >= 0, A * R[np.maximum(mode, 0), column] + B, W[:, column])
        np.testing.assert_allclose(cmd.reconstruct_epoch(store, column), dense, rtol=1e-6, atol=1e-6)
