"""Shared by the benchmarks: run a snippet in a fresh interpreter and measure its own time and peak memory."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def peak_rss_mb() -> float:
    """Peak resident set of this process image (VmHWM). Not ru_maxrss: Linux carries that over fork+exec
    from the parent, which in a benchmark holds the generated data."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_measured(code: str, preamble: str = "") -> dict:
    """Run ``code`` (after ``preamble``, untimed) in a fresh interpreter with ``src/`` on the path.

    The snippet may fill the dict ``result``; this adds ``seconds`` (unless set), ``peak_rss_mb`` and
    ``import_rss_mb`` (the peak before the timed part). On failure returns ``{"error": last stderr line}``.
    """
    wrapper = "\n".join([
        "import json, sys, time",
        f"sys.path[:0] = {[str(ROOT / 'src'), str(ROOT / 'bench')]!r}",
        "from _measure import peak_rss_mb",
        textwrap.dedent(preamble).strip(),
        "base_rss = peak_rss_mb()",
        "result = {}",
        "started = time.perf_counter()",
        textwrap.dedent(code).strip(),
        "result.setdefault('seconds', time.perf_counter() - started)",
        "result['peak_rss_mb'] = peak_rss_mb()",
        "result['import_rss_mb'] = base_rss",
        "print(json.dumps(result))",
    ])
    out = subprocess.run([sys.executable, "-c", wrapper], capture_output=True, text=True)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])
