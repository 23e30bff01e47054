"""A reconstruction written in the container its source checkpoint came in, so that it loads the way the source
loads: only the modelled weights differ. docs/formats.md ("What reconstruct writes") lists the containers.

- a torch file (``.pt``, ``.pth``, ``.ckpt``, ``.pth.tar``, ``.bin``): the source's object with the state dict
  replaced wherever it was wrapped (Lightning's ``state_dict``, a loop's ``model_state_dict``, torchvision's
  ``model``), every other entry (epoch, hyperparameters, version keys, optimizer state) kept as saved;
- a safetensors file: the same keys and header metadata;
- a checkpoint folder (Hugging Face ``config.json`` + ``model.safetensors``/``pytorch_model.bin``, or shards
  with their ``*.index.json``; accelerate's ``save_state`` folders): a folder with the weights replaced, sharded
  as the source, and every other file copied (config, tokenizer, the trainer's optimizer/scheduler/RNG states);
- a DeepSpeed ``global_stepN/`` folder: ``mp_rank_00_model_states.pt`` with ``module`` replaced, ZeRO stage 1/2
  optimizer partitions with their fp32 master weights replaced too (DeepSpeed's ``load_checkpoint`` restores the
  module from them), the other files copied;
- a ``torch.distributed.checkpoint`` folder: written back with ``dcp.save``; the entries that are not the model's
  tensors (optimizer tensors, pickled values such as a step count) are copied without being unpickled.

Names are the source's (a prefix that ingest stripped with ``--strip-prefix`` is put back), less the prefixes
passed as ``strip`` (``reconstruct --strip-prefix``). Tensors tied in a torch source share one storage again.
Nothing here runs code from a checkpoint: torch files are read as ingest reads them (``weights_only``).
"""

from __future__ import annotations

import io
import json
import shutil
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import CheckpointError, UsageError
from ..utils.output_folder import write_atomically
from ..store.location import is_url
from .checkpoints import state_dict_from_blocks, write_modelled_checkpoint, write_state_dict
from .discover import checkpoint_stem, discover
from .formats import (DEEPSPEED_MODEL_FILE, SAFETENSORS_SUFFIX, TORCH_SUFFIXES, WRAPPER_KEYS, find_index,
                      load_torch_file, safetensors_metadata, strip_prefix)
from .ingest import store_strip_prefixes
from .safetensors_reader import SafetensorsFile

# what each container is called in messages and in `reconstruct --json` ("format")
KINDS = {"safetensors": "safetensors file", "torch": "torch file", "hf-folder": "checkpoint folder",
         "sharded": "sharded checkpoint folder", "deepspeed": "DeepSpeed checkpoint folder",
         "dcp": "torch.distributed.checkpoint folder"}
FOLDER_KINDS = ("hf-folder", "sharded", "deepspeed", "dcp")
BARE_HINT = "pass --format pt or --format safetensors for a bare state dict"


@dataclass(frozen=True)
class Container:
    """The container of one store column's source checkpoint."""

    kind: str                 # a key of KINDS
    source: Path              # the checkpoint file, or the checkpoint folder
    folder: Path | None = None  # hf-folder: the checkpoint folder holding the model file

    @property
    def is_folder(self) -> bool:
        return self.kind in FOLDER_KINDS

    @property
    def suffix(self) -> str:
        """A file container's checkpoint suffix (``.ckpt``, ``.pth.tar``, ``.safetensors``); '' for folders."""
        return "" if self.is_folder else self.source.name[len(checkpoint_stem(self.source.name)):]


def source_container(store, column: int) -> Container | None:
    """The container of the source checkpoint of ``column``; None for a store built from memory (no source).
    A usage error when the source is on object storage or no longer exists (nothing to rebuild it from)."""
    record = store.time_axis[column]
    if is_url(record.source):
        raise UsageError(f"the source checkpoint of epoch {record.label}, {record.source}, is on object storage: "
                         f"its container is not rebuilt from there; {BARE_HINT}")
    path = Path(record.source)
    if not path.is_absolute():  # e.g. "<array>": a store written from memory
        return None
    if not path.exists():
        raise UsageError(f"the source checkpoint of epoch {record.label}, {path}, no longer exists: its "
                         f"container cannot be rebuilt; {BARE_HINT}")
    if path.is_dir():
        return Container(discover([path]).sources[0].format, path)
    folder = record.extra.get("folder")
    if folder and Path(folder) == path.parent:
        return Container("hf-folder", path, Path(folder))
    return Container("safetensors" if path.name.endswith(SAFETENSORS_SUFFIX) else "torch", path)


