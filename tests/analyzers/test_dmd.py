"""DMD from the cached Gram matrix against a dense SVD and PyDMD; the time windows read from the cached Gram
matrix. (KGA and PCA: test_kga.py and test_pca.py, which use the trajectories built here.)"""

from __future__ import annotations

import numpy as np
import pytest

from cmdtool.passes import local as passes
from cmdtool.analyzers.dmd import DMD, dmd_from_gram
from cmdtool.analyzers.kga import KGA
from cmdtool.analyzers.linear_models import parse_rank, truncation_rank
from cmdtool.analyzers.pca import PCA
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
