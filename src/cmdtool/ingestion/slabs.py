"""What both ingest engines do to one checkpoint: the one slab-size rule, filling its rows slab by slab, counting
its non-finite values, hashing its files and recording it on the time axis. The engines are :mod:`.ingest` (in
this process) and :mod:`.cluster_ingest` (Dask tasks).
"""

from __future__ import annotations

import bisect
import hashlib
from pathlib import Path

import numpy as np

from ..store import format as fmt
from ..store.layout import Layout, TensorEntry, TimeRecord
from ..utils.units import now_iso
from .formats import CheckpointSource, OpenCheckpoint


def slab_rows(n_rows: int, chunk_rows: int, budget: int, row_bytes: int) -> int:
    """Rows of a slab: whole chunk rows (at least one chunk row), as many as ``budget`` bytes hold at
    ``row_bytes`` bytes per row, and no more than the store has."""
    return int(min(n_rows, max(chunk_rows, (budget // row_bytes) // chunk_rows * chunk_rows)))


def fill_rows(checkpoint: OpenCheckpoint, entries: list[TensorEntry], target: np.ndarray, start: int) -> None:
    """Copy rows ``start .. start+len(target)`` of one checkpoint into ``target`` (float32), tensor by tensor
    (``entries``: the trajectory entries in row order); a tensor that straddles the slab is copied in part, and
    the pages it was read from are released at once, so memory never holds more than the slab and one tensor."""
    stop = start + len(target)
    first = bisect.bisect_right([e.stop for e in entries], start)
    for entry in entries[first:]:
        if entry.offset >= stop:
            break
        lo, hi = max(entry.offset, start) - entry.offset, min(entry.stop, stop) - entry.offset
        checkpoint.read_into(entry.name, lo, hi, target[entry.offset + lo - start:entry.offset + hi - start])


def fill_integers(checkpoint: OpenCheckpoint, layout: Layout, int_row: np.ndarray) -> None:
    for entry in layout.integer_entries:
        checkpoint.read_integers_into(entry.name, int_row[entry.offset:entry.stop])


def count_nonfinite(values: np.ndarray) -> int:
    return int(values.size - np.count_nonzero(np.isfinite(values)))


def file_digest(files: list[Path], algorithm: str = fmt.DIGEST) -> str:
    """``"<algorithm>:<hex>"`` over the files' bytes (in order), in a thread beside the conversion (both
    hashes release the GIL). xxh3_128 by default, faster than sha256 (docs/performance.md,
    "Ingest"); ``sha256`` still checks format-1 records."""
    if algorithm == "xxh3_128":
        import xxhash

        digest = xxhash.xxh3_128()
    elif algorithm == "sha256":
        digest = hashlib.sha256()
    else:
        raise ValueError(f"unknown digest {algorithm!r}")
    for path in files:
        with open(path, "rb") as handle:
            while chunk := handle.read(1024**2):
                digest.update(chunk)
    return f"{algorithm}:{digest.hexdigest()}"


def time_record(source: CheckpointSource, digest: str, nonfinite: int) -> TimeRecord:
    extra = {"folder": source.folder_origin or str(source.folder.resolve())} if source.folder is not None else {}
    return TimeRecord(label=int(source.label), source=source.origin or str(source.path.resolve()),
                      size=source.size, mtime=source.mtime, digest=digest, ingested_at=now_iso(),
                      nonfinite=nonfinite, extra=extra)


def account(report, record: TimeRecord, source: CheckpointSource) -> None:
    report.bytes_read += record.size
    if record.nonfinite:
        report.nonfinite[record.label] = record.nonfinite
