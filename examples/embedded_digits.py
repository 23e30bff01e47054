"""Embedded CMD on the digits CNN: plain SGD, online CMD, embedded CMD and the naive periodic assignment.

The setting of paper 000's Fig. 3 and Table 9 (M=10 modes, K=1000 samples, warm-up F=20, embedding every L=10
epochs, P=10% basic, 150 epochs, SGD lr 0.05 momentum 0.9), on scikit-learn's digits instead of CIFAR10:

    python examples/embedded_digits.py --out runs/embedded --figures docs/figures     # make train-cmd-embedded
    python examples/embedded_digits.py --quick --out /tmp/embedded                   # CI size, seconds

Per seed it trains three networks from the same initialisation and batch order:

- ``sgd``: plain SGD; ``online`` is the online CMD model (Alg. 3) of that same run, evaluated each epoch;
- ``embedded``: SGD with :class:`cmdtool.training.EmbeddedCMD` at its defaults (Alg. 4's per-epoch tie, references on
  their mode's scaled chain-rule gradient): the trained network itself, and
  ``embedded-cmd`` the CMD model of that run;
- ``naive``: SGD where the online CMD model is loaded into the network every 20 epochs (Fig. 3 left).

Writes ``results.json`` (curves per seed, summary) and, with ``--figures``, two PNGs; prints a markdown table.
``--checkpoints DIR`` also saves the embedded run's per-epoch state dicts (epoch_001.pt ...) for ``cmdtool ingest``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cmdtool.analyzers.cmd.online import OnlineCMD
from cmdtool.datasets import evaluate, load_split, make_model, shift_augment
from cmdtool.training import EmbeddedCMD

FULL = dict(epochs=150, warmup=20, every=10, fraction=0.10, relative_fraction=0.20, modes=10, samples=1000,
            naive_every=20, seeds=[0, 1, 2])
QUICK = dict(epochs=12, warmup=4, every=2, fraction=0.10, relative_fraction=0.20, modes=4, samples=200,
             naive_every=4, seeds=[0])
# the two embedding variants: the paper's basic P (Table 9, Fig. 3) and App. E.2's best, relative P = 20%
VARIANTS = {"embedded": dict(relative=False, fraction_key="fraction"),
            "embedded-rel": dict(relative=True, fraction_key="relative_fraction")}
LR, MOMENTUM, BATCH = 0.05, 0.9, 64


def train_one_epoch(model, optimiser, images, labels, generator, batch_size: int = BATCH) -> None:
    """One shuffled pass with one-pixel random shifts (the demo's recipe, examples/train_digits.py)."""
    model.train()
    order = torch.randperm(len(labels), generator=generator)
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        loss = nn.functional.cross_entropy(model(shift_augment(images[batch], generator)), labels[batch])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()


def _setup(seed: int):
    model = make_model(seed)
    optimiser = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    return model, optimiser, torch.Generator().manual_seed(seed)


def _acc(state, data) -> float:
    return evaluate(state, data)["test_acc"]


def run_sgd_and_online(seed: int, cfg: dict, data) -> dict:
    """Plain SGD, with online CMD watching it (Alg. 3)."""
    model, optimiser, generator = _setup(seed)
    online = OnlineCMD(warmup=cfg["warmup"], modes=cfg["modes"], samples=cfg["samples"], seed=seed)
    sgd, cmd = [], []
    for _ in range(cfg["epochs"]):
        train_one_epoch(model, optimiser, data.train_x, data.train_y, generator)
        online.update(model.state_dict())
        sgd.append(_acc(model.state_dict(), data))
        cmd.append(_acc(online.state_dict(), data) if online.warmed_up else sgd[-1])
    drift = online.drift_.report()
    return {"sgd": sgd, "online": cmd, "online_error": online.drift_.errors, "online_drift": drift.as_dict()}


def run_embedded(seed: int, cfg: dict, data, variant: str = "embedded", checkpoints: Path | None = None) -> dict:
    """SGD with embedded CMD (Alg. 4): the trained network and the run's CMD model, epoch by epoch."""
    model, optimiser, generator = _setup(seed)
    options = VARIANTS[variant]
    cmd = EmbeddedCMD(model, modes=cfg["modes"], warmup=cfg["warmup"], every=cfg["every"],
                      fraction=cfg[options["fraction_key"]], relative=options["relative"], samples=cfg["samples"],
                      seed=seed, optimizer=optimiser)
    trained, cmd_model = [], []
    started = time.perf_counter()
    for epoch in range(1, cfg["epochs"] + 1):
        train_one_epoch(model, optimiser, data.train_x, data.train_y, generator)
        cmd.on_epoch_end(epoch)
        trained.append(_acc(model.state_dict(), data))
        cmd_model.append(_acc(cmd.cmd_state_dict(), data))
        if checkpoints is not None:
            checkpoints.mkdir(parents=True, exist_ok=True)
            torch.save(model.state_dict(), checkpoints / f"epoch_{epoch:03d}.pt")
    seconds = time.perf_counter() - started
    return {variant: trained, f"{variant}-cmd": cmd_model,
            f"{variant}_trained_fraction": [r["trained_fraction"] for r in cmd.history_],
            f"{variant}_run_trained_fraction": cmd.run_trained_fraction(),
            f"{variant}_error": cmd.plan.drift.errors, f"{variant}_drift": cmd.drift_report.as_dict(),
            f"{variant}_seconds": seconds}


def run_naive(seed: int, cfg: dict, data) -> dict:
    """Fig. 3 left: every ``naive_every`` epochs from F on, load the online CMD model into the network."""
    model, optimiser, generator = _setup(seed)
    online = OnlineCMD(warmup=cfg["warmup"], modes=cfg["modes"], samples=cfg["samples"], seed=seed)
    curve, assigned = [], {}
    for epoch in range(1, cfg["epochs"] + 1):
        train_one_epoch(model, optimiser, data.train_x, data.train_y, generator)
        online.update(model.state_dict())
        if epoch >= cfg["warmup"] and (epoch - cfg["warmup"]) % cfg["naive_every"] == 0:
            model.load_state_dict(online.state_dict())
            assigned[epoch] = _acc(model.state_dict(), data)
        curve.append(_acc(model.state_dict(), data))
    return {"naive": curve, "naive_assigned": assigned}


METHODS = ("sgd", "online", "embedded", "embedded-cmd", "embedded-rel", "embedded-rel-cmd", "naive")


def summarise(runs: list[dict]) -> dict:
    """Final test accuracy per method (mean, sd over seeds) and the embedded run's trained share."""
    out = {}
    for method in METHODS:
        finals = np.array([100 * run[method][-1] for run in runs])
        out[method] = {"mean": float(finals.mean()), "sd": float(finals.std(ddof=1)) if len(finals) > 1 else 0.0,
                       "per_seed": finals.tolist()}
    for variant in VARIANTS:
        shares = np.array([100 * run[f"{variant}_run_trained_fraction"] for run in runs])
        out[f"{variant}_run_trained_percent"] = {"mean": float(shares.mean()), "sd": float(shares.std(ddof=1))
                                                 if len(shares) > 1 else 0.0}
        out[f"{variant}_final_trained_percent"] = float(np.mean([100 * run[f"{variant}_trained_fraction"][-1]
                                                                 for run in runs]))
    out["online_drift_seeds"] = [run["seed"] for run in runs if run["online_drift"]["drifted"]]
    return out


def markdown_table(summary: dict, cfg: dict) -> str:
    names = {"sgd": "plain SGD", "online": "online CMD (Alg. 3)",
             "embedded": f"embedded CMD, basic P={100 * cfg['fraction']:g}%: trained network",
             "embedded-cmd": f"embedded CMD, basic P={100 * cfg['fraction']:g}%: its CMD model",
             "embedded-rel": f"embedded CMD, relative P={100 * cfg['relative_fraction']:g}%: trained network",
             "embedded-rel-cmd": f"embedded CMD, relative P={100 * cfg['relative_fraction']:g}%: its CMD model",
             "naive": f"naive: CMD weights every {cfg['naive_every']} epochs"}
    lines = ["| method | final test accuracy (%) | per seed |", "|---|---|---|"]
    for method in METHODS:
        s = summary[method]
        lines.append(f"| {names[method]} | {s['mean']:.2f} ± {s['sd']:.2f} | "
                     f"{', '.join(f'{v:.2f}' for v in s['per_seed'])} |")
    return "\n".join(lines)


def plot(runs: list[dict], cfg: dict, folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    epochs = np.arange(1, cfg["epochs"] + 1)
    colours = {"sgd": "tab:orange", "online": "tab:blue", "embedded": "tab:green", "embedded-rel": "tab:red",
               "naive": "tab:gray"}
    labels = {"sgd": "plain SGD", "online": "online CMD",
              "embedded": f"embedded CMD, basic P={100 * cfg['fraction']:g}%",
              "embedded-rel": f"embedded CMD, relative P={100 * cfg['relative_fraction']:g}%",
              "naive": f"naive: CMD weights every {cfg['naive_every']} epochs"}
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    for method, colour in colours.items():
        curves = 100 * np.array([run[method] for run in runs])
        ax.plot(epochs, curves.mean(axis=0), color=colour, lw=1.2, label=labels[method])
    dots = sorted({int(e) for run in runs for e in run["naive_assigned"]})
    ax.scatter(dots, [100 * np.mean([run["naive_assigned"][str(e)] if str(e) in run["naive_assigned"]
                                     else run["naive_assigned"][e] for run in runs]) for e in dots],
               color="black", s=12, zorder=3, label="naive: the assigned CMD model")
    ax.axvline(cfg["warmup"], color="k", ls=":", lw=0.8)
    ax.set_ylim(80, 100)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"digits CNN, mean of {len(runs)} seeds (M={cfg['modes']}, F={cfg['warmup']}, "
                 f"L={cfg['every']})", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    accuracy = folder / "training_embedded_accuracy.png"
    fig.savefig(accuracy)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6.4, 2.8), dpi=100)
    for variant in VARIANTS:
        share = 100 * np.array([run[f"{variant}_trained_fraction"] for run in runs]).mean(axis=0)
        mean_share = np.mean([100 * run[f"{variant}_run_trained_fraction"] for run in runs])
        ax.step(epochs, share, where="post", color=colours[variant],
                label=f"{labels[variant]} (whole run: {mean_share:.1f}%)")
    ax.set_title("embedded CMD: share of the parameters trained in each epoch", fontsize=9)
    ax.legend(fontsize=7)
    ax.set_xlabel("epoch")
    ax.set_ylabel("trained (%)")
    ax.set_ylim(0, 105)
    fig.tight_layout()
    fraction = folder / "training_embedded_fraction.png"
    fig.savefig(fraction)
    plt.close(fig)
    return [accuracy, fraction]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CI size: 12 epochs, one seed")
    parser.add_argument("--seeds", type=int, nargs="+", help="seeds (default 0 1 2, --quick: 0)")
    parser.add_argument("--epochs", type=int, help="epochs per run (default 150)")
    parser.add_argument("--out", type=Path, default=Path("runs/embedded"), help="folder for results.json")
    parser.add_argument("--figures", type=Path, help="also write the two PNG figures into this folder")
    parser.add_argument("--checkpoints", type=Path, help="save the embedded run's per-epoch state dicts here "
                                                          "(first seed only)")
    args = parser.parse_args(argv)
    cfg = dict(QUICK if args.quick else FULL)
    if args.seeds:
        cfg["seeds"] = args.seeds
    if args.epochs:
        cfg["epochs"] = args.epochs
    torch.set_num_threads(1)  # tiny convolutions: one thread is much faster than several
    data = load_split()
    runs = []
    for k, seed in enumerate(cfg["seeds"]):
        started = time.perf_counter()
        run = {"seed": seed, **run_sgd_and_online(seed, cfg, data),
               **run_embedded(seed, cfg, data, "embedded", args.checkpoints if k == 0 else None),
               **run_embedded(seed, cfg, data, "embedded-rel"), **run_naive(seed, cfg, data)}
        runs.append(run)
        print(f"seed {seed}: SGD {100 * run['sgd'][-1]:.2f}%, online {100 * run['online'][-1]:.2f}%, embedded "
              f"basic {100 * run['embedded'][-1]:.2f}% (trained {100 * run['embedded_run_trained_fraction']:.1f}%"
              f" over the run), relative {100 * run['embedded-rel'][-1]:.2f}% (trained "
              f"{100 * run['embedded-rel_run_trained_fraction']:.1f}%), naive {100 * run['naive'][-1]:.2f}% "
              f"[{time.perf_counter() - started:.0f} s]", flush=True)
    summary = summarise(runs)
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"config": cfg, "summary": summary, "runs": runs}
    (args.out / "results.json").write_text(json.dumps(result, indent=1))
    print(markdown_table(summary, cfg))
    for variant in VARIANTS:
        share = summary[f"{variant}_run_trained_percent"]
        print(f"{variant}: trained {share['mean']:.1f} ± {share['sd']:.1f}% of the parameters over the run "
              f"({summary[f'{variant}_final_trained_percent']:.1f}% in the last epoch)")
    if args.figures:
        for path in plot(runs, cfg, args.figures):
            print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
