"""Finding checkpoints in the paths a user names, ordering them and reading their epoch labels.

docs/formats.md shows every layout. In short:

- A file with a checkpoint suffix (.pt .pth .bin .ckpt .pth.tar .tar .safetensors) is one checkpoint.
- A *checkpoint folder* is one checkpoint: a Hugging Face Trainer ``checkpoint-N/`` (its model file or shards;
  optimizer, scheduler, RNG and argument files are never read), a sharded folder (shards + ``*.index.json``), a
  DeepSpeed ``global_stepN/`` (``mp_rank_00_model_states.pt``) or a ``torch.distributed.checkpoint`` folder
  (``.metadata`` + ``*.distcp``).
- Any other folder is scanned one level deep for files and checkpoint folders.

Label rule: read from the checkpoint's path relative to the folder the user named (for a checkpoint named
directly, its name), without the checkpoint suffix and without Lightning's ``-vN`` copy suffix: the number after
``epoch`` if there is one, else the number after ``step``, else the last number. ``--label-pattern REGEX`` (first
group, or whole match) replaces the rule; an HF folder without a number in its name is labelled by its
``trainer_state.json`` (``global_step``). When no checkpoint has a number, labels are positions continuing the
store's. In a scanned folder where others have numbers, a checkpoint without one (Lightning's ``last.ckpt``, the
final model at the top of an HF run) and a second file for the same label (``-vN`` copies, ``best*``/``last*``
aliases) are skipped with a note; ``set_labels`` takes such a file under a label of the user's choosing.
"""

from __future__ import annotations

import fnmatch
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UsageError
from ..utils.units import natural_key
from .formats import (CHECKPOINT_SUFFIXES, DCP_METADATA, DEEPSPEED_MODEL_FILE, SAFETENSORS_SUFFIX, TORCH_SUFFIXES,
                      CheckpointSource, shard_files)

# Single-model files a trainer writes inside a checkpoint folder (Hugging Face Trainer and PEFT layouts).
MODEL_FILES_IN_FOLDER = ("model.safetensors", "pytorch_model.bin", "adapter_model.safetensors",
                         "adapter_model.bin", "model.pt", "model.pth")
# What else a trainer keeps in a checkpoint folder: optimizer, scheduler, grad scaler, RNG states, arguments.
# Never read (pickled arguments would be refused anyway); never taken for checkpoints of their own.
TRAINER_STATE = re.compile(r"^(optimizer|scheduler|scaler|rng_state(_\d+)?|training_args|trainer_state)\b"
                           r"|_optim_states\.pt$", re.IGNORECASE)
LIGHTNING_COPY = re.compile(r"-v\d+$")            # epoch=3-step=400-v1.ckpt: Lightning's second file of a name
ALIAS_PREFIXES = ("last", "best")                 # last.ckpt, best-epoch=3.ckpt, model_best.pth.tar: aliases

_EPOCH = re.compile(r"epoch[^0-9a-zA-Z]*(\d+)", re.IGNORECASE)
_STEP = re.compile(r"step[^0-9a-zA-Z]*(\d+)", re.IGNORECASE)
_LAST = re.compile(r"(\d+)(?!.*\d)")


@dataclass
class Discovery:
    sources: list[CheckpointSource]
    skipped: list[str] = field(default_factory=list)  # notes on what was not taken, and why


