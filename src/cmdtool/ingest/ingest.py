"""Streaming ingest of checkpoints into the trajectory store, in bounded memory, resumable after any crash.

Memory: one buffer of ``Tc`` checkpoints (``Tc x N`` float32, sized by ``memory_budget``) plus the checkpoint
being read. When the buffer is full it is written as whole chunks (one column of ``R x Tc`` chunks), then the
time axis is committed. A crash loses at most the buffer; the next run re-reads those checkpoints.
"""

from __future__ import annotations

import fnmatch
import hashlib
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import CheckpointError, UsageError
from ..progress import NullProgress
from ..store import format as fmt
from ..store.layout import Layout, TensorEntry, TimeRecord, numel_of, tensor_kind
from ..store.lock import file_lock
from ..store.store import TrajectoryStore, default_store_path, now_iso
from ..units import parse_size
from .discover import discover
from .formats import CheckpointSource, OpenCheckpoint, dtype_name, role_of_dtype

DEFAULT_MEMORY_BUDGET = fmt.INGEST_MEMORY_BUDGET


@dataclass
class IngestReport:
    store: Path
    added: list[int] = field(default_factory=list)       # labels appended
    replaced: list[int] = field(default_factory=list)    # labels re-ingested with --force
    unchanged: list[int] = field(default_factory=list)   # labels already in the store
    skipped: list[str] = field(default_factory=list)     # notes on non-checkpoint files
    nonfinite: dict[int, int] = field(default_factory=dict)  # label -> count of NaN/Inf values stored
    bytes_read: int = 0
    seconds: float = 0.0
    created: bool = False
    n_rows: int = 0
    n_checkpoints: int = 0

    def to_json(self) -> dict:
        return {"store": str(self.store), "created": self.created, "added": self.added, "replaced": self.replaced,
                "unchanged": self.unchanged, "skipped": self.skipped,
                "nonfinite": {str(k): v for k, v in self.nonfinite.items()}, "bytes_read": self.bytes_read,
                "seconds": round(self.seconds, 3), "n_rows": self.n_rows, "n_checkpoints": self.n_checkpoints}


def file_digest(files: list[Path]) -> str:
    """sha256 over the files' bytes (in order); hashlib releases the GIL, so this runs beside the conversion."""
    digest = hashlib.sha256()
    for path in files:
        with open(path, "rb") as handle:
            while chunk := handle.read(8 * 1024**2):
                digest.update(chunk)
    return digest.hexdigest()


def build_layout(infos, source: CheckpointSource, include=(), exclude=(), buffers: bool = True) -> Layout:
    """Lay out the tensors of a first checkpoint: floating tensors become trajectory rows in state-dict order."""
    entries, row, int_row = [], 0, 0
    for info in infos:
        kind = tensor_kind(info.name)
        selected = ((not include or any(fnmatch.fnmatchcase(info.name, p) for p in include))
                    and not any(fnmatch.fnmatchcase(info.name, p) for p in exclude)
                    and (buffers or kind != "buffer"))
        role = role_of_dtype(info.dtype)
        if role is None:
            raise CheckpointError(f"{source.path}: tensor {info.name!r} has unsupported dtype "
                                  f"{dtype_name(info.dtype)} (supported: float16/32/64, bfloat16, integers, bool)")
        numel = numel_of(info.shape)
        if not selected:
            entries.append(TensorEntry(info.name, info.shape, dtype_name(info.dtype), kind, "excluded", 0, numel))
        elif role == "trajectory":
            entries.append(TensorEntry(info.name, info.shape, dtype_name(info.dtype), kind, role, row, numel))
            row += numel
        else:
            entries.append(TensorEntry(info.name, info.shape, dtype_name(info.dtype), kind, role, int_row, numel))
            int_row += numel
    layout = Layout(entries)
    if layout.n_rows == 0:
        why = "no floating-point tensors" if not (include or exclude or not buffers) else \
            "no floating-point tensors left after --include/--exclude/--no-buffers"
        raise CheckpointError(f"{source.path}: {why}; nothing to analyse")
    return layout


