"""DMD, KGA and PCA from the cached Gram matrix against dense computations, PyDMD and scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cmdtool.analyzers import get_analyzer
from cmdtool.passes import local as passes
from cmdtool.analyzers.dmd import DMD, dmd_from_gram
from cmdtool.analyzers.eigenvalues import NEUTRAL, STABLE, UNSTABLE, classify_eigenvalues
from cmdtool.analyzers.kga import KGA
from cmdtool.analyzers.linear_models import parse_rank, truncation_rank
from cmdtool.analyzers.pca import PCA
from cmdtool_cli.summaries import summary_blocks
from cmdtool.errors import UsageError
from cmdtool.store import from_array


def linear_dynamics(n_rows, n_cols, eigenvalues, noise=0.0, seed=0):
    """Real trajectories Σ_k Re/Im(a_jk λ_kᵗ): each complex λ brings its conjugate (two real components)."""
    rng = np.random.default_rng(seed)
    t = np.arange(n_cols)
    W = np.zeros((n_rows, n_cols))
    for lam in eigenvalues:
        profile = np.asarray(lam, dtype=np.complex128) ** t
        W += np.outer(rng.normal(size=n_rows), profile.real)
        if np.iscomplex(lam):
            W += np.outer(rng.normal(size=n_rows), profile.imag)
    if noise:
        W += noise * rng.normal(size=W.shape)
    return W.astype(np.float32)


@pytest.fixture
def dynamics_store(tmp_path):
    """Four modes (a decaying oscillation, a decay, a constant) plus 1% noise: a clear optimal-threshold rank."""
    W = linear_dynamics(800, 30, [0.95 * np.exp(0.3j), 0.8, 1.0], noise=0.01)
    store = from_array(tmp_path / "dyn.zarr", W, labels=range(1, 31), target_chunk_bytes=4 * 30 * 64)
    return store, W.astype(np.float64)


def dense_dmd(W, rank, exact):
    """Textbook DMD (Eqs. 5-9) with a dense SVD, PyDMD's amplitude/reconstruction convention."""
    X, Y = W[:, :-1], W[:, 1:]
    U, s, Vt = np.linalg.svd(X, full_matrices=False)
    U, s, V = U[:, :rank], s[:rank], Vt[:rank].T
    atilde = U.T @ Y @ V / s
    lam, Q = np.linalg.eig(atilde)
    modes = (Y @ V / s) @ Q if exact else U @ Q
    b = np.linalg.lstsq(modes, W[:, 0].astype(np.complex128), rcond=None)[0]
    rec = (modes @ (b[:, None] * lam[:, None] ** np.arange(W.shape[1]))).real
    return lam, modes, b, rec


def sort_by_eigenvalue(lam, *others):
    order = np.lexsort((lam.imag, lam.real))
    return (lam[order],) + tuple(o[..., order] for o in others)


