"""A store's metadata read from its ``zarr.json`` documents with the json module alone.

Everything ``cmdtool info`` prints (layout, time axis, chunk shape, codec, results index and each result's
attributes) lives in a few small JSON documents; reading them directly keeps the import of zarr and numpy out
of ``info``'s start-up (``bench/startup.py`` measures it). The rules that say whether a folder is a
cmdtool store are here once and :class:`~cmdtool.store.store.TrajectoryStore` applies the same ones.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import StoreError, UsageError
from . import format as fmt
from .layout import Layout, TimeRecord


def check_store_folder(path) -> None:
    """A one-line usage error when ``path`` (a Path or RemotePath) holds no store."""
    if isinstance(path, Path) and path.exists() and not path.is_dir():
        raise UsageError(f"store path {path} is a file, not a trajectory store")
    if not (path / "zarr.json").is_file():
        raise UsageError(f"no trajectory store at {path}: create one with `cmdtool ingest CHECKPOINTS`")


def store_attributes(path, root_attributes: dict) -> dict:
    """The cmdtool attribute of a store's root group, checked: a zarr group that is not a store, or a store
    newer than this cmdtool, is a one-line error."""
    meta = root_attributes.get(fmt.ATTRS_KEY)
    if not isinstance(meta, dict):
        raise StoreError(f"{path} is a zarr group but not a cmdtool trajectory store")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > fmt.FORMAT_VERSION:
        raise StoreError(f"store {path} has format version {version}, newer than this cmdtool "
                         f"supports ({fmt.FORMAT_VERSION}); upgrade cmdtool to read it")
    return meta


def results_index(results_root) -> dict:
    """``{"<kind>/<name>": "<kind>/<name>@<id>"}``: the committed results (see ``results.py``)."""
    path = results_root / "zarr.json"
    if not path.is_file():
        return {}
    return json.loads(path.read_text()).get("attributes", {}).get("index", {})


def _document(path) -> dict:
    try:
        return json.loads((path / "zarr.json").read_text())
    except (OSError, ValueError) as exc:
        raise StoreError(f"cannot open store {path}: {exc}") from None


class StoreAttributes:
    """What a store's ``meta``, ``layout`` and ``time_axis`` say, for :class:`StoreMetadata` and
    :class:`~cmdtool.store.store.TrajectoryStore` alike."""

    meta: dict
    layout: Layout
    time_axis: list[TimeRecord]

    @property
    def format_version(self) -> int:
        return int(self.meta["format_version"])

    @property
    def revision(self) -> int:
        """Increases with every committed change of the trajectories (results record the one they saw)."""
        return int(self.meta["revision"])

    @property
    def n_rows(self) -> int:
        return self.layout.n_rows

    @property
    def n_checkpoints(self) -> int:
        return len(self.time_axis)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n_rows, self.n_checkpoints)


class StoreMetadata(StoreAttributes):
    """What a store says about itself, without opening its arrays: the same ``path``, ``meta``,
    ``layout``, ``time_axis``, ``revision``, ``n_rows``, ``n_checkpoints``, ``chunk_shape`` and ``codec`` as
    a read-only :class:`~cmdtool.store.store.TrajectoryStore`, and ``analyses()``.

    Use :meth:`read` (a local folder or a RemotePath), which returns None where the documents alone cannot answer
    (a rechunk interrupted between its renames): open the store then
    (:func:`~cmdtool.store.summary.store_metadata` does).
    """

    def __init__(self, path: Path, root: dict, trajectories: dict):
        self.path = path
        self.meta = store_attributes(path, root.get("attributes", {}))
        self.layout = Layout.from_json(self.meta["layout"])
        self.time_axis = [TimeRecord.from_json(r) for r in self.meta["time_axis"]]
        self.chunk_shape = tuple(int(c) for c in trajectories["chunk_grid"]["configuration"]["chunk_shape"])
        # the same rule as store.codec_of: blosc(lz4) + crc32c is "lz4", crc32c alone is "none"
        self.codec = "lz4" if any(c.get("name") == "blosc" for c in trajectories.get("codecs", [])) else "none"

    @classmethod
    def read(cls, path) -> StoreMetadata | None:
        check_store_folder(path)
        if not (path / fmt.TRAJECTORIES / "zarr.json").is_file():
            return None  # mid-rechunk: the store's reader knows where the complete copy is
        return cls(path, _document(path), _document(path / fmt.TRAJECTORIES))

    def analyses(self) -> list[tuple[str, str, dict]]:
        """(kind, name, attributes) of every committed result; a result whose document cannot be read has
        empty attributes (listed, not fatal)."""
        root = self.path / fmt.RESULTS
        out = []
        for key, folder in sorted(results_index(root).items()):
            kind, name = key.split("/", 1)
            try:
                attrs = json.loads((root / folder / "zarr.json").read_text()).get("attributes", {})
            except (OSError, ValueError):
                attrs = {}
            out.append((kind, name, attrs))
        return out
