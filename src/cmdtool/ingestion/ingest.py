"""Streaming ingest of checkpoints into the trajectory store, in bounded memory, resumable after any crash.

Memory: one buffer sized by ``memory_budget`` plus the largest tensor, never a whole checkpoint. Checkpoints are
read tensor by tensor: safetensors files with ``pread`` into numpy (no torch: :mod:`.safetensors_reader`), torch
zip files from memory maps (``torch.load(mmap=True, weights_only=True)``), whose mapped pages of a tensor are
dropped from the process once copied (:meth:`OpenCheckpoint.release`).

- A budget that holds ``Tb >= 1`` whole checkpoints buffers ``Tb x N`` float32 and writes it as whole chunks (one
  column of ``R x Tc`` chunks), then commits the time axis.
- A checkpoint larger than the budget is streamed in row slabs of ``S`` rows (a multiple of the chunk rows):
  each slab is filled from the tensors that overlap it and written, and the column is committed after its last
  slab. The store then has ``Tc = 1``; ``cmdtool rechunk`` widens the chunks afterwards.

A crash loses at most the uncommitted columns; the next run re-reads those checkpoints.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..utils.cluster import active_client
from ..errors import CheckpointError, CmdtoolError, LeaseLostError, UsageError
from ..utils.progress import NullProgress
from ..store import format as fmt
from ..store.layout import Layout, TensorEntry, TimeRecord, numel_of, tensor_kind
from ..store.lock import signals_deferred
from ..store.location import RemotePath, is_url, storage_error, store_location
from ..store.lock import store_lock
from ..store.store import TrajectoryStore, default_store_path, is_creatable
from ..store.zarr_access import codec_of, default_chunk_rows
from ..utils.threads import one_torch_thread
from ..utils.units import parse_size
from .discover import discover
from .formats import CheckpointSource, OpenCheckpoint, needs_torch, role_of_dtype
from .remote import CheckpointStaging, checkpoint_url
from .slabs import account, count_nonfinite, file_digest, fill_integers, fill_rows, slab_rows, time_record

DEFAULT_MEMORY_BUDGET = fmt.INGEST_MEMORY_BUDGET


@dataclass
class IngestReport:
    store: Path
    added: list[int] = field(default_factory=list)       # labels appended
    replaced: list[int] = field(default_factory=list)    # labels re-ingested with --force
    unchanged: list[int] = field(default_factory=list)   # labels already in the store
    skipped: list[str] = field(default_factory=list)     # notes on non-checkpoint files
    notes: list[str] = field(default_factory=list)       # notes on how the tensors are stored (name prefixes)
    nonfinite: dict[int, int] = field(default_factory=dict)  # label -> count of NaN/Inf values stored
    bytes_read: int = 0
    seconds: float = 0.0
    created: bool = False
    n_rows: int = 0
    n_checkpoints: int = 0

    def to_json(self) -> dict:
        return {"store": str(self.store), "created": self.created, "added": self.added, "replaced": self.replaced,
                "unchanged": self.unchanged, "skipped": self.skipped, "notes": self.notes,
                "nonfinite": {str(k): v for k, v in self.nonfinite.items()}, "bytes_read": self.bytes_read,
                "seconds": round(self.seconds, 3), "n_rows": self.n_rows, "n_checkpoints": self.n_checkpoints}


def build_layout(infos, source: CheckpointSource, include=(), exclude=(), buffers: bool = True) -> Layout:
    """Lay out the tensors of a first checkpoint: floating tensors become trajectory rows in state-dict order;
    a tensor tied to an earlier stored one (same storage) is stored once, under the earlier name."""
    entries, row, int_row = [], 0, 0
    roles: dict[str, str] = {}
    for info in infos:
        if info.tied_to and roles.get(info.tied_to) in ("trajectory", "integer"):
            entries.append(TensorEntry(info.name, info.shape, info.dtype, tensor_kind(info.name), "tied",
                                       0, numel_of(info.shape), tied_to=info.tied_to))
            roles[info.name] = "tied"
            continue
        kind = tensor_kind(info.name)
        selected = ((not include or any(fnmatch.fnmatchcase(info.name, p) for p in include))
                    and not any(fnmatch.fnmatchcase(info.name, p) for p in exclude)
                    and (buffers or kind != "buffer"))
        role = role_of_dtype(info.dtype)
        if role is None:
            raise CheckpointError(f"{source.path}: tensor {info.name!r} has unsupported dtype "
                                  f"{info.dtype} (supported: float16/32/64, bfloat16, integers, bool)")
        numel = numel_of(info.shape)
        if not selected:
            role = "excluded"
            entries.append(TensorEntry(info.name, info.shape, info.dtype, kind, role, 0, numel))
        elif role == "trajectory":
            entries.append(TensorEntry(info.name, info.shape, info.dtype, kind, role, row, numel))
            row += numel
        else:
            entries.append(TensorEntry(info.name, info.shape, info.dtype, kind, role, int_row, numel))
            int_row += numel
        roles[info.name] = role
    layout = Layout(entries)
    if layout.n_rows == 0:
        why = "no floating-point tensors" if not (include or exclude or not buffers) else \
            "no floating-point tensors left after --include/--exclude/--no-buffers"
        raise CheckpointError(f"{source.path}: {why}; nothing to analyse")
    return layout


def check_layout(layout: Layout, infos, source: CheckpointSource) -> None:
    """Raise naming the tensors whose names, shapes, dtypes or ties differ from the store's."""
    expected = layout.by_name()
    found = {i.name: i for i in infos}
    problems = []
    missing = [n for n in expected if n not in found]
    extra = [n for n in found if n not in expected]
    hint = _prefix_hint(missing, extra)
    if hint:
        raise CheckpointError(f"{source.path} does not match the store's tensors: {hint}")
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
        elif info.dtype != entry.dtype:
            problems.append(f"{name} is {info.dtype}, the store {entry.dtype}")
        elif entry.role == "tied" and info.tied_to != entry.tied_to:
            problems.append(f"{name} is tied to {entry.tied_to} in the store but not in this checkpoint")
    if problems:
        shown = "; ".join(problems[:4]) + ("; ..." if len(problems) > 4 else "")
        raise CheckpointError(f"{source.path} does not match the store's tensors: {shown}")


