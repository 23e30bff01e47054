"""Embedded CMD (paper 000, Sec. 3.4, Alg. 4, Eqs. 11-12) and drift tracking of online models."""

from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from cmdtool.analyzers.cmd.drift import CMDDriftWarning, assess_drift
from cmdtool.analyzers.cmd.online import OnlineCMD
from cmdtool.errors import UsageError
from cmdtool.training import EmbeddedCMD, GradualEmbedding, exponential_decay, halve_above, linear_decay

F, L = 6, 3


# ---------------------------------------------------------------------------------------------- constructed run
def planted_run(n_per_mode: int = 100, epochs: int = F + 2 * L, seed: int = 0):
    """Two planted modes; row i is exactly a_i r_m + b_i during the warm-up, then drifts by d_i (t − F).

    Returns W (N x T float32), each row's mode, a_i and its drift d_i (all distinct). Against the reference
    row k of its mode (itself drifting), row i drifts by e_i = d_i − (a_i / a_k) d_k, and Eq. 9's change of
    (a_i, b_i) is e_i times a per-mode vector: Diff_i ∝ |e_i|, a known order within a mode."""
    rng = np.random.default_rng(seed)
    t = np.arange(epochs)
    references = np.stack([np.cumsum(rng.normal(size=epochs)) + 3, np.sin(t / 2.0) * 4 + t])
    n = 2 * n_per_mode
    mode = np.repeat([0, 1], n_per_mode)
    a = rng.uniform(0.5, 2.0, n) * rng.choice([-1, 1], n)
    b = rng.normal(size=n)
    drift = (rng.permutation(n) + 1) * 1e-3
    W = a[:, None] * references[mode] + b[:, None] + drift[:, None] * np.clip(t - (F - 1), 0, None)[None, :]
    return W.astype(np.float32), mode, a, drift


def as_state(column: np.ndarray) -> dict:
    return {"layer.weight": torch.from_numpy(column[:150].reshape(15, 10).copy()),
            "layer.bias": torch.from_numpy(column[150:].copy())}


def lstsq_coefficients(W, references, mode, t):
    """Eq. 6 over epochs 1..t for each row against its mode's reference, by a generic solver."""
    a, b = np.zeros(len(W)), np.zeros(len(W))
    for i in range(len(W)):
        design = np.vstack([references[mode[i], :t], np.ones(t)]).T
        (a[i], b[i]), *_ = np.linalg.lstsq(design, W[i, :t].astype(np.float64), rcond=None)
    return a, b


def dense_alg4(W, mode, reference_rows, fraction, relative=False):
    """Alg. 4 written densely: batch least squares at every embedding epoch, Diff, bottom-P selection."""
    n = len(W)
    references = W[reference_rows].astype(np.float64)
    a_old, b_old = lstsq_coefficients(W, references, mode, F)
    embedded = np.zeros(n, dtype=bool)
    chosen_per_step = []
    for t in range(F + L, W.shape[1] + 1, L):
        a, b = lstsq_coefficients(W, references, mode, t)
        a[embedded], b[embedded] = a_old[embedded], b_old[embedded]
        diff = np.sqrt((a - a_old) ** 2 + (b - b_old) ** 2)
        a_old, b_old = a, b
        candidates = np.flatnonzero(~embedded & ~np.isin(np.arange(n), reference_rows))
        count = math.ceil(fraction * ((n - embedded.sum()) if relative else n))
        chosen = np.sort(candidates[np.argsort(diff[candidates], kind="stable")[:count]])
        embedded[chosen] = True
        chosen_per_step.append(chosen)
    return chosen_per_step


