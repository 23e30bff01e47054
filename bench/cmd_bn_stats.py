"""Measure what modelling BatchNorm running statistics costs: digits CNN, CMD(10), --bn-stats source vs model.

    PYTHONPATH=src python bench/cmd_bn_stats.py --runs 5 --samplings 3 --epochs 40

For each training run (seed) and each CMD sampling seed: held-out accuracy at the last epoch of the original
weights, of post-hoc CMD with the running stats kept from the source checkpoint (``source``) or modelled like
weights (``model``), and of online CMD (warm-up 20) under both policies. Prints one line per case and a summary.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch

from cmdtool.analyzers.cmd.posthoc import PosthocCMD
from cmdtool import datasets
from cmdtool.ingestion import ingest
from cmdtool.ingestion.checkpoints import build_state_dict
from cmdtool.store import open_store


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--samplings", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--modes", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=20)
    args = parser.parse_args()
    data = datasets.load_split()
    drops = {("posthoc", "source"): [], ("posthoc", "model"): [], ("online", "source"): [], ("online", "model"): []}
    with tempfile.TemporaryDirectory() as tmp:
        for run in range(args.runs):
            folder = Path(tmp) / f"run{run}"
            paths = datasets.train(folder / "ckpts", data, epochs=args.epochs, seed=run)
            original = datasets.evaluate(torch.load(paths[-1], weights_only=True), data)["test_acc"]
            ingest([folder / "ckpts"], folder / "run.zarr")
            store = open_store(folder / "run.zarr", mode="r+")
            last = store.n_checkpoints - 1
            for sampling_seed in range(args.samplings):
                line = [f"run {run} sample {sampling_seed}: original {100 * original:.2f}"]
                for policy in ("source", "model"):
                    cmd = PosthocCMD(modes=args.modes, seed=sampling_seed, bn_stats=policy,
                                     warmup=args.warmup).fit(store)
                    for variant in ("posthoc", "online"):
                        state = build_state_dict(store, cmd.reconstruct_epoch(store, last, variant=variant), last)
                        acc = datasets.evaluate(state, data)["test_acc"]
                        drops[(variant, policy)].append(100 * (original - acc))
                        line.append(f"{variant}/{policy} {100 * acc:.2f}")
                print(", ".join(line), flush=True)
    print(f"\naccuracy lost at epoch {args.epochs} (points; negative = CMD better), "
          f"{args.runs} runs x {args.samplings} samples:")
    for (variant, policy), values in drops.items():
        print(f"  {variant:8s} --bn-stats {policy:6s}: mean {statistics.mean(values):+.2f}, "
              f"worst {max(values):+.2f}, best {min(values):+.2f}")


if __name__ == "__main__":
    main()
