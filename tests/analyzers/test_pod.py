"""POD (truncated SVD from the cached Gram matrix) against a dense numpy SVD, and the proof of the analyzer
contract: the one module shows up in decompose, compare, evaluate, reconstruct, report and export."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cmdtool.analyzers import get_analyzer
from cmdtool.analyzers.pod import POD
from cmdtool.errors import NotFittedError, UsageError
from cmdtool.store import from_array, open_store
from cmdtool_cli.app import app

from tests.conftest import small_cnn, write_checkpoints

runner = CliRunner()


@pytest.fixture
def walk_store(tmp_path):
    rng = np.random.default_rng(3)
    W = (rng.normal(size=(300, 1)) + 0.1 * rng.normal(size=(300, 12)).cumsum(axis=1)).astype(np.float32)
    store = from_array(tmp_path / "walk.zarr", W, labels=range(1, 13), target_chunk_bytes=4 * 12 * 64)
    return store, W.astype(np.float64)


def dense_pod(W, rank):
    U, s, Vt = np.linalg.svd(W, full_matrices=False)
    return U[:, :rank], s, Vt[:rank].T, (U[:, :rank] * s[:rank]) @ Vt[:rank]


def test_pod_equals_dense_truncated_svd(walk_store):
    store, W = walk_store
    pod = POD(rank=4, device="cpu").fit(store)
    U, s, V, model = dense_pod(W, 4)
    np.testing.assert_allclose(pod.singular_values_, s, rtol=1e-6, atol=1e-6 * s[0])
    assert pod.rank_ == pod.rank_requested_ == 4
    signs = np.sign(np.sum(pod.right_singular_vectors_ * V, axis=0))   # a singular pair is defined up to sign
    np.testing.assert_allclose(pod.right_singular_vectors_ * signs, V, atol=1e-6)
    np.testing.assert_allclose(pod.coefficients_ * signs, V * s[:4], rtol=1e-6, atol=1e-6 * s[0])
    np.testing.assert_allclose(pod.modes_[...] * signs, U, atol=1e-5)
    assert pod.energy_ == pytest.approx(np.sum(s[:4] ** 2) / np.sum(s**2), rel=1e-9)
    # error per epoch from G alone equals the dense residual; stored floats are modes + coefficients
    dense_errors = np.linalg.norm(W - model, axis=0) / np.linalg.norm(W, axis=0)
    np.testing.assert_allclose(pod.metrics_["epoch_relative_error"], dense_errors, rtol=1e-5)
    assert pod.metrics_["relative_error"] == pytest.approx(np.linalg.norm(W - model) / np.linalg.norm(W), rel=1e-5)
    assert pod.metrics_["stored_floats"] == 4 * (300 + 12)
    # the same checkpoints before saving (one pass, W K) and after (the saved modes read once)
    before = pod.reconstruct_epochs(store, [0, 5, 11])
    pod.save("p")
    after = POD.load(store, "p").reconstruct_epochs(store, [0, 5, 11])
    np.testing.assert_allclose(before, model[:, [0, 5, 11]], atol=1e-5)
    np.testing.assert_allclose(after, model[:, [0, 5, 11]], atol=1e-5)


def test_pod_rank_rules_and_exact_low_rank(walk_store, tmp_path):
    store, W = walk_store
    s = np.linalg.svd(W, compute_uv=False)
    energy = np.cumsum(s**2) / np.sum(s**2)
    assert POD(rank=0.999, device="cpu").fit(store).rank_ == int(np.searchsorted(energy, 0.999) + 1)
    beta = 12 / 300
    omega = 0.56 * beta**3 - 0.95 * beta**2 + 1.82 * beta + 1.43
    assert POD(rank=0, device="cpu").fit(store).rank_ == max(1, int(np.sum(s > omega * np.median(s))))
    assert POD(rank=-1, device="cpu").fit(store).rank_ == 12
    # exactly rank-3 trajectories: three modes model them to the Gram path's floor
    rng = np.random.default_rng(0)
    low = (rng.normal(size=(200, 3)) @ rng.normal(size=(3, 10))).astype(np.float32)
    exact = from_array(tmp_path / "low.zarr", low, target_chunk_bytes=4 * 10 * 64)
    pod = POD(rank=-1, device="cpu").fit(exact)
    assert pod.rank_ == 3 and pod.metrics_["relative_error"] < 1e-6


def test_pod_contract(walk_store):
    store, _ = walk_store
    assert get_analyzer("pod") is POD
    assert repr(POD(rank=3)) == "POD(rank=3)"
    with pytest.raises(NotFittedError, match="not fitted"):
        POD().reconstruct_epoch(store, 0)
    with pytest.raises(UsageError, match="energy fraction"):
        POD(rank=1.5).fit(store)
    assert not store.results.exists("pod", "staged")
    assert POD.options_for_budget(5 * (300 + 12), 300, 12) == {"rank": 5}


@pytest.mark.slow
def test_pod_appears_in_every_command(tmp_path):
    """decompose, compare, evaluate, reconstruct, report and export find POD through the registry."""
    write_checkpoints(tmp_path / "ckpts", n_epochs=8)
    store = str(tmp_path / "run.zarr")
    args = ["--store", store]
    assert runner.invoke(app, ["ingest", str(tmp_path / "ckpts"), *args, "-q"]).exit_code == 0
    help_text = runner.invoke(app, ["decompose", "--help"]).output
    assert "pod" in help_text and "POD options" in help_text

    out = runner.invoke(app, ["decompose", "-m", "pod", "--rank", "3", *args, "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)["rank"] == 3
    assert runner.invoke(app, ["decompose", "-M", "3", "-K", "100", *args, "-q"]).exit_code == 0

    out = runner.invoke(app, ["compare", "cmd", "pod", *args, "--json"])
    assert out.exit_code == 0, out.output
    rows = {m["method"]: m for m in json.loads(out.stdout)["methods"]}
    assert rows["pod"]["budget_matched"] and rows["pod"]["stored_floats"] <= rows["cmd"]["stored_floats"]

    metrics = tmp_path / "metrics.py"
    metrics.write_text("def metrics(state):\n    return {'w0': float(state['0.weight'].flatten()[0])}\n")
    out = runner.invoke(app, ["evaluate", "--fn", f"{metrics}:metrics", *args, "--json"])
    assert out.exit_code == 0, out.output
    assert "pod" in [row["method"] for row in json.loads(out.stdout)["summary"]]

    out = runner.invoke(app, ["reconstruct", "-e", "8", "-m", "pod", *args, "--out", str(tmp_path / "pod.pt")])
    assert out.exit_code == 0, out.output
    state = torch.load(tmp_path / "pod.pt", weights_only=True)
    small_cnn().load_state_dict(state, strict=True)
    st = open_store(store)
    vector = POD.load(st).reconstruct_epoch(st, 7)
    entry = st.layout.by_name()["0.weight"]
    np.testing.assert_array_equal(state["0.weight"].flatten().numpy(), vector[entry.offset:entry.stop])

    out = runner.invoke(app, ["report", *args, "--out", str(tmp_path / "report"), "--json"])
    assert out.exit_code == 0, out.output
    summary = json.loads(out.stdout)
    assert {"pod_spectrum", "pod_coefficients"} <= {f["id"] for f in summary["figures"]}
    assert summary["results"]["pod/default"]["rank"] == 3
    assert (tmp_path / "report" / "pod_spectrum.png").stat().st_size > 1000
    errors = next(f for f in summary["figures"] if f["id"] == "epoch_errors")
    assert "POD" in errors["numbers"]

    out = runner.invoke(app, ["export", *args, "-m", "pod", "--out", str(tmp_path / "export")])
    assert out.exit_code == 0, out.output
    modes = np.load(tmp_path / "export" / "npy" / "pod" / "default" / "modes.npy")
    np.testing.assert_array_equal(modes, POD.load(st).modes_[...])
    assert (tmp_path / "export" / "csv" / "pod" / "default" / "coefficients.csv").is_file()