def write_container(store, column: int, blocks, container: Container, target: Path,
                    strip: tuple[str, ...] = ()) -> str:
    """Write epoch ``column``'s modelled weights (row blocks, as :func:`write_modelled_checkpoint` takes them)
    into ``target`` in ``container``'s form: a file, or a new folder (``target`` must not exist; the caller
    stages it). Returns a description of what was written (``Lightning checkpoint``, ``checkpoint folder``)."""
    names = _Names(store, strip)
    if container.kind == "safetensors":
        names.check(_safetensors_keys(container.source), container.source)
        write_modelled_checkpoint(store, column, blocks, target, "safetensors",
                                  metadata=safetensors_metadata(container.source), rename=names.written_by_store())
        return KINDS["safetensors"]
    if container.kind == "torch":
        return _write_torch(store, column, blocks, container.source, target, names)
    target.mkdir(parents=True)
    if container.kind == "hf-folder":
        _copy_other_files(container.folder, target, skip={container.source.name})
        model = container.source
        if model.name.endswith(SAFETENSORS_SUFFIX):
            names.check(_safetensors_keys(model), model)
            write_modelled_checkpoint(store, column, blocks, target / model.name, "safetensors",
                                      metadata=safetensors_metadata(model), rename=names.written_by_store())
        else:
            _write_torch(store, column, blocks, model, target / model.name, names)
        return "checkpoint folder"
    if container.kind == "sharded":
        _write_sharded(store, column, blocks, container.source, target, names)
        return KINDS["sharded"]
    if container.kind == "deepspeed":
        partitions = _zero_partitions(container.source)
        _copy_other_files(container.source, target, skip={DEEPSPEED_MODEL_FILE, *(p.name for p in partitions)})
        state = state_dict_from_blocks(store, column, blocks)
        _write_torch(store, column, blocks, container.source / DEEPSPEED_MODEL_FILE, target / DEEPSPEED_MODEL_FILE,
                     names, state=state, master_weights=True)
        _write_zero_partitions(container.source, partitions, target, state, names)
        return KINDS["deepspeed"]
    if container.kind == "dcp":
        _write_dcp(store, column, blocks, container.source, target, names)
        return KINDS["dcp"]
    raise CheckpointError(f"{container.source}: no writer for a {container.kind} checkpoint; {BARE_HINT}")


class _Names:
    """Store names <-> the source's names (with the prefix ingest stripped) <-> the names written."""

    def __init__(self, store, strip: tuple[str, ...]):
        self.layout = store.layout
        self.ingest_prefixes = store_strip_prefixes(store)
        self.strip = tuple(strip)
        self.source_of: dict[str, str] = {}   # store name -> the source's name

    def check(self, source_names, path: Path) -> None:
        """Map the source's tensor names to the store's; a source whose names no longer match is refused."""
        by_store = {strip_prefix(n, self.ingest_prefixes): n for n in source_names}
        expected = {e.name for e in self.layout.entries}
        if set(by_store) != expected:
            missing = sorted(expected - set(by_store))
            extra = sorted(set(by_store) - expected)
            what = f"lacks {missing[0]!r}" if missing else f"holds {extra[0]!r}, which the store does not"
            raise CheckpointError(f"{path} no longer matches the store's tensors (it {what}); {BARE_HINT}")
        self.source_of = by_store

    def written(self, source_name: str) -> str:
        return strip_prefix(source_name, self.strip)

    def written_by_store(self) -> dict[str, str]:
        return {name: self.written(source) for name, source in self.source_of.items()}

    def tied(self) -> dict[str, str]:
        """{store name: store name it is tied to}."""
        return {e.name: e.tied_to for e in self.layout.entries if e.role == "tied"}


def _safetensors_keys(path: Path) -> list[str]:
    try:
        with SafetensorsFile(path) as handle:
            return handle.keys()
    except CheckpointError as exc:  # changed since ingest
        why = getattr(exc, "reason", str(exc))
        raise CheckpointError(f"{path}: no longer a readable safetensors file ({why}); {BARE_HINT}") from None


def _wrapper_key(obj, path: Path):
    """The key under which ``obj`` holds the model's state dict (None: ``obj`` is the state dict), chosen as
    ingest chose it (:func:`cmdtool.ingestion.formats.unwrap_state_dict`)."""
    def is_state_dict(value) -> bool:
        return isinstance(value, dict) and bool(value) and all(isinstance(v, torch.Tensor) for v in value.values())

    if is_state_dict(obj):
        return None
    if isinstance(obj, dict):
        for key in WRAPPER_KEYS:
            if is_state_dict(obj.get(key)):
                return key
    raise CheckpointError(f"{path}: no longer holds the state dict it held when ingested; {BARE_HINT}")


