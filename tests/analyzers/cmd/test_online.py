"""Online CMD (Sec. 3.3): the recursion equals batch least squares, and the store variant equals the class."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cmdtool.analyzers.cmd.posthoc import PosthocCMD
from cmdtool.analyzers.cmd.math import abs_correlation
from cmdtool.analyzers.cmd.online import OnlineCMD
from cmdtool.errors import UsageError
from cmdtool.ingestion import ingest
from cmdtool.store import open_store

from tests.conftest import write_checkpoints


def batch_least_squares(W: np.ndarray, R: np.ndarray, mode: np.ndarray, t: int):
    """Eq. 6 over epochs 1..t with a fixed assignment, by a generic solver (not the closed form)."""
    a, b = np.zeros(len(W)), np.zeros(len(W))
    for i in range(len(W)):
        design = np.vstack([R[mode[i], :t], np.ones(t)]).T
        (a[i], b[i]), *_ = np.linalg.lstsq(design, W[i, :t].astype(np.float64), rcond=None)
    return a, b


def eq9_recursion(W: np.ndarray, R: np.ndarray, mode: np.ndarray, warmup: int, t: int):
    """Eqs. 9-10 literally: Ã(t) = (Ã(t−1) G(t−1) + W(t) w̃(t)ᵀ) G(t)⁻¹, G(t) = Σ_s w̃(s) w̃(s)ᵀ."""
    W = W.astype(np.float64)
    out_a, out_b = np.zeros(len(W)), np.zeros(len(W))
    for m in np.unique(mode):
        rows = mode == m
        w_tilde = np.vstack([R[m], np.ones(R.shape[1])])
        G = w_tilde[:, :warmup] @ w_tilde[:, :warmup].T
        A_tilde = W[rows, :warmup] @ w_tilde[:, :warmup].T @ np.linalg.inv(G)  # full CMD at F (Eq. 6)
        for s in range(warmup, t):
            G_next = G + np.outer(w_tilde[:, s], w_tilde[:, s])                     # Eq. 10
            A_tilde = (A_tilde @ G + np.outer(W[rows, s], w_tilde[:, s])) @ np.linalg.inv(G_next)  # Eq. 9
            G = G_next
        out_a[rows], out_b[rows] = A_tilde[:, 0], A_tilde[:, 1]
    return out_a, out_b


@pytest.fixture
def walks():
    rng = np.random.default_rng(11)
    base = rng.normal(size=(3, 25)).cumsum(axis=1)
    mix = rng.integers(0, 3, 400)
    W = (rng.uniform(-2, 2, (400, 1)) * base[mix] + rng.normal(0, 3, (400, 1))
         + 0.3 * rng.normal(size=(400, 25)).cumsum(axis=1)).astype(np.float32)
    return W


def feed(online: OnlineCMD, W: np.ndarray, t: int):
    online.update({"layer.weight": torch.from_numpy(W[:300, t].reshape(30, 10).copy()),
                   "layer.bias": torch.from_numpy(W[300:, t].copy())})


def test_online_coefficients_equal_batch_least_squares_after_every_epoch(walks):
    W = walks
    warmup = 8
    online = OnlineCMD(warmup=warmup, modes=3, samples=120, seed=0)
    for t in range(W.shape[1]):
        feed(online, W, t)
        if t + 1 < warmup:
            # warm-up: the online model is the trained model itself
            state = online.state_dict()
            np.testing.assert_array_equal(state["layer.bias"].numpy(), W[300:, t])
            with pytest.raises(UsageError, match="warm-up"):
                online.coefficients()
            continue
        mode = online.mode_
        R = W[online.reference_indices_].astype(np.float64)
        a, b = online.coefficients()
        batch_a, batch_b = batch_least_squares(W, R, mode, t + 1)
        np.testing.assert_allclose(a, batch_a, rtol=1e-7, atol=1e-9)
        np.testing.assert_allclose(b, batch_b, rtol=1e-7, atol=1e-7)
        model = np.concatenate([online.state_dict()["layer.weight"].numpy().ravel(),
                                online.state_dict()["layer.bias"].numpy()])
        np.testing.assert_allclose(model, batch_a * R[mode, t] + batch_b, rtol=1e-5, atol=1e-5)
    # and the literal recursion of Eq. 9 lands on the same coefficients
    eq9_a, eq9_b = eq9_recursion(W, R, mode, warmup, W.shape[1])
    np.testing.assert_allclose(a, eq9_a, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(b, eq9_b, rtol=1e-6, atol=1e-6)


def test_online_assignment_comes_from_the_warmup_epochs(walks):
    W = walks
    online = OnlineCMD(warmup=6, modes=3, samples=120, seed=0)
    for t in range(10):
        feed(online, W, t)
    refs = online.reference_indices_
    warm = W[:, :6].astype(np.float64)
    corr = abs_correlation(np.vstack([warm, warm[refs]]))[:len(W), len(W):]
    expected = corr.argmax(axis=1)
    expected[refs] = np.arange(len(refs))
    assert np.array_equal(online.mode_, expected)
    a, b = online.coefficients()
    assert np.all(a[refs] == 1.0) and np.all(b[refs] == 0.0)


def test_online_keeps_bn_stats_and_integers_from_the_latest_state():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6), torch.nn.Linear(6, 2))
    online = OnlineCMD(warmup=3, modes=2, samples=20)
    for _ in range(6):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn_like(p))
        model.train()
        model(torch.randn(8, 4))
        online.update(model.state_dict())
    state = online.state_dict()
    assert list(state) == list(model.state_dict())
    for key in ("1.running_mean", "1.running_var", "1.num_batches_tracked"):
        assert torch.equal(state[key], model.state_dict()[key])
    assert not torch.equal(state["0.weight"], model.state_dict()["0.weight"])
    model.load_state_dict(state, strict=True)


def test_store_variant_equals_the_online_class(tmp_path):
    states = write_checkpoints(tmp_path / "ckpts", n_epochs=12)
    ingest([tmp_path / "ckpts"], tmp_path / "run.zarr")
    store = open_store(tmp_path / "run.zarr", mode="r+")
    warmup = 5
    cmd = PosthocCMD(modes=3, samples=150, seed=4, warmup=warmup).fit(store)
    cmd.save("default")
    online = OnlineCMD(warmup=warmup, modes=3, samples=150, seed=4)
    floating = [e for e in store.layout.trajectory_entries]
    for column, state in enumerate(states):
        online.update(state)
        store_model = cmd.reconstruct_epoch(store, column, variant="online")
        class_model = online.model_vector()
        assert len(class_model) == sum(e.numel for e in floating)
        if column + 1 < warmup:
            np.testing.assert_array_equal(store_model, store.read_column(column))
        np.testing.assert_allclose(store_model, class_model, rtol=1e-5, atol=1e-6)
    assert np.array_equal(np.asarray(cmd.online_mode_[:]), online.mode_)
    a, b = online.coefficients()
    np.testing.assert_allclose(cmd.online_A_[:], a, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(cmd.online_B_[:], b, rtol=1e-5, atol=1e-6)
    # the online per-epoch error is zero through the warm-up and positive after
    errors = cmd.metrics_["online"]["epoch_relative_error"]
    assert errors[:warmup - 1] == [0.0] * (warmup - 1) and min(errors[warmup - 1:]) > 0
    # decompose --warmup reports the same drift as the class tracks in a training loop: e(t) from F on
    drift = cmd.metrics_["online"]["drift"]
    np.testing.assert_allclose(online.drift_.errors, errors[warmup - 1:], rtol=1e-4)
    assert drift["warmup_error"] == errors[warmup - 1] and drift["latest_error"] == errors[-1]
    assert drift["drifted"] == online.drift_.report().drifted
    assert drift["warmup_epoch"] == int(store.labels[warmup - 1])


def test_online_reconstruct_without_warmup_says_what_to_run(random_store):
    store, _ = random_store
    cmd = PosthocCMD(modes=2, samples=40).fit(store)
    with pytest.raises(UsageError, match="--warmup"):
        cmd.reconstruct_epoch(store, 3, variant="online")


def test_decompose_warmup_reports_drift_when_the_warmup_modes_stop_fitting(tmp_path):
    """Two groups move together through the warm-up (one mode fits them), then apart: the online model's
    error grows past 2x e(F), and `decompose --warmup` says so (metrics, --json and the printed summary)."""
    import json

    from typer.testing import CliRunner

    from cmdtool.store import from_array
    from cmdtool_cli.app import app

    rng = np.random.default_rng(3)
    T, F = 30, 10
    shared = rng.normal(size=T).cumsum()
    later = np.where(np.arange(T) < F, 0.0, np.arange(T) - F + 1.0) * 0.8
    group = np.repeat([0, 1], 200)
    W = (rng.uniform(0.5, 1.5, (400, 1)) * (shared + np.where(group == 0, 1, -1)[:, None] * later)
         + rng.normal(0, 1, (400, 1)) + 0.01 * rng.normal(size=(400, T)))
    from_array(tmp_path / "drift.zarr", W.astype(np.float32))
    result = CliRunner().invoke(app, ["decompose", "--store", str(tmp_path / "drift.zarr"), "--modes", "1",
                                      "--samples", "100", "--warmup", str(F), "--json"])
    assert result.exit_code == 0, result.output
    drift = json.loads(result.stdout)["online"]["drift"]
    saved = open_store(tmp_path / "drift.zarr").results.get("cmd", "default").metrics["online"]["drift"]
    assert saved == drift
    assert drift["drifted"] and drift["first_drift_epoch"] > F - 1 and drift["ratio"] > 2
    printed = CliRunner().invoke(app, ["decompose", "--store", str(tmp_path / "drift.zarr"), "--modes", "1",
                                       "--samples", "100", "--warmup", str(F)])
    assert printed.exit_code == 0 and "online CMD drifted" in printed.output
