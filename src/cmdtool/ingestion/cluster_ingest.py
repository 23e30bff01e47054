"""Ingest on a Dask cluster (docs/scale.md): new checkpoints in groups of chunk columns, one task per group.

The client has done everything that decides what goes where, as in process: discovery, the preflight that opens
every checkpoint's metadata and checks it against the layout, the store's creation, the lock. It then widens the
arrays to their final column count (one metadata write) and submits one task per group of new checkpoints whose
columns lie in one chunk column of ``trajectories`` (and of ``integer_values``, chunked by the same columns), so
that every chunk is written by one task only: a worker opens the store by the client's address, fills its
columns row slab by row slab (whole chunk rows, within the memory budget) from its checkpoints, writes them and
returns their time records (digest, NaN/Inf count). The client alone writes the epoch coordinate and commits
the time axis, group after group in column order: a group's checkpoints count as ingested only once every group
before it has committed, and columns past the last commit are scratch that the next ingest removes (the same
commit protocol as in process). A worker killed mid-group is rerun by Dask (its writes are idempotent).
"""

from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..store.lock import signals_deferred


def groups_of_chunk_columns(first_column: int, n_new: int, chunk_columns: int) -> list[tuple[int, int]]:
    """``(start, stop)`` column ranges covering ``first_column .. first_column + n_new``, cut at chunk-column
    boundaries (the first may begin inside a chunk column that committed columns share: only its task writes it)."""
    out, column, stop = [], first_column, first_column + n_new
    while column < stop:
        boundary = min(stop, (column // chunk_columns + 1) * chunk_columns)
        out.append((column, boundary))
        column = boundary
    return out


def chunk_columns_on_cluster(chunk_columns: int, n_checkpoints: int, n_workers: int) -> int:
    """Chunk width of a store created by an ingest on ``n_workers``: at most what in process would choose, and
    narrow enough that the first batch makes a group for every worker."""
    return int(max(1, min(chunk_columns, -(-n_checkpoints // max(n_workers, 1)))))


def write_group(address: str, sources, first_column: int, budget: int, strip_prefix: tuple[str, ...]):
    """One task: the checkpoints ``sources`` into columns ``first_column..`` of the store at ``address``; returns
    their :class:`TimeRecord` objects (not committed: the client does that)."""
    from ..store import open_store
    from ..utils.threads import one_torch_thread
    from .formats import OpenCheckpoint, needs_torch
    from .slabs import count_nonfinite, file_digest, fill_integers, fill_rows, slab_rows, time_record

    st = open_store(address, mode="r+")
    layout = st.layout
    entries, n_rows = layout.trajectory_entries, layout.n_rows
    chunk_rows = st.chunk_shape[0]
    width = len(sources)
    stop_column = first_column + width
    # a slab of whole chunk rows, all the group's columns, within the budget (a transposed copy doubles it)
    slab = slab_rows(n_rows, chunk_rows, budget, 8 * width)
    values = np.empty((width, slab), dtype=np.float32)
    nonfinite = [0] * width
    with one_torch_thread() if any(map(needs_torch, sources)) else contextlib.nullcontext(), \
            contextlib.ExitStack() as stack, ThreadPoolExecutor(max_workers=1) as hasher:
        digests = [hasher.submit(file_digest, source.files) for source in sources]  # overlaps the copies
        checkpoints = [stack.enter_context(OpenCheckpoint(source, strip_prefix)) for source in sources]
        for start in range(0, n_rows, slab):
            stop = min(start + slab, n_rows)
            for k, checkpoint in enumerate(checkpoints):
                fill_rows(checkpoint, entries, values[k, :stop - start], start)
                nonfinite[k] += count_nonfinite(values[k, :stop - start])
            st.write_region(slice(start, stop), slice(first_column, stop_column), values[:, :stop - start].T)
        if layout.n_integer_rows:
            integers = np.empty((width, layout.n_integer_rows), dtype=np.int64)
            for k, checkpoint in enumerate(checkpoints):
                fill_integers(checkpoint, layout, integers[k])
            st.integer_values[:, first_column:stop_column] = integers.T
        return [time_record(source, digest.result(), count)
                for source, digest, count in zip(sources, digests, nonfinite)]


def stream_on_cluster(client, st, new_sources, budget: int, report, progress, strip_prefix: tuple[str, ...]) -> None:
    """Ingest ``new_sources`` (checked already) into ``st`` on the cluster; commits in column order."""
    from distributed import as_completed

    from ..utils.cluster import killed_worker_error, store_address
    from .slabs import account

    first = st.n_checkpoints
    groups = groups_of_chunk_columns(first, len(new_sources), st.chunk_shape[1])
    with signals_deferred():
        st.resize_columns(first + len(new_sources))
    address = store_address(st)
    futures = {client.submit(write_group, address, new_sources[g0 - first:g1 - first], g0, budget, strip_prefix,
                             pure=False): k for k, (g0, g1) in enumerate(groups)}
    done: dict[int, list] = {}
    time_axis, committed = list(st.time_axis), 0
    try:
        with progress.task("ingesting", total=len(new_sources), unit="ckpt") as task:
            for future in as_completed(futures):
                done[futures[future]] = future.result()
                while committed in done:  # the commit point of each group, in column order, by this process
                    records = done.pop(committed)
                    g0 = groups[committed][0]
                    with signals_deferred():
                        st.write_labels(g0, [r.label for r in records])
                        time_axis.extend(records)
                        st.commit(time_axis)
                    for record, source in zip(records, new_sources[g0 - first:]):
                        account(report, record, source)
                        report.added.append(source.label)
                        task.advance(1, nbytes=record.size)
                    committed += 1
    except Exception as exc:
        for future in futures:
            future.cancel()
        error = killed_worker_error(exc, "ingest", f"the {committed} groups before it are committed, "
                                    f"run the command again to resume")
        if error is not None:
            raise error from None
        raise


__all__ = ["chunk_columns_on_cluster", "groups_of_chunk_columns", "stream_on_cluster", "write_group"]
