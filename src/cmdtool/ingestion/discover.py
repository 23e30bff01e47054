"""Finding checkpoints in the paths a user names, ordering them and reading their epoch labels.

docs/formats.md shows every layout. In short:

- A file with a checkpoint suffix (.pt .pth .bin .ckpt .pth.tar .tar .safetensors) is one checkpoint.
- A *checkpoint folder* is one checkpoint: a Hugging Face Trainer ``checkpoint-N/`` (its model file or shards;
  optimizer, scheduler, RNG and argument files are never read), a sharded folder (shards + ``*.index.json``), a
  DeepSpeed ``global_stepN/`` (``mp_rank_00_model_states.pt``) or a ``torch.distributed.checkpoint`` folder
  (``.metadata`` + ``*.distcp``).
- A folder with none of these whose subfolders hold one run of Lightning's default tree
  (``lightning_logs/version_N/checkpoints/``) is read there (:func:`trainer_tree`).
- Any other folder is scanned one level deep for files and checkpoint folders.

Label rule: read from the checkpoint's path relative to the folder the user named (for a checkpoint named
directly, its name), without the checkpoint suffix and without Lightning's ``-vN`` copy suffix: the number after
``epoch`` if there is one, else the number after ``step``, else the last number. ``--label-pattern REGEX`` (first
group, or whole match) replaces the rule; an HF folder without a number in its name is labelled by its
``trainer_state.json`` (``global_step``). When no checkpoint has a number, labels are positions continuing the
store's. In a scanned folder where others have numbers, a checkpoint without one (Lightning's ``last.ckpt``, the
final model at the top of an HF run) and a second file for the same label (``-vN`` copies, ``best*``/``last*``
aliases) are skipped with a note (a file with the content of a checkpoint taken, as that checkpoint:
:func:`same_content`); ``set_labels`` takes such a file under a label of the user's choosing.
"""

from __future__ import annotations

import fnmatch
import json
import re
import zipfile
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
        if own is None and not any(source is not None for source, _ in children):
            tree = trainer_tree(path, ignored)
            if tree is not None:
                skipped.append(f"{path}: took the checkpoints in {tree} (Lightning's default tree)")
                path = tree
                children = _checkpoint_children(path, ignored)
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


# Where Lightning's ModelCheckpoint writes below Trainer(default_root_dir=ROOT): ROOT/lightning_logs/version_N/
# checkpoints/ with its default logger (any logger name: ROOT/NAME/version_N/), ROOT/checkpoints/ without a logger;
# relative to the folder named (ROOT, ROOT/lightning_logs or ROOT/lightning_logs/version_N).
TRAINER_TREES = ("checkpoints", "*/version_*/checkpoints", "version_*/checkpoints")


def trainer_tree(path: Path, ignored: set[Path] = frozenset()) -> Path | None:
    """The one checkpoint folder of a trainer's default tree below ``path`` (see :data:`TRAINER_TREES`), or
    None when there is none. Several runs (Lightning's version_0, version_1, ... of repeated fits) are not
    chosen between: a :class:`UsageError` names them and the command that takes the latest."""
    found = []
    for pattern in TRAINER_TREES:
        for folder in sorted(path.glob(pattern), key=lambda p: natural_key(str(p))):
            if folder.is_dir() and folder.resolve() not in ignored and \
                    any(source for source, _ in _checkpoint_children(folder, ignored)):
                found.append(folder)
        if found:
            break
    if len(found) <= 1:
        return found[0] if found else None
    runs = ", ".join(str(folder.relative_to(path)) for folder in found)
    raise UsageError(f"{path}: {len(found)} runs with checkpoints ({runs}); name the one to ingest, e.g. "
                     f"`cmdtool ingest {found[-1]}`")


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


# A record torch.save writes into every zip that identifies the save, not its content.
_SAVE_RECORDS = (".data/serialization_id",)


def _torch_zip_entries(path: Path):
    """The entries of a ``torch.save`` zip file as ``(name below the archive's top folder, ZipInfo)``, sorted, or
    None for any other file. The top folder is named after the file a save was written to (``model_3/data.pkl``),
    so two saves of one object under different names differ in their bytes but not in these entries."""
    if not path.name.endswith(TORCH_SUFFIXES):
        return None
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return None
    entries = sorted((info.filename.partition("/")[2], info) for info in infos)
    return [(name, info) for name, info in entries if name not in _SAVE_RECORDS]


