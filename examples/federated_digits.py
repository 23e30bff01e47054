"""Federated learning with CMD on the digits CNN: communicated floats and accuracy, baseline vs CMD (Sec. 4).

Paper 000's Table 3 setting (App. F.1: 50 clients, Dirichlet(1) non-IID, 10% per round, 1,500 rounds of 10
local epochs, CMD with 2 modes, P = 5% halved once more than 80% is embedded) scaled to scikit-learn's digits:

    python examples/federated_digits.py --out runs/federated --figures docs/figures   # make train-cmd-federated
    python examples/federated_digits.py --quick --out /tmp/federated                  # CI size, seconds

10 clients with Dirichlet(1) class mixtures, 3 drawn per round, 2 local epochs of SGD (lr 0.05, momentum 0.9,
a fresh optimizer per local run), 150 rounds; CMD: M=2, K=1000, warm-up 20 rounds, a decision every 5 rounds.
Clients tie embedded weights at every local step (``FederatedCMD(local_freeze="step")``, the default);
``--also-round`` adds a third run per seed with ``local_freeze="round"`` (every weight trains locally, embedded ones
are reset at the sync). All runs of a seed draw the same clients in the same order. Writes ``results.json`` and,
with ``--figures``, one PNG; prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from embedded_digits import LR, MOMENTUM, train_one_epoch  # noqa: E402  (the same local training recipe)

from cmdtool.datasets import evaluate, load_split, make_model  # noqa: E402
from cmdtool.training import FederatedCMD, GradualEmbedding, dirichlet_split, halve_above  # noqa: E402

FULL = dict(clients=10, per_round=3, rounds=150, local_epochs=2, alpha=1.0, modes=2, samples=1000, warmup=20,
            every=5, fraction=0.05, seeds=[0, 1, 2, 3, 4], eval_every=5)
QUICK = dict(clients=10, per_round=3, rounds=16, local_epochs=1, alpha=1.0, modes=2, samples=200, warmup=4,
             every=2, fraction=0.1, seeds=[0], eval_every=4)


def run(seed: int, cfg: dict, data, with_cmd: bool, local_freeze: str = "step") -> dict:
    parts = dirichlet_split(data.train_y.numpy(), cfg["clients"], cfg["alpha"], seed=seed)
    generator = torch.Generator().manual_seed(seed)

    def local_train(model, optimizer, indices, round_):
        for _ in range(cfg["local_epochs"]):
            train_one_epoch(model, optimizer, data.train_x[indices], data.train_y[indices], generator)

    embedding = None
    if with_cmd:
        embedding = GradualEmbedding(modes=cfg["modes"], warmup=cfg["warmup"], every=cfg["every"],
                                     fraction=cfg["fraction"], samples=cfg["samples"], seed=seed,
                                     schedule=halve_above(0.8))
    server = FederatedCMD(make_model(seed), [torch.as_tensor(p) for p in parts], local_train,
                          lambda params: torch.optim.SGD(params, lr=LR, momentum=MOMENTUM),
                          cfg["per_round"], embedding=embedding, seed=seed, local_freeze=local_freeze)
    server.run(cfg["rounds"], evaluate=lambda state: evaluate(state, data), eval_every=cfg["eval_every"])
    rounds = [r.as_dict() for r in server.log]
    return {"volume": server.volume(), "rounds": rounds, "final_acc": rounds[-1]["metrics"]["test_acc"],
            "client_sizes": [len(p) for p in parts]}


def summarise(runs: list[dict]) -> dict:
    def stats(values):
        values = np.asarray(values, dtype=float)
        return {"mean": float(values.mean()), "sd": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
                "per_seed": values.tolist()}

    extra = {}
    if all("cmd-round" in r for r in runs):
        extra["cmd_round_acc"] = stats([100 * r["cmd-round"]["final_acc"] for r in runs])
    return {**extra, "baseline_acc": stats([100 * r["baseline"]["final_acc"] for r in runs]),
            "cmd_acc": stats([100 * r["cmd"]["final_acc"] for r in runs]),
            "volume_ratio": stats([100 * r["cmd"]["volume"]["volume_ratio"] for r in runs]),
            "counted_equals_eq16": all(r["cmd"]["volume"]["counted_total"] == r["cmd"]["volume"]["eq16_total"]
                                       for r in runs),
            "baseline_counted_equals_eq15": all(r["baseline"]["volume"]["counted_total"]
                                                == r["baseline"]["volume"]["eq15_total"] for r in runs)}


def markdown_table(summary: dict, cfg: dict) -> str:
    b, c, v = summary["baseline_acc"], summary["cmd_acc"], summary["volume_ratio"]
    return "\n".join([
        "| run | volume (floats per round, % of baseline) | final test accuracy (%) | per seed |",
        "|---|---|---|---|",
        f"| FedAvg baseline | 100 | {b['mean']:.2f} ± {b['sd']:.2f} | {', '.join(f'{x:.2f}' for x in b['per_seed'])} |",
        f"| CMD (M={cfg['modes']}, P={100 * cfg['fraction']:g}%) | {v['mean']:.2f} ± {v['sd']:.2f} | "
        f"{c['mean']:.2f} ± {c['sd']:.2f} | {', '.join(f'{x:.2f}' for x in c['per_seed'])} |"]
        + ([f"| CMD, local_freeze='round' | {v['mean']:.2f} | {summary['cmd_round_acc']['mean']:.2f} ± "
            f"{summary['cmd_round_acc']['sd']:.2f} | "
            f"{', '.join(f'{x:.2f}' for x in summary['cmd_round_acc']['per_seed'])} |"]
           if "cmd_round_acc" in summary else []))


def plot(runs: list[dict], cfg: dict, folder: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    fig, (left, right) = plt.subplots(1, 2, figsize=(8, 3.2), dpi=100)
    rounds = np.arange(1, cfg["rounds"] + 1)
    for key, colour, label in (("baseline", "tab:orange", "FedAvg baseline"), ("cmd", "tab:green", "CMD")):
        floats = np.mean([[r["floats_counted"] for r in run[key]["rounds"]] for run in runs], axis=0)
        left.plot(rounds, floats / 1000, color=colour, label=label, lw=1.2)
        evaluated = [r["round"] for r in runs[0][key]["rounds"] if r["metrics"]]
        acc = np.mean([[100 * r["metrics"]["test_acc"] for r in run[key]["rounds"] if r["metrics"]] for run in runs],
                      axis=0)
        right.plot(evaluated, acc, color=colour, label=label, lw=1.2)
    left.set_xlabel("round")
    left.set_ylabel("floats sent per round (thousands)")
    left.set_ylim(bottom=0)
    left.legend(fontsize=8)
    right.set_xlabel("round")
    right.set_ylabel("test accuracy (%)")
    right.set_ylim(80, 100)
    fig.suptitle(f"federated digits: {cfg['clients']} clients, {cfg['per_round']} per round, mean of "
                 f"{len(runs)} seeds", fontsize=9)
    fig.tight_layout()
    path = folder / "training_federated.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CI size: 16 rounds, one seed")
    parser.add_argument("--seeds", type=int, nargs="+", help="seeds (default 0-4, --quick: 0)")
    parser.add_argument("--rounds", type=int, help="synchronisation rounds (default 150)")
    parser.add_argument("--out", type=Path, default=Path("runs/federated"), help="folder for results.json")
    parser.add_argument("--figures", type=Path, help="also write the PNG figure into this folder")
    parser.add_argument("--also-round", action="store_true", help="also run CMD with local_freeze='round'")
    args = parser.parse_args(argv)
    cfg = dict(QUICK if args.quick else FULL)
    if args.seeds:
        cfg["seeds"] = args.seeds
    if args.rounds:
        cfg["rounds"] = args.rounds
    torch.set_num_threads(1)
    data = load_split()
    runs = []
    for seed in cfg["seeds"]:
        started = time.perf_counter()
        result = {"seed": seed, "baseline": run(seed, cfg, data, False), "cmd": run(seed, cfg, data, True)}
        if args.also_round:
            result["cmd-round"] = run(seed, cfg, data, True, local_freeze="round")
            print(f"seed {seed}: CMD with local_freeze='round' {100 * result['cmd-round']['final_acc']:.2f}%",
                  flush=True)
        runs.append(result)
        volume = result["cmd"]["volume"]
        print(f"seed {seed}: baseline {100 * result['baseline']['final_acc']:.2f}%, CMD "
              f"{100 * result['cmd']['final_acc']:.2f}% at {100 * volume['volume_ratio']:.2f}% of the floats "
              f"(counted {volume['counted_per_round']:.1f}, Eq. 16 {volume['eq16_per_round']:.1f} per round) "
              f"[{time.perf_counter() - started:.0f} s]", flush=True)
    summary = summarise(runs)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"config": cfg, "summary": summary, "runs": runs}, indent=1))
    print(markdown_table(summary, cfg))
    print(f"counted floats equal Eq. 16: {summary['counted_equals_eq16']}; baseline equals Eq. 15: "
          f"{summary['baseline_counted_equals_eq15']}")
    if args.figures:
        print(f"wrote {plot(runs, cfg, args.figures)}")
    return {"config": cfg, "summary": summary, "runs": runs}


if __name__ == "__main__":
    main(sys.argv[1:])
