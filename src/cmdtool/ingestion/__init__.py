"""Ingestion: checkpoint discovery, safe readers and the streaming ingest into the store."""

from .discover import Discovery, discover, parse_label
from .formats import CheckpointSource, OpenCheckpoint, load_torch_file
from .ingest import IngestReport, ingest

__all__ = ["CheckpointSource", "Discovery", "IngestReport", "OpenCheckpoint", "discover", "ingest",
           "load_torch_file", "parse_label"]