def _content_size(path: Path) -> int:
    entries = _torch_zip_entries(path)
    return sum(info.file_size for _, info in entries) if entries is not None else path.stat().st_size


def content_digest(files) -> str:
    """xxh3_128 of a checkpoint's content: its files' bytes in order, a ``torch.save`` zip file by its entries
    (names below the top folder, and data; see :func:`_torch_zip_entries`)."""
    import xxhash

    digest = xxhash.xxh3_128()
    for path in map(Path, files):
        entries = _torch_zip_entries(path)
        if entries is None:
            with open(path, "rb") as handle:
                while chunk := handle.read(1024**2):
                    digest.update(chunk)
            continue
        with zipfile.ZipFile(path) as archive:
            for name, info in entries:
                digest.update(name.encode() + b"\0")
                with archive.open(info) as entry:
                    while chunk := entry.read(1024**2):
                        digest.update(chunk)
    return digest.hexdigest()


def same_content(source: CheckpointSource, others: list[CheckpointSource],
                 most: int = 3) -> CheckpointSource | None:
    """The checkpoint among ``others`` whose files hold the same content as ``source``'s, or None: a trainer's
    duplicate of a checkpoint (Lightning's ``last.ckpt``, an HF run's final ``model.safetensors``, torchvision's
    ``checkpoint.pth`` beside the last ``model_N.pth``). Same content: the same bytes, except that two
    ``torch.save`` zip files are compared by their entries (:func:`content_digest`). Only checkpoints of the same
    content size are hashed, the nearest in modification time first, at most ``most`` of them; a checkpoint
    listed on object storage (its files are sparse placeholders until downloaded) is never compared."""

    def size_and_time(checkpoint):
        try:
            files = [Path(f) for f in checkpoint.files]
            stats = [f.stat() for f in files]
            if any(st.st_size and not st.st_blocks for st in stats):
                return None  # a placeholder of a checkpoint on object storage (ingest/remote.py): not downloaded
            return sum(_content_size(f) for f in files), max(st.st_mtime for st in stats)
        except (OSError, TypeError):  # vanished meanwhile, or not a local file
            return None

    own = size_and_time(source)
    if own is None:
        return None
    candidates = [(abs(at[1] - own[1]), other) for other in others if other is not source
                  for at in [size_and_time(other)] if at is not None and at[0] == own[0]]
    if not candidates:
        return None
    try:
        digest = content_digest(source.files)
        for _, other in sorted(candidates, key=lambda pair: pair[0])[:most]:
            if content_digest(other.files) == digest:
                return other
    except (OSError, zipfile.BadZipFile, ValueError, EOFError):
        return None
    return None


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
        twin = same_content(source, [s for s in sources if labels[id(s)] is not None])
        if twin is not None:
            skipped.append(f"{source.path}: the same content as {twin.path} (epoch {labels[id(twin)]}); skipped as "
                           f"that checkpoint")
            continue
        free = max([first_free_label] + [label + 1 for label in labels.values() if label is not None])
        why = f"--label-pattern {pattern!r} does not match" if pattern else "no epoch number in"
        skipped.append(f"{source.path}: {why} {source.label_text!r}; skipped as an alias or final copy (to take "
                       f"it as a new last epoch: --set-label {source.path}={free})")
    kept.sort(key=lambda s: (s.label, _is_alias(s.label_text), natural_key(s.label_text)))
    result: list[CheckpointSource] = []
    for source in kept:
        if result and result[-1].label == source.label:
            first = result[-1]
            if same_content(source, [first]) is not None:
                skipped.append(f"{source.path}: the same content as {first.path} (epoch {source.label}); skipped as "
                               f"that checkpoint")
                continue
            if not _is_alias(source.label_text) or chosen(source) is not None:
                raise UsageError(f"duplicate epoch label {source.label}: {first.path} and {source.path}; leave one "
                                 f"out with --skip GLOB")
            skipped.append(f"{source.path}: a second checkpoint for epoch {source.label} (a copy or alias of "
                           f"{first.path.name}); skipped (to take it instead, pass --skip '{first.path.name}')")
            continue
        result.append(source)
    return result
