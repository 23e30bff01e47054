"""Choice of compute device for the streaming passes."""

from __future__ import annotations

from ..errors import UsageError


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


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, not the machine's count)."""
    import os

    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class compute_threads:
    """Context manager: torch's intra-op threads *and* numpy's BLAS threads for a streaming pass, one core left to
    the read-ahead (the reader thread and zarr's decompression), and never more than torch was set to use.

    As many compute threads as cores, when the reader needs one of those cores too, make every torch call wait
    for a descheduled worker. The CPU passes do their float64 products in numpy
    (:mod:`cmdtool.passes.host_float64`), whose OpenBLAS would otherwise start one thread per core for every
    2048-row product, each start costing more than the product.

    ``workers``: blocks computed side by side (:func:`cmdtool.passes.local.run_blocks_side_by_side`); each
    gets an equal share of the cores, one thread at least.

    The counts are set for the block only and restored after it (:func:`cmdtool.utils.threads.thread_limits`), so a
    user's process is as it was after a cmdtool call.
    """

    def __init__(self, workers: int = 1):
        self.workers = max(1, int(workers))
        self._scope = None

    def __enter__(self):
        import torch

        from .threads import thread_limits

        cores = available_cores()
        share = cores - 1 if self.workers == 1 else cores // self.workers
        threads = max(1, min(torch.get_num_threads(), share))
        self._scope = thread_limits(threads, blas_threads=threads)
        self._scope.__enter__()
        return self

    def __exit__(self, *exc):
        scope, self._scope = self._scope, None
        return scope.__exit__(*exc) if scope is not None else False
