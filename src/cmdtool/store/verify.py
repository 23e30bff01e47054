"""Whole-store integrity check (`cmdtool verify`): every chunk's checksum, and no chunk missing.

Every chunk is read by zarr, one at a time, through :class:`~cmdtool.store.store.MissingChunksRaise`: a damaged
chunk fails its crc32c checksum, and a deleted one is missing (zarr alone would read it as the fill value, zeros,
without complaint). Each problem is reported with the chunk's name (``trajectories/c/3/0``) and its rows and
columns.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..progress import NullProgress
from . import format as fmt


def _open(folder, missing_chunks_raise: bool = True):
    """The zarr array in ``folder``, read strictly (a missing chunk raises) unless told otherwise."""
    import zarr

    from .store import reading_strictly, zarr_store

    array = zarr.open_array(store=zarr_store(folder, read_only=True), mode="r")
    return reading_strictly(array) if missing_chunks_raise else array


def _problem(exc: BaseException) -> str:
    from .store import chunk_damage

    return chunk_damage(exc) or f"unreadable ({type(exc).__name__}: {str(exc)[:80]})"


@dataclass
class Damage:
    array: str
    rows: tuple[int, int]
    columns: tuple[int, int]
    problem: str  # "checksum" | "missing" | "unreadable (...)"
    chunk: str = ""  # the chunk's name in the store, e.g. "trajectories/c/3/0"

    def describe(self) -> str:
        where = f" (chunk {self.chunk})" if self.chunk else ""
        return (f"{self.array}: rows {self.rows[0]}..{self.rows[1] - 1}, columns {self.columns[0]}..{self.columns[1] - 1}"
                f"{where}: {self.problem}")


@dataclass
class VerifyReport:
    chunks_checked: int = 0
    damage: list[Damage] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.damage

    def to_json(self) -> dict:
        return {"ok": self.ok, "chunks_checked": self.chunks_checked,
                "damage": [{"array": d.array, "rows": list(d.rows), "columns": list(d.columns), "problem": d.problem,
                            "chunk": d.chunk}
                           for d in self.damage]}


def array_folder(store_path, name: str):
    """The folder of array ``name``; during a rechunk's swap (``trajectories`` renamed away, the complete copy
    still staged) the staged one, which is what a reader of the store reads."""
    folder = store_path / name
    staged = store_path / fmt.STAGING / name
    if not (folder / "zarr.json").is_file() and (staged / "zarr.json").is_file():
        return staged
    return folder


def _check_rows(array, name: str, rows: tuple[int, int], n_cols: int) -> tuple[int, list[Damage]]:
    """Read each chunk of ``array`` (read strictly) in chunk rows ``rows`` and the committed columns, one at a
    time; (chunks checked, damage)."""
    chunk_rows, chunk_cols = array.chunks
    checked, damage = 0, []
    for r0 in range(rows[0], rows[1], chunk_rows):
        r1 = min(r0 + chunk_rows, rows[1])
        for c0 in range(0, n_cols, chunk_cols):
            c1 = min(c0 + chunk_cols, n_cols)
            checked += 1
            try:
                array[r0:r1, c0:c1]
            except Exception as exc:  # noqa: BLE001 - any failure to read a chunk is damage
                damage.append(Damage(name, (r0, r1), (c0, c1), _problem(exc),
                                     f"{name}/c/{r0 // chunk_rows}/{c0 // chunk_cols}"))
    return checked, damage


def _check_rows_on_worker(address: str, name: str, rows: tuple[int, int], n_cols: int):
    """A Dask task of :func:`verify_store`: the worker reads the chunk files at the client's store address."""
    from .location import store_location

    return _check_rows(_open(array_folder(store_location(address), name)), name, rows, n_cols)


# chunk rows per Dask task: about this many bytes of float32 decoded
VERIFY_TASK_BYTES = 256 * 1024**2


def _check_array(store, name: str, n_cols: int, report: VerifyReport, task) -> None:
    from ..cluster import active_client, store_address

    try:
        array = _open(array_folder(store.path, name))
    except Exception as exc:  # noqa: BLE001 - zarr raises many types for broken metadata
        report.damage.append(Damage(name, (0, store.n_rows), (0, n_cols), f"unreadable metadata ({exc})"))
        return
    if array.ndim != 2 or n_cols == 0:
        return
    chunk_rows = array.chunks[0]
    n_rows = array.shape[0]
    client = active_client()
    step = chunk_rows if client is None else \
        chunk_rows * max(1, VERIFY_TASK_BYTES // (4 * chunk_rows * max(n_cols, 1)))
    ranges = [(r0, min(r0 + step, n_rows)) for r0 in range(0, n_rows, step)]
    if client is None:
        outcomes = ((rows, _check_rows(array, name, rows, n_cols)) for rows in ranges)
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


def _read_whole(array) -> int:
    """Read a (small) array whole: its chunk count, or the failure of the first bad chunk."""
    array[...]
    return max(1, array.nchunks)


def _check_coordinates(store, report: VerifyReport) -> None:
    """Format 2's coordinate arrays decode, and ``epoch`` holds the committed labels (what xarray shows)."""
    if store.format_version < 2:
        return
    labels = [record.label for record in store.time_axis]
    for name in (fmt.EPOCH, fmt.TENSOR, fmt.TENSOR_INDEX):
        try:
            # a missing epoch chunk reads as zeros, which the labels comparison below reports
            array = _open(store.path / name, missing_chunks_raise=name != fmt.EPOCH)
            values, count = array[...], max(1, array.nchunks)
        except Exception as exc:  # noqa: BLE001 - any failure to read a coordinate is damage
            report.chunks_checked += 1
            report.damage.append(Damage(name, (0, 0), (0, 0), _problem(exc), _chunk_named(exc, name)))
            continue
        report.chunks_checked += count
        if name == fmt.EPOCH and values[:len(labels)].tolist() != labels:
            report.damage.append(Damage(name, (0, 0), (0, len(labels)), "labels differ from the time axis"))


def _chunk_named(exc: BaseException, name: str) -> str:
    from .store import ChunkMissing

    return f"{name}/{exc.key}" if isinstance(exc, ChunkMissing) else ""


def _check_results(store, report: VerifyReport) -> None:
    """Every array of every committed result decodes (a chunk a result never wrote is its fill value)."""
    from .metadata import results_index

    root = store.path / fmt.RESULTS
    for key, folder in sorted(results_index(root).items()):
        kind, name = key.split("/", 1)
        try:
            for child in sorted((root / folder).iterdir(), key=lambda p: p.name):
                if _is_array(child):
                    report.chunks_checked += _read_whole(_open(child, missing_chunks_raise=False))
        except Exception as exc:  # noqa: BLE001 - any failure to read a result is damage
            report.damage.append(Damage(f"results/{kind}/{name}", (0, 0), (0, 0), _problem(exc)))


def _is_array(folder) -> bool:
    """Whether ``folder`` holds a zarr array (its ``zarr.json`` says ``node_type: array``)."""
    import json

    try:
        return json.loads((folder / "zarr.json").read_text()).get("node_type") == "array"
    except (FileNotFoundError, NotADirectoryError):
        return False


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
        from ..progress import _NullTask

        _check_array(store, fmt.INTEGER_VALUES, n_cols, report, _NullTask())
    _check_coordinates(store, report)
    _check_results(store, report)
    return report