def _prefix_hint(missing: list[str], extra: list[str]) -> str | None:
    """When the names differ only by a leading prefix (``module.`` of DataParallel/DDP, ``_orig_mod.`` of
    torch.compile, ``model.`` of a Lightning module), say so and how to strip it."""
    if not missing or len(missing) != len(extra):
        return None
    for longer, shorter, where in ((extra, missing, "this checkpoint's"), (missing, extra, "the store's")):
        prefix = longer[0][: len(longer[0]) - len(shorter[0])] if longer[0].endswith(shorter[0]) else ""
        if prefix and sorted(n[len(prefix):] for n in longer if n.startswith(prefix)) == sorted(shorter) \
                and all(n.startswith(prefix) for n in longer):
            fix = (f"pass --strip-prefix {prefix}" if where == "this checkpoint's" else
                   f"ingest into a new --store with --strip-prefix {prefix}")
            return (f"{where} tensor names carry the prefix {prefix!r} and the others' do not (saved from a "
                    f"wrapped model, e.g. DataParallel/DDP 'module.'); {fix}")
    return None


# prefixes that wrappers put before every tensor name, and what puts them there
WRAPPER_PREFIXES = {"_orig_mod.": "torch.compile", "module.": "DataParallel/DDP"}


def carried_prefix(names) -> str:
    """The wrapper prefixes (:data:`WRAPPER_PREFIXES`, possibly nested: ``module._orig_mod.``) that every name
    carries; '' when none."""
    names = list(names)
    prefix = ""
    while names:
        found = next((p for p in WRAPPER_PREFIXES if all(n.startswith(prefix + p) for n in names)), None)
        if found is None:
            break
        prefix += found
    return prefix