@pytest.mark.parametrize("relative", [False, True])
def test_embedding_rule_equals_dense_alg4_and_follows_the_known_diff_order(relative):
    W, planted_mode, planted_a, drift = planted_run()
    plan = GradualEmbedding(modes=2, warmup=F, every=L, fraction=0.15, relative=relative, samples=200)
    steps = [s for t in range(W.shape[1]) if (s := plan.observe(as_state(W[:, t]))) is not None]
    assert [s.epoch for s in steps] == [F + L, F + 2 * L]
    # the warm-up clustering recovers the planted modes (up to their numbering)
    mode = plan.mode
    assert len(np.unique(mode)) == 2 and all(len(np.unique(mode[planted_mode == m])) == 1 for m in (0, 1))
    expected = dense_alg4(W, mode, plan.reference_rows, 0.15, relative)
    for step, want in zip(steps, expected):
        np.testing.assert_array_equal(step.rows, want)
    assert len(steps[0].rows) == 30 and len(steps[1].rows) == (math.ceil(0.15 * 170) if relative else 30)
    # known order: within a mode Diff_i ∝ |e_i|, so the first step embeds, per mode, a prefix of the |e| order
    split = 0
    for m in (0, 1):
        k = plan.reference_rows[m]
        in_mode = np.flatnonzero((mode == m) & ~np.isin(np.arange(len(W)), plan.reference_rows))
        effective = np.abs(drift[in_mode] - planted_a[in_mode] / planted_a[k] * drift[k])
        chosen = np.isin(in_mode, steps[0].rows)
        if chosen.any() and (~chosen).any():
            assert effective[chosen].max() < effective[~chosen].min()
            split += 1
    assert split >= 1
    # embedded coefficients are frozen at their embedding epoch's values (Eq. 9 fit over 1..t)
    a_t, b_t = lstsq_coefficients(W, W[plan.reference_rows].astype(np.float64), mode, F + L)
    np.testing.assert_allclose(steps[0].a, a_t[steps[0].rows], rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(steps[0].b, b_t[steps[0].rows], rtol=1e-6, atol=1e-7)
    a_now, b_now = plan.coefficients()
    np.testing.assert_array_equal(a_now[steps[0].rows], steps[0].a)
    np.testing.assert_array_equal(b_now[steps[0].rows], steps[0].b)


def test_references_are_never_embedded_even_when_everything_else_is():
    W, *_ = planted_run(epochs=F + 4 * L)
    plan = GradualEmbedding(modes=2, warmup=F, every=L, fraction=0.5, samples=200)
    for t in range(W.shape[1]):
        plan.observe(as_state(W[:, t]))
    assert not plan.embedded[plan.reference_rows].any()
    assert plan.embedded.sum() == len(W) - len(plan.reference_rows)
    assert plan.trained_fraction() == pytest.approx(len(plan.reference_rows) / len(W))


def test_schedules_follow_app_e2_and_f1():
    assert [linear_decay(4)(k, 0.0, None, 0.2) for k in range(5)] == pytest.approx([0.2, 0.15, 0.1, 0.05, 0.0])
    assert [exponential_decay(0.5)(k, 0.0, None, 0.2) for k in range(3)] == pytest.approx([0.2, 0.1, 0.05])
    rule = halve_above(0.8)
    assert rule(3, 0.75, 0.05, 0.05) == 0.05 and rule(4, 0.85, 0.05, 0.05) == 0.025
    W, *_ = planted_run(epochs=F + 4 * L)
    plan = GradualEmbedding(modes=2, warmup=F, every=L, fraction=0.3, samples=200, schedule=exponential_decay(0.5))
    counts = [len(s.rows) for t in range(W.shape[1]) if (s := plan.observe(as_state(W[:, t]))) is not None]
    assert counts == [60, 30, 15, 8]  # ceil(P_k * 200) with P_k = 0.3 / 2^k


# ---------------------------------------------------------------------------------------------- a live model
def tiny_task(seed: int = 0):
    """A small MLP with a BatchNorm on a fixed random classification task."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(96, 8, generator=generator)
    y = (x[:, :3].argmax(dim=1) + (x[:, 3] > 1).long()) % 3
    return model, x, y


def train_epoch(model, optimizer, x, y, generator, after_step=None):
    model.train()
    order = torch.randperm(len(y), generator=generator)
    for start in range(0, len(y), 32):
        batch = order[start:start + 32]
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
        optimizer.step()
        if after_step is not None:
            after_step()


def expected_embedded_values(cmd: EmbeddedCMD) -> dict:
    """a_i r_m + b_i in float32 (two roundings), from the frozen coefficients and the references' values now."""
    frozen = cmd.frozen
    references = frozen.reference_values().numpy()
    out = {}
    for name in frozen.parts:
        flat, a, b, ref = frozen.coefficients(name)
        out[name] = (flat, a * references[ref] + b)
    return out


CUDA = pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                          reason="no CUDA device")])


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("optimizer_kind", ["sgd-momentum-wd", "adamw"])
def test_step_freeze_keeps_embedded_weights_exactly_on_the_cmd_model_and_untrained(optimizer_kind, device):
    model, x, y = tiny_task()
    model, x, y = model.to(device), x.to(device), y.to(device)
    if optimizer_kind == "adamw":
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    cmd = EmbeddedCMD(model, modes=3, warmup=4, every=2, fraction=0.2, samples=100, optimizer=optimizer,
                      freeze="step")
    generator = torch.Generator().manual_seed(1)
    checks = []

    def check():
        if cmd.frozen is None or not cmd.frozen.parts:
            return
        params = dict(model.named_parameters())
        for name, (flat, want) in expected_embedded_values(cmd).items():
            index = torch.as_tensor(flat, device=device)
            got = params[name].detach().reshape(-1)[index].cpu().numpy()
            np.testing.assert_array_equal(got, want.astype(np.float32))
            assert torch.all(params[name].grad.reshape(-1)[index] == 0)  # their gradient is never applied
        checks.append(1)

    for epoch in range(12):
        train_epoch(model, optimizer, x, y, generator, after_step=check)
        cmd.on_epoch_end(epoch)
    assert len(checks) > 10
    assert cmd.trained_fraction() < 0.5
    # no embedded weight is a reference, and the trained share is what the history says
    plan = cmd.plan
    assert not plan.embedded[plan.reference_rows].any()
    n_params = sum(p.numel() for p in model.parameters())
    per_step = math.ceil(0.2 * n_params)  # basic P: a share of all trainable weights, every L epochs
    assert cmd.history_[-1]["trained_fraction"] == pytest.approx(1 - 3 * per_step / n_params)  # during epoch 12
    masks = cmd.embedded_mask()
    assert sum(int(m.sum()) for m in masks.values()) == plan.embedded.sum() == 4 * per_step


