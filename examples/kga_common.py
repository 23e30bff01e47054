"""What the KGA examples share: the two tasks, one training loop with per-epoch records, and output helpers.

Tasks
- ``mlp``: paper 003 Fig. 4's function approximation z = x² + y², x, y uniform in [-6, 6] (4,096 training points),
  an MLP 2-32-32-1 (1,185 parameters, App. A.2: "3 layers with 32 neurons in the hidden layer"), MSE, batch 64.
- ``digits``: scikit-learn's 8x8 digits (1,257 train / 540 test images), the repo's small CNN with BatchNorm
  (3,866 trainable parameters; :mod:`cmdtool.datasets`), cross-entropy, batch 64; test accuracy in eval mode.

Every run is deterministic for a seed: the initial weights come from ``torch.manual_seed(seed)`` and the data
order from a generator seeded with the seed; one CPU thread.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cmdtool.training import KGAOptimizer


@dataclass
class Task:
    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    make_model: object                     # seed -> nn.Module
    loss: object                           # (output, target) -> scalar tensor
    test_x: torch.Tensor | None = None
    test_y: torch.Tensor | None = None
    batch_size: int = 64


def mlp_task(n_points: int = 4096, seed: int = 0) -> Task:
    g = torch.Generator().manual_seed(1000 + seed)
    x = torch.rand(n_points, 2, generator=g) * 12 - 6
    z = (x ** 2).sum(dim=1, keepdim=True)

    def make_model(model_seed):
        torch.manual_seed(model_seed)
        return nn.Sequential(nn.Linear(2, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1))

    return Task("mlp", x, z, make_model, nn.functional.mse_loss)


def digits_task(n_train: int | None = None) -> Task:
    """``n_train`` keeps the first n training images (the CI-size runs)."""
    from cmdtool.datasets import load_split, make_model

    data = load_split()
    return Task("digits", data.train_x[:n_train], data.train_y[:n_train], make_model, nn.functional.cross_entropy,
                data.test_x, data.test_y)


OPTIMIZERS = {
    "sgd": lambda params, lr: torch.optim.SGD(params, lr=lr),
    "momentum": lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9),
    "adam": lambda params, lr: torch.optim.Adam(params, lr=lr),
}


@dataclass
class Method:
    """One line of a comparison: a base optimizer and learning rate, with or without KGA (``kga`` = its options)."""

    label: str
    optimizer: str
    lr: float
    kga: dict | None = None
    snapshots: bool = False                # keep the flat weights of every epoch (for threshold probes)


@dataclass
class Run:
    method: str
    seed: int
    train_loss: list = field(default_factory=list)       # mean minibatch loss of each epoch
    test_acc: list = field(default_factory=list)
    masked_fraction: list = field(default_factory=list)
    masked_per_tensor: list = field(default_factory=list)
    epoch_seconds: list = field(default_factory=list)     # wall time of training only (steps + KGA), no evaluation
    epoch_cpu_seconds: list = field(default_factory=list)  # CPU time of the same (less disturbed by other load)
    fit_seconds: list = field(default_factory=list)       # KGA's snapshot + DMD + mask time inside the epoch
    accelerating: list = field(default_factory=list)
    memory_bytes: dict = field(default_factory=dict)
    fits: list = field(default_factory=list)
    snapshots: list = field(default_factory=list)


def train(task: Task, method: Method, epochs: int, seed: int) -> Run:
    torch.set_num_threads(1)                # tiny models: one thread is fastest and deterministic
    model = task.make_model(seed)
    optimizer = OPTIMIZERS[method.optimizer](model.parameters(), method.lr)
    kga = KGAOptimizer(optimizer, model.named_parameters(), **method.kga) if method.kga is not None else None
    step = kga.step if kga is not None else optimizer.step
    generator = torch.Generator().manual_seed(seed)
    run = Run(method.label, seed)
    n = len(task.train_y)
    for _ in range(epochs):
        model.train()
        started, started_cpu = time.perf_counter(), time.process_time()
        total = 0.0
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, task.batch_size):
            batch = order[start:start + task.batch_size]
            loss = task.loss(model(task.train_x[batch]), task.train_y[batch])
            optimizer.zero_grad()
            loss.backward()
            step()
            total += loss.item() * len(batch)
        record = kga.epoch_end() if kga is not None else None
        run.epoch_seconds.append(time.perf_counter() - started)
        run.epoch_cpu_seconds.append(time.process_time() - started_cpu)
        run.train_loss.append(total / n)
        run.masked_fraction.append(record["masked_fraction"] if record else 0.0)
        run.masked_per_tensor.append(record["masked_per_tensor"] if record else {})
        run.fit_seconds.append(record["fit_seconds"] if record else 0.0)
        run.accelerating.append(bool(record and record["accelerating"]))
        if task.test_x is not None:
            model.eval()
            with torch.no_grad():
                run.test_acc.append(float((model(task.test_x).argmax(dim=1) == task.test_y).float().mean()))
        if method.snapshots:
            run.snapshots.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double().numpy())
    if kga is not None:
        run.memory_bytes = kga.memory_bytes()
        run.fits = kga.fits_
    return run


def run_all(task: Task, methods: list[Method], epochs: int, seeds: list[int], log=print) -> dict[str, list[Run]]:
    """Every method for every seed, interleaved (seed by seed, all methods in turn) so that a change in the load
    of a shared machine falls on every method alike; ``min_cpu_seconds`` then picks the least disturbed run."""
    out: dict[str, list[Run]] = {m.label: [] for m in methods}
    for seed in seeds:
        for method in methods:
            run = train(task, method, epochs, seed)
            out[method.label].append(run)
            log(f"  {method.label:<28} seed {seed}: final loss {run.train_loss[-1]:.5g}"
                + (f", test acc {run.test_acc[-1]:.4f}" if run.test_acc else "")
                + f", {sum(run.epoch_cpu_seconds):.2f} s CPU")
    return out


def min_cpu_seconds(group: list[Run], epochs: slice = slice(None)) -> float:
    """CPU seconds of the given epochs, the smallest over the runs of a method (same work for every seed)."""
    return min(sum(r.epoch_cpu_seconds[epochs]) for r in group)


def median_final(group: list[Run]) -> float:
    """Median final loss over seeds, a diverged (non-finite) run counting as +inf."""
    final = np.array([r.train_loss[-1] for r in group], dtype=np.float64)
    return float(np.median(np.where(np.isfinite(final), final, np.inf)))


def mean_sd(values) -> tuple[float, float]:
    values = np.asarray(values, dtype=np.float64)
    return float(values.mean()), float(values.std(ddof=1)) if values.size > 1 else 0.0


def fmt(mean: float, sd: float, digits: int = 4) -> str:
    return f"{mean:.{digits}g} ± {sd:.2g}"


def save_json(path: Path, payload: dict) -> None:
    """Write results as json (numpy arrays dropped: snapshots are for in-process probes only)."""
    def clean(value):
        if isinstance(value, Run):
            return {k: clean(v) for k, v in value.__dict__.items() if k != "snapshots"}
        if isinstance(value, dict):
            return {str(k): clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        if isinstance(value, (np.floating, np.integer)):
            return value.item()
        return value

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(clean(payload), indent=1))


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def add_common_arguments(parser, default_out: str) -> None:
    parser.add_argument("--quick", action="store_true", help="reduced size (what CI runs): few epochs, one seed")
    parser.add_argument("--out", type=Path, default=Path(default_out),
                        help="folder for the results json (created)")
    parser.add_argument("--figures", type=Path, default=None,
                        help="folder for the png figures (default: the --out folder)")


def save_figure(fig, args, name: str) -> Path:
    """Lay out, write to the --figures folder (default --out) and close ``fig``."""
    import matplotlib.pyplot as plt

    folder = args.figures or args.out
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
