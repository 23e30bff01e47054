"""`cmdtool rechunk`: rewrite the arrays of a store with another chunk shape (or codec), streaming, in bounded
memory, crash-safe (docs/store.md, "Rechunk").

The new ``trajectories`` (and ``integer_values``) are written under the ``staging`` group, row block by row block
(each block spans every committed column and is a whole number of new chunk rows, so every chunk is written
once, whole). The staged arrays are then swapped in: one ``renameat2(RENAME_EXCHANGE)`` per array where the
filesystem has it (atomic), else two renames with a recovery step that the next open finishes
(:func:`recover_swap`). Values do not change, so the revision and every cached result stay valid. A kill before
the swap leaves the store as it was (plus a staging folder that the next writer removes); a kill after it, the
rechunked store.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import UsageError
from ..utils.progress import NullProgress
from ..utils.units import parse_size
from . import format as fmt
from .lock import signals_deferred
from .location import RemotePath
from .store import TrajectoryStore
from .swap import STAGED_ARRAYS, recover_swap, swap_in
from .zarr_access import codec_of, create_column_arrays, default_chunk_rows, open_zarr_group

def default_chunk_shape(n_rows: int, n_columns: int, chunk_columns: int | None = None,
                        target_chunk_bytes: int = fmt.TARGET_CHUNK_BYTES) -> tuple[int, int]:
    """Chunks for the analyzers' read pattern (row blocks over all columns): as wide as the columns
    (at most :data:`~cmdtool.store.format.MAX_CHUNK_COLUMNS`), about ``target_chunk_bytes`` each."""
    columns = int(max(1, min(chunk_columns or n_columns, fmt.MAX_CHUNK_COLUMNS)))
    rows = default_chunk_rows(columns, n_columns, target_chunk_bytes)
    return int(min(rows, max(n_rows, 1))), columns


@dataclass
class RechunkReport:
    store: Path
    old_chunks: tuple[int, int]
    new_chunks: tuple[int, int]
    old_codec: str
    new_codec: str
    bytes_before: int = 0
    bytes_after: int = 0
    seconds: float = 0.0
    unchanged: bool = False

    def to_json(self) -> dict:
        return {"store": str(self.store), "old_chunks": list(self.old_chunks), "new_chunks": list(self.new_chunks),
                "old_codec": self.old_codec, "new_codec": self.new_codec, "bytes_before": self.bytes_before,
                "bytes_after": self.bytes_after, "seconds": round(self.seconds, 3), "unchanged": self.unchanged}


def rechunk(path=None, chunk_rows: int | None = None, chunk_columns: int | None = None, codec: str | None = None,
            memory_budget: str | int = fmt.INGEST_MEMORY_BUDGET, progress=None) -> RechunkReport:
    """Rewrite the store at ``path`` with chunks ``(chunk_rows, chunk_columns)`` (default: every committed column,
    ~8 MiB per chunk) and ``codec`` (default: the store's). Holds the store's ingest lock throughout."""
    from .summary import folder_bytes

    progress = progress or NullProgress()
    started = time.perf_counter()
    budget = parse_size(memory_budget)
    store = TrajectoryStore(path, mode="r+")
    if isinstance(store.path, RemotePath):
        raise UsageError(f"cannot rechunk {store.path} in place: object storage has no rename, so the swap of "
                         f"the arrays could not be atomic; rechunk a local copy and upload it (docs/store.md)")
    with store.ingest_lock():
        store._open_group()  # re-read under the lock
        remove_staging(store)
        store.drop_scratch_columns()
        n_rows, n_cols = store.shape
        if n_cols == 0:
            raise UsageError(f"store {store.path} holds no checkpoints yet; nothing to rechunk")
        old_chunks, old_codec = store.chunk_shape, store.codec
        default_rows, default_columns = default_chunk_shape(n_rows, n_cols, chunk_columns)
        new_chunks = (int(min(chunk_rows or default_rows, n_rows)), default_columns)
        new_codec = codec or old_codec
        if chunk_rows is not None and chunk_rows < 1:
            raise UsageError("--chunk-rows must be at least 1")
        report = RechunkReport(store.path, old_chunks, new_chunks, old_codec, new_codec,
                               bytes_before=folder_bytes(store.path / fmt.TRAJECTORIES))
        if new_chunks == old_chunks and new_codec == old_codec:
            report.unchanged, report.bytes_after = True, report.bytes_before
            report.seconds = time.perf_counter() - started
            return report
        staging = store.path / fmt.STAGING
        open_zarr_group(staging, "a", attributes={"complete": False})
        create_column_arrays(staging, n_rows, store.layout.n_integer_rows, new_chunks, new_codec, n_cols,
                             with_epoch=False)
        target = open_zarr_group(staging, "r+")
        _copy_rows(store, target, new_chunks, budget, progress)
        if store.integer_values is not None:
            target[fmt.INTEGER_VALUES][:, :] = store.integer_values[:, :n_cols]
        with signals_deferred():
            target.attrs["complete"] = True  # from here on the staged arrays may replace the old ones
            for name in STAGED_ARRAYS:
                if (staging / name).is_dir():
                    swap_in(store.path, name)
            store._open_group()
            store.commit(store.time_axis, bump_revision=False, chunk_shape=list(new_chunks))
        remove_staging(store)
        report.bytes_after = folder_bytes(store.path / fmt.TRAJECTORIES)
    report.seconds = time.perf_counter() - started
    return report


def _copy_rows(store: TrajectoryStore, target, chunks: tuple[int, int], budget: int, progress) -> None:
    """Copy every committed value in row blocks of whole new chunk rows, each at most a third of the budget
    (the block read, zarr's copies while encoding)."""
    import numpy as np

    n_rows, n_cols = store.shape
    destination = target[fmt.TRAJECTORIES].with_config({"write_empty_chunks": True})
    per_chunk_row = 4 * chunks[0] * n_cols
    block_rows = chunks[0] * max(1, (budget // 3) // per_chunk_row)
    with progress.task("rechunking", total=n_rows, unit="rows") as task:
        for start in range(0, n_rows, block_rows):
            stop = min(start + block_rows, n_rows)
            block = np.ascontiguousarray(store._read(slice(start, stop), slice(0, n_cols)))
            with signals_deferred():
                destination[start:stop, :] = block
            task.advance(stop - start)


def remove_staging(store: TrajectoryStore) -> None:
    """Remove what a rechunk left (finishing its swap first). Needs the ingest lock."""
    staging = store.path / fmt.STAGING
    if staging.exists():
        recover_swap(store.path)
        doomed = store.path.parent / f".{store.path.name}.staging-removing-{os.getpid()}"
        os.rename(staging, doomed)  # gone from the store at once; the deletion itself may take a while
        shutil.rmtree(doomed, ignore_errors=True)
        store._open_group()


__all__ = ["RechunkReport", "default_chunk_shape", "rechunk", "recover_swap", "remove_staging", "codec_of"]
