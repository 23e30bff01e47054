"""Layout manifest and time-axis records of a trajectory store."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

# Buffers cannot be told from parameters in a bare state dict; these suffixes are BatchNorm's buffers.
BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of the checkpoints and where its values live in the store.

    ``role`` is ``"trajectory"`` (floating point: rows ``offset .. offset+numel`` of ``trajectories``),
    ``"integer"`` (integer/bool: rows of ``integer_values``), ``"excluded"`` (left out by the user's
    patterns; reconstruction copies it from the source checkpoint) or ``"tied"`` (shares its storage with the
    earlier tensor ``tied_to``, e.g. an output layer tied to the embedding: stored once, under that name).
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    kind: str  # "parameter" | "buffer"
    role: str  # "trajectory" | "integer" | "excluded" | "tied"
    offset: int = 0
    numel: int = 0
    tied_to: str = ""

    @property
    def stop(self) -> int:
        return self.offset + self.numel

    def to_json(self) -> dict:
        data = dataclasses.asdict(self)
        data["shape"] = list(self.shape)
        if not self.tied_to:  # stores without tied tensors keep the manifest they always had
            del data["tied_to"]
        return data

    @classmethod
    def from_json(cls, data: dict) -> "TensorEntry":
        return cls(**{**data, "shape": tuple(data["shape"])})


def tensor_kind(name: str) -> str:
    return "buffer" if name.endswith(BUFFER_SUFFIXES) else "parameter"


def numel_of(shape) -> int:
    return int(math.prod(shape)) if len(shape) else 1


@dataclass(frozen=True)
class TimeRecord:
    """One column of the store: which checkpoint it came from. ``digest`` is ``"<algorithm>:<hex>"`` over the
    checkpoint's file bytes (``xxh3_128`` since format 2; format-1 records read as ``sha256:...``)."""

    label: int
    source: str
    size: int
    mtime: float
    digest: str
    ingested_at: str
    nonfinite: int = 0
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "TimeRecord":
        if "sha256" in data:  # format 1
            data = {**data, "digest": f"sha256:{data['sha256']}" if data["sha256"] else ""}
            del data["sha256"]
        return cls(**data)


@dataclass
class Layout:
    entries: list[TensorEntry]

    @property
    def trajectory_entries(self) -> list[TensorEntry]:
        return [e for e in self.entries if e.role == "trajectory"]

    @property
    def integer_entries(self) -> list[TensorEntry]:
        return [e for e in self.entries if e.role == "integer"]

    @property
    def tied_entries(self) -> list[TensorEntry]:
        return [e for e in self.entries if e.role == "tied"]

    @property
    def n_rows(self) -> int:
        return sum(e.numel for e in self.trajectory_entries)

    @property
    def n_integer_rows(self) -> int:
        return sum(e.numel for e in self.integer_entries)

    def by_name(self) -> dict[str, TensorEntry]:
        return {e.name: e for e in self.entries}

    def row_names(self, rows) -> list[str]:
        """Tensor name and index of each given trajectory row (for messages and exports)."""
        import numpy as np

        entries = self.trajectory_entries
        offsets = np.array([e.offset for e in entries])
        out = []
        for row in rows:
            k = int(np.searchsorted(offsets, row, side="right") - 1)
            entry = entries[k]
            idx = np.unravel_index(int(row) - entry.offset, entry.shape) if entry.shape else ()
            out.append(f"{entry.name}[{','.join(map(str, idx))}]")
        return out

    def to_json(self) -> list[dict]:
        return [e.to_json() for e in self.entries]

    @classmethod
    def from_json(cls, data: list[dict]) -> "Layout":
        return cls([TensorEntry.from_json(d) for d in data])
