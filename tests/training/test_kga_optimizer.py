"""Training-time KGA (paper 003 Eqs. 7-15, Alg. 1-2) against dense reference computations."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from cmdtool.errors import UsageError
from cmdtool.training import KGAOptimizer
from cmdtool.training.kga_optimizer import acceleration_operator, accelerate_update


# ---------------------------------------------------------------------------------------------- dense references
def dense_dmd(W: np.ndarray, rank: int):
    """Projected DMD by a full SVD of X (paper 003 Eqs. 5-9), eigenvalues ordered like dmd_from_gram's."""
    X, Y = W[:, :-1], W[:, 1:]
    U, s, Vh = np.linalg.svd(X, full_matrices=False)
    U, s, V = U[:, :rank], s[:rank], Vh[:rank].T
    atilde = U.T @ Y @ V / s[None, :]                                      # Eq. 7
    lam, Q = np.linalg.eig(atilde)                                          # Eq. 9
    order = np.lexsort((np.angle(lam), -np.abs(lam)))
    lam, Q = lam[order], Q[:, order]
    modes = U @ Q                                                           # projected modes Φ = X V Σ⁻¹ Q
    amplitudes = np.linalg.lstsq(modes, W[:, 0].astype(complex), rcond=None)[0]
    return U, atilde, lam, Q, modes, amplitudes


def dense_accelerated(delta: np.ndarray, U: np.ndarray, lam: np.ndarray, Q: np.ndarray, alpha: float, eps: float):
    """Eqs. 10-13 written out: Δw + U α Q_s Λ_s L_s Uᵀ Δw, L = Q⁻¹."""
    stable = np.abs(lam) < 1 - eps
    L = np.linalg.inv(Q)
    reduced = U.T @ delta
    boost = Q[:, stable] @ (lam[stable] * (L[stable] @ reduced))
    return delta + (U @ (alpha * boost)).real


def dense_kwm_masked(W, rank, eps, window, threshold):
    """Eq. 15: masked iff |Σ_{k not neutral} λ_kⁱ b_k Φ_jk| < τ for i in the last s steps of the window."""
    _, _, lam, _, modes, b = dense_dmd(W, rank)
    keep = np.abs(np.abs(lam) - 1) > eps
    steps = np.arange(W.shape[1] - window, W.shape[1])
    scores = np.abs(modes[:, keep] @ (b[keep, None] * lam[keep, None] ** steps[None, :]))
    return (scores < threshold).all(axis=1), scores


# ---------------------------------------------------------------------------------------------- helpers
class Planted:
    """A model whose "optimizer" moves the weights by prescribed updates: SGD with lr 1 and grad = −Δw."""

    def __init__(self, w0: np.ndarray):
        self.param = torch.nn.Parameter(torch.tensor(w0, dtype=torch.float32))
        self.optimizer = torch.optim.SGD([self.param], lr=1.0)

    def step(self, stepper, delta: np.ndarray) -> None:
        self.param.grad = -torch.tensor(delta, dtype=torch.float32)
        stepper.step()

    @property
    def w(self) -> np.ndarray:
        return self.param.detach().numpy().astype(np.float64)


def linear_system(n=40, seed=0, eigenvalues=(1.0, 0.8, 0.9 * np.exp(0.3j))):
    """w_t = Re Σ_k c_k λ_kᵗ φ_k: exact DMD data with known eigenvalues (conjugate pairs added for complex λ)."""
    rng = np.random.default_rng(seed)
    lams = []
    for lam in eigenvalues:
        lams += [lam, np.conj(lam)] if np.iscomplex(lam) else [lam]
    lams = np.array(lams, dtype=complex)
    phis = rng.normal(size=(n, len(lams))) + 0j
    for k, lam in enumerate(lams):
        if np.iscomplex(lam) and lam.imag < 0:
            phis[:, k] = np.conj(phis[:, k - 1])
        elif np.iscomplex(lam):
            phis[:, k] = rng.normal(size=n) + 1j * rng.normal(size=n)
    return lams, phis


