"""``cmdtool export``: analysis results as ``.npy``, ``.csv`` (small tables) and HDF5, for other tools.

Layout under ``out_dir``::

    npy/<kind>/<name>/<array>.npy      every array of the result (complex stays complex), plus attrs.json
    csv/<kind>/<name>/<table>.csv      small tables: spectra, explained variance, mode sizes, per-layer stats,
                                       per-epoch errors, reference trajectories, PCA coordinates, metric records
    cmdtool.h5                         group /<kind>/<name> per result: one dataset per array, the epoch labels
                                       as ``labels``, the result's json attributes as the group's ``attrs_json``

Arrays are copied chunk by chunk along their first axis (``np.lib.format.open_memmap`` for npy, a chunked
dataset for HDF5), so N-long and N×d outputs (mode, A, B, masks, PCA directions) never sit whole in memory.
CSV numbers are written with 17 significant digits: reading them back gives the stored values exactly.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import UsageError
from ..utils.progress import NullProgress

FORMATS = ("npy", "csv", "hdf5")
COPY_BLOCK_BYTES = 32 * 1024**2


def exported_kinds() -> tuple[str, ...]:
    """Kinds exported by default: every registered analyzer and evaluation (the Gram cache is internal: export
    it by naming it)."""
    from ..analyzers import available_methods

    return tuple(available_methods()) + ("evaluation",)


@dataclass
class ExportSummary:
    out_dir: str
    results: list = field(default_factory=list)   # "<kind>/<name>"
    files: list = field(default_factory=list)     # paths written, relative to out_dir
    bytes_written: int = 0

    def to_dict(self) -> dict:
        return {"out_dir": self.out_dir, "results": self.results, "files": self.files,
                "bytes_written": self.bytes_written}


def select_results(store, methods=None, name: str | None = "default") -> list:
    """Results to export: of ``methods`` (default every analysis kind present) and ``name`` (None: all names)."""
    present = store.results.list()
    kinds = list(dict.fromkeys(m.lower() for m in methods)) if methods else \
        [k for k in exported_kinds() if any(pk == k for pk, _ in present)]
    chosen = []
    for kind in kinds:
        names = [n for k, n in present if k == kind]
        if not names:
            have = ", ".join(sorted({k for k, _ in present})) or "none"
            raise UsageError(f"no {kind} result in {store.path} to export (kinds present: {have})")
        if name is None:
            chosen += [store.results.get(kind, n) for n in names]
        elif name in names:
            chosen.append(store.results.get(kind, name))
        elif methods:
            raise UsageError(f"no {kind} result named {name!r} (present: {', '.join(names)}); choose with --name")
    if not chosen:
        raise UsageError(f"store {store.path} holds no analysis results named {name!r} to export; run "
                         f"`cmdtool decompose` first, or pass --name")
    return chosen


def _block_rows(array) -> int:
    row_bytes = max(int(np.prod(array.shape[1:], dtype=np.int64)) * array.dtype.itemsize, 1)
    return max(1, COPY_BLOCK_BYTES // row_bytes)


def _copy_blocks(source, target) -> None:
    """target[...] = source[...] one block of rows at a time (bounded memory whatever the first axis is)."""
    if source.ndim == 0:
        target[()] = source[()]
        return
    step = _block_rows(source)
    for r0 in range(0, source.shape[0], step):
        target[r0:r0 + step] = source[r0:r0 + step]


def _write_csv(path: Path, header: list, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        for row in rows:
            writer.writerow([_cell(v) for v in row])


def _cell(value):
    if isinstance(value, (float, np.floating)):
        return repr(float(value)) if np.isfinite(value) else ""  # repr: shortest text that reads back exactly
    if isinstance(value, np.integer):
        return int(value)
    return value


def csv_tables(result, store) -> dict:
    """{table name: (header, rows)} of the small tables of one result: the evaluation records, or what the
    result's analyzer gives (:meth:`~cmdtool.analyzers.base.Analyzer.csv_tables`)."""
    if result.kind == "evaluation":
        rows = [(r["method"], int(r["epoch"]), metric, value) for r in result.attrs.get("records", [])
                for metric, value in (r.get("metrics") or {}).items()]
        return {"records": (["method", "epoch", "metric", "value"], rows)}
    from ..analyzers import analyzer_classes

    cls = analyzer_classes().get(result.kind)
    return cls.csv_tables(result, store) if cls is not None else {}


