"""Start-up time of the CLI: `cmdtool --help`, `cmdtool info`, `cmdtool verify`, and `cmdtool decompose` (PCA
and CMD on the CPU, issue #26) on a small store (5000 x 20).

Runs each command ``--repeat`` times in a fresh process and prints the median wall time and the median CPU time
(user + system of the child, less sensitive to other load on the machine), plus which heavy libraries the
command imported. The target is under 0.5 s for the first three (issue #11); decompose imports no torch on the CPU.
``--pythonpath`` runs another tree (e.g. ``git archive main`` unpacked: ``SRC/src:SRC/cli``) for a before/after.

    python bench/startup.py [--repeat 7] [--python .venv/bin/python] [--pythonpath SRC/src:SRC/cli]
"""

from __future__ import annotations

import argparse
import os
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
    app(sys.argv[1:])
except SystemExit as exit:
    code = exit.code
sys.stderr.write("HEAVY " + ",".join(m for m in ("torch", "matplotlib", "scipy", "zarr") if m in sys.modules) + "\\n")
"""


def run(python: str, args: list[str], env: dict | None = None) -> tuple[float, float, str]:
    before = os.times()
    started = time.perf_counter()
    out = subprocess.run([python, "-c", PROBE, *args], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - started
    after = os.times()
    cpu = (after.children_user - before.children_user) + (after.children_system - before.children_system)
    heavy = next((line[6:] for line in out.stderr.splitlines() if line.startswith("HEAVY ")), "?")
    return wall, cpu, heavy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--pythonpath", help="PYTHONPATH of the cmdtool to time (default: as installed)")
    opts = parser.parse_args()
    env = dict(os.environ, PYTHONPATH=opts.pythonpath) if opts.pythonpath else None
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "s.zarr"
        subprocess.run([opts.python, "-c", "import numpy as np, sys\nfrom cmdtool.store import from_array\n"
                        "from_array(sys.argv[1], np.random.default_rng(0).normal(size=(5000, 20)).cumsum(axis=1))",
                        str(store)], check=True, env=env)
        commands = (["--help"], ["info", "--store", str(store)], ["verify", "-q", "--store", str(store)],
                    ["decompose", "-m", "pca", "--dims", "3", "-q", "--device", "auto", "--store", str(store)],
                    ["decompose", "--modes", "10", "-q", "--device", "auto", "--store", str(store)])
        for args in commands:
            runs = [run(opts.python, args, env) for _ in range(opts.repeat)]
            wall = statistics.median(r[0] for r in runs)
            cpu = statistics.median(r[1] for r in runs)
            label = " ".join(args[:3]) if args[0] == "decompose" else args[0]
            print(f"cmdtool {label:<20} wall {wall:.3f} s, cpu {cpu:.3f} s (median of {opts.repeat}); "
                  f"imported: {runs[0][2] or 'none of torch/matplotlib/scipy/zarr'}")


if __name__ == "__main__":
    main()