def trajectory(lams, phis, n_cols):
    t = np.arange(n_cols)
    return (phis @ (lams[:, None] ** t[None, :])).real


def regression_data(seed: int, n: int = 256):
    """z = x² + y² on [-1, 1]², and the generator that orders the minibatches."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 2, generator=g) * 2 - 1
    return x, (x ** 2).sum(1, keepdim=True), g


def minibatch_steps(model, optimizer, stepper, x, y, generator, steps: int, batch: int = 32) -> None:
    for _ in range(steps):
        chosen = torch.randperm(len(x), generator=generator)[:batch]
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x[chosen]), y[chosen]).backward()
        stepper.step()


def train_regression(stepper_factory, optimizer_factory, epochs=6, steps=8, seed=0):
    """A tiny MLP regression; returns the final flat weights and the stepper."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    optimizer = optimizer_factory(model.parameters())
    stepper = stepper_factory(optimizer, model)
    x, y, g = regression_data(seed)
    for _ in range(epochs):
        minibatch_steps(model, optimizer, stepper, x, y, g, steps)
        if hasattr(stepper, "epoch_end"):
            stepper.epoch_end()
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]), stepper


OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.05),
    "momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
    "adam": lambda p: torch.optim.Adam(p, lr=0.01),
}


# ---------------------------------------------------------------------------------------------- Eq. 12
def test_eq12_scales_stable_components_by_one_plus_alpha_lambda():
    """Constructed spectrum: stable λ (a conjugate pair and a real one), neutral and unstable; in mode coordinates
    the stable components become (1 + αλ)·ŵ, the others and the complement of span(U) are untouched."""
    rng = np.random.default_rng(3)
    lam = np.array([0.9 * np.exp(0.15j), 0.9 * np.exp(-0.15j), 0.5, 1.0, 1.2])
    classes = np.array([0, 0, 0, 1, 2], dtype=np.int8)
    pair = rng.normal(size=5) + 1j * rng.normal(size=5)
    Q = np.column_stack([pair, pair.conj(), rng.normal(size=(5, 3))])          # Ã = Q Λ Q⁻¹ is real
    U = np.linalg.qr(rng.normal(size=(30, 5)))[0]
    delta = rng.normal(size=30)
    alpha = 2.5
    op = acceleration_operator(lam, Q, classes, alpha)
    assert np.abs((Q @ np.diag(lam) @ np.linalg.inv(Q)).imag).max() < 1e-12      # Ã is real
    new = accelerate_update(torch.tensor(delta), torch.tensor(U), torch.tensor(op)).numpy()
    L = np.linalg.inv(Q)
    before, after = L @ (U.T @ delta), L @ (U.T @ new)
    np.testing.assert_allclose(after[:3], (1 + alpha * lam[:3]) * before[:3], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(after[3:], before[3:], rtol=1e-10, atol=1e-12)
    complement = np.eye(30) - U @ U.T
    np.testing.assert_allclose(complement @ new, complement @ delta, atol=1e-12)
    # the literal Eq. 13 keeps only span(U)
    literal = accelerate_update(torch.tensor(delta), torch.tensor(U), torch.tensor(op), drop_complement=True)
    np.testing.assert_allclose(literal.numpy(), U @ (U.T @ new), atol=1e-12)


def test_fig3_example_moderate_alpha_hastens_decay_large_alpha_overshoots():
    """Fig. 3: λ = 0.9e^{0.15i}, ŵ = 1 before the update, unaccelerated change (λ − 1)ŵ. After Eq. 12 the mode is
    1 + (1 + αλ)(λ − 1): |·| = 0.9 at α = 0, smaller for moderate α, above 1 at α = 10 (overshoot)."""
    lam = 0.9 * np.exp(0.15j)
    A = np.array([[lam.real, -lam.imag], [lam.imag, lam.real]])                 # real Ã with eigenvalues λ, λ̄
    eigenvalues, Q = np.linalg.eig(A)
    Q = Q[:, np.argsort(-eigenvalues.imag)]
    eigenvalues = np.sort_complex(eigenvalues)[::-1]
    L = np.linalg.inv(Q)
    x = (Q @ np.array([1.0, 1.0])).real                                         # ŵ = 1 for λ (and 1 for λ̄)
    moduli = {}
    for alpha in (0.0, 1.0, 2.0, 5.0, 10.0):
        op = acceleration_operator(eigenvalues, Q, np.zeros(2, np.int8), alpha)
        delta = (A - np.eye(2)) @ x
        new = accelerate_update(torch.tensor(delta), torch.eye(2, dtype=torch.float64), torch.tensor(op)).numpy()
        mode = (L @ (x + new))[0]
        np.testing.assert_allclose(mode, 1 + (1 + alpha * lam) * (lam - 1), atol=1e-12)
        moduli[alpha] = abs(mode)
    assert moduli[0.0] == pytest.approx(0.9)
    assert moduli[1.0] == pytest.approx(0.81)                                   # λ²
    assert moduli[5.0] < moduli[2.0] < moduli[1.0] < 0.9                        # faster decay
    assert moduli[10.0] == pytest.approx(1.2139, abs=1e-4) and moduli[10.0] > 1  # overshoot amplifies


def test_step_equals_dense_eqs_7_to_13_on_planted_dynamics():
    """The first accelerated step of the wrapper equals Eqs. 7-13 computed with a dense SVD of the snapshots."""
    lams, phis = linear_system()
    n_cols = 7
    W = trajectory(lams, phis, n_cols)
    planted = Planted(W[:, 0])
    kga = KGAOptimizer(planted.optimizer, [planted.param], alpha=1.5, eps=0.02, rank=4, warmup=n_cols - 1, history=None)
    for t in range(1, n_cols):
        planted.step(kga, W[:, t] - W[:, t - 1])            # no acceleration during the warm-up
        kga.epoch_end()
    np.testing.assert_allclose(planted.w, W[:, -1], rtol=1e-5, atol=1e-6)
    Ws = np.stack([np.float32(W[:, t]).astype(np.float64) for t in range(n_cols)], 1)   # what was snapshot
    U, atilde, lam, Q, _, _ = dense_dmd(Ws, 4)
    np.testing.assert_allclose(kga.eigenvalues_, lam, rtol=1e-6)
    assert kga.fits_[-1]["classes"] == {"stable": 3, "neutral": 1, "unstable": 0}
    delta = np.random.default_rng(0).normal(size=W.shape[0])
    before = planted.w
    planted.step(kga, delta)
    expected = dense_accelerated(delta, U, lam, Q, 1.5, 0.02)
    np.testing.assert_allclose(planted.w - before, expected, rtol=2e-4, atol=2e-5)
    assert not np.allclose(expected, delta)                 # the acceleration did something


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_no_stable_mode_is_exactly_the_base_optimizer(name):
    """eps ≥ 1 leaves no stable mode (|λ| < 1 − eps is impossible): no acceleration, bit for bit (Sec. 3.2)."""
    base, _ = train_regression(lambda opt, model: opt, OPTIMIZERS[name])
    wrapped, kga = train_regression(lambda opt, model: KGAOptimizer(opt, model.named_parameters(), alpha=5.0, eps=1.0,
                                                           warmup=2), OPTIMIZERS[name])
    assert len(kga.fits_) == 5 and not any(f["accelerating"] for f in kga.fits_)
    assert torch.equal(base, wrapped)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_kga_changes_the_trajectory_with_every_base_optimizer(name):
    base, _ = train_regression(lambda opt, model: opt, OPTIMIZERS[name])
    wrapped, kga = train_regression(lambda opt, model: KGAOptimizer(opt, model.named_parameters(), alpha=1.0, warmup=2),
                                    OPTIMIZERS[name])
    assert any(f["accelerating"] for f in kga.fits_)
    assert torch.isfinite(wrapped).all() and not torch.equal(base, wrapped)


# ---------------------------------------------------------------------------------------------- Efficient-KGA
def _run_planted_subspace(efficient: bool, epochs=12):
    """Weights that stay in a fixed 3-D subspace (w_0 and two update directions; the updates follow a stable
    linear system), so U of the first fit spans every later snapshot and every accelerated update."""
    rng = np.random.default_rng(5)
    n = 60
    w0 = rng.normal(size=n)
    B = rng.normal(size=(n, 2))
    A = 0.85 * np.array([[np.cos(0.3), -np.sin(0.3)], [np.sin(0.3), np.cos(0.3)]])
    planted = Planted(w0)
    kga = KGAOptimizer(planted.optimizer, [planted.param], alpha=0.8, eps=0.02, rank=3, warmup=4, history=6,
              efficient=efficient)
    c = np.array([1.0, 0.5])
    atildes, eigenvalues = [], []
    for _ in range(epochs):
        for _ in range(3):
            c_next = A @ c
            planted.step(kga, B @ (c_next - c))
            c = c_next
        kga.epoch_end()
        atildes.append(kga.atilde_.copy())
        eigenvalues.append(kga.eigenvalues_.copy())
    return planted.w, kga, atildes, eigenvalues


def test_efficient_kga_equals_full_kga_when_u_spans_the_data():
    w_full, full, atilde_full, eig_full = _run_planted_subspace(False)
    w_eff, eff, atilde_eff, eig_eff = _run_planted_subspace(True)
    assert len(full.fits_) == len(eff.fits_) == 9 and all(f["accelerating"] for f in full.fits_)
    for a, b, la, lb in zip(atilde_full, atilde_eff, eig_full, eig_eff):
        np.testing.assert_allclose(lb, la, rtol=1e-5, atol=1e-6)
        # Ã is defined up to the signs of the singular vectors: equal up to D Ã D with D = diag(±1)
        signs = np.sign(np.diag(a)) * np.sign(np.diag(b))
        np.testing.assert_allclose(signs[:, None] * b * signs[None, :], a, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(w_eff, w_full, rtol=1e-5, atol=1e-5)
    # Efficient-KGA keeps U (N×r) and W̃ (r×t), not W (N×t)
    assert eff.memory_bytes()["snapshots"] == 0 and full.memory_bytes()["snapshots"] > 0
    assert eff.memory_bytes()["reduced_trajectories"] == 3 * 6 * 8


# ---------------------------------------------------------------------------------------------- masks
def _masked_run(mask, threshold, epochs=9, window=3, rank=3, alpha=0.5):
    """A real regression run with a mask; records the snapshots it saw so the test can recompute the mask."""
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
    kga = KGAOptimizer(optimizer, model.named_parameters(), alpha=alpha, eps=0.02, rank=rank, history=6, warmup=4,
              mask=mask, window=window, mask_threshold=threshold)
    x, y, g = regression_data(1)

    def flat():
        return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double().numpy()

    snapshots, masks = [flat()], [kga.mask_.numpy().copy()]
    for _ in range(epochs):
        minibatch_steps(model, optimizer, kga, x, y, g, 8)
        kga.epoch_end()
        snapshots.append(flat())
        masks.append(kga.mask_.numpy().copy())
    return np.stack(snapshots, 1), masks, kga


def _check_against_dense(W, masks, kga, dense_rule, history=6, warmup=4):
    """Replay Alg. 2: at each refit the rule is evaluated on the rows still in KGA over the window."""
    kept = np.ones(W.shape[0], bool)
    changed = 0
    for t in range(warmup, W.shape[1] - 1 + 1):
        window = W[kept][:, max(0, t + 1 - history):t + 1]
        newly = np.zeros(W.shape[0], bool)
        newly[np.flatnonzero(kept)] = dense_rule(window)
        kept &= ~newly
        np.testing.assert_array_equal(masks[t], kept, err_msg=f"mask after refit at snapshot {t}")
        changed += int(newly.any())
    assert changed >= 2, "the run should mask weights at several refits"
    assert 0 < 1 - kept.mean() < 1
    fractions = kga.masked_fractions()
    assert fractions["masked_fraction"] == pytest.approx(1 - kept.mean())
    sizes = [p.numel() for p in kga.params]
    per_tensor = np.split(~kept, np.cumsum(sizes)[:-1])
    for name, part in zip(kga.param_names, per_tensor):
        assert fractions["masked_per_tensor"][name] == pytest.approx(part.mean())
    assert [r["masked_fraction"] for r in kga.epoch_log_][-1] == pytest.approx(1 - kept.mean())


def test_kwm_mask_equals_dense_eq15():
    threshold = 0.008
    W, masks, kga = _masked_run("kwm", threshold)

    def rule(window):
        masked, scores = dense_kwm_masked(window, 3, 0.02, 3, threshold)
        margin = np.abs(scores.max(axis=1) - threshold).min(initial=np.inf)
        assert margin > 1e-6, "a score sits on the threshold: the comparison would be decided by roundoff"
        return masked

    _check_against_dense(W, masks, kga, rule)


def test_norm_mask_equals_dense_rule():
    threshold = 0.05
    W, masks, kga = _masked_run("norm", threshold)
    _check_against_dense(W, masks, kga, lambda window: np.abs(window[:, -1]) < threshold)


def test_delta_mask_equals_dense_rule():
    threshold = 2e-3
    W, masks, kga = _masked_run("delta", threshold)

    def rule(window):
        if window.shape[1] < 4:                                # needs s + 1 = 4 snapshots
            return np.zeros(window.shape[0], bool)
        return (np.abs(np.diff(window[:, -4:], axis=1)) < threshold).all(axis=1)

    _check_against_dense(W, masks, kga, rule)


def test_masked_weights_get_the_base_update_only():
    """After masking, a masked weight moves exactly as the base optimizer moves it."""
    W, masks, kga = _masked_run("norm", 0.05, epochs=7)
    masked = ~kga.mask_
    assert masked.any() and kga.fits_[-1]["accelerating"]
    before = torch.cat([p.detach().reshape(-1) for p in kga.params]).clone()
    base_state = copy.deepcopy(kga.optimizer.state_dict())
    for p in kga.params:
        p.grad = torch.ones_like(p)
    # what plain SGD+momentum would do from here, on a copy of the optimizer state
    shadow = [p.detach().clone().requires_grad_(True) for p in kga.params]
    shadow_opt = torch.optim.SGD(shadow, lr=0.1, momentum=0.5)
    shadow_opt.load_state_dict(base_state)
    for q in shadow:
        q.grad = torch.ones_like(q)
    shadow_opt.step()
    kga.step()
    after = torch.cat([p.detach().reshape(-1) for p in kga.params])
    plain = torch.cat([q.detach().reshape(-1) for q in shadow])
    assert torch.equal(after[masked], plain[masked])
    assert not torch.allclose(after[~masked], plain[~masked])
    assert not torch.equal(after, before)


# ---------------------------------------------------------------------------------------------- KGA-Iter, state
def test_kga_iter_refits_every_k_steps():
    _, kga = train_regression(lambda opt, model: KGAOptimizer(opt, model.named_parameters(), every=4, warmup=3),
                              OPTIMIZERS["sgd"], epochs=3, steps=8)
    assert [f["step"] for f in kga.fits_] == [12, 16, 20, 24]
    assert len(kga.epoch_log_) == 3 and kga.epoch_log_[-1]["step"] == 24


@pytest.mark.parametrize("config", [dict(), dict(efficient=True), dict(mask="kwm", mask_threshold=0.01),
                                    dict(every=3, history=None)])
def test_state_dict_round_trip_resumes_exactly(tmp_path, config):
    """Train 4 epochs, save model/optimizer/KGA with torch.save, rebuild everything from the files and train 4
    more: identical to 8 uninterrupted epochs, bit for bit."""
    def make(seed=0):
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
        return model, opt, KGAOptimizer(opt, model.named_parameters(), alpha=1.0, warmup=2, **config)

    x = torch.rand(128, 2, generator=torch.Generator().manual_seed(0))
    y = x.sum(1, keepdim=True) ** 2

    def epochs(model, opt, kga, first, last):
        for epoch in range(first, last):
            minibatch_steps(model, opt, kga, x, y, torch.Generator().manual_seed(epoch), 4)
            kga.epoch_end()

    model, opt, kga = make()
    epochs(model, opt, kga, 0, 8)
    reference = [p.detach().clone() for p in model.parameters()]

    model, opt, kga = make()
    epochs(model, opt, kga, 0, 4)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "kga": kga.state_dict()}, tmp_path / "c.pt")
    del model, opt, kga
    model, opt, kga = make(seed=123)                       # different init: everything must come from the file
    saved = torch.load(tmp_path / "c.pt", weights_only=True)
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    kga.load_state_dict(saved["kga"])
    epochs(model, opt, kga, 4, 8)
    for p, q in zip(model.parameters(), reference):
        assert torch.equal(p.detach(), q)
    assert any(f["accelerating"] for f in kga.fits_)


