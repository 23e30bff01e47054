"""Storage engines side by side: every candidate reads the same stores in the same run, one fresh process per
reader, in alternating rounds (issue #27: the choice of cmdtool's one chunk engine).

    PYTHONPATH=src python bench/engines.py --store wide=/tmp/wide.zarr --store narrow=/tmp/narrow.zarr \
        --rounds 3 [--baseline-src /tmp/base/src] [--json out.json]

Each reader reads the whole ``trajectories`` array of a store in row blocks of the passes' size (about 32 MiB:
``default_block_rows(T, passes.DEFAULT_BLOCK_BYTES)``, whole chunk rows over every column), one block read ahead of
the consumer where the engine does not do it itself, twice in its process; the faster of the two reads is kept
(wall and CPU seconds of the process, all threads), with the process's peak RSS (VmHWM). Rounds run the readers
in turn, so that the load of a shared machine falls on all of them alike; the table shows medians over rounds
and the range. The load average is printed with it.

Readers (``--readers`` picks some):

- ``hand (baseline)``: ``--baseline-src``'s ``open_store(p).iter_blocks(..., reuse_arrays=True)``, the chunk
  reader cmdtool had before issue #27 (store/chunk_files.py);
- ``cmdtool``: this tree's ``open_store(p).iter_blocks(..., reuse_arrays=True)``;
- ``zarr cN bM``: zarr-python's own codec pipeline, ``async.concurrency`` N, ``codec_pipeline.batch_size`` M,
  each block read into an array handed back by the consumer (``get_basic_selection(out=)``), one block ahead in a
  thread;
- ``zarrs tN``: the same through the zarrs Rust codec pipeline (``codec_pipeline.path``), ``threading.max_workers``
  N;
- ``tensorstore``: the zarr3 driver, ``data_copy_concurrency`` and ``file_io_concurrency`` at the core count, no
  cache, the next block's read issued before the current one is consumed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Shared by every reader: the block rows of the passes, and a timed loop over two full reads.
PREAMBLE = """
import json, os, sys, threading, time
import numpy as np

def peak_rss_mb():
    for line in open('/proc/self/status'):
        if line.startswith('VmHWM:'):
            return int(line.split()[1]) / 1024

