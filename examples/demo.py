"""`make demo`: a small run end to end. Writes checkpoints of a drifting CNN, ingests them and summarises.

Replaced by the digits training pipeline once the analyzers land (see docs/demo.md).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import torch

OUT = Path("demo-run")


def main() -> None:
    shutil.rmtree(OUT, ignore_errors=True)
    ckpts = OUT / "ckpts"
    ckpts.mkdir(parents=True)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 10))
    for epoch in range(1, 31):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))
        torch.save(model.state_dict(), ckpts / f"epoch_{epoch}.pt")
    cmd = [sys.executable, "-m", "cmdtool_cli", ]
    store = ["--store", str(OUT / "cmdtool.zarr")]
    subprocess.run(cmd + ["ingest", str(ckpts)] + store, check=True)
    subprocess.run(cmd + ["info"] + store, check=True)


if __name__ == "__main__":
    main()
