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

    The snippet may fill the dict ``result``; this adds ``seconds`` (unless set), ``cpu_seconds`` (CPU time of
    every thread of the process, less sensitive than ``seconds`` to other jobs on a shared machine), ``peak_rss_mb``
    and ``import_rss_mb`` (the peak before the timed part). On failure returns ``{"error": last stderr line}``.
    """
    wrapper = "\n".join([
        "import json, sys, time",
        f"sys.path[:0] = {[str(ROOT / 'src'), str(ROOT / 'bench')]!r}",
        "from _measure import peak_rss_mb",
        textwrap.dedent(preamble).strip(),
        "base_rss = peak_rss_mb()",
        "result = {}",
        "started, cpu_started = time.perf_counter(), time.process_time()",
        textwrap.dedent(code).strip(),
        "result.setdefault('seconds', time.perf_counter() - started)",
        "result.setdefault('cpu_seconds', time.process_time() - cpu_started)",
        "result['peak_rss_mb'] = peak_rss_mb()",
        "result['import_rss_mb'] = base_rss",
        "print(json.dumps(result))",
    ])
    out = subprocess.run([sys.executable, "-c", wrapper], capture_output=True, text=True)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


PYDMD_STEP, SKLEARN_STEP = "PyDMD DMD(svd_rank=10), in memory", "sklearn PCA(40), in memory"


def reference_steps(store) -> dict[str, str]:
    """Snippets for :func:`run_measured`: PyDMD ``DMD(svd_rank=10)`` and scikit-learn ``PCA(40)`` on W loaded into
    memory (the load timed apart, in ``load_seconds``), each with the relative error of its reconstruction."""
    load = f"""
        st = open_store({str(store)!r})
        t0 = time.perf_counter()
        W = st.trajectories[:, :]
        result['load_seconds'] = time.perf_counter() - t0
        t0, c0 = time.perf_counter(), time.process_time()
    """
    steps = {
        PYDMD_STEP: """
            from pydmd import DMD
            d = DMD(svd_rank=10).fit(W)
            rec = d.reconstructed_data.real
            result.update(seconds=time.perf_counter() - t0, cpu_seconds=time.process_time() - c0)
            result['relative_error'] = float(np.linalg.norm(W - rec) / np.linalg.norm(W))
        """,
        SKLEARN_STEP: """
            from sklearn.decomposition import PCA
            p = PCA(n_components=40).fit(W.T)
            result.update(seconds=time.perf_counter() - t0, cpu_seconds=time.process_time() - c0)
            rec = p.inverse_transform(p.transform(W.T)).T
            result['relative_error'] = float(np.linalg.norm(W - rec) / np.linalg.norm(W))
            result['solver'] = p._fit_svd_solver
        """,
    }
    # dedented apart: the two parts are indented differently
    return {name: textwrap.dedent(load) + textwrap.dedent(code) for name, code in steps.items()}
