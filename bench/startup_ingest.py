"""Start-up and wall time of `cmdtool ingest` of a folder of safetensors checkpoints, per checkout (issue #26).

Set-up (torch, in this process): 20 safetensors checkpoints of the digits CNN (``cmdtool.datasets.train``), or with
``--params N`` 20 checkpoints of a synthetic model of N parameters (half float32, a quarter each bfloat16 and
float16). Then each ``--checkout`` (a source tree with src/ and cli/) ingests the folder into a new store in a fresh
process (``python -X importtime``), the checkouts taking turns, ``--repeat`` times each. Printed per checkout: the
medians of the wall time, the child's CPU time, the time spent importing (the sum of ``-X importtime``'s self
times) and torch's share of it, and whether torch was imported.

    python bench/startup_ingest.py --checkout /work/main --checkout . [--repeat 7] [--params 8000000]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROBE = """
import sys
from cmdtool_cli.app import app
try:
    app(["ingest", sys.argv[1], "--store", sys.argv[2], "-q"])
except SystemExit as exit:
    assert not exit.code, exit.code
sys.stdout.write("TORCH " + str("torch" in sys.modules) + "\\n")
"""


def write_checkpoints(folder: Path, params: int) -> None:
    if not params:
        from cmdtool.datasets import train

        train(folder, epochs=20, fmt="safetensors")
        return
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    quarter = params // 4
    for epoch in range(1, 21):
        save_file({"body.weight": torch.randn(2 * quarter, generator=generator),
                   "head.weight": torch.randn(quarter, generator=generator).to(torch.bfloat16),
                   "norm.weight": torch.randn(quarter, generator=generator).to(torch.float16)},
                  str(folder / f"epoch_{epoch}.safetensors"))


def run(python: str, checkout: Path, folder: Path, store: Path) -> tuple[float, float, float, float, bool]:
    env = dict(os.environ, PYTHONPATH=f"{checkout / 'src'}{os.pathsep}{checkout / 'cli'}")
    shutil.rmtree(store, ignore_errors=True)
    before = os.times()
    started = time.perf_counter()
    out = subprocess.run([python, "-X", "importtime", "-c", PROBE, str(folder), str(store)], capture_output=True,
                         text=True, env=env, check=True)
    wall = time.perf_counter() - started
    after = os.times()
    cpu = (after.children_user - before.children_user) + (after.children_system - before.children_system)
    imports, torch_import = 0.0, 0.0
    for line in out.stderr.splitlines():  # "import time: self [us] | cumulative | imported package"
        if line.startswith("import time:") and "self [us]" not in line:
            fields = line[len("import time:"):].split("|")
            imports += int(fields[0]) / 1e6
            if fields[2].strip() == "torch":
                torch_import = int(fields[1]) / 1e6
    return wall, cpu, imports, torch_import, "TORCH True" in out.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkout", action="append", type=Path, required=True)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--params", type=int, default=0, help="a synthetic model of this many parameters")
    parser.add_argument("--python", default=sys.executable)
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "ckpts"
        write_checkpoints(folder, opts.params)
        size = sum(f.stat().st_size for f in folder.iterdir())
        print(f"{len(list(folder.iterdir()))} checkpoints, {size / 1e6:.1f} MB")
        runs: dict[Path, list] = {c: [] for c in opts.checkout}
        for _ in range(opts.repeat):
            for checkout in opts.checkout:  # taking turns, so that load on the machine falls on both alike
                runs[checkout].append(run(opts.python, checkout, folder, Path(tmp) / "s.zarr"))
        for checkout, results in runs.items():
            wall, cpu, imports, torch_import = (statistics.median(r[i] for r in results) for i in range(4))
            print(f"{str(checkout):<20} wall {wall:.2f} s, cpu {cpu:.2f} s, imports {imports:.2f} s "
                  f"(torch {torch_import:.2f} s), torch imported: {results[0][4]} (median of {opts.repeat})")


if __name__ == "__main__":
    main()
