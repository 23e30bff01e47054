"""Whole-store integrity check (`cmdtool verify`): every chunk's checksum, and no chunk missing.

zarr reads a missing chunk file as the fill value (zeros) without complaint, so a deleted chunk inside the
committed range is looked for explicitly; a damaged one fails its crc32c checksum when decoded.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..progress import NullProgress
from . import format as fmt


@dataclass
class Damage:
    array: str
    rows: tuple[int, int]
    columns: tuple[int, int]
    problem: str  # "checksum" | "missing" | "unreadable"

    def describe(self) -> str:
        return (f"{self.array}: rows {self.rows[0]}..{self.rows[1] - 1}, columns {self.columns[0]}..{self.columns[1] - 1}:"
                f" {self.problem}")


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


def _check_rows(store, name: str, arr, rows: tuple[int, int], n_cols: int) -> tuple[int, list[Damage]]:
    """Decode the chunks of ``arr`` in chunk rows ``rows`` and committed columns; (chunks checked, damage)."""
    chunk_rows, chunk_cols = arr.chunks
    folder = store.path / name / "c"
    checked, damage = 0, []
    for r0 in range(rows[0], rows[1], chunk_rows):
        r1 = min(r0 + chunk_rows, rows[1])
        for c0 in range(0, n_cols, chunk_cols):
            c1 = min(c0 + chunk_cols, n_cols)
            checked += 1
            key = folder / str(r0 // chunk_rows) / str(c0 // chunk_cols)
            if not key.is_file():
                damage.append(Damage(name, (r0, r1), (c0, c1), "missing"))
                continue
            try:
                np.asarray(arr[r0:r1, c0:c1])
            except ValueError as exc:
                problem = "checksum" if "checksum" in str(exc).lower() else f"unreadable ({exc})"
                damage.append(Damage(name, (r0, r1), (c0, c1), problem))
            except Exception as exc:  # noqa: BLE001 - any decode failure is damage
                damage.append(Damage(name, (r0, r1), (c0, c1), f"unreadable ({type(exc).__name__})"))
    return checked, damage


def _check_rows_on_worker(address: str, name: str, rows: tuple[int, int], n_cols: int):
    """A Dask task of :func:`verify_store`: the worker opens the store by the client's address."""
    from .store import open_store

    store = open_store(address)
    return _check_rows(store, name, store.group[name], rows, n_cols)


# chunk rows per Dask task: about this many bytes of float32 decoded
VERIFY_TASK_BYTES = 256 * 1024**2


def _check_array(store, name: str, arr, n_cols: int, report: VerifyReport, task) -> None:
    from ..cluster import active_client, store_address

    if arr.ndim != 2 or n_cols == 0:
        return
    chunk_rows = arr.chunks[0]
    n_rows = arr.shape[0]
    client = active_client()
    step = chunk_rows if client is None else \
        chunk_rows * max(1, VERIFY_TASK_BYTES // (4 * chunk_rows * max(n_cols, 1)))
    ranges = [(r0, min(r0 + step, n_rows)) for r0 in range(0, n_rows, step)]
    if client is None:
        outcomes = ((rows, _check_rows(store, name, arr, rows, n_cols)) for rows in ranges)
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


def _check_coordinates(store, report: VerifyReport) -> None:
    """Format 2's coordinate arrays decode, and ``epoch`` holds the committed labels (what xarray shows)."""
    if store.format_version < 2:
        return
    for name in (fmt.EPOCH, fmt.TENSOR, fmt.TENSOR_INDEX):
        report.chunks_checked += 1
        try:
            values = np.asarray(store.group[name][...])
        except Exception as exc:  # noqa: BLE001 - any decode failure is damage
            report.damage.append(Damage(name, (0, 0), (0, 0), f"unreadable ({type(exc).__name__})"))
            continue
        if name == fmt.EPOCH and values[:store.n_checkpoints].tolist() != store.labels.tolist():
            report.damage.append(Damage(name, (0, 0), (0, store.n_checkpoints),
                                        "labels differ from the time axis"))


def verify_store(store, progress=None) -> VerifyReport:
    """Decode every committed chunk of ``trajectories`` and ``integer_values``; list what is damaged."""
    progress = progress or NullProgress()
    report = VerifyReport()
    n_cols = store.n_checkpoints
    with progress.task("verifying", total=store.n_rows, unit="rows") as task:
        _check_array(store, fmt.TRAJECTORIES, store.trajectories, n_cols, report, task)
    if store.integer_values is not None and store.layout.n_integer_rows:
        from ..progress import _NullTask

        _check_array(store, fmt.INTEGER_VALUES, store.integer_values, n_cols, report, _NullTask())
    _check_coordinates(store, report)
    for kind, name in store.results.list():
        try:
            result = store.results.get(kind, name)
            for key in result.keys():
                report.chunks_checked += 1
                np.asarray(result.array(key)[...])
        except Exception as exc:  # noqa: BLE001
            report.damage.append(Damage(f"results/{kind}/{name}", (0, 0), (0, 0),
                                        f"unreadable ({type(exc).__name__}: {str(exc)[:80]})"))
    return report
