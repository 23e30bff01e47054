"""Choice of compute device for the streaming passes.

The CPU is the string ``"cpu"``: the CPU passes compute in numpy and need no torch. A GPU is a ``torch.device``,
made (and torch imported) only when one is asked for, or when ``auto`` finds that one may be present
(:func:`cuda_may_be_present`, answered without importing torch where it can be).
"""

from __future__ import annotations

import sys

from ..errors import UsageError

CPU = "cpu"

# device files of a GPU driver torch could use: NVIDIA's, WSL's GPU paravirtualisation, AMD's (ROCm builds)
_GPU_DRIVER_FILES = ("/dev/nvidiactl", "/proc/driver/nvidia", "/dev/dxg", "/dev/kfd")


def device_type(device) -> str:
    """``"cpu"`` or ``"cuda"`` of a device :func:`resolve_device` returned (or of any ``torch.device``)."""
    return getattr(device, "type", None) or str(device).split(":", 1)[0]


def computes_in_numpy(device) -> bool:
    """Whether a pass on ``device`` computes in numpy: the CPU as :func:`resolve_device` names it (``"cpu"``). A
    ``torch.device`` (a GPU; or the CPU, given as a torch device) computes in torch."""
    return isinstance(device, str) and device == CPU


def torch_built_for_gpu() -> bool:
    """Whether the installed torch is built for a GPU, read from ``torch/version.py`` (``cuda``/``hip`` are None
    in a CPU build) without importing torch; True where the file cannot be read (then torch is asked)."""
    import importlib.util
    import re
    from pathlib import Path

    spec = importlib.util.find_spec("torch")
    if spec is None:
        return False
    try:
        text = (Path(spec.submodule_search_locations[0]) / "version.py").read_text()
    except (OSError, TypeError, IndexError):
        return True
    built_for = re.findall(r"^(cuda|hip)\b[^=\n]*=\s*(.+?)\s*$", text, flags=re.MULTILINE)
    return not built_for or any(value != "None" for _, value in built_for)


def cuda_may_be_present() -> bool:
    """False when torch surely reports no CUDA device, found without importing torch: torch is not installed,
    it is a CPU build, or (on Linux) no GPU driver's device files exist. True otherwise (ask torch)."""
    if "torch" in sys.modules:
        return True
    if not torch_built_for_gpu():
        return False
    if sys.platform.startswith("linux"):
        import os

        return any(os.path.exists(path) for path in _GPU_DRIVER_FILES)
    return True


def resolve_device(spec=None):
    """``auto`` (or None) -> CUDA when available, else CPU; ``cuda``/``cuda:N``/``cpu`` as given (checked).

    Returns :data:`CPU` (the string ``"cpu"``: numpy passes) or a ``torch.device`` of type cuda; torch is
    imported for CUDA only (and by ``auto`` where :func:`cuda_may_be_present` cannot rule CUDA out). A
    ``torch.device`` given is taken as its type says (``torch.device("cpu")`` is the CPU, computed in numpy)."""
    if spec is not None and not isinstance(spec, str):
        return CPU if getattr(spec, "type", None) == "cpu" else spec  # a torch.device
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        if not cuda_may_be_present():
            return CPU
        import torch

        return torch.device("cuda") if torch.cuda.is_available() else CPU
    if spec == CPU:
        return CPU
    import torch

    try:
        device = torch.device(spec)
    except RuntimeError:
        raise UsageError(f"unknown device {spec!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda asked for, but no CUDA device is available (use --device auto or cpu)")
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"unsupported device {spec!r}: use auto, cpu, cuda or cuda:N")
    return CPU if device.type == "cpu" else device


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, not the machine's count)."""
    import os

    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _blas_threads() -> int | None:
    """The largest thread count of the BLAS libraries loaded (threadpoolctl), None if none is."""
    from threadpoolctl import threadpool_info

    counts = [pool["num_threads"] for pool in threadpool_info() if pool.get("user_api") == "blas"]
    return max(counts) if counts else None


class compute_threads:
    """Context manager: numpy's BLAS threads (and torch's intra-op threads, where torch is imported) for a
    streaming pass, one core left to the read-ahead (the reader thread and zarr's decompression), and never more
    than torch (where imported) or else the BLAS library was set to use.

    As many compute threads as cores, when the reader needs one of those cores too, make every call wait for a
    descheduled worker. The CPU passes do their float64 products in numpy
    (:mod:`cmdtool.passes.host_float64`), whose OpenBLAS would otherwise start one thread per core for every
    2048-row product, each start costing more than the product.

    ``workers``: blocks computed side by side (:func:`cmdtool.passes.local.run_blocks_side_by_side`); each
    gets an equal share of the cores, one thread at least.

    A CPU pass uses no torch, so torch is not imported for this: its count is scoped only when torch is already
    imported (a GPU pass, or a user's process that uses torch). The counts are set for the block only and
    restored after it (:func:`cmdtool.utils.threads.thread_limits`), so a user's process is as it was after a
    cmdtool call.
    """

    def __init__(self, workers: int = 1):
        self.workers = max(1, int(workers))
        self._scope = None

    def __enter__(self):
        from .threads import thread_limits

        cores = available_cores()
        share = cores - 1 if self.workers == 1 else cores // self.workers
        torch = sys.modules.get("torch")
        if torch is not None:
            limit = torch.get_num_threads()
        else:
            limit = _blas_threads() or share
        threads = max(1, min(limit, share))
        self._scope = thread_limits(threads if torch is not None else None, blas_threads=threads)
        self._scope.__enter__()
        return self

    def __exit__(self, *exc):
        scope, self._scope = self._scope, None
        return scope.__exit__(*exc) if scope is not None else False