def checkpoint_stem(name: str) -> str:
    """A file name without its checkpoint suffix (the longest one: ``a.pth.tar`` -> ``a``)."""
    for suffix in sorted(CHECKPOINT_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


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
    name = LIGHTNING_COPY.sub("", name)
    for regex in (_EPOCH, _STEP, _LAST):
        match = regex.search(name)
        if match:
            return int(match.group(1))
    return None


def _file_source(path: Path) -> CheckpointSource | None:
    name = path.name
    if name.endswith(SAFETENSORS_SUFFIX):
        return CheckpointSource(path, "safetensors", [path], name=checkpoint_stem(name))
    if name.endswith(TORCH_SUFFIXES):
        return CheckpointSource(path, "torch", [path], name=checkpoint_stem(name))
    return None


def _is_model_index(path: Path) -> bool:
    return path.name.endswith(".index.json")


def folder_source(path: Path) -> CheckpointSource | None:
    """The checkpoint a folder *is* (see the module note), or None for a folder of checkpoints."""
    if (path / DCP_METADATA).is_file() and any(path.glob("*.distcp")):
        files = [path / DCP_METADATA] + sorted(path.glob("*.distcp"), key=lambda p: natural_key(p.name))
        return CheckpointSource(path, "dcp", files, name=path.name, folder=path)
    if (path / DEEPSPEED_MODEL_FILE).is_file():
        return CheckpointSource(path, "deepspeed", [path / DEEPSPEED_MODEL_FILE], name=path.name, folder=path)
    if any(_is_model_index(p) for p in path.glob("*.index.json")):
        return CheckpointSource(path, "sharded", shard_files(path), name=path.name, folder=path)
    for model_file in MODEL_FILES_IN_FOLDER:
        candidate = path / model_file
        if candidate.is_file() and _only_trainer_files_beside(path, candidate):
            source = _file_source(candidate)
            source.name, source.folder = path.name, path
            return source
    return None


def _only_trainer_files_beside(folder: Path, model_file: Path) -> bool:
    """A model file makes its folder one checkpoint only when nothing beside it is another checkpoint (a plain
    folder of ``epoch_N.pt`` files may also hold a ``model.pt``)."""
    for child in folder.iterdir():
        if child == model_file or child.name.startswith(".") or TRAINER_STATE.search(child.name):
            continue
        if child.is_file() and _file_source(child) is not None and child.name not in MODEL_FILES_IN_FOLDER:
            return False
        if child.is_dir() and folder_source(child) is not None:
            return False
    return True


def _trainer_step(folder: Path | None) -> int | None:
    """``global_step`` from an HF checkpoint folder's ``trainer_state.json`` (plain json, never a pickle)."""
    if folder is None or not (folder / "trainer_state.json").is_file():
        return None
    try:
        step = json.loads((folder / "trainer_state.json").read_text()).get("global_step")
    except (OSError, ValueError, AttributeError):
        return None
    return int(step) if isinstance(step, int) else None


def _skipped_by(patterns: tuple[str, ...], *names: str) -> str | None:
    for pattern in patterns:
        if any(fnmatch.fnmatchcase(name, pattern) for name in names):
            return pattern
    return None


def discover(paths: list[str | Path], label_pattern: str | None = None, first_free_label: int = 0,
             ignore: tuple[Path, ...] = (), skip: tuple[str, ...] = (),
             set_labels: dict[str | Path, int] | None = None) -> Discovery:
    """Checkpoints under ``paths`` (files and folders), ordered by label, with labels set.

    ``ignore``: folders never taken as checkpoints or noted (the store itself, when it lives beside them).
    ``skip``: globs on a file's or folder's name or relative path; matches are left out with a note.
    ``set_labels``: {path: label} for checkpoints whose label the rule cannot read (they are then taken too).
    """
    ignored = {p.resolve() for p in ignore}
    chosen_labels = {Path(p).resolve(): int(label) for p, label in (set_labels or {}).items()}
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
        pattern = _skipped_by(skip, path.name, str(path))
        if pattern:
            skipped.append(f"{path}: skipped (--skip {pattern!r})")
            continue
        if path.is_file():
            source = _file_source(path)
            if source is None:
                raise UsageError(f"{path}: not a checkpoint file (expected {', '.join(CHECKPOINT_SUFFIXES)})")
            source.label_text, source.named = source.name, True
            sources.append(source)
            continue
        children = _checkpoint_children(path, ignored)
        own = folder_source(path)
        if own is not None and not any(source is not None and source.folder for source, _ in children):
            own.label_text, own.named = path.resolve().name, True
            sources.append(own)
            continue
        found = 0
        for source, note in children:
            if source is None:
                skipped.append(note)
                continue
            if source.path == path:  # shards indexed at the top of the folder
                sources.append(source)
                found += 1
                continue
            relative = source.folder.relative_to(path) if source.folder else source.path.relative_to(path)
            pattern = _skipped_by(skip, relative.name, str(relative))
            if pattern:
                skipped.append(f"{path / relative}: skipped (--skip {pattern!r})")
                continue
            source.label_text = checkpoint_stem(str(relative))
            sources.append(source)
            found += 1
        if found == 0 and not any("--skip" in note for note in skipped):
            raise UsageError(_nothing_found(path))
    # the same checkpoint named twice (e.g. a folder and a file in it) counts once
    unique: dict[Path, CheckpointSource] = {}
    for source in sources:
        unique.setdefault(source.path.resolve(), source)
    sources = list(unique.values())
    if not sources:
        raise UsageError("no checkpoints left to ingest (every path was skipped)")
    sources = _assign_labels(sources, label_pattern, first_free_label, chosen_labels, skipped)
    return Discovery(sources, skipped)


def _checkpoint_children(folder: Path, ignored: set[Path]) -> list[tuple[CheckpointSource | None, str]]:
    """(source, "") for each checkpoint directly in ``folder``, (None, note) for each other entry. Shards listed
    by an index at this level (the final model at the top of an HF run) are one checkpoint, labelled by the
    index's name (so, without a number, skipped unless given a label)."""
    out = []
    in_index: set[str] = set()
    indexes = sorted(folder.glob("*.index.json"))
    if len(indexes) == 1:
        files = shard_files(folder)
        in_index = {f.name for f in files}
        out.append((CheckpointSource(folder, "sharded", files, name=folder.name,
                                     label_text=checkpoint_stem(indexes[0].name)), ""))
    for child in sorted(folder.iterdir(), key=lambda p: natural_key(p.name)):
        if child.name.startswith(".") or child.resolve() in ignored or child.name in in_index:
            continue
        if TRAINER_STATE.search(child.name):
            out.append((None, f"{child}: trainer state (optimizer, scheduler, RNG or arguments), not model "
                              f"weights; skipped"))
            continue
        source = _file_source(child) if child.is_file() else folder_source(child)
        out.append((source, "" if source else f"{child}: not a checkpoint, skipped"))
    return out


def _nothing_found(path: Path) -> str:
    message = (f"{path}: no checkpoints found (looked for {', '.join(CHECKPOINT_SUFFIXES)} files and checkpoint "
               f"folders: HF checkpoint-N/, sharded, DeepSpeed global_stepN/, torch.distributed.checkpoint)")
    for child in sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if any(source for source, _ in _checkpoint_children(child, set())):
            return message + f"; {child} holds some: `cmdtool ingest {child}`"
    return message


def _is_alias(name: str) -> bool:
    stem = checkpoint_stem(name).lower()
    return stem.startswith(ALIAS_PREFIXES) or stem.endswith(("_best", "-best", "_last", "-last")) \
        or bool(LIGHTNING_COPY.search(stem))


def _assign_labels(sources, pattern, first_free_label, chosen_labels, skipped) -> list[CheckpointSource]:
    def chosen(source):
        for key in (source.path.resolve(), source.folder.resolve() if source.folder else None):
            if key in chosen_labels:
                return chosen_labels[key]
        return None

    labels = {}
    for source in sources:
        label = chosen(source)
        if label is None:
            label = parse_label(source.label_text or source.name, pattern)
        if label is None and pattern is None:
            label = _trainer_step(source.folder)
        labels[id(source)] = label
    if all(label is None for label in labels.values()) and not pattern:
        sources.sort(key=lambda s: natural_key(s.label_text or s.name))
        for position, source in enumerate(sources):
            source.label = first_free_label + position
        return sources
    kept = []
    for source in sources:
        label = labels[id(source)]
        if label is not None:
            source.label = label
            kept.append(source)
            continue
        rule = f"--label-pattern {pattern!r}" if pattern else "the default rule (a number in the name)"
        if source.named:
            fix = "pass --set-label PATH=N" if pattern else "pass --label-pattern REGEX or --set-label PATH=N"
            raise UsageError(f"{source.path}: cannot read an epoch label from {source.label_text!r} with {rule}; "
                             f"{fix}")
        why = f"--label-pattern {pattern!r} does not match" if pattern else "no epoch number in"
        skipped.append(f"{source.path}: {why} {source.label_text!r}; skipped as an alias or final copy (take it "
                       f"with --set-label {source.path}=N)")
    kept.sort(key=lambda s: (s.label, _is_alias(s.label_text), natural_key(s.label_text)))
    result: list[CheckpointSource] = []
    for source in kept:
        if result and result[-1].label == source.label:
            first = result[-1]
            if not _is_alias(source.label_text) or chosen(source) is not None:
                raise UsageError(f"duplicate epoch label {source.label}: {first.path} and {source.path}; leave one "
                                 f"out with --skip GLOB")
            skipped.append(f"{source.path}: a second checkpoint for epoch {source.label} (a copy or alias of "
                           f"{first.path.name}); skipped (to take it instead, pass --skip '{first.path.name}')")
            continue
        result.append(source)
    return result