def embedded_sgd_run(epochs: int, every: int, seed: int, after_epoch=None, freeze: str = "epoch"):
    """The tiny task with SGD + momentum and EmbeddedCMD(F=3, P=30%) for ``epochs`` epochs."""
    model, x, y = tiny_task()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    cmd = EmbeddedCMD(model, modes=3, warmup=3, every=every, fraction=0.3, samples=100, optimizer=optimizer,
                      freeze=freeze)
    generator = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        train_epoch(model, optimizer, x, y, generator)
        cmd.on_epoch_end(epoch)
        if after_epoch is not None:
            after_epoch(model, optimizer, cmd)
    return model, cmd


def test_step_freeze_momentum_state_of_embedded_weights_is_zero_and_stays_zero():
    def check(model, optimizer, cmd):
        for name, mask in cmd.embedded_mask().items():
            buffer = optimizer.state[dict(model.named_parameters())[name]]["momentum_buffer"]
            assert torch.all(buffer[mask] == 0)

    _, cmd = embedded_sgd_run(6, every=1, seed=2, after_epoch=check, freeze="step")
    assert cmd.embedded_mask()


def run_with_resume(stop_at: int | None, path, freeze: str, epochs: int = 10):
    """Train ``epochs`` epochs; with ``stop_at``, save everything at that epoch, drop every object, and go on
    from the file alone (what a killed run does)."""
    def fresh():
        model, x, y = tiny_task()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        cmd = EmbeddedCMD(model, modes=3, warmup=3, every=2, fraction=0.25, samples=100, optimizer=optimizer,
                          freeze=freeze)
        return model, optimizer, cmd, x, y, torch.Generator().manual_seed(3)

    model, optimizer, cmd, x, y, generator = fresh()
    for epoch in range(epochs):
        if stop_at is not None and epoch == stop_at:
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "embedded_cmd": cmd.state_dict(), "generator": generator.get_state()}, path)
            cmd.close()
            del model, optimizer, cmd
            model, optimizer, cmd, x, y, generator = fresh()
            saved = torch.load(path, weights_only=True)  # plain tensors and values only
            model.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
            cmd.load_state_dict(saved["embedded_cmd"])
            generator.set_state(saved["generator"])
        train_epoch(model, optimizer, x, y, generator)
        cmd.on_epoch_end(epoch)
    return model, cmd


