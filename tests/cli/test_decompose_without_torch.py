"""`cmdtool decompose` on the CPU imports no torch (issue #26): every registered method, with `--device auto` and
`--device cpu`, runs in a fresh process that is checked for torch, and its saved result equals a dense reference
or a known value. torch costs 1.2-2.8 s to import; a CPU pass computes in numpy (cmdtool.passes.contract.Block).

The stores are written with the store API (numpy and zarr only), so no torch is needed to make them either.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from cmdtool.analyzers import analyzer_classes, get_analyzer
from cmdtool.analyzers.kga import kwm_score_matrix
from cmdtool.store import from_array, open_store
from cmdtool.utils.device import resolve_device, torch_built_for_gpu

from tests.conftest import planted_modes

SCRIPT = """
import json, sys
from cmdtool_cli.app import app
try:
    app(sys.argv[1:])
except SystemExit as exit:
    assert not exit.code, exit.code
print("IMPORTED " + json.dumps(sorted(m for m in ("torch",) if m in sys.modules)))
"""


def decompose_in_fresh_process(store, method: str, device: str, options: list[str]) -> dict:
    """Runs `cmdtool decompose -m METHOD --device DEVICE --json` in a new interpreter; asserts that torch was not
    imported and returns the JSON summary."""
    args = ["decompose", "-m", method, "--name", device, "--device", device, "--json", "--store", str(store.path),
            *options]
    out = subprocess.run([sys.executable, "-c", SCRIPT, *args], capture_output=True, text=True, check=True)
    lines = out.stdout.splitlines()
    imported = json.loads(lines[-1].removeprefix("IMPORTED "))
    assert imported == [], (method, device, out.stderr[-2000:])
    return json.loads("\n".join(lines[:-1]))


def without_timings(value):
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items() if k not in ("timings", "fit_seconds", "name")}
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """Trajectories that are exact affine images of 3 curves: rank 4 (3 curves and the constant)."""
    W, truth, *_ = planted_modes(n_rows=600, n_cols=30, n_modes=3, seed=2)
    store = from_array(tmp_path_factory.mktemp("planted") / "s.zarr", W, labels=range(1, 31),
                       tensors={"layer1.weight": (20, 10), "layer1.bias": (200,), "layer2.weight": (200,)},
                       target_chunk_bytes=4 * 64 * 30)
    return store, W.astype(np.float64), truth


@pytest.fixture(scope="module")
def kwm_case(tmp_path_factory):
    """w_j(t) = n_j + c_j 0.5ᵗ (as tests/test_gram_methods.py's KWM case): weight j is masked out of KGA iff
    |c_j| 0.5^(T−s) < ε."""
    n_cols = 12
    rng = np.random.default_rng(4)
    n_rows = 240
    neutral = rng.normal(size=n_rows)
    magnitude = np.where(rng.random(n_rows) < 0.4, rng.uniform(0.5, 2.0, n_rows), rng.uniform(20, 60, n_rows))
    stable = magnitude * rng.choice([-1, 1], n_rows)
    W = (neutral[:, None] + stable[:, None] * 0.5 ** np.arange(n_cols)[None, :]).astype(np.float32)
    store = from_array(tmp_path_factory.mktemp("kwm") / "s.zarr", W, tensors={"a.weight": (150,), "b.weight": (90,)},
                       target_chunk_bytes=4 * n_cols * 64)
    return store, W.astype(np.float64), np.abs(stable) * 0.5 ** (n_cols - 3) < 0.01


def same_up_to_sign(got: np.ndarray, want: np.ndarray, atol: float) -> None:
    signs = np.sign(np.sum(got * want, axis=0))
    assert np.all(np.abs(signs) == 1)
    np.testing.assert_allclose(got * signs[None, :], want, atol=atol)


def check_cmd(fitted, W, truth) -> None:
    mode = np.asarray(fitted.mode_[:])
    assert len(set(zip(mode.tolist(), truth.tolist()))) == 3  # the planted partition, whatever the labels
    assert fitted.metrics_["relative_error"] < 1e-6
    assert sorted(fitted.metrics_["mode_sizes"]) == sorted(np.bincount(truth).tolist())
    # online CMD (Sec. 3.3) of exactly affine trajectories is exact too
    assert fitted.metrics_["online"]["relative_error"] < 1e-6


def dense_dmd_eigenvalues(W, rank: int) -> np.ndarray:
    X, Y = W[:, :-1], W[:, 1:]
    U, s, Vt = np.linalg.svd(X, full_matrices=False)
    atilde = U[:, :rank].T @ Y @ Vt[:rank].T / s[:rank]
    return np.linalg.eigvals(atilde)


def check_dmd(fitted, W, _) -> None:
    np.testing.assert_allclose(np.sort_complex(fitted.eigenvalues_), np.sort_complex(dense_dmd_eigenvalues(W, 4)),
                               rtol=1e-6)
    s = np.linalg.svd(W[:, :-1], compute_uv=False)
    np.testing.assert_allclose(fitted.singular_values_[:4], s[:4], rtol=1e-7)


def check_kga(fitted, W, expected_masked) -> None:
    assert fitted.class_counts() == {"stable": 1, "neutral": 1, "unstable": 0}
    np.testing.assert_array_equal(np.asarray(fitted.mask_[...]) == 0, expected_masked)
    assert list(fitted.masked_per_tensor_) == [int(expected_masked[:150].sum()), int(expected_masked[150:].sum())]
    score = kwm_score_matrix(fitted.mode_coefficients_, fitted.amplitudes_, fitted.eigenvalues_, fitted.classes_,
                             W.shape[1], 3)
    assert 0.2 < expected_masked.mean() < 0.6
    np.testing.assert_array_equal(expected_masked, (np.abs(W @ score) < 0.01).all(axis=1))
    U, s, _ = np.linalg.svd(W[:, :-1], full_matrices=False)
    same_up_to_sign(np.asarray(fitted.weight_basis_[...], dtype=np.float64), U[:, :2], atol=1e-5)


def check_pca(fitted, W, _) -> None:
    checkpoints = W.T
    centred = checkpoints - checkpoints.mean(axis=0)
    U, s, Vt = np.linalg.svd(centred, full_matrices=False)
    np.testing.assert_allclose(fitted.explained_variance_, s[:3] ** 2 / (W.shape[1] - 1), rtol=1e-9)
    same_up_to_sign(np.asarray(fitted.directions_[...], dtype=np.float64), Vt[:3].T, atol=1e-6)
    np.testing.assert_allclose(fitted.means_[...], checkpoints.mean(axis=0), atol=1e-6)
    assert fitted.metrics_["relative_error"] < 1e-6  # rank 4 = the mean and 3 directions


def check_pod(fitted, W, _) -> None:
    U, s, _ = np.linalg.svd(W, full_matrices=False)
    np.testing.assert_allclose(fitted.singular_values_[:4], s[:4], rtol=1e-7)
    same_up_to_sign(np.asarray(fitted.modes_[...], dtype=np.float64), U[:, :4], atol=1e-5)
    assert fitted.metrics_["relative_error"] < 1e-6


# method -> (store fixture, options, check of the saved result against the dense reference or known values)
CASES = {
    "cmd": ("planted", ["--modes", "3", "--samples", "120", "--warmup", "10"], check_cmd),
    "dmd": ("planted", ["--rank", "4"], check_dmd),
    "kga": ("kwm_case", ["--rank", "2", "--eps", "0.01", "--window", "3"], check_kga),
    "pca": ("planted", ["--dims", "3"], check_pca),
    "pod": ("planted", ["--rank", "4"], check_pod),
}


def test_every_registered_method_is_checked():
    assert set(CASES) == set(analyzer_classes())


@pytest.mark.parametrize("text, built_for_gpu", [
    ("cuda: Optional[str] = None\nhip: Optional[str] = None\n", False),
    ("cuda: Optional[str] = '12.4'\nhip: Optional[str] = None\n", True),
    ("cuda = None\nhip = '6.2.41133'\n", True),
    ("__version__ = '9.9'\n", True),  # a layout not understood: torch is asked
])
def test_gpu_build_is_read_from_torch_version_file(tmp_path, monkeypatch, text, built_for_gpu):
    """`--device auto` learns from torch/version.py, without importing torch, that a CPU build has no CUDA."""
    import importlib.util
    from types import SimpleNamespace

    (tmp_path / "version.py").write_text(text)
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name: SimpleNamespace(submodule_search_locations=[str(tmp_path)]))
    assert torch_built_for_gpu() is built_for_gpu
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)  # torch not installed
    assert torch_built_for_gpu() is False


@pytest.mark.parametrize("method", sorted(CASES))
def test_decompose_on_the_cpu_imports_no_torch(method, planted, kwm_case):
    fixture, options, check = CASES[method]
    store, W, reference = {"planted": planted, "kwm_case": kwm_case}[fixture]
    # auto is the CPU where there is no GPU (CI); where there is one, auto runs on it and imports torch for it.
    # How auto resolves does not depend on the method: one method checks it (a fresh process costs ~2 s)
    devices = ("auto", "cpu") if resolve_device("auto") == "cpu" and method == "cmd" else ("cpu",)
    summaries = {device: decompose_in_fresh_process(store, method, device, options) for device in devices}
    if "auto" in summaries:
        assert without_timings(summaries["auto"]) == without_timings(summaries["cpu"])
    reader = open_store(store.path)
    for device in devices:
        check(get_analyzer(method).load(reader, device), W, reference)
