"""End to end on a real training run: a CNN on scikit-learn's digits, CMD(10), reconstruct, evaluate."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from cmdtool import datasets
from cmdtool_cli.app import app

runner = CliRunner()


@pytest.mark.slow
def test_cmd_model_of_the_last_epoch_keeps_test_accuracy(tmp_path):
    data = datasets.load_split()
    paths = datasets.train(tmp_path / "ckpts", data, epochs=30, seed=0)
    original = datasets.evaluate(torch.load(paths[-1], weights_only=True), data)
    assert original["test_acc"] > 0.9  # the run really learned something

    store = str(tmp_path / "run.zarr")
    assert runner.invoke(app, ["ingest", str(tmp_path / "ckpts"), "--store", store, "-q"]).exit_code == 0
    result = runner.invoke(app, ["decompose", "--modes", "10", "--store", store, "-q"])
    assert result.exit_code == 0, result.output
    out = tmp_path / "cmd_epoch30.pt"
    result = runner.invoke(app, ["reconstruct", "--epoch", "30", "--store", store, "--out", str(out), "-q"])
    assert result.exit_code == 0, result.output

    state = torch.load(out, weights_only=True)
    modelled = datasets.evaluate(state, data)
    # the paper reports CMD is usually a little better; it must not be more than 1 point worse
    assert modelled["test_acc"] >= original["test_acc"] - 0.01, (modelled, original)
    # and it is a different model, not the original weights copied
    assert not torch.equal(state["0.weight"], torch.load(paths[-1], weights_only=True)["0.weight"])
