"""CMD for federated learning (paper 000, Sec. 4): FedAvg (Eq. 13), client sync (Eq. 14), volume (Eqs. 15-16)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from cmdtool.training import FederatedCMD, GradualEmbedding, dirichlet_split

from tests.training.test_embedded import tiny_task

N_CLIENTS, PER_ROUND = 5, 2


def federation(with_cmd: bool, seed: int = 0, local_freeze: str = "step"):
    model, x, y = tiny_task(seed)
    parts = dirichlet_split(y.numpy(), N_CLIENTS, alpha=1.0, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    trained = []  # every selected client's full weight vector after local training, in order

    def local_train(model, optimizer, indices, round_):
        model.train()
        order = indices[torch.randperm(len(indices), generator=generator)]
        for start in range(0, len(order), 16):
            batch = order[start:start + 16]
            if len(batch) < 2:  # BatchNorm needs two samples
                continue
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
        trained.append(torch.cat([v.detach().reshape(-1).float() for v in model.state_dict().values()
                                  if v.is_floating_point()]))

    embedding = GradualEmbedding(modes=2, warmup=4, every=2, fraction=0.2, samples=100) if with_cmd else None
    server = FederatedCMD(model, [torch.as_tensor(p) for p in parts], local_train,
                          lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9), PER_ROUND,
                          embedding=embedding, seed=seed, local_freeze=local_freeze)
    return server, trained


def test_dirichlet_split_is_disjoint_complete_and_skewed():
    labels = np.repeat(np.arange(10), 50)
    parts = dirichlet_split(labels, 10, alpha=1.0, seed=3)
    joined = np.concatenate(parts)
    assert len(joined) == len(labels) and len(np.unique(joined)) == len(labels)
    assert all(len(p) for p in parts)
    shares = np.array([np.bincount(labels[p], minlength=10) / len(p) for p in parts])
    assert shares.max() > 0.25  # non-IID: some client holds far more than 10% of one class
    assert [p.tolist() for p in dirichlet_split(labels, 10, alpha=1.0, seed=3)] == [p.tolist() for p in parts]


@pytest.mark.parametrize("local_freeze", ["step", "round"])
def test_fedavg_and_sync_equal_a_dense_computation_every_round(local_freeze):
    server, trained = federation(with_cmd=True, local_freeze=local_freeze)
    n_rows = server.layout.n_rows
    off_the_model = []  # per round: largest |w_i − (a_i w_m + b_i)| over embedded rows in the clients' uploads
    for _ in range(10):
        embedded = server.embedded.clone()  # I(t_s), fixed by earlier rounds
        before = len(trained)
        record = server.run_round()
        uploads = torch.stack(trained[before:]).double().numpy()
        assert len(uploads) == PER_ROUND == len(record.clients)
        main = server.main.double().numpy()
        keep = ~embedded.numpy()
        # Eq. 13: the server's un-embedded weights are the mean over the selected clients
        np.testing.assert_allclose(main[keep], uploads[:, keep].mean(axis=0), rtol=1e-6, atol=1e-7)
        # embedded weights follow a_i w_m + b_i from the coefficients the clients were sent
        if embedded.any():
            a, b, mode = server.coef_a.double().numpy(), server.coef_b.double().numpy(), server.coef_mode.numpy()
            references = main[server.reference_rows.numpy()]
            np.testing.assert_allclose(main[~keep], (a * references[mode] + b)[~keep], rtol=1e-6, atol=1e-7)
        if embedded.any():  # what local training did to embedded weights (never uploaded)
            references = uploads[:, server.reference_rows.numpy()]
            model = a * references[:, mode] + b
            off_the_model.append(np.abs(uploads - model)[:, ~keep].max())
        # Eq. 14: after the sync every client holds exactly the server's model
        for client in server.clients:
            assert torch.equal(client.weights, server.main)
        assert len(main) == n_rows
    assert server.embedded.any() and not server.embedded[server.reference_rows].any()
    # "step": tied at every local step (float32 rounding only); "round": trained locally, reset at the sync
    assert off_the_model and (max(off_the_model) < 1e-5) == (local_freeze == "step")


def test_counted_floats_equal_eqs_15_and_16():
    server, _ = federation(with_cmd=True)
    baseline, _ = federation(with_cmd=False)
    server.run(12)
    baseline.run(12)
    n_rows = server.layout.n_rows
    for record in server.log:
        assert record.floats_counted == record.floats_formula
        assert record.floats_up == record.not_embedded * PER_ROUND
        assert record.floats_down == record.not_embedded * N_CLIENTS
        assert record.floats_coefficients == 2 * record.newly_embedded * N_CLIENTS
    for record in baseline.log:  # Eq. 15, N(|C| + |𝒞|) per round
        assert record.floats_counted == record.floats_formula == n_rows * (PER_ROUND + N_CLIENTS)
    volume = server.volume()
    rounds = len(server.log)
    assert volume["counted_total"] == volume["eq16_total"]  # Eq. 16 (times E_s) with the pairs actually embedded
    assert server.channel.floats == volume["counted_total"]
    assert baseline.volume()["counted_total"] == baseline.volume()["eq15_total"]
    mean_not_embedded = np.mean([r.not_embedded for r in server.log])
    embedded_pairs = int(server.embedded.sum())
    assert volume["eq16_per_round"] == pytest.approx(mean_not_embedded * (PER_ROUND + N_CLIENTS)
                                                     + 2 * embedded_pairs / rounds * N_CLIENTS, rel=1e-12)
    assert volume["embedded_pairs"] == embedded_pairs > 0
    assert volume["volume_ratio"] < 1 and baseline.volume()["volume_ratio"] == 1.0
    # the paper's Eq. 16 writes 2N for the pairs (all of them embedded); references never are
    assert volume["eq16_paper_per_round"] > volume["eq16_per_round"]
    # integers: M reference indices once, then an index and a mode per embedded weight, to every client
    assert server.channel.ints == N_CLIENTS * (len(server.reference_rows) + 2 * embedded_pairs)