def test_load_state_dict_refuses_other_settings():
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    state = KGAOptimizer(opt, model.named_parameters(), alpha=1.0).state_dict()
    with pytest.raises(UsageError, match="alpha"):
        KGAOptimizer(opt, model.named_parameters(), alpha=2.0).load_state_dict(state)


@pytest.mark.parametrize("kwargs, message", [
    (dict(every="iter"), "every"), (dict(every=0), "every"), (dict(history=1), "history"),
    (dict(mask="magnitude", mask_threshold=1.0), "mask"), (dict(mask="kwm"), "mask_threshold"),
    (dict(mask="kwm", mask_threshold=0.1, efficient=True), "efficient"), (dict(window=0), "window"),
    (dict(rank="x"), "rank"), (dict(eps=-1), "eps"),
])
def test_bad_settings_are_one_line_usage_errors(kwargs, message):
    model = torch.nn.Linear(2, 1)
    with pytest.raises(UsageError, match=message):
        KGAOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model.parameters(), **kwargs)


def test_the_default_keeps_the_whole_history_as_the_paper_does():
    """Paper 003 keeps every snapshot (W_i grows with training); the window is an option."""
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    kga = KGAOptimizer(opt, model.parameters(), warmup=1)
    for _ in range(12):
        opt.zero_grad()
        model(torch.ones(2, 3)).sum().backward()
        kga.step()
        kga.epoch_end()
    assert kga.history is None and kga.fits_[-1]["snapshots"] == 13  # w_0 and one per epoch, none dropped


