"""Whole-store integrity check (`cmdtool verify`): every chunk's checksum, and no chunk missing.

Chunk files are read and decoded as they are on disk (:mod:`~cmdtool.store.chunk_files`, no zarr): a damaged chunk
fails its crc32c checksum, and a deleted one is missing (zarr would read it as the fill value, zeros, without
complaint).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..utils.progress import NullProgress
from . import format as fmt
from .chunk_files import ArrayDocument, ChunkDamage, is_array


@dataclass
class Damage:
    array: str
    rows: tuple[int, int]
    columns: tuple[int, int]
    problem: str  # "checksum" | "missing" | "unreadable"

    def describe(self) -> str:
        return (f"{self.array}: rows {self.rows[0]}..{self.rows[1] - 1}, "
                f"columns {self.columns[0]}..{self.columns[1] - 1}: {self.problem}")


@dataclass
class VerifyReport:
    chunks_checked: int = 0
    damage: list[Damage] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.damage

    def to_json(self) -> dict:
        return {"ok": self.ok, "chunks_checked": self.chunks_checked,
                "damage": [{"array": d.array, "rows": list(d.rows), "columns": list(d.columns), "problem": d.problem}
                           for d in self.damage]}


def array_folder(store_path, name: str):
    """The folder of array ``name``; during a rechunk's swap (``trajectories`` renamed away, the complete copy
    still staged) the staged one, which is what a reader of the store reads."""
    folder = store_path / name
    staged = store_path / fmt.STAGING / name
    if not (folder / "zarr.json").is_file() and (staged / "zarr.json").is_file():
        return staged
    return folder


def _check_rows(document: ArrayDocument, name: str, rows: tuple[int, int], n_cols: int) -> tuple[int, list[Damage]]:
    """Decode the chunks of ``document`` in chunk rows ``rows`` and committed columns; (chunks checked, damage)."""
    chunk_rows, chunk_cols = document.chunk_shape
    checked, damage = 0, []
    for r0 in range(rows[0], rows[1], chunk_rows):
        r1 = min(r0 + chunk_rows, rows[1])
        for c0 in range(0, n_cols, chunk_cols):
            c1 = min(c0 + chunk_cols, n_cols)
            checked += 1
            try:
                if document.read_chunk((r0 // chunk_rows, c0 // chunk_cols)) is None:
                    damage.append(Damage(name, (r0, r1), (c0, c1), "missing"))
            except ChunkDamage as exc:
                damage.append(Damage(name, (r0, r1), (c0, c1), exc.problem))
    return checked, damage


def _check_rows_on_worker(address: str, name: str, rows: tuple[int, int], n_cols: int):
    """A Dask task of :func:`verify_store`: the worker reads the chunk files at the client's store address."""
    from .location import store_location

    return _check_rows(ArrayDocument.read(array_folder(store_location(address), name)), name, rows, n_cols)


# chunk rows per Dask task: about this many bytes of float32 decoded
VERIFY_TASK_BYTES = 256 * 1024**2


