"""Storage: the chunked zarr trajectory store, its block reader and its results."""

from .layout import Layout, TensorEntry, TimeRecord
from .results import Result, ResultsCatalog, ResultWriter
from .store import RowBlock, TrajectoryStore, default_store_path, from_array, open_store

__all__ = ["Layout", "TensorEntry", "TimeRecord", "Result", "ResultsCatalog", "ResultWriter", "RowBlock",
           "TrajectoryStore", "default_store_path", "from_array", "open_store"]