def block_rows_of(n_rows, chunk_rows, n_cols, block_bytes=32 * 1024**2):
    return int(max(1, block_bytes // (4 * n_cols * chunk_rows)) * chunk_rows)

def ahead(read, starts):
    # one block read ahead of the consumer, in a thread
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(read, starts[0])
        for k in range(len(starts)):
            block = pending.result()
            if k + 1 < len(starts):
                pending = pool.submit(read, starts[k + 1])
            yield block

def timed(full_read, result):
    best = None
    for _ in range(2):
        t0, c0 = time.perf_counter(), time.process_time()
        total = full_read()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        if best is None or wall < best[0]:
            best = (wall, cpu)
    result.update(seconds=best[0], cpu_seconds=best[1], checksum=float(total), peak_rss_mb=peak_rss_mb())
"""

READERS = {
    "hand (baseline)": ("baseline", """
        from cmdtool.store import open_store
        from cmdtool.passes.local import DEFAULT_BLOCK_BYTES
        st = open_store(STORE)
        def full_read():
            total = 0.0
            for start, stop, data in st.iter_blocks(block_bytes=DEFAULT_BLOCK_BYTES, reuse_arrays=True):
                total += float(data[-1, -1])
            return total
        timed(full_read, result)
    """),
    "cmdtool": ("tree", """
        from cmdtool.store import open_store
        from cmdtool.passes.local import DEFAULT_BLOCK_BYTES
        st = open_store(STORE)
        def full_read():
            total = 0.0
            for block in st.iter_blocks(block_bytes=DEFAULT_BLOCK_BYTES, reuse_arrays=True):
                total += float(block.data[-1, -1])
                block.release()
            return total
        timed(full_read, result)
    """),
}


def _zarr_reader(pipeline: str, setting: dict) -> str:
    return f"""
        import zarr
        from zarr.core.buffer import default_buffer_prototype
        zarr.config.set({{**{setting!r}, 'codec_pipeline.path': {pipeline!r}}})
        a = zarr.open_array(STORE + '/trajectories', mode='r')
        n, t = a.shape
        rows = block_rows_of(n, a.chunks[0], t)
        starts = list(range(0, n, rows))
        free = []  # arrays the consumer handed back
        def read(start):
            stop = min(start + rows, n)
            out = free.pop() if free else np.empty((rows, t), dtype=a.dtype)
            view = out[:stop - start]
            a.get_basic_selection((slice(start, stop), slice(0, t)),
                                  out=default_buffer_prototype().nd_buffer.from_numpy_array(view))
            return out, view
        def full_read():
            total = 0.0
            for out, view in ahead(read, starts):
                total += float(view[-1, -1])
                free.append(out)
            return total
        timed(full_read, result)
    """


for concurrency, batch in ((10, 1), (64, 1), (10, 16), (64, 64), (150, 150)):
    READERS[f"zarr c{concurrency} b{batch}"] = ("tree", _zarr_reader(
        "zarr.core.codec_pipeline.BatchedCodecPipeline",
        {"async.concurrency": concurrency, "codec_pipeline.batch_size": batch}))
for threads in (1, 2):
    READERS[f"zarrs t{threads}"] = ("tree", _zarr_reader("zarrs.ZarrsCodecPipeline",
                                                         {"threading.max_workers": threads,
                                                          "codec_pipeline.validate_checksums": True}))
READERS["zarrs t2 min4"] = ("tree", _zarr_reader("zarrs.ZarrsCodecPipeline",
                                                 {"threading.max_workers": 2, "codec_pipeline.validate_checksums": True,
                                                  "codec_pipeline.chunk_concurrent_minimum": 4}))
READERS["tensorstore"] = ("tree", """
    import tensorstore as ts
    cores = len(os.sched_getaffinity(0))
    a = ts.open({'driver': 'zarr3', 'kvstore': {'driver': 'file', 'path': STORE + '/trajectories'},
                 'fill_missing_data_reads': False, 'recheck_cached_data': False},
                context=ts.Context({'data_copy_concurrency': {'limit': cores},
                                    'file_io_concurrency': {'limit': cores},
                                    'cache_pool': {'total_bytes_limit': 0}}), read=True).result()
    n, t = a.shape
    rows = block_rows_of(n, a.chunk_layout.read_chunk.shape[0], t)
    starts = list(range(0, n, rows))
    def full_read():
        total = 0.0
        pending = a[starts[0]:min(starts[0] + rows, n), :].read()
        for k in range(len(starts)):
            block = pending.result()
            if k + 1 < len(starts):
                pending = a[starts[k + 1]:min(starts[k + 1] + rows, n), :].read()
            total += float(block[-1, -1])
        return total
    timed(full_read, result)
""")


def run_reader(name: str, store: str, baseline_src: Path | None) -> dict:
    where, code = READERS[name]
    src = baseline_src if where == "baseline" else ROOT / "src"
    program = "\n".join([f"import sys; sys.path.insert(0, {str(src)!r})", textwrap.dedent(PREAMBLE),
                         f"STORE = {store!r}", "result = {}", textwrap.dedent(code),
                         "print(json.dumps(result))"])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(src)}
    out = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or [f"exit {out.returncode}"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", action="append", required=True, help="NAME=PATH of a store to read")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--readers", default=",".join(READERS), help="comma-separated names")
    parser.add_argument("--baseline-src", type=Path, default=None,
                        help="src/ of a checkout with the hand-written reader (e.g. git archive e46185b)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    readers = [r for r in args.readers.split(",") if r in READERS and
               (READERS[r][0] != "baseline" or args.baseline_src)]
    stores = dict(s.split("=", 1) for s in args.store)
    runs: dict = {(s, r): [] for s in stores for r in readers}
    loads = []
    for k in range(args.rounds):
        for store_name, path in stores.items():
            for reader in (readers if k % 2 == 0 else readers[::-1]):
                got = run_reader(reader, path, args.baseline_src)
                got["load_average"] = os.getloadavg()[0]
                loads.append(got["load_average"])
                runs[store_name, reader].append(got)
                print(f"round {k + 1} {store_name} {reader}: {got}", file=sys.stderr)
    print(f"{os.cpu_count()} CPUs; load average during the runs {min(loads):.2f}-{max(loads):.2f}; "
          f"medians over {args.rounds} rounds (range)\n")
    print("| store | reader | wall s | CPU s | peak RSS MB |")
    print("|---|---|---:|---:|---:|")
    for (store_name, reader), got in runs.items():
        good = [g for g in got if "error" not in g]
        if not good:
            print(f"| {store_name} | {reader} | failed: {got[0]['error'][:80]} | | |")
            continue

        def cell(key, digits=2):
            values = [g[key] for g in good]
            return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"
        print(f"| {store_name} | {reader} | {cell('seconds')} | {cell('cpu_seconds')} | {cell('peak_rss_mb', 0)} |")
    if args.json:
        args.json.write_text(json.dumps({f"{s} | {r}": v for (s, r), v in runs.items()}, indent=2))


if __name__ == "__main__":
    main()