def test_memory_report_counts_what_is_held():
    model = torch.nn.Linear(100, 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    kga = KGAOptimizer(opt, model.parameters(), history=5)
    memory = kga.memory_bytes()
    assert memory["snapshots"] == 1010 * 5 * 4 + 5 * 5 * 8
    assert memory["total"] == sum(v for k, v in memory.items() if k != "total")


RESUMABLE_RUN = r"""
import os, signal, sys
import torch
from cmdtool.training import KGAOptimizer

folder, kill_at = sys.argv[1], int(sys.argv[2])
torch.set_num_threads(1)
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
kga = KGAOptimizer(opt, model.named_parameters(), alpha=1.0, warmup=3, history=5, mask="kwm", mask_threshold=0.005)
x = torch.rand(256, 2, generator=torch.Generator().manual_seed(0)) * 2 - 1
y = (x ** 2).sum(1, keepdim=True)
path, first = os.path.join(folder, "last.pt"), 0
if os.path.exists(path):                              # resume from the last completed epoch
    saved = torch.load(path, weights_only=True)
    model.load_state_dict(saved["model"]); opt.load_state_dict(saved["opt"]); kga.load_state_dict(saved["kga"])
    first = saved["epoch"]
for epoch in range(first, 10):
    g = torch.Generator().manual_seed(epoch)          # the data order depends on the epoch only
    for s in range(8):
        if kga.steps_ == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        batch = torch.randperm(256, generator=g)[:32]
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x[batch]), y[batch]).backward()
        kga.step()
    kga.epoch_end()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "kga": kga.state_dict(), "epoch": epoch + 1},
               path + ".tmp")
    os.replace(path + ".tmp", path)                   # atomic: a kill leaves the previous epoch's file
"""


@pytest.mark.slow
def test_resume_after_sigkill_equals_an_uninterrupted_run(tmp_path):
    """A run killed (SIGKILL) in the middle of epoch 6 and restarted from its last per-epoch save ends with the
    same weights, optimizer state and KGA state (mask, fits) as a run that was never interrupted."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    (tmp_path / "whole").mkdir()
    (tmp_path / "killed").mkdir()

    def start(folder, kill_at):
        return subprocess.Popen([sys.executable, "-c", RESUMABLE_RUN, str(folder), str(kill_at)], env=env)

    whole, killed = start(tmp_path / "whole", -1), start(tmp_path / "killed", 5 * 8 + 3)
    assert whole.wait() == 0
    assert killed.wait() == -9
    assert torch.load(tmp_path / "killed" / "last.pt", weights_only=True)["epoch"] == 5
    assert start(tmp_path / "killed", -1).wait() == 0
    a = torch.load(tmp_path / "whole" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "killed" / "last.pt", weights_only=True)
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key])
    assert_same(a, b)
    fits = a["kga"]["fits"]
    assert len(fits) == 8 and any(f["accelerating"] for f in fits) and fits[-1]["masked_fraction"] > 0
    assert a["kga"]["kept"] is not None and a["opt"]["state"]


def assert_same(a, b, where="state"):
    """Equal nested states (tensors bit for bit); wall-clock seconds are the only thing allowed to differ."""
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            if "seconds" not in str(key):
                assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for k, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{k}]")
    else:
        assert a == b, where


def test_diverged_weights_stop_acceleration_instead_of_raising():
    """NaN weights (a diverged run) in the window: the refit fits nothing and the steps are the base optimizer's."""
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    kga = KGAOptimizer(opt, model.named_parameters(), warmup=1, history=3, rank=-1)
    for epoch in range(6):
        if epoch == 2:
            with torch.no_grad():
                model.weight[0, 0] = float("nan")
        opt.zero_grad()
        model(torch.ones(2, 3)).sum().backward()
        kga.step()
        kga.epoch_end()
    assert [f["fitted"] for f in kga.fits_] == [True, True, False, False, False, False]
    assert not any(f["accelerating"] for f in kga.fits_[2:])


def test_efficient_kga_waits_for_a_finite_window():
    """A window holding NaN cannot fix Efficient-KGA's basis: it keeps the snapshots and starts later."""
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    kga = KGAOptimizer(opt, model.named_parameters(), warmup=1, history=2, rank=-1, efficient=True)
    for epoch in range(5):
        with torch.no_grad():
            model.bias[0] = float("nan") if epoch == 0 else 0.1 * epoch
        opt.zero_grad()
        model(torch.ones(2, 3)).sum().backward()
        kga.step()
        kga.epoch_end()
    assert [f["fitted"] for f in kga.fits_] == [False, False, True, True, True]
    assert kga.memory_bytes()["snapshots"] == 0 and kga.memory_bytes()["reduced_trajectories"] > 0
