"""CMD for federated learning (paper 000, Sec. 4, Eqs. 13-16; App. F): fewer floats per synchronisation.

A round t_s of federated averaging (McMahan et al. 2017) as the paper extends it:

1. a random subset C(t_s) of the clients 𝒞 trains locally from the synchronised model;
2. each selected client uploads its *un-embedded* weights; the server averages them (Eq. 13):
   w_i^main(t_s) = mean over C(t_s) of w_i^client(t_s), for i not in I(t_s);
3. the server runs embedded CMD (Alg. 4, :class:`~cmdtool.training.embedded.GradualEmbedding`) on the main
   model's round-by-round trajectory, and sends each newly embedded pair (a_i, b_i) to every client once;
4. every client synchronises (Eq. 14): w_i^client <- w_i^main for i not in I(t_s), and a_i w_m(t_s) + b_i from
   its local copy of the coefficients for i in I(t_s), where I(t_s) = {i : t_s > τ_{s,i}}.

Only un-embedded weights (the M references always among them) and the new coefficient pairs travel, so a round
sends (N − |I(t_s)|)(|C| + |𝒞|) + 2 |new(t_s)| |𝒞| floats. Averaged over E_s rounds this is Eq. 16,

    N̂^not-embedded (|C| + |𝒞|) + (2 N_embedded / E_s) |𝒞|,

against Eq. 15's N(|C| + |𝒞|) per round without CMD. (The paper writes 2N for the coefficient term, assuming
every pair is eventually embedded; references never are, so the exact count uses the number embedded.)
Every message here goes through a :class:`Channel` that counts the floats it carries, and receivers rebuild
their weights only from what they received and what they stored: the counted total equals the formula
exactly. Integers (the indices and modes of newly embedded weights, 2 per weight, once) are counted apart.

How a client treats embedded weights in its local training is ``local_freeze`` (the paper's Sec. 4 fixes only
what is sent and Eq. 14's synchronisation):

- ``"step"`` (default): Eq. 11 at every local optimizer step (:class:`~cmdtool.training.freeze.FrozenEmbedding`,
  ``tie="step"``): embedded weights follow their references and are not trained, and each reference gets its
  mode's chain-rule gradient scaled by 1 / (1 + Σ a_i²). Clients compute no updates for embedded weights.
- ``"round"``: Alg. 4's per-epoch semantics applied to a round: every weight trains locally (references on
  the same scaled chain-rule gradient), and the embedded ones are reset to a_i w_m + b_i when local training
  ends. They are never uploaded, so what they learned locally reaches the server only through the references
  and un-embedded weights it shaped.

Either way the messages, and so the volume, are the same (measured on digits in docs/training.md). Floating
entries that are not parameters (BatchNorm statistics) are averaged and sent like un-embedded weights; integer
entries stay as the working model has them.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..errors import UsageError
from .embedded import GradualEmbedding
from .freeze import FrozenEmbedding
from .layout import StateLayout

log = logging.getLogger("cmdtool.training")


def dirichlet_split(labels, n_clients: int, alpha: float = 1.0, seed: int = 0) -> list[np.ndarray]:
    """Non-IID client datasets (App. F.1): each class is divided among the clients in proportions drawn from
    Dirichlet(alpha); returns each client's sample indices (disjoint, covering every sample). Lower alpha
    means more skewed clients; every client gets at least one sample."""
    labels = np.asarray(labels)
    if n_clients < 1 or n_clients > len(labels):
        raise UsageError(f"cannot split {len(labels)} samples among {n_clients} clients")
    rng = np.random.default_rng(seed)
    while True:
        parts: list[list[int]] = [[] for _ in range(n_clients)]
        for cls in np.unique(labels):
            members = rng.permutation(np.flatnonzero(labels == cls))
            shares = rng.dirichlet(np.full(n_clients, float(alpha)))
            cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
            for client, chunk in enumerate(np.split(members, cuts)):
                parts[client].extend(chunk.tolist())
        if all(parts):
            return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


class Channel:
    """Counts what is sent: every message is a tensor, copied on sending (the receiver gets its own)."""

    def __init__(self):
        self.floats = 0
        self.ints = 0

    def send(self, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.is_floating_point():
            self.floats += tensor.numel()
        else:
            self.ints += tensor.numel()
        return tensor.detach().clone()


class Client:
    """A client's synchronised weights (flat float32) and its local copy of the embedded coefficients."""

    def __init__(self, index: int, data: Any, weights: torch.Tensor):
        self.index = index
        self.data = data
        self.weights = weights.clone()
        n = len(weights)
        self.embedded = torch.zeros(n, dtype=torch.bool)
        self.a = torch.zeros(n, dtype=torch.float32)
        self.b = torch.zeros(n, dtype=torch.float32)
        self.mode = torch.zeros(n, dtype=torch.int64)
        self.reference_rows = torch.zeros(0, dtype=torch.int64)  # received once, when the warm-up ends
        self.pending = None

    def store_coefficients(self, rows: torch.Tensor, modes: torch.Tensor, pairs: torch.Tensor) -> None:
        """Keep newly embedded (a_i, b_i) and their modes; they take effect from the next round on."""
        self.pending = (rows, modes, pairs)

    def sync(self, values: torch.Tensor) -> None:
        """Eq. 14: the un-embedded weights from the server's message, the embedded ones a_i w_m + b_i."""
        self.weights[~self.embedded] = values
        embedded = self.embedded
        if embedded.any():
            references = self.weights[self.reference_rows]
            self.weights[embedded] = self.a[embedded] * references[self.mode[embedded]] + self.b[embedded]
        if self.pending is not None:  # I(t_s) = {i : t_s > τ_i}: pairs embedded this round apply from the next
            rows, modes, pairs = self.pending
            self.embedded[rows] = True
            self.mode[rows] = modes
            self.a[rows], self.b[rows] = pairs[0], pairs[1]
            self.pending = None