def _replaced_state(inner: dict, state: dict, names: _Names) -> dict:
    """``inner`` (a source state dict) with every tensor replaced by the modelled one, under the written names,
    in the source's order; tied tensors share one tensor again. The dict's type and its ``_metadata`` (module
    versions that ``load_state_dict`` reads) are kept."""
    out = OrderedDict() if isinstance(inner, OrderedDict) else {}
    tied = names.tied()
    for source_name in inner:
        name = strip_prefix(source_name, names.ingest_prefixes)
        anchor = names.written(names.source_of[tied[name]]) if name in tied else None
        out[names.written(source_name)] = out[anchor] if anchor in out else state[name]
    if hasattr(inner, "_metadata"):
        out._metadata = inner._metadata
    return out


def _write_torch(store, column: int, blocks, source: Path, target: Path, names: _Names, state=None,
                 master_weights: bool = False) -> str:
    """The torch file ``source`` with its state dict replaced; ``master_weights``: also the fp32 master copies
    that a DeepSpeed model-states file's ``optimizer`` entry holds (:func:`_with_master_weights`)."""
    obj = load_torch_file(source)
    key = _wrapper_key(obj, source)
    inner = obj if key is None else obj[key]
    names.check(list(inner), source)
    if state is None:
        state = state_dict_from_blocks(store, column, blocks)
    replaced = _replaced_state(inner, state, names)
    if key is None:
        written = replaced
    else:
        written = type(obj)() if isinstance(obj, OrderedDict) else {}
        for name, value in obj.items():
            written[name] = replaced if name == key else value
        if master_weights and isinstance(written.get("optimizer"), dict):
            written["optimizer"] = _with_master_weights(written["optimizer"], written.get("param_shapes"),
                                                        inner, state, names, source)
    write_atomically(target, lambda temporary: torch.save(written, temporary))
    if key is None:
        return "torch state dict"
    if isinstance(obj, dict) and "pytorch-lightning_version" in obj:
        return "Lightning checkpoint"
    return f"checkpoint dict, weights under {key!r}"


def _with_master_weights(optimizer: dict, param_shapes, module: dict, state: dict, names: _Names,
                         source: Path) -> dict:
    """A DeepSpeed mixed-precision optimizer state (fp16/bf16 without ZeRO) with its fp32 master copies set to the
    modelled weights: ``fp32_groups`` (per parameter group, one tensor per parameter) or ``fp32_groups_flat``
    (per group, the parameters flattened). DeepSpeed's ``load_checkpoint`` copies them back into the module at
    the first step, so copies of the source's would undo the reconstruction. Moments and the loss scale are kept.

    Which weight each master copy is: ``param_shapes``' names in order where DeepSpeed saved them; otherwise the
    source module's tensor (in order) of the same shape whose values the copy rounds to, as the module is the
    master copy cast to its dtype when saved."""
    def modelled(name: str) -> torch.Tensor:
        return state[strip_prefix(name, names.ingest_prefixes)].detach().float().reshape(-1)

    def names_of(masters: list[torch.Tensor], shapes) -> list[str]:
        if isinstance(shapes, dict) and len(shapes) == len(masters):
            return list(shapes)
        found, taken = [], set()
        for master in masters:
            name = next((n for n, v in module.items() if n not in taken and _rounds_to(master, v)), None)
            if name is None:
                raise CheckpointError(f"{source}: an fp32 master weight of the optimizer matches no weight of the "
                                      f"module; {BARE_HINT}")
            taken.add(name)
            found.append(name)
        return found

    groups = len(optimizer.get("fp32_groups") or optimizer.get("fp32_groups_flat") or [])
    shapes_of = list(param_shapes) if isinstance(param_shapes, list) and len(param_shapes) == groups \
        else [None] * groups
    out = dict(optimizer)
    if isinstance(optimizer.get("fp32_groups"), list):
        out["fp32_groups"] = [
            [modelled(name).reshape(master.shape).to(master.dtype) for name, master in zip(names_of(group, shapes),
                                                                                         group)]
            for shapes, group in zip(shapes_of, optimizer["fp32_groups"])]
    if isinstance(optimizer.get("fp32_groups_flat"), list):
        flats = []
        for shapes, flat in zip(shapes_of, optimizer["fp32_groups_flat"]):
            if shapes is None:
                raise CheckpointError(f"{source}: flat fp32 master weights without param_shapes; {BARE_HINT}")
            values = torch.cat([modelled(name) for name in shapes]) if shapes else flat.new_zeros(0)
            if values.numel() > flat.numel():
                raise CheckpointError(f"{source}: the optimizer's flat master weights do not match param_shapes; "
                                      f"{BARE_HINT}")
            flat = flat.clone()
            flat[:values.numel()] = values.to(flat.dtype)
            flats.append(flat)
        out["fp32_groups_flat"] = flats
    return out


