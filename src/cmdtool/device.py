"""Choice of compute device for the streaming passes."""

from __future__ import annotations

from .errors import UsageError


def resolve_device(spec=None):
    """``auto`` (or None) -> CUDA when available, else CPU; ``cuda``/``cuda:N``/``cpu`` as given (checked).
    Returns a ``torch.device`` (torch is imported here, not with the module)."""
    import torch

    if isinstance(spec, torch.device):
        return spec
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise UsageError(f"unknown device {spec!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda asked for, but no CUDA device is available (use --device auto or cpu)")
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"unsupported device {spec!r}: use auto, cpu, cuda or cuda:N")
    return device
