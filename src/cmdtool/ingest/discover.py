"""Finding checkpoints in the paths a user names, ordering them and reading their epoch labels.

Label rule (docs/commands.md): from the checkpoint's name (file stem, or folder name for a sharded checkpoint
or a trainer's ``checkpoint-N/`` folder), the number after ``epoch`` if there is one, else the number after
``step``, else the last number in the name. ``--label-pattern REGEX`` (first group, or whole match) overrides it.
When no checkpoint name has a number, labels are positions continuing the store's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UsageError
from ..units import natural_key
from .formats import CHECKPOINT_SUFFIXES, SAFETENSORS_SUFFIX, TORCH_SUFFIXES, CheckpointSource, shard_files

# Single-model files a trainer writes inside a checkpoint-N/ folder (Hugging Face Trainer layout).
MODEL_FILES_IN_FOLDER = ("model.safetensors", "pytorch_model.bin", "model.pt", "model.pth")

_EPOCH = re.compile(r"epoch[^0-9a-zA-Z]*(\d+)", re.IGNORECASE)
_STEP = re.compile(r"step[^0-9a-zA-Z]*(\d+)", re.IGNORECASE)
_LAST = re.compile(r"(\d+)(?!.*\d)")


@dataclass
class Discovery:
    sources: list[CheckpointSource]
    skipped: list[str] = field(default_factory=list)  # notes on files that are not checkpoints


def parse_label(name: str, pattern: str | None = None) -> int | None:
    if pattern:
        match = re.search(pattern, name)
        if not match:
            return None
        text = match.group(1) if match.groups() else match.group(0)
        try:
            return int(text)
        except ValueError:
            raise UsageError(f"--label-pattern {pattern!r} matched {text!r} in {name!r}, not an integer") from None
    for regex in (_EPOCH, _STEP, _LAST):
        match = regex.search(name)
        if match:
            return int(match.group(1))
    return None


def _file_source(path: Path) -> CheckpointSource | None:
    name = path.name
    if name.endswith(SAFETENSORS_SUFFIX):
        return CheckpointSource(path, "safetensors", [path], name=path.stem)
    if name.endswith(TORCH_SUFFIXES):
        return CheckpointSource(path, "torch", [path], name=path.stem)
    return None


def _folder_source(path: Path) -> CheckpointSource | None:
    if any(path.glob("*.index.json")):
        return CheckpointSource(path, "sharded", shard_files(path), name=path.name)
    for model_file in MODEL_FILES_IN_FOLDER:
        candidate = path / model_file
        if candidate.is_file():
            source = _file_source(candidate)
            source.name = path.name
            return source
    return None


def discover(paths: list[str | Path], label_pattern: str | None = None, first_free_label: int = 0,
             ignore: tuple[Path, ...] = ()) -> Discovery:
    """Checkpoints under ``paths`` (files and folders), ordered by label, with labels set.

    ``ignore``: folders never taken as checkpoints or noted (the store itself, when it lives beside them).
    """
    ignored = {p.resolve() for p in ignore}
    if label_pattern:
        try:
            re.compile(label_pattern)
        except re.error as exc:
            raise UsageError(f"--label-pattern {label_pattern!r} is not a valid regular expression: {exc}") from None
    sources: list[CheckpointSource] = []
    skipped: list[str] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise UsageError(f"{path}: no such file or folder")
        if path.is_file():
            source = _file_source(path)
            if source is None:
                raise UsageError(f"{path}: not a checkpoint file (expected {', '.join(CHECKPOINT_SUFFIXES)})")
            sources.append(source)
            continue
        folder_source = _folder_source(path) if any(path.glob("*.index.json")) else None
        if folder_source:
            sources.append(folder_source)
            continue
        found = 0
        for child in sorted(path.iterdir(), key=lambda p: natural_key(p.name)):
            if child.name.startswith(".") or child.resolve() in ignored:
                continue
            source = _file_source(child) if child.is_file() else _folder_source(child)
            if source is None:
                skipped.append(f"{child}: not a checkpoint, skipped")
                continue
            sources.append(source)
            found += 1
        if found == 0:
            raise UsageError(f"{path}: no checkpoints found (looked for {', '.join(CHECKPOINT_SUFFIXES)} files "
                             f"and sharded folders with an *.index.json)")
    # the same file named twice (e.g. a folder and a file in it) counts once
    unique: dict[Path, CheckpointSource] = {}
    for source in sources:
        unique.setdefault(source.path.resolve(), source)
    sources = list(unique.values())
    _assign_labels(sources, label_pattern, first_free_label)
    return Discovery(sources, skipped)


def _assign_labels(sources: list[CheckpointSource], pattern: str | None, first_free_label: int) -> None:
    labels = [parse_label(s.name, pattern) for s in sources]
    if all(label is None for label in labels) and not pattern:
        sources.sort(key=lambda s: natural_key(s.name))
        for position, source in enumerate(sources):
            source.label = first_free_label + position
        return
    for source, label in zip(sources, labels):
        if label is None:
            rule = f"--label-pattern {pattern!r}" if pattern else "the default rule (a number in the name)"
            raise UsageError(f"{source.path}: cannot read an epoch label from {source.name!r} with {rule}; "
                             f"pass --label-pattern")
        source.label = label
    sources.sort(key=lambda s: (s.label, natural_key(s.name)))
    for previous, current in zip(sources, sources[1:]):
        if previous.label == current.label:
            raise UsageError(f"duplicate epoch label {current.label}: {previous.path} and {current.path}")