def export(store, out_dir="export", methods=None, name: str | None = "default", formats=FORMATS,
           progress=None, force: bool = False) -> ExportSummary:
    """Write the selected results (see :func:`select_results`) in ``formats`` under ``out_dir``.

    ``out_dir`` follows the output-folder rule of :mod:`cmdtool.utils.output_folder` (``force``: write into a
    non-empty folder cmdtool did not mark); files of earlier exports there are kept."""
    formats = list(dict.fromkeys(f.lower().lstrip(".") for f in formats)) or list(FORMATS)
    formats = ["hdf5" if f in ("h5", "hdf") else f for f in formats]
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise UsageError(f"unknown export format {unknown[0]!r}: choose from {', '.join(FORMATS)}")
    results = select_results(store, methods, name)
    progress = progress or NullProgress()
    from ..utils.output_folder import OutputFolder  # imports zarr: not at the top (the CLI imports this module)

    folder = OutputFolder(out_dir, "export", force=force, store=store)
    with folder as out:
        summary = _export_into(store, results, formats, out, progress)
    summary.out_dir = str(folder.path)
    summary.bytes_written = sum((folder.path / f).stat().st_size for f in summary.files)
    return summary


def _export_into(store, results, formats, out: Path, progress) -> ExportSummary:
    summary = ExportSummary(str(out))
    h5 = None
    if "hdf5" in formats:
        import h5py

        h5_path = out / "cmdtool.h5"
        h5 = h5py.File(h5_path, "w")
        h5.attrs["store"] = str(store.path)
        h5.attrs["store_revision"] = store.revision
        summary.files.append(h5_path.name)
    try:
        total = sum(len(r.keys()) for r in results) + len(results)
        with progress.task("export", total=total, unit="arrays") as task:
            for result in results:
                summary.results.append(f"{result.kind}/{result.name}")
                attrs_text = json.dumps(result.attrs, indent=2)
                folder = Path(result.kind) / result.name
                group = None
                if h5 is not None:
                    group = h5.require_group(f"{result.kind}/{result.name}")
                    group.attrs["attrs_json"] = attrs_text
                    if result.attrs.get("labels"):
                        group.create_dataset("labels", data=np.asarray(result.attrs["labels"], dtype=np.int64))
                if "npy" in formats:
                    (out / "npy" / folder).mkdir(parents=True, exist_ok=True)
                    (out / "npy" / folder / "attrs.json").write_text(attrs_text + "\n")
                    summary.files.append(str(Path("npy") / folder / "attrs.json"))
                for key in result.keys():
                    array = result.array(key)
                    if "npy" in formats:
                        path = out / "npy" / folder / f"{key}.npy"
                        target = np.lib.format.open_memmap(path, mode="w+", dtype=array.dtype, shape=array.shape)
                        _copy_blocks(array, target)
                        target.flush()
                        del target
                        summary.files.append(str(path.relative_to(out)))
                    if group is not None:
                        chunks = (min(_block_rows(array), array.shape[0]), *array.shape[1:]) \
                            if array.ndim and array.size else None
                        dataset = group.create_dataset(key, shape=array.shape, dtype=array.dtype, chunks=chunks)
                        _copy_blocks(array, dataset)
                    task.advance(1)
                if "csv" in formats:
                    for table, (header, rows) in csv_tables(result, store).items():
                        path = out / "csv" / folder / f"{table}.csv"
                        _write_csv(path, header, rows)
                        summary.files.append(str(path.relative_to(out)))
                task.advance(1)
    finally:
        if h5 is not None:
            h5.close()
    return summary
