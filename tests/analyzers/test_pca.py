"""PCA from the cached Gram matrix against scikit-learn; PCA and KGA on a CUDA device against the CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cmdtool.analyzers.kga import KGA
from cmdtool.analyzers.pca import PCA
from cmdtool_cli.summaries import summary_blocks

from tests.analyzers.test_dmd import dynamics_store  # noqa: F401 (a fixture)


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