def _rounds_to(master: torch.Tensor, value) -> bool:
    """Whether the fp32 ``master`` copy, cast to ``value``'s dtype and shape, is ``value``."""
    return isinstance(value, torch.Tensor) and value.numel() == master.numel() \
        and torch.equal(master.detach().reshape(value.shape).to(value.dtype), value)


def _zero_partitions(folder: Path) -> list[Path]:
    """A DeepSpeed checkpoint folder's ZeRO optimizer partitions (``zero_pp_rank_R_mp_rank_00_optim_states.pt``,
    ``bf16_`` first with bf16 training), in data-parallel rank order."""
    def rank(path: Path) -> int:
        return int(path.name.split("zero_pp_rank_")[1].split("_")[0])

    return sorted((p for p in folder.glob("*zero_pp_rank_*_mp_rank_00_optim_states.pt")
                   if p.name.split("zero_pp_rank_")[1].split("_")[0].isdigit()), key=rank)


def _write_zero_partitions(folder: Path, partitions: list[Path], target: Path, state: dict, names: _Names) -> None:
    """Write ZeRO stage 1/2 partitions whose fp32 master weights are the modelled weights.

    DeepSpeed keeps an fp32 copy of every trained weight in the optimizer partitions
    (``single_partition_of_fp32_groups``: per parameter group, the group's parameters flattened in
    ``param_shapes`` order, each followed by its alignment padding, and cut into one piece per rank), and its
    ``load_checkpoint`` puts those copies back into the module at the first step. A copied partition would
    bring back the source's weights; so the master copies are rewritten from the modelled state, and the
    optimizer's moments and everything else are kept as saved. The partitions pickle DeepSpeed's classes, so
    they are read and written with :mod:`.torch_archive`, which never unpickles them."""
    if not partitions:
        return
    from . import torch_archive

    param_shapes = load_torch_file(folder / DEEPSPEED_MODEL_FILE).get("param_shapes") or []
    scanned = [torch_archive.scan(path) for path in partitions]
    groups, paddings = [], []
    for path, obj in zip(partitions, scanned):
        inner = obj.get("optimizer_state_dict") if isinstance(obj, dict) else None
        flat = inner.get("single_partition_of_fp32_groups") if isinstance(inner, dict) else None
        if not isinstance(flat, list) or not all(isinstance(t, torch_archive.TensorRef) for t in flat) \
                or len(flat) != len(param_shapes):
            raise CheckpointError(f"{path}: not a ZeRO stage 1/2 optimizer partition that matches "
                                  f"{DEEPSPEED_MODEL_FILE}'s param_shapes; {BARE_HINT}")
        groups.append(flat)
        paddings = inner.get("param_alignment_paddings") or paddings
    replacements: list[list] = [[] for _ in partitions]
    for g, shapes in enumerate(param_shapes):
        pieces = [torch_archive.read_tensor(path, flat[g]) for path, flat in zip(partitions, groups)]
        merged = np.concatenate(pieces)
        offset = 0
        for p, name in enumerate(shapes):
            store_name = strip_prefix(name, names.ingest_prefixes)
            values = state.get(store_name)
            if values is None or offset + values.numel() > len(merged):
                raise CheckpointError(f"{folder}: the ZeRO partitions do not hold {name!r} where "
                                      f"{DEEPSPEED_MODEL_FILE} says; {BARE_HINT}")
            merged[offset:offset + values.numel()] = values.detach().float().reshape(-1).numpy()
            offset += values.numel() + (int(paddings[g][p]) if g < len(paddings) else 0)
        bounds = np.cumsum([0] + [len(piece) for piece in pieces])
        for rank, flat in enumerate(groups):
            replacements[rank].append((flat[g], merged[bounds[rank]:bounds[rank + 1]]))
    for path, rank_replacements in zip(partitions, replacements):
        torch_archive.write_replacing(path, target / path.name, rank_replacements)


