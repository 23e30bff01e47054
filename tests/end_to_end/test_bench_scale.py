"""bench/scale.py runs end to end (smoke size, every step in this process) and cleans up after itself."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_scale_benchmark_smoke(tmp_path):
    out = tmp_path / "figures.json"
    work = tmp_path / "bench"
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "scale.py"), "--size", "smoke", "--in-process",
                          "--dir", str(work), "--json", str(out)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    (summary,) = json.loads(out.read_text())
    assert summary["n_params"] == 50_000 and summary["n_checkpoints"] == 12
    assert set(summary["steps"]) == {"floor", "ingest", "read", "cmd", "dmd", "kga", "pca", "reconstruct",
                                     "batched"}
    assert all(step["seconds"] > 0 and step["peak_rss_mb"] > 0 for step in summary["steps"].values())
    assert "| cmd |" in run.stdout and not work.exists()  # generated checkpoints and store deleted