def prefix_note(layout: Layout, strip_prefix: tuple[str, ...]) -> str | None:
    """What ingest says about how a new store holds names that a wrapper prefixed (None: nothing to say)."""
    if strip_prefix:
        shown = " ".join(f"--strip-prefix {p}" for p in strip_prefix)
        return (f"tensor names stored without the prefix {', '.join(map(repr, strip_prefix))} ({shown}); "
                f"reconstruct puts it back where a checkpoint had it, so a reconstruction loads where its "
                f"checkpoint loads, and --format pt|safetensors writes the stored names")
    prefix = carried_prefix(e.name for e in layout.entries)
    if not prefix:
        return None
    makers = " + ".join(WRAPPER_PREFIXES[p] for p in re.findall(r"[^.]+\.", prefix))
    return (f"every tensor name carries the prefix {prefix!r} ({makers}); stored as saved, so a reconstruction "
            f"loads where the checkpoints load; to load into the bare model, pass --strip-prefix {prefix} to "
            f"reconstruct or evaluate")


@dataclass(frozen=True)
class BufferPlan:
    """How ingest buffers: ``buffers`` buffers of ``columns`` checkpoints x ``slab_rows`` rows each.

    - Two buffers when the budget holds two checkpoints: one is filled from the files while a writer thread
      encodes and writes the other (reading and writing overlap on two cores).
    - One buffer of one checkpoint when only one fits.
    - A checkpoint larger than the budget: one checkpoint at a time in slabs of whole chunk rows
      (``slab_rows < n_rows``)."""

    buffers: int
    columns: int
    slab_rows: int
    n_rows: int

    @classmethod
    def for_budget(cls, n_rows: int, chunk_shape: tuple[int, int], budget: int) -> "BufferPlan":
        chunk_rows, chunk_columns = chunk_shape
        per_column = 4 * n_rows
        if 2 * per_column <= budget:
            return cls(2, int(max(1, min(chunk_columns, budget // (2 * per_column)))), n_rows, n_rows)
        if per_column <= budget:
            return cls(1, 1, n_rows, n_rows)
        return cls(1, 1, slab_rows(n_rows, chunk_rows, budget, 4), n_rows)

    @staticmethod
    def chunk_columns_for(n_rows: int, budget: int, n_checkpoints: int) -> int:
        """Chunk width of a new store: what one of the two buffers holds (so chunk columns are written whole),
        split evenly over this first batch (150 checkpoints at a cap of 134 make two chunk columns of 75, not
        134 + 16 with 118 columns of padding, which costs encode time and, uncompressed, disk)."""
        cap = int(max(1, min(budget // (8 * n_rows), fmt.MAX_CHUNK_COLUMNS)))
        wanted = max(n_checkpoints, 32)
        return int(min(cap, -(-wanted // -(-wanted // cap))))

    @property
    def slabs(self) -> list[tuple[int, int]]:
        return [(r, min(r + self.slab_rows, self.n_rows)) for r in range(0, self.n_rows, self.slab_rows)]

    @property
    def streaming(self) -> bool:
        return self.slab_rows < self.n_rows


def ingest(paths, store: str | Path | None = None, *, label_pattern: str | None = None,
           include: tuple[str, ...] = (), exclude: tuple[str, ...] = (), buffers: bool = True,
           memory_budget: str | int = DEFAULT_MEMORY_BUDGET, force: bool = False, progress=None,
           skip: tuple[str, ...] = (), set_labels: dict | None = None,
           strip_prefix: tuple[str, ...] = (), codec: str | None = None) -> IngestReport:
    """Stream the checkpoints under ``paths`` into the store (created if needed). See ``cmdtool ingest --help``.

    ``skip``: globs of files/folders to leave out; ``set_labels``: {path: label} for checkpoints whose name has
    no label (taken too); ``strip_prefix``: prefixes removed from tensor names where present (``module.``).
    ``codec``: the chunk codec of a new store (``lz4`` or ``none``; default :data:`fmt.DEFAULT_CODEC`).
    docs/formats.md describes the layouts and the label rule. A path may be an fsspec URL (``s3://bucket/ckpts/``):
    its checkpoints are downloaded one (or two) at a time into a staging folder beside the store (or in $TMPDIR)
    and the time records name the URLs (:mod:`cmdtool.ingestion.remote`)."""
    if codec is not None and codec not in fmt.CODECS:
        raise UsageError(f"unknown codec {codec!r}: choose one of {', '.join(fmt.CODECS)}")
    store_path = store_location(store) if store is not None else default_store_path()
    urls = [url for url in map(checkpoint_url, paths) if url]
    if urls and active_client() is not None:
        # workers would each need the staging folder; they read checkpoints from paths they all see
        raise UsageError(f"{urls[0]}: checkpoints on object storage are ingested in this process only; drop "
                         f"--scheduler (or copy them to a folder every worker mounts)")
    staging = CheckpointStaging(paths, store_path.parent if isinstance(store_path, Path) else None)
    try:
        with staging:
            return _ingest(staging, store_path, label_pattern=label_pattern, include=include, exclude=exclude,
                           buffers=buffers, memory_budget=memory_budget, force=force, progress=progress,
                           skip=skip, set_labels=staging.translate_labels(set_labels),
                           strip_prefix=strip_prefix, codec=codec)
    except CmdtoolError as exc:
        raise staging.translate(exc)
    except Exception as exc:  # noqa: BLE001 - no credentials, access denied, no bucket: one line
        error = storage_error(exc, str(store_path) if is_url(store_path) else "")
        if error is None:
            raise
        raise error from None


def _ingest(staging: CheckpointStaging, store_path, *, label_pattern, include, exclude, buffers, memory_budget,
            force, progress, skip, set_labels, strip_prefix, codec) -> IngestReport:
    paths = staging.paths
    progress = progress or NullProgress()
    started = time.perf_counter()
    budget = parse_size(memory_budget)
    local_store = isinstance(store_path, Path)
    ignore = (store_path,) if local_store else ()  # checkpoints are never read from inside the store
    if local_store and store_path.exists() and not store_path.is_dir():
        raise UsageError(f"store path {store_path} is a file, not a trajectory store")
    report = IngestReport(store=store_path)

    existing = (store_path / "zarr.json").is_file()
    if existing:
        st = TrajectoryStore(store_path, mode="r+")
        lock = st.ingest_lock()
    else:
        if not is_creatable(store_path):
            raise UsageError(f"{store_path} exists and is not a trajectory store; choose another --store")
        st = None
        created_dir = not store_path.exists() if local_store else not any(store_path.iterdir())
        discovery = discover(paths, label_pattern, ignore=ignore, skip=skip,  # check before creating
                             set_labels=set_labels)
        staging.name_origins(discovery)
        store_path.mkdir(parents=True, exist_ok=True)
        lock = store_lock(store_path, fmt.INGEST_LOCK)
    try:
        with lock:
            if st is None and (store_path / "zarr.json").is_file():  # another ingest created it meanwhile
                st = TrajectoryStore(store_path, mode="r+")
            if st is not None:  # existing store: discover under the lock, labels continue the store's
                first_free = int(st.labels[-1]) + 1 if st.n_checkpoints else 0
                discovery = discover(paths, label_pattern, first_free_label=first_free, ignore=ignore,
                                     skip=skip, set_labels=set_labels)
                staging.name_origins(discovery)
            options = IngestOptions(tuple(include), tuple(exclude), buffers, label_pattern, tuple(strip_prefix))
            if st is not None and codec is not None and codec != codec_of(st.trajectories):
                raise UsageError(f"store {store_path} is written with codec {codec_of(st.trajectories)}; appending "
                                 f"keeps it (change it with `cmdtool rechunk --codec {codec}`)")
            return _ingest_locked(discovery, st, store_path, report, options, budget, force, progress, started,
                                  codec, staging)
    except BaseException as exc:
        # A first ingest that fails before its first commit leaves no store behind. Committed checkpoints are
        # never deleted, and an interrupt (SIGINT, SIGTERM) leaves exactly what a SIGKILL at that moment would:
        # the last commit, or an empty store that the next run fills.
        # A writer that lost its lock (object storage) deletes nothing: the store is another writer's now.
        if (not existing and created_dir and not isinstance(exc, (KeyboardInterrupt, LeaseLostError))
                and committed_checkpoints(store_path) == 0):
            _remove_whole(store_path)
        raise


def committed_checkpoints(store_path: Path) -> int:
    """Checkpoints the store at ``store_path`` lists as committed (0 when there is no readable store)."""
    try:
        return TrajectoryStore(store_path, mode="r").n_checkpoints
    except Exception:  # noqa: BLE001 - no store, or one created only partly: nothing committed
        return 0


def _remove_whole(folder: Path | RemotePath) -> None:
    """Remove a folder this run created, all or nothing: renamed aside first, so that an interrupted removal
    never leaves a half-deleted store that the next ingest would refuse. (On object storage, which has no
    rename, its keys are deleted; what an interrupted deletion leaves is what a killed creation leaves, which
    the next ingest overwrites.)"""
    if isinstance(folder, RemotePath):
        folder.remove_tree()
        return
    doomed = folder.parent / f".{folder.name}.cmdtool-removing-{os.getpid()}"
    try:
        folder.rename(doomed)
    except OSError:
        return
    shutil.rmtree(doomed, ignore_errors=True)


@dataclass(frozen=True)
class IngestOptions:
    """What decides a store's rows and names; fixed when the store is created (appends must match)."""

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    buffers: bool = True
    label_pattern: str | None = None
    strip_prefix: tuple[str, ...] = ()

    def to_json(self) -> dict:
        return {"include": list(self.include), "exclude": list(self.exclude), "buffers": self.buffers,
                "label_pattern": self.label_pattern, "strip_prefix": list(self.strip_prefix)}


def store_strip_prefixes(store) -> tuple[str, ...]:
    """The prefixes a store's ingest stripped from tensor names (to reopen its sources the same way)."""
    return tuple(store.meta.get("ingest_options", {}).get("strip_prefix") or ())


def open_recorded_source(store, column: int) -> OpenCheckpoint:
    """The source checkpoint of a store column, opened as ingest read it (same layout rules and prefixes)."""
    record = store.time_axis[column]
    if is_url(record.source):
        raise CheckpointError(f"tensors left out of the store must be copied from the source checkpoint of epoch "
                              f"{record.label}, {record.source}, which is on object storage: download it and "
                              f"reconstruct from a store ingested from the local copy (not supported yet)")
    path = Path(record.source)
    if not path.exists():
        raise CheckpointError(f"tensors left out of the store must be copied from the source checkpoint of epoch "
                              f"{record.label}, {path}, which no longer exists")
    return OpenCheckpoint(discover([path]).sources[0], strip_prefixes=store_strip_prefixes(store))


def _ingest_locked(discovery, st, store_path, report, options: IngestOptions, budget, force, progress,
                   started, codec: str | None = None, staging: CheckpointStaging | None = None) -> IngestReport:
    staging = staging or CheckpointStaging(())
    report.skipped = discovery.skipped
    for note in discovery.skipped:
        progress.note(note)

    if st is not None:
        st.drop_scratch_columns()  # columns a killed ingest left beyond the committed ones
        _check_options(st, options)
        options = IngestOptions(options.include, options.exclude, options.buffers, options.label_pattern,
                                options.strip_prefix or store_strip_prefixes(st))

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
            with staging.local(source):  # a remote checkpoint whose size or mtime differ: its bytes decide
                same = file_digest(source.files, record.digest.partition(":")[0] or fmt.DIGEST) == record.digest
            if same:
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
    # (a remote checkpoint is checked when it is downloaded to be read, except the first of a new store, which
    # sets the layout: downloading each twice would double the transfer)
    with progress.task("checking", total=len(todo), unit="ckpt") as task:
        for source in todo:
            if staging.is_remote(source) and layout is not None:
                task.advance(1)
                continue
            with staging.local(source, keep=True), OpenCheckpoint(source, options.strip_prefix) as checkpoint:
                infos = checkpoint.infos()
                if layout is None:
                    layout = build_layout(infos, source, options.include, options.exclude, options.buffers)
                check_layout(layout, infos, source)
            task.advance(1)

    n_rows = layout.n_rows
    if st is None:
        # As wide as the budget allows, but no wider than this first batch needs (padding a chunk costs
        # compression time and disk); later appends add chunk columns of the same width.
        chunk_columns = BufferPlan.chunk_columns_for(n_rows, budget, len(new_sources))
        client = active_client()
        if client is not None:  # a group of chunk columns per worker (cluster_ingest)
            from .cluster_ingest import chunk_columns_on_cluster

            chunk_columns = chunk_columns_on_cluster(chunk_columns, len(new_sources),
                                                     len(client.scheduler_info()["workers"]))
        note = prefix_note(layout, options.strip_prefix)
        if note:
            report.notes.append(note)
            progress.note(note)
        with signals_deferred():  # a store created only in part would not open
            st = TrajectoryStore.create(store_path, layout, chunk_columns, codec=codec or fmt.DEFAULT_CODEC,
                                        chunk_rows=default_chunk_rows(
                                            chunk_columns, max(len(new_sources), fmt.PLANNED_CHECKPOINTS)),
                                        extra={"ingest_options": options.to_json()})
        report.created = True
    original_meta = dict(st.meta)
    try:
        _stream(st, new_sources, replace, budget, report, progress, options.strip_prefix, staging)
    except LeaseLostError:
        raise  # the store is another writer's now (object storage): this process writes nothing more
    except Exception:
        # A failure mid-stream (not a kill): publish the time axis as it was, so the store reads as before.
        st.restore(original_meta)
        with contextlib.suppress(Exception):  # best effort (e.g. a full disk): the next ingest does it too
            st.drop_scratch_columns()
        raise
    report.n_rows, report.n_checkpoints = st.n_rows, st.n_checkpoints
    report.seconds = time.perf_counter() - started
    return report


def _check_options(st: TrajectoryStore, options: IngestOptions) -> None:
    stored = st.meta.get("ingest_options", {})
    given = {"include": list(options.include), "exclude": list(options.exclude), "buffers": options.buffers,
             "strip_prefix": list(options.strip_prefix)}
    for key, value in given.items():
        default = [] if key != "buffers" else True
        if value != default and value != stored.get(key, default):
            raise UsageError(f"store {st.path} was created with {key}={stored.get(key, default)}; "
                             f"appending with {key}={value} would change its rows (use a new --store)")


def _stream(st: TrajectoryStore, new_sources, replace, budget: int, report: IngestReport, progress,
            strip_prefix: tuple[str, ...], staging: CheckpointStaging) -> None:
    client = active_client()
    if client is not None and new_sources:  # on a Dask cluster: groups of chunk columns, committed here
        from .cluster_ingest import stream_on_cluster

        stream_on_cluster(client, st, new_sources, budget, report, progress, strip_prefix)
        new_sources = []
        if not replace:
            return
    # torch's copies of torch files are memory-bound: more threads contend with the writer and the hasher (and
    # safetensors files are read without torch, which is then not imported at all)
    sources = new_sources + [source for _, source in replace]
    with one_torch_thread() if any(map(needs_torch, sources)) else contextlib.nullcontext():
        _stream_columns(st, new_sources, replace, budget, report, progress, strip_prefix, staging)


def _stream_columns(st: TrajectoryStore, new_sources, replace, budget: int, report: IngestReport, progress,
                    strip_prefix: tuple[str, ...], staging: CheckpointStaging) -> None:
    layout = st.layout
    entries = layout.trajectory_entries
    n_rows, n_int = layout.n_rows, layout.n_integer_rows
    chunk_rows, chunk_columns = st.chunk_shape
    plan = BufferPlan.for_budget(n_rows, st.chunk_shape, budget)
    buffers = [np.empty((plan.columns, plan.slab_rows), dtype=np.float32) for _ in range(plan.buffers)]
    int_buffers = [np.empty((plan.columns, n_int), dtype=np.int64) if n_int else None for _ in range(plan.buffers)]
    # rows per write call: whole chunk rows, about 16 MiB of transposed copy (enough chunks to keep zarr's
    # concurrent encoders busy)
    write_rows = chunk_rows * max(1, (16 * 1024**2) // (4 * plan.columns * chunk_rows))
    integers = st.integer_values  # the store's own array objects: resize_columns updates their shapes
    trajectories = st.trajectories
    time_axis = list(st.time_axis)

    def write_values(buffer: np.ndarray, start: int, stop: int, first_column: int, n_columns: int) -> None:
        """Rows ``start..stop`` (a slab) of the first ``n_columns`` slots of ``buffer`` into the store."""
        if trajectories.shape[1] < first_column + n_columns:
            with signals_deferred():
                st.resize_columns(first_column + n_columns)
        # A few chunk rows at a time (on object storage zarr copies each group contiguously first, and a
        # whole buffer at once would double the memory the budget allows; locally each chunk is assembled
        # from the transposed view in a reused buffer). An interrupt lands between two writes (columns past
        # the committed ones are scratch until the commit).
        for row in range(start, stop, write_rows):
            row_stop = min(row + write_rows, stop)
            with signals_deferred():
                st.write_region(slice(row, row_stop), slice(first_column, first_column + n_columns),
                                buffer[:n_columns, row - start:row_stop - start].T)

    def write_and_commit(k: int, first_column: int, records: list[TimeRecord], values_written: bool) -> None:
        """Buffer ``k``'s columns into the store, then the commit that publishes them (runs in the writer
        thread when reading and writing overlap; commits keep their order: one writer)."""
        stop = first_column + len(records)
        if not values_written:
            write_values(buffers[k], 0, n_rows, first_column, len(records))
        with signals_deferred():
            if integers is not None:
                integers[:, first_column:stop] = int_buffers[k][:len(records)].T
            st.write_labels(first_column, [r.label for r in records])
            time_axis.extend(records)
            st.commit(time_axis)  # the commit point: these checkpoints now count as ingested

    def read_checkpoint(source: CheckpointSource, k: int, slot: int, target_column: int | None) -> int:
        """Fill slot ``slot`` of buffer ``k`` from ``source``; when streaming, write each slab to
        ``target_column`` as soon as it is filled. Returns the NaN/Inf count."""
        nonfinite = 0
        with OpenCheckpoint(source, strip_prefix) as checkpoint:
            if staging.is_remote(source):  # not opened by the preflight (see _ingest_locked)
                check_layout(layout, checkpoint.infos(), source)
            for start, stop in plan.slabs:
                values = buffers[k][slot, :stop - start]
                fill_rows(checkpoint, entries, values, start)
                nonfinite += count_nonfinite(values)
                if target_column is not None:
                    write_values(buffers[k], start, stop, target_column, 1)
            if int_buffers[k] is not None:
                fill_integers(checkpoint, layout, int_buffers[k][slot])
        return nonfinite

    total = len(new_sources) + len(replace)
    overlap = plan.buffers > 1
    with ThreadPoolExecutor(max_workers=1) as hasher, ThreadPoolExecutor(max_workers=1) as writer, \
            progress.task("ingesting", total=total, unit="ckpt") as task:
        in_flight = [None] * plan.buffers  # the write of each buffer still running
        k, column, pending = 0, len(time_axis), []
        # a remote checkpoint is downloaded just before it is read (the next one meanwhile) and its local copy
        # dropped once read and hashed, when the loop asks for the next: the staging folder holds two at most
        for source in staging.each_local(new_sources):
            digest = hasher.submit(file_digest, source.files)
            if not pending and in_flight[k] is not None:
                in_flight[k].result()  # this buffer is free once its previous write is done
                in_flight[k] = None
            nonfinite = read_checkpoint(source, k, len(pending), column + len(pending) if plan.streaming else None)
            record = time_record(source, digest.result(), nonfinite)
            pending.append(record)
            account(report, record, source)
            report.added.append(source.label)
            task.advance(1, nbytes=record.size)
            # hand the buffer over at chunk-column boundaries so that chunks are written whole
            if plan.streaming or (column + len(pending)) % chunk_columns == 0 or len(pending) == plan.columns:
                if overlap:
                    in_flight[k] = writer.submit(write_and_commit, k, column, pending, False)
                else:
                    write_and_commit(k, column, pending, plan.streaming)
                k, column, pending = (k + 1) % plan.buffers, column + len(pending), []
        if pending and overlap:
            writer.submit(write_and_commit, k, column, pending, False).result()
        elif pending:
            write_and_commit(k, column, pending, plan.streaming)
        for future in in_flight:
            if future is not None:
                future.result()
        columns_of = {id(source): col for col, source in replace}
        for source in staging.each_local([source for _, source in replace]):
            col = columns_of[id(source)]
            digest = hasher.submit(file_digest, source.files)
            # a replaced column is committed data: its writes and the commit go together, uninterrupted
            with signals_deferred():
                nonfinite = read_checkpoint(source, 0, 0, col if plan.streaming else None)
                if not plan.streaming:
                    write_values(buffers[0], 0, n_rows, col, 1)
                if integers is not None:
                    integers[:, col] = int_buffers[0][0]
                record = time_record(source, digest.result(), nonfinite)
                time_axis[col] = record
                st.commit(time_axis)
            account(report, record, source)
            report.replaced.append(source.label)
            task.advance(1, nbytes=record.size)