def check_layout(layout: Layout, infos, source: CheckpointSource) -> None:
    """Raise naming the tensors whose names, shapes or dtypes differ from the store's."""
    expected = layout.by_name()
    found = {i.name: i for i in infos}
    problems = []
    missing = [n for n in expected if n not in found]
    extra = [n for n in found if n not in expected]
    if missing:
        problems.append("missing " + ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else ""))
    if extra:
        problems.append("not in the store " + ", ".join(extra[:5]) + (" ..." if len(extra) > 5 else ""))
    for name, entry in expected.items():
        info = found.get(name)
        if info is None:
            continue
        if tuple(info.shape) != tuple(entry.shape):
            problems.append(f"{name} has shape {tuple(info.shape)}, the store {tuple(entry.shape)}")
        elif dtype_name(info.dtype) != entry.dtype:
            problems.append(f"{name} is {dtype_name(info.dtype)}, the store {entry.dtype}")
    if problems:
        shown = "; ".join(problems[:4]) + ("; ..." if len(problems) > 4 else "")
        raise CheckpointError(f"{source.path} does not match the store's tensors: {shown}")


def _fill(checkpoint: OpenCheckpoint, layout: Layout, row: np.ndarray, int_row: np.ndarray | None) -> None:
    """Copy one checkpoint's values into a float32 row of the buffer (and its integers aside)."""
    target = torch.from_numpy(row)
    int_target = torch.from_numpy(int_row) if int_row is not None else None
    for entry in layout.entries:
        if entry.role == "excluded":
            continue
        tensor = checkpoint.tensor(entry.name).detach().reshape(-1)
        if entry.role == "trajectory":
            target[entry.offset:entry.stop].copy_(tensor)  # casts bf16/fp16/fp64 -> float32
        else:
            int_target[entry.offset:entry.stop].copy_(tensor)


def ingest(paths, store: str | Path | None = None, *, label_pattern: str | None = None,
           include: tuple[str, ...] = (), exclude: tuple[str, ...] = (), buffers: bool = True,
           memory_budget: str | int = DEFAULT_MEMORY_BUDGET, force: bool = False, progress=None) -> IngestReport:
    """Stream the checkpoints under ``paths`` into the store (created if needed). See ``cmdtool ingest --help``."""
    progress = progress or NullProgress()
    started = time.perf_counter()
    budget = parse_size(memory_budget)
    store_path = Path(store) if store is not None else default_store_path()
    if store_path.exists() and not store_path.is_dir():
        raise UsageError(f"store path {store_path} is a file, not a trajectory store")
    report = IngestReport(store=store_path)

    existing = (store_path / "zarr.json").is_file()
    if existing:
        st = TrajectoryStore(store_path, mode="r+")
        lock = st.ingest_lock()
    else:
        if store_path.exists() and any(p.name not in (fmt.INGEST_LOCK, fmt.RESULTS_LOCK)
                                       for p in store_path.iterdir()):
            raise UsageError(f"{store_path} exists and is not a trajectory store; choose another --store")
        st = None
        created_dir = not store_path.exists()
        discovery = discover(paths, label_pattern, ignore=(store_path,))  # check the input before creating
        store_path.mkdir(parents=True, exist_ok=True)
        lock = file_lock(store_path / fmt.INGEST_LOCK, f"store {store_path}")
    try:
        with lock:
            if st is None and (store_path / "zarr.json").is_file():  # another ingest created it meanwhile
                st = TrajectoryStore(store_path, mode="r+")
            if st is not None:  # existing store: discover under the lock, labels continue the store's
                first_free = int(st.labels[-1]) + 1 if st.n_checkpoints else 0
                discovery = discover(paths, label_pattern, first_free_label=first_free, ignore=(store_path,))
            return _ingest_locked(discovery, st, store_path, report, label_pattern, include, exclude, buffers,
                                  budget, force, progress, started)
    except BaseException:
        # A failed first ingest leaves no store behind (a SIGKILL, which runs no handler, leaves an empty
        # store that the next run fills).
        if not existing and created_dir and (report.created or not (store_path / "zarr.json").is_file()):
            shutil.rmtree(store_path, ignore_errors=True)
        raise


