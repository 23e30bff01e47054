"""KGA from the cached Gram matrix on trajectories of known spectrum: eigenvalue classes and the KWM masks."""

from __future__ import annotations

import numpy as np
import pytest

from cmdtool.analyzers.eigenvalues import NEUTRAL, STABLE, UNSTABLE, classify_eigenvalues
from cmdtool.analyzers.kga import KGA
from cmdtool.store import from_array

from tests.analyzers.test_dmd import linear_dynamics


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
