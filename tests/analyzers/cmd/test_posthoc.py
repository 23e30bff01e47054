"""Post-hoc CMD against known structure and against a dense in-memory implementation of Alg. 1-2."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import pdist

from cmdtool.analyzers import get_analyzer
from cmdtool.analyzers.cmd.posthoc import PosthocCMD
from cmdtool.analyzers.cmd.math import MODE_KEPT, MODE_NONFINITE, sample_rows
from cmdtool.passes.local import cached_gram
from cmdtool.errors import UsageError
from cmdtool.store import from_array

from tests.conftest import planted_modes


# ---------------------------------------------------------------------------------------------- dense oracle
def dense_cmd(W: np.ndarray, sampled: np.ndarray, modes: int):
    """Alg. 1-2 written directly from the paper and the authors' numpy code: everything in memory,
    np.corrcoef for C1, pinv of the 2x2 normal matrix of Eq. 6 per mode."""
    W = W.astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        C1 = np.abs(np.corrcoef(W[sampled]))
    C1[np.isnan(C1)] = 0.0
    raw = fcluster(linkage(pdist(C1), method="complete"), modes, criterion="maxclust")
    ids, counts = np.unique(raw, return_counts=True)
    by_size = [ids[j] for j in sorted(range(len(ids)), key=lambda j: (-counts[j], ids[j]))]
    labels = np.array([by_size.index(r) for r in raw])
    ref_pos = []
    for m in range(len(ids)):
        members = np.flatnonzero(labels == m)
        ref_pos.append(members[np.argmax(C1[np.ix_(members, members)].mean(axis=0))])
    ref_idx = sampled[np.array(ref_pos)]
    R = W[ref_idx]
    # Step 2 (Eq. 5): |corr| of every row with every reference, NaN (constant rows) -> 0
    Wc = W - W.mean(axis=1, keepdims=True)
    Rc = R - R.mean(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        C2 = np.abs(Wc @ Rc.T) / np.outer(np.linalg.norm(Wc, axis=1), np.linalg.norm(Rc, axis=1))
    C2[np.isnan(C2)] = 0.0
    mode = C2.argmax(axis=1)
    mode[ref_idx] = np.arange(len(ref_idx))
    # Step 3 (Eq. 6): Ã_m = W_m w̃ᵀ (w̃ w̃ᵀ)^+
    A = np.zeros(len(W))
    B = np.zeros(len(W))
    for m in range(len(ref_idx)):
        rows = mode == m
        w_tilde = np.vstack([R[m], np.ones(W.shape[1])])
        coef = W[rows] @ w_tilde.T @ np.linalg.pinv(w_tilde @ w_tilde.T)
        A[rows], B[rows] = coef[:, 0], coef[:, 1]
    return dict(C1=C1, labels=labels, reference_indices=ref_idx, mode=mode, A=A, B=B, R=R)


def same_partition(found: np.ndarray, truth: np.ndarray) -> bool:
    """True when the two labelings are one permutation apart."""
    pairs = set(zip(found.tolist(), truth.tolist()))
    return len(pairs) == len(set(found.tolist())) == len(set(truth.tolist()))


# ---------------------------------------------------------------------------------------------- sampling
def test_balanced_sampling_gives_every_layer_its_share():
    layers = [(0, 200), (200, 200), (400, 200)]
    sample = sample_rows(layers, 60, "balanced", seed=3)
    assert len(sample) == 60 and len(np.unique(sample)) == 60 and np.all(np.diff(sample) > 0)
    per_layer = np.bincount(sample // 200, minlength=3)
    assert np.all(per_layer >= 10)  # K/2 spread evenly: 30 / 3 layers
    assert np.array_equal(sample, sample_rows(layers, 60, "balanced", seed=3))
    assert not np.array_equal(sample, sample_rows(layers, 60, "balanced", seed=4))


def test_balanced_sampling_caps_small_layers_and_skips_unmodelled_rows():
    layers = [(0, 2), (10, 1000)]  # rows 2..9 are not modelled (e.g. BatchNorm stats)
    sample = sample_rows(layers, 100, "balanced", seed=0)
    assert {0, 1} <= set(sample.tolist())
    assert not np.any((sample >= 2) & (sample < 10))
    assert len(sample) == 100


def test_sampling_is_uniform_when_half_k_does_not_exceed_the_layers():
    layers = [(10 * i, 10) for i in range(40)]
    assert np.array_equal(sample_rows(layers, 60, "balanced", seed=1), sample_rows(layers, 60, "uniform", seed=1))
    assert len(sample_rows(layers, 1000, "balanced")) == 400  # K >= rows: every row


# ---------------------------------------------------------------------------------------------- planted modes
def test_planted_modes_are_recovered_exactly(planted_store):
    store, W, truth = planted_store
    cmd = PosthocCMD(modes=3, samples=120, seed=0).fit(store)
    mode = np.asarray(cmd.mode_[:])
    assert same_partition(mode, truth)
    assert cmd.metrics_["relative_error"] < 1e-6
    assert cmd.metrics_["relative_error_motion"] < 1e-6
    # modes are numbered by their size in the clustered sample (as the authors' code does)
    assert sorted(cmd.metrics_["sample_mode_sizes"], reverse=True) == cmd.metrics_["sample_mode_sizes"]
    assert sorted(cmd.metrics_["mode_sizes"]) == sorted(np.bincount(truth).tolist())


def test_planted_modes_with_noise_fit_at_the_noise_level(tmp_path):
    noise = 0.05
    W, truth, a, b, curves = planted_modes(n_rows=2000, n_cols=40, noise=noise, seed=5)
    clean = (a[:, None] * curves[truth] + b[:, None])
    store = from_array(tmp_path / "noisy.zarr", W, target_chunk_bytes=4 * 40 * 256)
    cmd = PosthocCMD(modes=3, samples=300, seed=0).fit(store)
    assert same_partition(np.asarray(cmd.mode_[:]), truth)
    floor = np.linalg.norm(W - clean) / np.linalg.norm(W)
    floor_motion = np.linalg.norm(W - clean) / np.linalg.norm(W - W.mean(axis=1, keepdims=True))
    # the references are noisy weights themselves, so CMD sits a little above the noise floor, never far
    assert 0.8 * floor < cmd.metrics_["relative_error"] < 1.5 * floor
    assert 0.8 * floor_motion < cmd.metrics_["relative_error_motion"] < 1.5 * floor_motion


# ---------------------------------------------------------------------------------------------- dense oracle
@pytest.mark.parametrize("modes", [1, 4, 7])
def test_every_output_matches_the_dense_reference(random_store, modes):
    store, W = random_store
    cmd = PosthocCMD(modes=modes, samples=80, seed=2).fit(store)
    cmd.save("default")
    ref = dense_cmd(W, cmd.sampled_indices_, modes)
    np.testing.assert_allclose(cmd.correlation_, ref["C1"], atol=1e-6)
    assert np.array_equal(cmd.sample_modes_, ref["labels"])
    assert np.array_equal(cmd.reference_indices_, ref["reference_indices"])
    np.testing.assert_array_equal(cmd.reference_trajectories_, W[ref["reference_indices"]])
    assert np.array_equal(np.asarray(cmd.mode_[:]), ref["mode"])
    np.testing.assert_allclose(cmd.A_[:], ref["A"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(cmd.B_[:], ref["B"], rtol=1e-5, atol=1e-5)
    # the errors reported are those of the dense model
    recon = ref["A"][:, None] * ref["R"][ref["mode"]] + ref["B"][:, None]
    dense_error = np.linalg.norm(W - recon) / np.linalg.norm(W)
    assert cmd.metrics_["relative_error"] == pytest.approx(dense_error, rel=1e-4)
    motion = np.linalg.norm(W - recon) / np.linalg.norm(W - W.mean(axis=1, keepdims=True))
    assert cmd.metrics_["relative_error_motion"] == pytest.approx(motion, rel=1e-4)
    epoch_error = np.linalg.norm(W - recon, axis=0) / np.linalg.norm(W, axis=0)
    np.testing.assert_allclose(cmd.metrics_["epoch_relative_error"], epoch_error, rtol=1e-4)
    np.testing.assert_allclose(cmd.row_sq_error_[:], ((W - recon) ** 2).sum(axis=1), rtol=1e-3, atol=1e-6)
    # reconstruction at every epoch equals a * r + b computed densely, from the fitted and the loaded object
    loaded = get_analyzer("cmd").load(store, "default")
    for column in range(W.shape[1]):
        np.testing.assert_allclose(cmd.reconstruct_epoch(store, column), recon[:, column], rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(loaded.reconstruct_epoch(store, column), cmd.reconstruct_epoch(store, column))
    # the linkage saved is the one of C1
    np.testing.assert_allclose(loaded.linkage_, linkage(pdist(ref["C1"]), method="complete"), atol=1e-6)


def test_threshold_cut_matches_scipy(random_store):
    store, W = random_store
    cmd = PosthocCMD(threshold=1.5, samples=80, seed=2).fit(store)
    C1 = dense_cmd(W, cmd.sampled_indices_, 2)["C1"]
    expected = len(np.unique(fcluster(linkage(pdist(C1), "complete"), 1.5, criterion="distance")))
    assert cmd.metrics_["modes"] == expected > 1


# ---------------------------------------------------------------------------------------------- special rows
@pytest.fixture
def awkward_store(tmp_path):
    """Random walks with constant rows, a NaN row and BatchNorm running statistics."""
    rng = np.random.default_rng(7)
    W = rng.normal(size=(300, 12)).cumsum(axis=1).astype(np.float32)
    W[5] = 0.25          # constant
    W[150] = -3.0        # constant
    W[77, 4] = np.nan    # NaN at one epoch
    W[250:] = 1.0 + 0.3 * rng.normal(size=(50, 12)).cumsum(axis=1)  # the "running stats" move a lot
    tensors = {"conv.weight": (10, 10), "conv.bias": (100,), "fc.weight": (50,), "bn.running_var": (50,)}
    store = from_array(tmp_path / "awkward.zarr", W, labels=range(1, 13), tensors=tensors,
                       target_chunk_bytes=4 * 12 * 64)
    return store, W


def test_constant_reference_nonfinite_and_bn_rows(awkward_store):
    store, W = awkward_store
    cmd = PosthocCMD(modes=3, samples=60, seed=0).fit(store)
    mode, A, B = np.asarray(cmd.mode_[:]), cmd.A_[:], cmd.B_[:]
    assert not np.any(cmd.sampled_indices_ >= 250)  # running stats are not sampled under 'source'
    assert np.all(mode[250:] == MODE_KEPT)
    assert mode[77] == MODE_NONFINITE and cmd.metrics_["nonfinite_rows"] == 1
    assert cmd.metrics_["kept_rows"] == 50
    for row in (5, 150):
        assert A[row] == 0.0 and B[row] == W[row, 0]
    refs = cmd.reference_indices_
    assert np.all(A[refs] == 1.0) and np.all(B[refs] == 0.0)
    assert np.array_equal(mode[refs], np.arange(len(refs)))
    for column in range(W.shape[1]):
        rec = cmd.reconstruct_epoch(store, column)
        np.testing.assert_array_equal(rec[250:], W[250:, column])  # kept from the source
        np.testing.assert_array_equal(rec[77], W[77, column])      # NaN row kept as stored (NaN included)
        np.testing.assert_array_equal(rec[refs], W[refs, column])  # references exact
        assert rec[5] == W[5, column] and rec[150] == W[150, column]
    layers = cmd.metrics_["layers"]
    assert layers["bn.running_var"]["modelled"] is False and layers["bn.running_var"]["relative_error"] == 0.0
    assert sum(cmd.metrics_["mode_sizes"]) == 300 - 50 - 1


def test_bn_stats_model_fits_the_running_stats(awkward_store):
    store, W = awkward_store
    cmd = PosthocCMD(modes=3, samples=60, seed=0, bn_stats="model").fit(store)
    mode = np.asarray(cmd.mode_[:])
    assert np.all(mode[250:] >= 0) and cmd.metrics_["kept_rows"] == 0
    assert cmd.metrics_["layers"]["bn.running_var"]["relative_error"] > 0


# ---------------------------------------------------------------------------------------------- passes, window
def test_sampling_pass_shares_the_gram_matrix_and_reuses_it(random_store):
    store, W = random_store
    first = PosthocCMD(modes=3, samples=50, seed=1).fit(store)
    gram = cached_gram(store)
    assert gram is not None
    np.testing.assert_allclose(gram.gram, W.astype(np.float64).T @ W.astype(np.float64), rtol=1e-6)
    second = PosthocCMD(modes=3, samples=50, seed=1).fit(store)  # gram cached: sample read with read_rows
    assert np.array_equal(first.reference_indices_, second.reference_indices_)
    np.testing.assert_array_equal(first.A_[:], second.A_[:])


def test_epoch_window(random_store):
    store, W = random_store  # labels 10..26
    cmd = PosthocCMD(modes=2, samples=50, epochs="12:20").fit(store)
    assert cmd.reference_trajectories_.shape == (2, 9)
    ref = dense_cmd(W[:, 2:11], cmd.sampled_indices_, 2)
    np.testing.assert_allclose(cmd.A_[:], ref["A"], rtol=1e-5, atol=1e-6)
    with pytest.raises(UsageError, match="outside the window"):
        cmd.reconstruct_epoch(store, 0)


def test_bad_options_are_usage_errors(random_store):
    """The library names its parameters (the CLI spells them as flags: tests/cli/test_commands.py)."""
    store, _ = random_store
    with pytest.raises(UsageError, match="modes 500 is more than the 50 sampled weights: raise samples"):
        PosthocCMD(modes=500, samples=50).fit(store)
    with pytest.raises(UsageError, match="warmup must be between 2 and the 17"):
        PosthocCMD(warmup=40).fit(store)
    with pytest.raises(UsageError, match="unknown bn_stats 'maybe'"):
        PosthocCMD(bn_stats="maybe").fit(store)
    with pytest.raises(UsageError, match="unknown sampling 'stratified'"):
        PosthocCMD(sampling="stratified").fit(store)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(random_store):
    store, W = random_store
    cpu = PosthocCMD(modes=4, samples=80, seed=2, device="cpu", warmup=6).fit(store)
    gpu = PosthocCMD(modes=4, samples=80, seed=2, device="cuda", warmup=6).fit(store)
    assert np.array_equal(np.asarray(cpu.mode_[:]), np.asarray(gpu.mode_[:]))
    np.testing.assert_allclose(gpu.A_[:], cpu.A_[:], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(gpu.B_[:], cpu.B_[:], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(gpu.online_A_[:], cpu.online_A_[:], rtol=1e-6, atol=1e-7)
    assert gpu.metrics_["relative_error"] == pytest.approx(cpu.metrics_["relative_error"], rel=1e-9)