@dataclass
class RoundLog:
    """One synchronisation round: who trained, what travelled, and what the formulas say it should be."""

    round: int
    clients: list[int]
    not_embedded: int           # N − |I(t_s)|: floats per model message this round
    newly_embedded: int         # pairs sent to every client this round
    floats_up: int              # counted: client -> server
    floats_down: int            # counted: server -> clients (weights)
    floats_coefficients: int    # counted: server -> clients (a, b pairs)
    ints_sent: int              # counted: indices and modes of the new pairs
    floats_formula: int         # (N − |I|)(|C| + |𝒞|) + 2 |new| |𝒞|
    floats_baseline: int        # Eq. 15: N(|C| + |𝒞|)
    metrics: dict | None = None

    @property
    def floats_counted(self) -> int:
        return self.floats_up + self.floats_down + self.floats_coefficients

    def as_dict(self) -> dict:
        return {**asdict(self), "floats_counted": self.floats_counted}


class FederatedCMD:
    """Federated averaging with embedded CMD (Sec. 4), simulated in one process with exact accounting.

    Parameters
    ----------
    model : the working model: each selected client's local training runs on it, from the client's weights.
    client_data : one item per client (whatever ``local_train`` needs, e.g. an index array).
    local_train : ``f(model, optimizer, data, round)`` trains ``model`` in place on one client's data.
    make_optimizer : ``f(parameters) -> optimizer``, a fresh one per local training.
    clients_per_round : |C(t_s)|, drawn at random each round.
    embedding : a :class:`~cmdtool.training.embedded.GradualEmbedding` run on the main model round by round
        (its epochs are rounds); ``None`` gives plain federated averaging, the Eq. 15 baseline.
    seed : of the client draws.
    local_freeze : ``"step"`` (default) or ``"round"``: when clients tie embedded weights to their references
        during local training (module docstring).
    """

    def __init__(self, model: torch.nn.Module, client_data: Sequence[Any], local_train: Callable,
                 make_optimizer: Callable, clients_per_round: int, embedding: GradualEmbedding | None = None,
                 seed: int = 0, local_freeze: str = "step"):
        if local_freeze not in ("step", "round"):
            raise UsageError(f"local_freeze must be 'step' or 'round' (got {local_freeze!r})")
        self.local_freeze = local_freeze
        if not 1 <= clients_per_round <= len(client_data):
            raise UsageError(f"clients_per_round must be between 1 and {len(client_data)}")
        self.model = model
        self.template = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.layout = StateLayout(self.template)
        self.main = self.layout.flatten(self.template)
        self.clients = [Client(i, data, self.main) for i, data in enumerate(client_data)]
        self.local_train = local_train
        self.make_optimizer = make_optimizer
        self.clients_per_round = clients_per_round
        self.embedding = embedding
        if embedding is not None and embedding.eligible_names is None:
            embedding.eligible_names = [n for n, _ in model.named_parameters()]
        self.rng = np.random.default_rng(seed)
        self.channel = Channel()
        self.round = 0
        self.log: list[RoundLog] = []
        self.frozen: FrozenEmbedding | None = None  # Eq. 11 on the working model during local training
        self.embedded = torch.zeros(self.layout.n_rows, dtype=torch.bool)  # I(t_s), as the server knows it
        self.coef_a = torch.zeros(self.layout.n_rows, dtype=torch.float32)
        self.coef_b = torch.zeros(self.layout.n_rows, dtype=torch.float32)
        self.coef_mode = torch.zeros(self.layout.n_rows, dtype=torch.int64)
        self.reference_rows = torch.zeros(0, dtype=torch.int64)

    def state_dict(self) -> dict:
        """The main (server) model as a state dict of the working model's keys, shapes and dtypes."""
        return self.layout.unflatten_into(self.main, self.template)

    # ------------------------------------------------------------------ one round
    def run_round(self, evaluate: Callable[[dict], dict] | None = None) -> RoundLog:
        self.round += 1
        n_total = len(self.clients)
        selected = np.sort(self.rng.choice(n_total, size=self.clients_per_round, replace=False))
        sent = (self.channel.floats, self.channel.ints)
        keep = ~self.embedded  # un-embedded rows this round: I(t_s) was fixed by earlier rounds
        n_keep = int(keep.sum())

        uploads = [self.channel.send(self._train_client(self.clients[c])[keep]) for c in selected]
        floats_up = self.channel.floats - sent[0]

        # Eq. 13: average of the un-embedded weights; embedded ones follow their references
        self.main[keep] = torch.stack(uploads).mean(dim=0)
        self._apply_embedding(self.main)

        step = None
        if self.embedding is not None:
            step = self.embedding.observe(self.state_dict())
            if self.embedding.epoch == self.embedding.warmup:
                self.reference_rows = torch.as_tensor(self.embedding.reference_rows)
                for client in self.clients:  # which weights are the M references: M integers, once
                    client.reference_rows = self.channel.send(self.reference_rows)
                self.frozen = FrozenEmbedding(self.model, self.layout, self.embedding.reference_rows,
                                              tie="step" if self.local_freeze == "step" else "epoch")
        new = 0 if step is None else len(step.rows)
        coefficient_floats = 0
        # new pairs first (stored by the clients, effective next round), then the weights
        if new:
            rows = torch.as_tensor(step.rows)
            pairs = torch.as_tensor(np.stack([step.a, step.b]), dtype=torch.float32)
            modes = torch.as_tensor(step.reference)
            before = self.channel.floats
            for client in self.clients:
                client.store_coefficients(self.channel.send(rows), self.channel.send(modes), self.channel.send(pairs))
            coefficient_floats = self.channel.floats - before
        down_start = self.channel.floats
        for client in self.clients:  # the main model's un-embedded weights go to every client (Eqs. 15-16)
            client.sync(self.channel.send(self.main[keep]))
        floats_down_weights = self.channel.floats - down_start
        if new:  # the server's own record of I(t_s+1) and the coefficients, as the clients hold them
            self.embedded[rows] = True
            self.coef_a[rows], self.coef_b[rows] = pairs[0], pairs[1]
            self.coef_mode[rows] = modes
            self.frozen.embed(step.rows, pairs[0].double().numpy(), pairs[1].double().numpy(), step.reference)

        n_sync = len(selected) + n_total
        record = RoundLog(self.round, selected.tolist(), n_keep, new, floats_up, floats_down_weights,
                          coefficient_floats, self.channel.ints - sent[1],
                          n_keep * n_sync + 2 * new * n_total, self.layout.n_rows * n_sync)
        if evaluate is not None:
            record.metrics = evaluate(self.state_dict())
        self.log.append(record)
        log.info("round %d: clients %s, %d of %d floats un-embedded, %d newly embedded, %d floats sent",
                 self.round, record.clients, n_keep, self.layout.n_rows, new, record.floats_counted)
        return record

    def _apply_embedding(self, weights: torch.Tensor) -> None:
        """Embedded rows of ``weights`` <- a_i w_m + b_i (float32, as clients compute it in Eq. 14)."""
        rows = self.embedded
        if rows.any():
            references = weights[self.reference_rows]
            weights[rows] = self.coef_a[rows] * references[self.coef_mode[rows]] + self.coef_b[rows]

    def _train_client(self, client: Client) -> torch.Tensor:
        """Local training of one client from its synchronised weights; returns its weights afterwards."""
        state = self.layout.unflatten_into(client.weights, self.model.state_dict())
        self.model.load_state_dict(state)
        optimizer = self.make_optimizer(self.model.parameters())
        if self.frozen is not None:
            self.frozen.attach_optimizer(optimizer)
            self.frozen.apply()
        self.local_train(self.model, optimizer, client.data, self.round)
        if self.frozen is not None:
            self.frozen.apply()
        return self.layout.flatten(self.model.state_dict())

    # ------------------------------------------------------------------ many rounds
    def run(self, rounds: int, evaluate: Callable[[dict], dict] | None = None, eval_every: int = 1,
            progress: Callable[[RoundLog], None] | None = None) -> list[RoundLog]:
        for k in range(rounds):
            wants = evaluate is not None and ((k + 1) % eval_every == 0 or k + 1 == rounds)
            record = self.run_round(evaluate if wants else None)
            if progress is not None:
                progress(record)
        return self.log

    def volume(self) -> dict:
        """Floats over the run: counted, Eq. 16 (exact and as the paper writes it) and Eq. 15, as totals over
        the E_s rounds (integers, so "counted equals Eq. 16" is an exact comparison) and per round."""
        if not self.log:
            raise UsageError("no round has run yet")
        rounds = len(self.log)
        n_total = len(self.clients)
        n_sync = self.clients_per_round + n_total
        n_rows = self.layout.n_rows
        embedded_pairs = sum(r.newly_embedded for r in self.log)
        not_embedded_total = sum(r.not_embedded for r in self.log)
        counted = sum(r.floats_counted for r in self.log)
        eq16 = not_embedded_total * n_sync + 2 * embedded_pairs * n_total  # Eq. 16 times E_s
        eq16_paper = not_embedded_total * n_sync + 2 * n_rows * n_total if embedded_pairs else eq16
        eq15 = n_rows * n_sync * rounds
        return {"rounds": rounds, "n_floats": n_rows, "clients": n_total, "clients_per_round": self.clients_per_round,
                "mean_not_embedded": not_embedded_total / rounds, "embedded_pairs": embedded_pairs,
                "counted_total": counted, "eq16_total": eq16, "eq16_paper_total": eq16_paper, "eq15_total": eq15,
                "counted_per_round": counted / rounds, "eq16_per_round": eq16 / rounds,
                "eq16_paper_per_round": eq16_paper / rounds, "eq15_per_round": eq15 / rounds,
                "volume_ratio": counted / eq15, "ints_per_round": sum(r.ints_sent for r in self.log) / rounds}