@pytest.mark.parametrize("freeze", ["epoch", "step"])
@pytest.mark.parametrize("stop_at", [2, 6])  # inside the warm-up; after two embedding epochs
def test_resume_from_saved_state_equals_an_uninterrupted_run(stop_at, freeze, tmp_path):
    model_a, cmd_a = run_with_resume(None, tmp_path / "unused.pt", freeze)
    model_b, cmd_b = run_with_resume(stop_at, tmp_path / "ckpt.pt", freeze)
    for (name, value_a), value_b in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        assert torch.equal(value_a, value_b), name
    assert cmd_a.history_ == cmd_b.history_
    np.testing.assert_array_equal(cmd_a.plan.embedded, cmd_b.plan.embedded)
    for got, want in zip(cmd_b.plan.coefficients(), cmd_a.plan.coefficients()):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("freeze", ["epoch", "step"])
def test_cmd_model_state_dict_loads_strictly_and_is_exact_on_embedded_weights(freeze):
    """The CMD model's embedded entries are a_i r_m + b_i to the last bit. The run ends on an embedding decision
    (F = 3, L = 2: decisions after epochs 5 and 7): with freeze="step" the model holds every embedded weight
    there already; with freeze="epoch" (Alg. 4's order) those chosen at the last decision still hold their
    trained values, the earlier ones are tied."""
    masks = []
    model, cmd = embedded_sgd_run(7, every=2, seed=4, freeze=freeze,
                                  after_epoch=lambda m, o, c: masks.append(c.embedded_mask()))
    state = cmd.cmd_state_dict()
    fresh, _, _ = tiny_task(1)
    fresh.load_state_dict(state, strict=True)
    live = model.state_dict()
    untied = 0
    for name, (flat, want) in expected_embedded_values(cmd).items():
        index = torch.as_tensor(flat)
        want = torch.from_numpy(want.astype(np.float32))
        assert torch.equal(state[name].reshape(-1)[index], want)
        earlier = masks[-2][name].reshape(-1)[index] if name in masks[-2] else torch.zeros(len(flat), dtype=bool)
        assert torch.equal(live[name].reshape(-1)[index][earlier], want[earlier])
        untied += int((live[name].reshape(-1)[index] != want).sum())
    newly = cmd.history_[-1]["embedded_now"]
    assert newly > 0
    if freeze == "step":
        assert untied == 0
    else:
        assert 0 < untied <= newly


@pytest.mark.parametrize("reference_gradient", ["own", "mode", "projection"])
def test_epoch_freeze_trains_embedded_weights_inside_the_epoch_and_ties_them_at_its_end(reference_gradient):
    """freeze="epoch" (Alg. 4, the default): during an epoch every weight but the references takes exactly the
    optimizer's step on its own gradient (the references too unless reference_gradient="mode"); at the epoch's end
    the weights embedded before it equal a_i r_m + b_i, with r_m the references' trained values, and those
    chosen at this epoch's decision keep their trained values until the next epoch's end (Alg. 4: the Eq. 11
    line precedes the decision in the loop)."""
    model, x, y = tiny_task()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    cmd = EmbeddedCMD(model, modes=3, warmup=3, every=1, fraction=0.3, samples=100,
                      optimizer=optimizer if reference_gradient == "mode" else None,  # the others hook nothing
                      reference_gradient=reference_gradient)
    references = {}
    twin, _, _ = tiny_task()  # a plain copy, synced before each step and stepped with the same batch and rule
    twin_optimizer = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    generator = torch.Generator().manual_seed(5)
    moved = references_differed = chosen_now = 0
    for epoch in range(6):
        order = torch.randperm(len(y), generator=generator)
        model.train(), twin.train()
        for start in range(0, len(y), 32):
            batch = order[start:start + 32]
            twin.load_state_dict(model.state_dict())
            twin_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))  # its own momentum buffers
            for net, opt in ((model, optimizer), (twin, twin_optimizer)):
                opt.zero_grad()
                nn.functional.cross_entropy(net(x[batch]), y[batch]).backward()
                opt.step()
            for (name, p), q in zip(model.named_parameters(), twin.parameters()):
                keep = ~references[name] if name in references else torch.ones_like(p, dtype=torch.bool)
                assert torch.equal(p[keep], q[keep]), name  # embedded weights are trained like the others
                references_differed += int(not torch.equal(p, q))
        before_tie = {n: p.detach().clone() for n, p in model.named_parameters()}
        tied_before = cmd.embedded_mask()
        cmd.on_epoch_end(epoch)
        if cmd.frozen is not None and reference_gradient == "mode":  # references step on the mode's gradient
            references = {n: _reference_mask(cmd, n) for n, _ in model.named_parameters()}
        params = dict(model.named_parameters())
        for name, (flat, want) in expected_embedded_values(cmd).items() if cmd.frozen else []:
            index = torch.as_tensor(flat)
            got = params[name].detach().reshape(-1)[index].numpy()
            trained = before_tie[name].reshape(-1)[index].numpy()
            want = want.astype(np.float32)
            was = tied_before[name].reshape(-1)[index].numpy() if name in tied_before else np.zeros(len(flat), bool)
            np.testing.assert_array_equal(got[was], want[was])  # tied at the epoch's end (Eq. 11)
            np.testing.assert_array_equal(got[~was], trained[~was])  # chosen now: tied from the next epoch's end
            moved += int((trained[was] != want[was]).sum())
            chosen_now += int((~was).sum())
        for name, mask in cmd.embedded_mask().items():  # the others keep the optimizer's values
            keep = ~mask & ~_reference_mask(cmd, name) if reference_gradient == "projection" else ~mask
            assert torch.equal(params[name].detach()[keep], before_tie[name][keep])  # (the projection moves r_m)
    assert cmd.plan.embedded.sum() > 0 and moved > 0  # the embedded weights had left a r + b within the epoch
    assert chosen_now > 0
    assert (references_differed > 0) == (reference_gradient == "mode")