# ---------------------------------------------------------------------------------------------------- DMD
@pytest.mark.parametrize("exact", [False, True])
def test_dmd_gram_path_equals_dense_svd(random_store, exact):
    store, W = random_store
    W = W.astype(np.float64)
    dmd = DMD(rank=5, exact=exact).fit(store)
    lam, modes, b, rec = dense_dmd(W, 5, exact)
    np.testing.assert_allclose(np.sort_complex(dmd.eigenvalues_), np.sort_complex(lam), atol=1e-9)
    np.testing.assert_allclose(W @ dmd.reconstruction_matrix_, rec, atol=1e-7 * np.abs(W).max())
    # per-epoch error from G alone equals the dense residual
    dense_err = np.linalg.norm(W - rec, axis=0) / np.linalg.norm(W, axis=0)
    np.testing.assert_allclose(dmd.metrics_["epoch_relative_error"], dense_err, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(dmd.metrics_["relative_error"], np.linalg.norm(W - rec) / np.linalg.norm(W),
                               rtol=1e-6)
    motion = np.linalg.norm(W - W.mean(axis=1, keepdims=True))
    np.testing.assert_allclose(dmd.metrics_["relative_error_motion"], np.linalg.norm(W - rec) / motion, rtol=1e-6)
    assert dmd.metrics_["stored_floats"] == 5 * W.shape[0] + 10


@pytest.mark.parametrize("rank", [3, 0, 0.999])
@pytest.mark.parametrize("exact", [False, True])
def test_dmd_agrees_with_pydmd(dynamics_store, rank, exact):
    pydmd = pytest.importorskip("pydmd")
    store, W = dynamics_store
    ref = pydmd.DMD(svd_rank=rank, exact=exact).fit(W)
    dmd = DMD(rank=rank, exact=exact, save_modes=True).fit(store)
    dmd.save("t")
    assert dmd.rank_ == len(ref.eigs)
    if rank == 0:
        assert dmd.rank_ == 4  # the four planted components stand above the 1% noise
    lam, ours_scaled = sort_by_eigenvalue(dmd.eigenvalues_, dmd.modes_ * dmd.amplitudes_)
    ref_lam, ref_scaled = sort_by_eigenvalue(ref.eigs, ref.modes * ref.amplitudes)
    np.testing.assert_allclose(lam, ref_lam, atol=1e-8)
    # Φ_k b_k does not depend on how each mode is normalised; modes are stored as float32
    np.testing.assert_allclose(ours_scaled, ref_scaled, atol=2e-5 * np.abs(ref_scaled).max())
    np.testing.assert_allclose(W @ dmd.reconstruction_matrix_, ref.reconstructed_data.real,
                               atol=1e-8 * np.abs(W).max())
    column = 17
    np.testing.assert_allclose(dmd.reconstruct_epoch(store, column), ref.reconstructed_data.real[:, column],
                               atol=1e-5 * np.abs(W).max())


def test_dmd_rank_rules_match_pydmd():
    from pydmd.utils import compute_rank

    rng = np.random.default_rng(3)
    X = rng.normal(size=(300, 20)) @ np.diag(np.geomspace(10, 0.01, 20))
    s = np.linalg.svd(X, compute_uv=False)
    for rank in (0, 0.9, 0.99, 7, 100):
        assert truncation_rank(s, 300, 20, rank) == compute_rank(X, rank)
    assert parse_rank("0") == 0 and parse_rank("0.9") == 0.9 and parse_rank("12") == 12
    for bad in ("abc", "1.5", "-3"):
        with pytest.raises(UsageError):
            parse_rank(bad)


def test_dmd_save_load_round_trip(dynamics_store):
    store, W = dynamics_store
    dmd = DMD(rank=4).fit(store)
    dmd.save("rt")
    again = DMD.load(store, "rt")
    np.testing.assert_array_equal(again.eigenvalues_, dmd.eigenvalues_)
    np.testing.assert_array_equal(again.reconstruction_matrix_, dmd.reconstruction_matrix_)
    assert again.metrics_["relative_error"] == pytest.approx(dmd.metrics_["relative_error"])
    assert again.modes_ is None  # not materialised without save_modes
    # without stored modes a reconstruction is one pass: W K e_t
    np.testing.assert_allclose(again.reconstruct_epoch(store, 5), W @ dmd.reconstruction_matrix_[:, 5],
                               atol=1e-5 * np.abs(W).max())


def test_numerical_rank_caps_the_gram_path():
    """Exactly rank-2 data: the Gram path keeps 2 modes even when asked for 6 (the rest is roundoff)."""
    W = linear_dynamics(200, 12, [0.9, 1.0]).astype(np.float64)
    fit = dmd_from_gram(W.T @ W, 200, rank=6)
    assert fit.rank == 2 and fit.rank_requested == 6
    np.testing.assert_allclose(np.sort(fit.eigenvalues.real), [0.9, 1.0], atol=1e-6)


# ---------------------------------------------------------------------------------------------------- windows, cache
def test_window_is_a_gram_submatrix_and_the_gram_is_computed_once(random_store, monkeypatch):
    store, W = random_store
    W = W.astype(np.float64)
    DMD(rank=3).fit(store)  # computes and caches G of all columns
    created = store.results.get("gram", "full").attrs["created_at"]
    gram_updates = []
    monkeypatch.setattr(passes.GramAccumulator, "update", lambda *a: gram_updates.append(1))
    # labels are 10..26: epochs 12:22 are columns 2..12
    dmd = DMD(rank=4, epochs="12:22").fit(store)
    pca = PCA(dims=3, epochs="12:22").fit(store)
    kga = KGA(rank=4, epochs="12:22").fit(store)
    assert gram_updates == []
    assert store.results.get("gram", "full").attrs["created_at"] == created
    assert dmd.gram_from_cache_ and pca.gram_from_cache_ and kga.gram_from_cache_
    assert dmd.timings_["gram_seconds"] == 0.0
    Ww = W[:, 2:13]
    lam, _, _, rec = dense_dmd(Ww, 4, exact=False)
    np.testing.assert_allclose(np.sort_complex(dmd.eigenvalues_), np.sort_complex(lam), atol=1e-9)
    np.testing.assert_allclose(Ww @ dmd.reconstruction_matrix_, rec, atol=1e-7 * np.abs(Ww).max())
    centred = Ww.T - Ww.T.mean(axis=0)
    sv = np.linalg.svd(centred, compute_uv=False)
    np.testing.assert_allclose(pca.explained_variance_, sv[:3] ** 2 / (Ww.shape[1] - 1), rtol=1e-9)
    assert list(dmd.labels_) == list(range(12, 23))


# ---------------------------------------------------------------------------------------------------- PCA
def test_pca_agrees_with_sklearn(random_store):
    from sklearn.decomposition import PCA as SkPCA

    store, W = random_store
    checkpoints = W.T.astype(np.float64)  # rows = checkpoints, as P-BFGS sees them
    ref = SkPCA(n_components=6).fit(checkpoints)
    pca = PCA(dims=6).fit(store)
    pca.save("t")
    np.testing.assert_allclose(pca.explained_variance_, ref.explained_variance_, rtol=1e-9)
    np.testing.assert_allclose(pca.explained_variance_ratio_, ref.explained_variance_ratio_, rtol=1e-9)
    directions = pca.directions_[...].T  # (d, N) like components_
    signs = np.sign(np.sum(directions * ref.components_, axis=1))
    assert np.all(np.abs(signs) == 1)
    np.testing.assert_allclose(directions * signs[:, None], ref.components_, atol=1e-6)
    np.testing.assert_allclose(pca.coordinates_ * signs[None, :], ref.transform(checkpoints), atol=1e-6)
    np.testing.assert_allclose(pca.means_[...], ref.mean_, atol=1e-6)
    rebuilt = ref.inverse_transform(ref.transform(checkpoints))
    np.testing.assert_allclose(pca.reconstruct_epoch(store, 4), rebuilt[4], atol=1e-5)
    dense_err = np.linalg.norm(checkpoints - rebuilt, axis=1) / np.linalg.norm(checkpoints, axis=1)
    np.testing.assert_allclose(pca.metrics_["epoch_relative_error"], dense_err, rtol=1e-6, atol=1e-9)
    assert pca.metrics_["stored_floats"] == 6 * 500 + 500 + 6 * 17


def test_pca_dims_capped_at_t_minus_one(random_store):
    store, _ = random_store
    pca = PCA(dims=40).fit(store)
    assert pca.dims_ == 16
    assert pca.metrics_["relative_error"] < 1e-6  # T−1 directions plus the mean span every checkpoint
    assert pca.reproduces_the_data()
    assert summary_blocks(pca)[-1] == ("warning: 16 directions = T − 1 for T = 17 checkpoints: they span every "
                                        "centred checkpoint, so this model is the data itself (its error is "
                                        "roundoff); choose fewer with --dims, or --dims 0 for the threshold rule")


def test_pca_default_keeps_the_gavish_donoho_rank_of_the_centred_data(random_store, planted_store):
    """dims=0: σ_k of the centred checkpoints above ω(β)·median(σ) over their T − 1 non-trivial values,
    β = T/N, ω(β) = 0.56β³ − 0.95β² + 1.82β + 1.43 (Gavish & Donoho 2014), at most 40."""
    for store, W in (random_store,):
        sigma = np.linalg.svd(W.astype(np.float64) - W.mean(axis=1, keepdims=True), compute_uv=False)
        sigma = sigma[:W.shape[1] - 1]
        beta = W.shape[1] / W.shape[0]
        omega = 0.56 * beta**3 - 0.95 * beta**2 + 1.82 * beta + 1.43
        expected = int(np.count_nonzero(sigma > omega * np.median(sigma)))
        pca = PCA().fit(store)
        assert pca.dims_ == expected and 1 <= expected < W.shape[1] - 1
        assert not pca.reproduces_the_data() and not summary_blocks(pca)[-1].startswith("warning")
    assert expected == 4
    # three planted curves, noise-free: the centred data has rank 3 (the rest is roundoff, below the numerical rank)
    assert PCA().fit(planted_store[0]).dims_ == 3


# ---------------------------------------------------------------------------------------------------- KGA
def test_kga_classes_of_known_spectrum(tmp_path):
    true = [1.0, 0.7, 1.08, 0.9 * np.exp(0.4j)]  # neutral, stable, unstable, stable pair
    W = linear_dynamics(300, 20, true, seed=2)
    store = from_array(tmp_path / "k.zarr", W, target_chunk_bytes=4 * 20 * 64)
    kga = KGA(rank=5, eps=0.02, mask_threshold=1e-3).fit(store)
    expected = np.array([1.0, 0.7, 1.08, 0.9 * np.exp(0.4j), 0.9 * np.exp(-0.4j)])
    np.testing.assert_allclose(np.sort_complex(kga.eigenvalues_), np.sort_complex(expected), atol=1e-6)
    assert kga.class_counts() == {"stable": 3, "neutral": 1, "unstable": 1}
    for lam, code in zip(kga.eigenvalues_, kga.classes_):
        want = NEUTRAL if abs(abs(lam) - 1) <= 0.02 else (STABLE if abs(lam) < 1 else UNSTABLE)
        assert code == want
    state = kga.training_kga_state()
    assert len(state["stable"]["eigenvalues"]) == 3 and len(state["neutral"]["eigenvalues"]) == 1
    # left and right eigenvectors are dual: L Q = I
    np.testing.assert_allclose(kga.left_eigenvectors_ @ kga.eigenvectors_, np.eye(5), atol=1e-9)


def test_classify_eigenvalues_boundaries():
    lam = np.array([0.98, 0.99, 1.0, 1.01, 1.02, 0.5j])
    assert list(classify_eigenvalues(lam, 0.01)) == [STABLE, NEUTRAL, NEUTRAL, NEUTRAL, UNSTABLE, STABLE]


def test_kwm_masks_on_constructed_case(tmp_path):
    """w_j(t) = n_j + c_j 0.5ᵗ: the neutral part n_j never counts; weight j is masked out (Eq. 15) iff
    |c_j| 0.5ⁱ < ε over the last s epochs, i.e. |c_j| 0.5^(T−s) < ε."""
    n_cols, window, eps = 12, 3, 0.01
    rng = np.random.default_rng(4)
    sizes = {"a.weight": (30, 4), "a.bias": (30,), "b.weight": (90,)}
    n_rows = 120 + 30 + 90
    neutral = rng.normal(size=n_rows)
    # |c| either well below or well above the cut-off eps / 0.5^(T−s) = 5.12
    magnitude = np.where(rng.random(n_rows) < 0.4, rng.uniform(0.5, 2.0, n_rows), rng.uniform(20, 60, n_rows))
    stable = magnitude * rng.choice([-1, 1], n_rows)
    t = np.arange(n_cols)
    W = (neutral[:, None] + stable[:, None] * 0.5 ** t[None, :]).astype(np.float32)
    store = from_array(tmp_path / "kwm.zarr", W, tensors=sizes, target_chunk_bytes=4 * n_cols * 64)
    kga = KGA(rank=2, eps=eps, window=window).fit(store)
    kga.save("m")
    assert kga.class_counts() == {"stable": 1, "neutral": 1, "unstable": 0}
    expected_masked = np.abs(stable) * 0.5 ** (n_cols - window) < eps
    mask = kga.mask_[...]
    np.testing.assert_array_equal(mask == 0, expected_masked)
    assert 0.2 < expected_masked.mean() < 0.6
    assert kga.masked_fraction_ == pytest.approx(expected_masked.mean())
    bounds = np.cumsum([0, 120, 30, 90])
    per_tensor = [int(expected_masked[lo:hi].sum()) for lo, hi in zip(bounds[:-1], bounds[1:])]
    assert list(kga.masked_per_tensor_) == per_tensor
    summary = kga.summary()
    assert summary["masked_per_tensor"]["b.weight"]["size"] == 90
    # the stored basis is U = X V Σ⁻¹: orthonormal columns spanning the snapshots
    U = kga.weight_basis_[...].astype(np.float64)
    np.testing.assert_allclose(U.T @ U, np.eye(2), atol=1e-5)
    loaded = KGA.load(store, "m")
    assert loaded.masked_fraction_ == kga.masked_fraction_
    np.testing.assert_array_equal(loaded.classes_, kga.classes_)


def test_registry_and_options():
    assert get_analyzer("dmd") is DMD and get_analyzer("kga") is KGA and get_analyzer("pca") is PCA
    options = dict(modes=10, rank="3", exact=True, save_modes=False, eps=0.05, window=4, dims=7, epochs=None,
                   device="cpu")
    assert DMD.from_options(options).get_params() == dict(rank="3", exact=True, save_modes=False, epochs=None,
                                                          device="cpu")
    assert PCA.from_options(options).dims == 7
    assert KGA.from_options(options).window == 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_passes_match_cpu(dynamics_store):
    store, W = dynamics_store
    cpu = PCA(dims=3, device="cpu").fit(store)
    cpu.save("cpu")
    cpu_dirs = cpu.directions_[...]
    store.results.delete("gram", "full")
    gpu = PCA(dims=3, device="cuda").fit(store)
    gpu.save("gpu")
    np.testing.assert_allclose(gpu.explained_variance_, cpu.explained_variance_, rtol=1e-6)
    np.testing.assert_allclose(np.abs(gpu.directions_[...]), np.abs(cpu_dirs), atol=1e-5)
    cpu_kga = KGA(rank=4, device="cpu").fit(store)
    gpu_kga = KGA(rank=4, device="cuda").fit(store)
    np.testing.assert_allclose(gpu_kga.eigenvalues_, cpu_kga.eigenvalues_, atol=1e-9)
    assert gpu_kga.masked_fraction_ == pytest.approx(cpu_kga.masked_fraction_, abs=1e-3)
