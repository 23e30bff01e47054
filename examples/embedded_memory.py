"""Memory EmbeddedCMD holds, per parameter, after the warm-up (paper 000, App. C.7: O(N)).

    python examples/embedded_memory.py            # MLPs of 0.1M, 1M and 4M parameters, random data

Counts the bytes of every array and tensor EmbeddedCMD keeps (its OnlineCMD sums, Alg. 4's coefficients and
flags, the per-parameter masks and float32 coefficients on the model's device), not the model or optimizer.
"""

from __future__ import annotations

import sys
import warnings

import numpy as np
import torch
from torch import nn

from cmdtool.training import EmbeddedCMD


def held_bytes(value, seen: set) -> int:
    """Bytes of the arrays and tensors reachable from ``value`` through attributes and containers."""
    if id(value) in seen:
        return 0
    seen.add(id(value))
    if isinstance(value, nn.Module):  # the model itself is not CMD's memory
        return 0
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, np.ndarray):
        return value.nbytes
    if isinstance(value, dict):
        return sum(held_bytes(v, seen) for v in value.values())
    if isinstance(value, (list, tuple, set)):
        return sum(held_bytes(v, seen) for v in value)
    if hasattr(value, "__dict__") and type(value).__module__.startswith("cmdtool"):
        return sum(held_bytes(v, seen) for v in vars(value).values())
    return 0


def measure(width: int, epochs: int = 8) -> tuple[int, int, float]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    cmd = EmbeddedCMD(model, modes=10, warmup=4, every=2, fraction=0.10, optimizer=optimizer)
    x, y = torch.randn(256, 64), torch.randint(0, 10, (256,))
    for epoch in range(epochs):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        cmd.on_epoch_end(epoch)
    n = sum(p.numel() for p in model.parameters())
    # decisions at epochs 6 and 8: 20% embedded; the model's own tensors are not counted
    model_tensors = {id(t) for t in model.state_dict(keep_vars=True).values()}
    bytes_held = held_bytes(cmd, {id(model), id(optimizer), *model_tensors})
    return n, bytes_held, cmd.plan.embedded_fraction()


def main() -> None:
    warnings.simplefilter("ignore")
    print("| parameters N | embedded | bytes held by EmbeddedCMD | bytes per parameter | x a float32 model |")
    print("|---|---|---|---|---|")
    for width in (256, 960, 1984):
        n, held, embedded = measure(width)
        print(f"| {n:,} | {100 * embedded:.0f}% | {held:,} | {held / n:.1f} | {held / (4 * n):.2f} |", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