def _dense_projection(cmd, trained: np.ndarray, offsets: bool = True) -> np.ndarray:
    """r_m* = (w_m + Σ_{i∈E_m} a_i (w_i − b_i)) / (1 + Σ_{i∈E_m} a_i²) from a flat float64 vector, with the
    float32 coefficients as applied (E_m: the rows embedded so far); ``offsets=False`` leaves out b_i, which
    maps gradients to the mode's scaled chain-rule gradient."""
    plan = cmd.plan
    rows = np.flatnonzero(plan.embedded)
    a = plan.a_old[rows].astype(np.float32).astype(np.float64)
    b = plan.b_old[rows].astype(np.float32).astype(np.float64) if offsets else np.zeros(len(rows))
    mode = plan.mode[rows].astype(np.int64)
    out = trained[plan.reference_rows].copy()
    for m in range(len(out)):
        m_rows = mode == m
        out[m] = (out[m] + np.sum(a[m_rows] * (trained[rows[m_rows]] - b[m_rows]))) / (1 + np.sum(a[m_rows] ** 2))
    return out


def test_projection_ties_each_mode_at_the_least_squares_point_of_its_line():
    """reference_gradient="projection" (freeze="epoch"): at an epoch's end each reference becomes the
    least-squares point of its mode's line, r_m* = (w_m + Σ a_i (w_i − b_i)) / (1 + Σ a_i²) over the embedded
    weights as trained, and those weights a_i r_m* + b_i (Eq. 11), exactly; rows chosen at this epoch's decision
    keep their trained values, and the optimizer's momentum buffers are left as they are."""
    model, x, y = tiny_task()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    cmd = EmbeddedCMD(model, modes=3, warmup=3, every=1, fraction=0.3, samples=100,
                      reference_gradient="projection")  # no optimizer: nothing is hooked
    generator = torch.Generator().manual_seed(5)
    moved = 0
    for epoch in range(7):
        train_epoch(model, optimizer, x, y, generator)
        tied_before = cmd.embedded_mask()
        if tied_before:
            trained = cmd.plan.layout.flatten(model.state_dict()).double().numpy()
            want = _dense_projection(cmd, trained)
        buffers = [optimizer.state[p]["momentum_buffer"].clone() for p in model.parameters()]
        cmd.on_epoch_end(epoch)
        assert all(torch.equal(optimizer.state[p]["momentum_buffer"], buffer)
                   for p, buffer in zip(model.parameters(), buffers))
        if not tied_before:
            continue
        references = cmd.frozen.reference_values().numpy()
        np.testing.assert_array_equal(references, want.astype(np.float32))
        moved += int(np.sum(references != trained[cmd.plan.reference_rows].astype(np.float32)))
        params = dict(model.named_parameters())
        for name, (flat, tied) in expected_embedded_values(cmd).items():
            index = torch.as_tensor(flat)
            got = params[name].detach().reshape(-1)[index].numpy()
            was = tied_before[name].reshape(-1)[index].numpy() if name in tied_before else np.zeros(len(flat), bool)
            np.testing.assert_array_equal(got[was], tied[was].astype(np.float32))
            np.testing.assert_array_equal(got[~was], trained[cmd.plan.layout.rows_of([name])][flat][~was]
                                          .astype(np.float32))
    assert moved > 0


