"""Resume support: an object's attributes as nested dicts of tensors and plain values, and back.

Training-time CMD state must go into the user's training checkpoint and come back after a kill. Those
checkpoints are read with ``torch.load(weights_only=True)`` (by torch's default, by Lightning, and by
``cmdtool ingest``), which refuses numpy arrays, dataclasses and other Python objects. So numpy arrays become
tensors with a marker, dataclasses become dicts naming their class, and dtypes/devices become strings.

:class:`~cmdtool.analyzers.cmd.online.OnlineCMD` is captured attribute by attribute (``vars``), so its resume
support follows its internals without listing them here.
"""

from __future__ import annotations

import dataclasses
import importlib

import numpy as np
import torch

from ..errors import UsageError

_NUMPY, _DTYPE, _DEVICE, _DATACLASS, _TUPLE = "__numpy__", "__dtype__", "__device__", "__dataclass__", "__tuple__"
# modules that training checkpoints written by earlier versions name for their dataclasses -> where those
# classes are now
MOVED_MODULES = {"cmdtool.analyzers.cmd_math": "cmdtool.analyzers.cmd.math",
                 "cmdtool.analyzers.cmd_drift": "cmdtool.analyzers.cmd.drift",
                 "cmdtool.analyzers.online_cmd": "cmdtool.analyzers.cmd.online"}


def encode(value):
    """``value`` as something ``torch.load(weights_only=True)`` can read back (tensors copied to CPU)."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, np.ndarray):
        return {_NUMPY: torch.from_numpy(np.ascontiguousarray(value).copy())}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, torch.dtype):
        return {_DTYPE: str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {_DEVICE: str(value)}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        cls = type(value)
        return {_DATACLASS: f"{cls.__module__}:{cls.__qualname__}",
                "fields": {f.name: encode(getattr(value, f.name)) for f in dataclasses.fields(value)}}
    if isinstance(value, tuple):
        return {_TUPLE: [encode(v) for v in value]}
    if isinstance(value, list):
        return [encode(v) for v in value]
    if isinstance(value, dict):
        return {k: encode(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot save a {type(value).__name__} in a training checkpoint")


def decode(value):
    """The inverse of :func:`encode`. Dataclasses are rebuilt only from cmdtool's own modules."""
    if isinstance(value, list):
        return [decode(v) for v in value]
    if not isinstance(value, dict):
        return value
    if _NUMPY in value:
        return value[_NUMPY].numpy().copy()
    if _DTYPE in value:
        return getattr(torch, value[_DTYPE])
    if _DEVICE in value:
        return torch.device(value[_DEVICE])
    if _TUPLE in value:
        return tuple(decode(v) for v in value[_TUPLE])
    if _DATACLASS in value:
        module, _, name = value[_DATACLASS].partition(":")
        if not module.startswith("cmdtool."):
            raise UsageError(f"training state names a class outside cmdtool ({value[_DATACLASS]}): refused")
        cls = getattr(importlib.import_module(MOVED_MODULES.get(module, module)), name)
        return cls(**{k: decode(v) for k, v in value["fields"].items()})
    return {k: decode(v) for k, v in value.items()}


def export_attributes(obj, skip: tuple[str, ...] = ()) -> dict:
    """Every instance attribute of ``obj`` (except ``skip``), encoded."""
    return {name: encode(value) for name, value in vars(obj).items() if name not in skip}


def restore_attributes(obj, state: dict, device: torch.device | None = None) -> None:
    """Set the attributes saved by :func:`export_attributes`; top-level tensors go to ``device``."""
    for name, value in state.items():
        value = decode(value)
        if device is not None and isinstance(value, torch.Tensor):
            value = value.to(device)
        setattr(obj, name, value)