def _copy_other_files(folder: Path, target: Path, skip: set[str]) -> None:
    """Copy, byte for byte, every plain file of a checkpoint folder but the weights (``skip``) and hidden files:
    the config, generation config and tokenizer files that load beside the weights, and the trainer's own state
    (optimizer, scheduler, RNG, arguments), so that the folder resumes the way the source does. The copies are
    never unpickled or read."""
    for child in sorted(folder.iterdir()):
        if child.name in skip or child.name.startswith(".") or not child.is_file():
            continue
        shutil.copyfile(child, target / child.name)


def _write_sharded(store, column: int, blocks, folder: Path, target: Path, names: _Names) -> None:
    index_path = find_index(folder)
    index = json.loads(index_path.read_text())
    weight_map: dict[str, str] = index["weight_map"]
    names.check(list(weight_map), folder)
    state = state_dict_from_blocks(store, column, blocks)
    shards: dict[str, list[str]] = {}
    for source_name, shard in weight_map.items():
        shards.setdefault(shard, []).append(source_name)
    _copy_other_files(folder, target, skip={index_path.name, *shards})
    for shard, source_names in shards.items():
        part = _replaced_state({n: None for n in source_names}, state, names)
        if shard.endswith(SAFETENSORS_SUFFIX):
            write_state_dict({k: v.contiguous() for k, v in part.items()}, target / shard, "safetensors",
                             metadata=safetensors_metadata(folder / shard))
        elif shard.endswith(TORCH_SUFFIXES):
            write_atomically(target / shard, lambda temporary, part=part: torch.save(part, temporary))
        else:
            raise CheckpointError(f"{index_path}: shard {shard!r} is neither safetensors nor a torch file")
    index = dict(index, weight_map={names.written(n): shard for n, shard in weight_map.items()})
    (target / index_path.name).write_text(json.dumps(index, indent=2) + "\n")


class _RawBytes:
    """A pickled DCP entry carried over as its bytes (never unpickled here)."""

    __slots__ = ("data",)

    def __init__(self, data: bytes):
        self.data = data


def _write_dcp(store, column: int, blocks, folder: Path, target: Path, names: _Names) -> None:
    """The source DCP checkpoint with the model's tensors replaced, saved with ``dcp.save`` in this process.

    Every entry is read through DCP's own reader with the metadata ingest read (its restricted unpickler):
    tensors with ``weights_only``, and pickled entries kept as raw bytes and written back as they were, so
    nothing from the checkpoint is unpickled."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
    from torch.distributed.checkpoint._traverse import set_element
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from .formats import DcpFolder

    source = DcpFolder(folder)
    model = {fqn: name for name, fqn in source.model_tensors()}
    names.check(list(model.values()), folder)
    others = {}
    for fqn, md in source.metadata.state_dict_metadata.items():
        if fqn not in model:
            others[fqn] = torch.empty(tuple(md.size), dtype=md.properties.dtype) \
                if isinstance(md, TensorStorageMetadata) else None
    raw: dict[str, bytes] = {}

    class KeepBytes(DefaultLoadPlanner):
        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            raw[read_item.dest_index.fqn] = value.read()

    class WriteRawBytes(DefaultSavePlanner):
        def transform_object(self, write_item, object):  # noqa: A002 - the planner's own signature
            if isinstance(object, _RawBytes):
                return io.BytesIO(object.data)
            return super().transform_object(write_item, object)

    if others:
        reader = FileSystemReader(str(folder))
        reader.read_metadata = lambda *args, **kwargs: source.metadata  # never the unrestricted pickle.load
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                dcp.load(others, storage_reader=reader, planner=KeepBytes(), no_dist=True)
        except Exception as exc:  # noqa: BLE001 - missing or damaged .distcp files
            raise CheckpointError(f"{folder}: cannot read the DCP checkpoint ({exc}); {BARE_HINT}") from None
    state = state_dict_from_blocks(store, column, blocks)
    nested: dict = {}
    for fqn in source.metadata.state_dict_metadata:
        path = tuple(source.paths.get(fqn, (fqn,)))
        if fqn in model:
            name = strip_prefix(model[fqn], names.ingest_prefixes)
            value = state[name]
            path = path[:-1] + (names.written(model[fqn]),)
        else:
            value = _RawBytes(raw[fqn]) if fqn in raw else others[fqn]
        set_element(nested, path, value)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no process group: saving in one process" is the point
        dcp.save(nested, storage_writer=FileSystemWriter(str(target)), planner=WriteRawBytes(), no_dist=True)


def describe_bare(fmt: str) -> str:
    return "safetensors state dict" if fmt == "safetensors" else "torch state dict"