def test_projection_moves_references_by_the_epochs_scaled_mode_gradients_under_plain_sgd():
    """With plain SGD from a tied state, the projection's change of r_m over an epoch is −η Σ_k g_m,k with
    g_m = (∂L/∂r_m + Σ_{i∈E_m} a_i ∂L/∂w_i) / (1 + Σ a_i²) at the weights as trained (Alg. 4's per-epoch
    semantics, every weight on its own gradient, with the tie consistent with the mode)."""
    model, x, y = tiny_task()
    lr = 0.1
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    cmd = EmbeddedCMD(model, modes=3, warmup=3, every=2, fraction=0.3, samples=100,
                      reference_gradient="projection")
    generator = torch.Generator().manual_seed(3)
    for epoch in range(6):  # decisions at epochs 5 and 7 (1-based): the tie at 6 starts a tied epoch 7
        train_epoch(model, optimizer, x, y, generator)
        cmd.on_epoch_end(epoch)
    start = cmd.frozen.reference_values().double().numpy()
    state = model.state_dict()
    summed = np.zeros(len(start))

    def record(*_):
        grads = {n: p.grad for n, p in model.named_parameters()}
        flat = cmd.plan.layout.flatten({n: grads.get(n, t) for n, t in state.items()}).double().numpy()
        summed[:] += _dense_projection(cmd, flat, offsets=False)

    hook = optimizer.register_step_pre_hook(record)
    train_epoch(model, optimizer, x, y, generator)
    hook.remove()
    cmd.on_epoch_end(6)
    np.testing.assert_allclose(cmd.frozen.reference_values().double().numpy(), start - lr * summed,
                               rtol=0, atol=1e-7)


def test_step_freeze_gives_references_the_scaled_chain_rule_gradient():
    """freeze="step": before a step, g_m = (∂L/∂r_m + Σ a_i ∂L/∂w_i) / (1 + Σ a_i²) over the embedded weights
    of mode m, and 0 for embedded entries; with plain SGD the tied weights then take the orthogonal projection
    of the untied SGD step onto their mode's direction (1, a_i ...)."""
    model, cmd = embedded_sgd_run(5, every=1, seed=6, freeze="step")
    frozen = cmd.frozen
    params = dict(model.named_parameters())
    gradients = {n: torch.randn(p.shape, generator=torch.Generator().manual_seed(k), dtype=torch.float32)
                 for k, (n, p) in enumerate(params.items())}
    for n, p in params.items():
        p.grad = gradients[n].clone()
    frozen.tie_gradients()
    # the same from the plan's rows, densely, in float64
    plan = cmd.plan
    flat_grad = plan.layout.flatten({n: gradients.get(n, t) for n, t in model.state_dict().items()}).double()
    rows = np.flatnonzero(plan.embedded)
    a = plan.a_old[rows].astype(np.float32).astype(np.float64)
    mode = plan.mode[rows].astype(np.int64)
    for m, ref_row in enumerate(plan.reference_rows):
        in_mode = mode == m
        want = (flat_grad[ref_row] + np.sum(a[in_mode] * flat_grad.numpy()[rows[in_mode]])) / (
            1 + np.sum(a[in_mode] ** 2))
        got = plan.layout.flatten({n: (params[n].grad if n in params else t) for n, t in
                                   model.state_dict().items()})[ref_row]
        assert float(got) == pytest.approx(float(want), rel=1e-5)
    for name, mask in cmd.embedded_mask().items():
        assert torch.all(params[name].grad[mask] == 0)
        assert torch.equal(params[name].grad[~mask & ~_reference_mask(cmd, name)],
                           gradients[name][~mask & ~_reference_mask(cmd, name)])


def _reference_mask(cmd, name):
    mask = torch.zeros(dict(cmd.model.named_parameters())[name].shape, dtype=torch.bool)
    which, flat = cmd.plan.layout.locate(cmd.plan.reference_rows)
    for entry_pos, index in zip(which, flat):
        if cmd.plan.layout.entries[entry_pos].name == name:
            mask.view(-1)[int(index)] = True
    return mask