def _ingest_locked(discovery, st, store_path, report, label_pattern, include, exclude, buffers, budget, force,
                   progress, started) -> IngestReport:
    report.skipped = discovery.skipped
    for note in discovery.skipped:
        progress.note(note)

    if st is not None:
        _check_options(st, include, exclude, buffers, label_pattern)

    # ---- classify: already ingested / changed / new
    by_label = {r.label: (i, r) for i, r in enumerate(st.time_axis)} if st is not None else {}
    last_label = int(st.labels[-1]) if st is not None and st.n_checkpoints else None
    new_sources, replace = [], []
    for source in discovery.sources:
        if source.label in by_label:
            column, record = by_label[source.label]
            if source.size == record.size and source.mtime == record.mtime:
                report.unchanged.append(source.label)
                continue
            digest = file_digest(source.files)
            if digest == record.sha256:
                report.unchanged.append(source.label)
                continue
            if not force:
                raise UsageError(f"{source.path}: content changed since epoch {source.label} was ingested "
                                 f"from {record.source}; pass --force to replace that epoch")
            replace.append((column, source))
        elif last_label is not None and source.label < last_label:
            raise UsageError(f"{source.path}: epoch {source.label} falls before the store's last epoch "
                             f"{last_label}; the store only appends (ingest into a new --store instead)")
        else:
            new_sources.append(source)

    todo = new_sources + [s for _, s in replace]
    if not todo:
        report.n_rows, report.n_checkpoints = st.n_rows, st.n_checkpoints
        report.seconds = time.perf_counter() - started
        return report

    # ---- preflight: open every checkpoint (metadata only) before writing anything
    layout = st.layout if st is not None else None
    with progress.task("checking", total=len(todo), unit="ckpt") as task:
        for source in todo:
            with OpenCheckpoint(source) as checkpoint:
                infos = checkpoint.infos()
                if layout is None:
                    layout = build_layout(infos, source, include, exclude, buffers)
                check_layout(layout, infos, source)
            task.advance(1)

    n_rows = layout.n_rows
    if st is None:
        # As wide as the budget allows, but no wider than this first batch needs (padding a chunk costs
        # compression time and disk); later appends add chunk columns of the same width.
        chunk_columns = max(1, min(budget // (4 * n_rows), fmt.MAX_CHUNK_COLUMNS, max(len(new_sources), 32)))
        st = TrajectoryStore.create(store_path, layout, chunk_columns, extra={"ingest_options": {
            "include": list(include), "exclude": list(exclude), "buffers": buffers,
            "label_pattern": label_pattern}})
        report.created = True
    original_meta = dict(st.meta)
    try:
        _stream(st, new_sources, replace, budget, report, progress)
    except Exception:
        # A failure mid-stream (not a kill): publish the time axis as it was, so the store reads as before.
        st.restore(original_meta)
        raise
    report.n_rows, report.n_checkpoints = st.n_rows, st.n_checkpoints
    report.seconds = time.perf_counter() - started
    return report


def _check_options(st: TrajectoryStore, include, exclude, buffers, label_pattern) -> None:
    stored = st.meta.get("ingest_options", {})
    given = {"include": list(include), "exclude": list(exclude), "buffers": buffers}
    for key, value in given.items():
        default = [] if key != "buffers" else True
        if value != default and value != stored.get(key, default):
            raise UsageError(f"store {st.path} was created with {key}={stored.get(key, default)}; "
                             f"appending with {key}={value} would change its rows (use a new --store)")


def _stream(st: TrajectoryStore, new_sources, replace, budget: int, report: IngestReport, progress) -> None:
    layout = st.layout
    n_rows, n_int = layout.n_rows, layout.n_integer_rows
    chunk_columns = st.chunk_shape[1]
    # Buffer whole chunk columns when the budget allows; a smaller budget flushes partial chunks (slower).
    buffer_columns = int(max(1, min(chunk_columns, budget // (4 * n_rows))))
    buffer = np.empty((buffer_columns, n_rows), dtype=np.float32)
    int_buffer = np.empty((buffer_columns, n_int), dtype=np.int64) if n_int else None
    trajectories = st.trajectories
    # rows per write call: whole chunk rows, about 16 MiB of transposed copy (enough chunks to keep zarr's
    # concurrent encoders busy)
    write_rows = st.chunk_shape[0] * max(1, (16 * 1024**2) // (4 * buffer_columns * st.chunk_shape[0]))
    integers = st.integer_values
    time_axis = list(st.time_axis)
    column = len(time_axis)
    pending: list[TimeRecord] = []

    def flush():
        nonlocal column, pending
        if not pending:
            return
        stop = column + len(pending)
        if trajectories.shape[1] < stop:
            trajectories.resize((n_rows, stop))
            if integers is not None:
                integers.resize((n_int, stop))
        # Write a few chunk rows at a time from a contiguous transposed copy: zarr would otherwise copy the
        # whole (strided) buffer at once, doubling the memory the budget allows.
        for row in range(0, n_rows, write_rows):
            row_stop = min(row + write_rows, n_rows)
            trajectories[row:row_stop, column:stop] = np.ascontiguousarray(buffer[:len(pending), row:row_stop].T)
        if integers is not None:
            integers[:, column:stop] = int_buffer[:len(pending)].T
        time_axis.extend(pending)
        st.commit(time_axis)  # the commit point: these checkpoints now count as ingested
        column, pending = stop, []

    total = len(new_sources) + len(replace)
    with ThreadPoolExecutor(max_workers=1) as hasher, \
            progress.task("ingesting", total=total, unit="ckpt") as task:
        for source in new_sources:
            digest = hasher.submit(file_digest, source.files)
            slot = len(pending)
            with OpenCheckpoint(source) as checkpoint:
                _fill(checkpoint, layout, buffer[slot], int_buffer[slot] if int_buffer is not None else None)
            record = _record(source, digest.result(), buffer[slot])
            pending.append(record)
            _account(report, record, source)
            report.added.append(source.label)
            task.advance(1, nbytes=record.size)
            # flush at chunk-column boundaries so that chunks are written whole
            if (column + len(pending)) % chunk_columns == 0 or len(pending) == buffer_columns:
                flush()
        flush()
        for col, source in replace:
            digest = hasher.submit(file_digest, source.files)
            row = np.empty(n_rows, dtype=np.float32)
            int_row = np.empty(n_int, dtype=np.int64) if n_int else None
            with OpenCheckpoint(source) as checkpoint:
                _fill(checkpoint, layout, row, int_row)
            trajectories[:, col] = row
            if integers is not None:
                integers[:, col] = int_row
            record = _record(source, digest.result(), row)
            time_axis[col] = record
            st.commit(time_axis)
            _account(report, record, source)
            report.replaced.append(source.label)
            task.advance(1, nbytes=record.size)


def _record(source: CheckpointSource, digest: str, values: np.ndarray) -> TimeRecord:
    nonfinite = int(values.size - np.count_nonzero(np.isfinite(values)))
    return TimeRecord(label=int(source.label), source=str(source.path.resolve()), size=source.size,
                      mtime=source.mtime, sha256=digest, ingested_at=now_iso(), nonfinite=nonfinite)


def _account(report: IngestReport, record: TimeRecord, source: CheckpointSource) -> None:
    report.bytes_read += record.size
    if record.nonfinite:
        report.nonfinite[record.label] = record.nonfinite