def _check_array(store, name: str, n_cols: int, report: VerifyReport, task) -> None:
    from ..utils.cluster import active_client, store_address

    try:
        document = ArrayDocument.read(array_folder(store.path, name))
    except (ChunkDamage, OSError, ValueError, KeyError) as exc:
        report.damage.append(Damage(name, (0, store.n_rows), (0, n_cols), f"unreadable metadata ({exc})"))
        return
    if len(document.shape) != 2 or n_cols == 0:
        return
    chunk_rows = document.chunk_shape[0]
    n_rows = document.shape[0]
    client = active_client()
    step = chunk_rows if client is None else \
        chunk_rows * max(1, VERIFY_TASK_BYTES // (4 * chunk_rows * max(n_cols, 1)))
    ranges = [(r0, min(r0 + step, n_rows)) for r0 in range(0, n_rows, step)]
    if client is None:
        outcomes = ((rows, _check_rows(document, name, rows, n_cols)) for rows in ranges)
    else:  # on a Dask cluster: groups of chunk rows checked by the workers
        from distributed import as_completed

        futures = {client.submit(_check_rows_on_worker, store_address(store), name, rows, n_cols, pure=False): rows
                   for rows in ranges}
        outcomes = ((futures[future], future.result()) for future in as_completed(futures))
    damage = []
    for (r0, r1), (checked, found) in outcomes:
        report.chunks_checked += checked
        damage.extend(found)
        task.advance(r1 - r0)
    report.damage.extend(sorted(damage, key=lambda d: (d.rows, d.columns)))


def _read_whole(document: ArrayDocument, missing_is_damage: bool) -> tuple[np.ndarray, int]:
    """Every chunk of a (small) array decoded and joined: (values, chunks read). A missing chunk raises
    ``ChunkDamage("missing")``, or reads as zeros where zarr's fill value is what the writer meant."""
    values = np.zeros(document.shape, dtype=object if document.data_type == "string" else document.data_type)
    count = 0
    for index in document.chunk_indices():
        chunk = document.read_chunk(index)
        count += 1
        if chunk is None:
            if missing_is_damage:
                raise ChunkDamage("missing")
            continue
        where = tuple(slice(i * c, min((i + 1) * c, n)) for i, c, n in zip(index, document.chunk_shape,
                                                                          document.shape))
        values[where] = chunk[tuple(slice(0, w.stop - w.start) for w in where)]
    return values, count


def _check_coordinates(store, report: VerifyReport) -> None:
    """Format 2's coordinate arrays decode, and ``epoch`` holds the committed labels (what xarray shows)."""
    if store.format_version < 2:
        return
    labels = [record.label for record in store.time_axis]
    for name in (fmt.EPOCH, fmt.TENSOR, fmt.TENSOR_INDEX):
        try:
            # a missing epoch chunk reads as zeros, which the labels comparison below reports
            values, count = _read_whole(ArrayDocument.read(store.path / name), missing_is_damage=name != fmt.EPOCH)
        except (ChunkDamage, OSError, ValueError, KeyError) as exc:
            report.chunks_checked += 1
            problem = exc.problem if isinstance(exc, ChunkDamage) else f"unreadable ({type(exc).__name__})"
            report.damage.append(Damage(name, (0, 0), (0, 0), problem))
            continue
        report.chunks_checked += count
        if name == fmt.EPOCH and values[:len(labels)].tolist() != labels:
            report.damage.append(Damage(name, (0, 0), (0, len(labels)), "labels differ from the time axis"))


def _check_results(store, report: VerifyReport) -> None:
    """Every array of every committed result decodes (a chunk a result never wrote is its fill value)."""
    from .metadata import results_index

    root = store.path / fmt.RESULTS
    for key, folder in sorted(results_index(root).items()):
        kind, name = key.split("/", 1)
        try:
            for child in sorted((root / folder).iterdir(), key=lambda p: p.name):
                if is_array(child):
                    report.chunks_checked += _read_whole(ArrayDocument.read(child), missing_is_damage=False)[1]
        except Exception as exc:  # noqa: BLE001 - any failure to read a result is damage
            problem = exc.problem if isinstance(exc, ChunkDamage) else \
                f"unreadable ({type(exc).__name__}: {str(exc)[:80]})"
            report.damage.append(Damage(f"results/{kind}/{name}", (0, 0), (0, 0), problem))


def verify_store(store, progress=None) -> VerifyReport:
    """Decode every committed chunk of ``trajectories`` and ``integer_values``, the coordinate arrays and every
    result's arrays; list what is damaged. ``store``: a :class:`~cmdtool.store.store.TrajectoryStore` or the
    :class:`~cmdtool.store.metadata.StoreMetadata` of one (all that is read is its metadata and chunk files)."""
    progress = progress or NullProgress()
    report = VerifyReport()
    n_cols = store.n_checkpoints
    with progress.task("verifying", total=store.n_rows, unit="rows") as task:
        _check_array(store, fmt.TRAJECTORIES, n_cols, report, task)
    if store.layout.n_integer_rows and (array_folder(store.path, fmt.INTEGER_VALUES) / "zarr.json").is_file():
        from ..utils.progress import NullTask

        _check_array(store, fmt.INTEGER_VALUES, n_cols, report, NullTask())
    _check_coordinates(store, report)
    _check_results(store, report)
    return report