def test_without_an_optimizer_only_epoch_freeze_with_own_or_projection_is_allowed():
    model, _, _ = tiny_task()
    for freeze, reference_gradient in (("step", "mode"), ("step", "own"), ("epoch", "mode")):
        with pytest.raises(UsageError, match="optimizer"):
            EmbeddedCMD(model, modes=3, warmup=3, freeze=freeze, reference_gradient=reference_gradient)
    EmbeddedCMD(model, modes=3, warmup=3, reference_gradient="own")
    EmbeddedCMD(model, modes=3, warmup=3, reference_gradient="projection")
    with pytest.raises(UsageError, match="reference_gradient"):
        EmbeddedCMD(model, modes=3, warmup=3, reference_gradient="partial")
    with pytest.raises(UsageError, match="freeze='epoch'"):  # the projection is the tie at the epoch's end
        EmbeddedCMD(model, modes=3, warmup=3, freeze="step", reference_gradient="projection",
                    optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(UsageError, match="freeze"):
        EmbeddedCMD(model, modes=3, warmup=3, freeze="batch")


# ---------------------------------------------------------------------------------------------- drift
def test_assess_drift_finds_the_first_epoch_past_the_factor():
    report = assess_drift(range(20, 26), [0.05, 0.07, 0.09, 0.11, 0.08, 0.12], factor=2.0)
    assert report.drifted and report.first_drift_epoch == 23
    assert (report.worst_epoch, report.worst_error) == (25, 0.12)
    assert report.ratio == pytest.approx(0.12 / 0.05)
    assert not assess_drift([5, 6, 7], [0.1, 0.19, 0.2]).drifted  # exactly 2x is not past it


def drifting_walks(change: bool, epochs: int = 30, warmup: int = 10):
    """Two planted modes; with ``change`` half the rows of mode 0 follow a new, unrelated walk after the
    warm-up, which no warm-up mode can model."""
    rng = np.random.default_rng(7)
    refs = rng.normal(size=(3, epochs)).cumsum(axis=1)
    n = 200
    mode = np.repeat([0, 1], n // 2)
    W = rng.uniform(0.5, 2, (n, 1)) * refs[mode] + rng.normal(0, 3, (n, 1)) + 0.01 * rng.normal(size=(n, epochs))
    if change:
        late = np.arange(warmup, epochs)
        W[:50, late] += 4 * (refs[2, late] - refs[2, warmup])[None, :]
    return W.astype(np.float32)


@pytest.mark.parametrize("change", [False, True])
def test_online_cmd_warns_when_its_error_doubles_and_not_otherwise(change):
    W = drifting_walks(change)
    online = OnlineCMD(warmup=10, modes=2, samples=200)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for t in range(W.shape[1]):
            online.update({"w": torch.from_numpy(W[:, t].copy())})
    drift = [w for w in caught if issubclass(w.category, CMDDriftWarning)]
    report = online.drift_.report()
    assert report.warmup_epoch == 10 and len(online.drift_.errors) == 21
    # e(t) is the online model's error at epoch t, recomputed densely here
    a, b = online.coefficients()
    model = a * W[online.reference_indices_][online.mode_, -1] + b
    assert online.drift_.errors[-1] == pytest.approx(np.linalg.norm(W[:, -1] - model) / np.linalg.norm(W[:, -1]),
                                                     rel=1e-5)
    assert report.drifted == change and len(drift) == int(change)
    if change:
        assert "lengthen the warm-up" in str(drift[0].message) and drift[0].filename == __file__


def test_state_saved_under_an_earlier_module_name_loads():
    """Training checkpoints name their dataclasses by module: one written before CMD's modules moved into
    cmdtool.analyzers.cmd loads as the class at its current place."""
    from cmdtool.analyzers.cmd.drift import DriftMonitor
    from cmdtool.training._state import decode, encode

    monitor = DriftMonitor(factor=3.0, epochs=[4, 5], errors=[0.25, 0.5])
    saved = encode(monitor)
    assert saved["__dataclass__"] == "cmdtool.analyzers.cmd.drift:DriftMonitor"
    saved["__dataclass__"] = "cmdtool.analyzers.cmd_drift:DriftMonitor"
    assert decode(saved) == monitor
