"""Train a small CNN on scikit-learn's 8x8 digits and save one checkpoint per epoch: the run `make demo` analyses.

A plain torch training loop; copy it and put your own model, data and optimiser in. All cmdtool needs from a
training run is the folder of per-epoch state dicts this writes (``epoch_001.pt``, ``epoch_002.pt``, ...)::

    python examples/train_digits.py --out ckpts --epochs 40
    cmdtool ingest ckpts
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

from cmdtool.datasets import evaluate, load_split, make_model, shift_augment


def train(out_dir: Path, epochs: int = 40, seed: int = 0, lr: float = 0.05, momentum: float = 0.9,
          batch_size: int = 64) -> list[Path]:
    """SGD with momentum, one-pixel random shifts as augmentation; returns the checkpoint paths."""
    torch.set_num_threads(1)  # tiny convolutions: one thread is much faster than several
    out_dir.mkdir(parents=True, exist_ok=True)
    data = load_split()              # stratified 70/30 split; the 30% test set is never trained on
    model = make_model(seed)         # 2 conv layers with BatchNorm + a linear classifier, 3,866 trainable parameters
    optimiser = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    generator = torch.Generator().manual_seed(seed)
    paths = []
    for epoch in range(1, epochs + 1):
        model.train()
        order = torch.randperm(len(data.train_y), generator=generator)
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            images = shift_augment(data.train_x[batch], generator)
            loss = nn.functional.cross_entropy(model(images), data.train_y[batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        path = out_dir / f"epoch_{epoch:03d}.pt"
        torch.save(model.state_dict(), path)   # a plain state dict: loads with weights_only=True
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("ckpts"), help="folder for epoch_XXX.pt")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    paths = train(args.out, args.epochs, args.seed)
    final = evaluate(torch.load(paths[-1], weights_only=True))
    print(f"trained {args.epochs} epochs (seed {args.seed}): {len(paths)} checkpoints in {args.out}/, "
          f"final test accuracy {final['test_acc']:.4f}, test loss {final['test_loss']:.4f}")


if __name__ == "__main__":
    main()
