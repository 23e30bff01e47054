"""float64 block arithmetic on the CPU through numpy/OpenBLAS, in cache-sized row chunks (docs/design sec. 5.1).

torch's CPU float64 kernels are several times slower than numpy's OpenBLAS for the passes' work (the float32 to
float64 conversion and the Gram product Xᵀ X; ``bench/cpu_float64.py`` compares the two paths per accumulator).
So on the CPU a pass's blocks are numpy arrays (no torch is imported: see :class:`~cmdtool.passes.contract.Block`),
an accumulator converts its block chunk by chunk (:meth:`~cmdtool.passes.contract.Block.float64_chunks`) and
does its products in numpy; on CUDA it keeps torch. The functions below take either kind of array (numpy on the
CPU, torch tensors on a GPU, or on the CPU for the training-time :class:`~cmdtool.analyzers.cmd.online.OnlineCMD`)
and do the same thing to each, so that code written with them (CMD's fit) is one code for both devices.
Both are exact float32 values in float64 arithmetic: results differ by float64 summation order only (1e-12
relative in tests/passes/test_passes.py). numpy's BLAS threads follow the pass's compute threads
(:class:`~cmdtool.utils.device.compute_threads`).
"""

from __future__ import annotations

import numpy as np

# bytes of one float64 chunk (2048 rows at T = 150): it stays in cache between the conversion and the products,
# and the per-row temporaries of a chunk (CMD's R x M correlations) stay small whatever the block's row count
CHUNK_BYTES = 2048 * 150 * 8


def chunk_rows(n_cols: int) -> int:
    """Rows of one float64 chunk of ``n_cols`` columns."""
    return max(64, CHUNK_BYTES // (8 * max(n_cols, 1)))


def is_numpy(array) -> bool:
    return isinstance(array, np.ndarray)


def on_cpu(array) -> bool:
    """A numpy array, or a torch tensor in the CPU's memory."""
    return is_numpy(array) or array.device.type == "cpu"


def matmul(a, b):
    """``a @ b`` of float64 arrays: numpy/OpenBLAS on the CPU (for CPU torch tensors the result shares numpy's
    memory), torch on CUDA."""
    if is_numpy(a):
        return np.matmul(a, b)
    if not on_cpu(a):
        return a @ b
    import torch

    return torch.from_numpy(np.matmul(a.numpy(), b.numpy()))


def to_float64_(target, source):
    """Copy the float32 array ``source`` into the float64 array ``target`` (numpy's conversion on the CPU)."""
    if is_numpy(target):
        np.copyto(target, source)
    elif on_cpu(target):
        np.copyto(target.numpy(), source.numpy())
    else:
        target.copy_(source)
    return target


def where(condition, a, b):
    """``torch.where`` / ``np.where`` (scalars allowed)."""
    if is_numpy(condition):
        return np.where(condition, a, b)
    import torch

    return torch.where(condition, a, b)


def zeros(shape, like, dtype="float64"):
    """Zeros of a dtype named as numpy names it, an array of ``like``'s kind (and device)."""
    if is_numpy(like):
        return np.zeros(shape, dtype=dtype)
    import torch

    return torch.zeros(shape, dtype=getattr(torch, dtype), device=like.device)


def arange(start, stop, like, dtype="float64"):
    if is_numpy(like):
        return np.arange(start, stop, dtype=dtype)
    import torch

    return torch.arange(start, stop, dtype=getattr(torch, dtype), device=like.device)


def bincount(values, weights=None, minlength: int = 0):
    if is_numpy(values):
        return np.bincount(values, weights=weights, minlength=minlength)
    import torch

    return torch.bincount(values, weights=weights, minlength=minlength)


def clamp_min(array, low: float):
    """``max(array, low)`` elementwise (NaN stays NaN)."""
    return np.maximum(array, low) if is_numpy(array) else array.clamp(min=low)


def square_(array):
    """Square in place."""
    return np.square(array, out=array) if is_numpy(array) else array.square_()


def copy(array):
    return array.copy() if is_numpy(array) else array.clone()


def float32_rounded(array):
    """float64 values rounded to float32 and back (what a float32 result stores)."""
    return array.astype(np.float32).astype(np.float64) if is_numpy(array) else array.float().double()


def float64(array):
    """The values in float64 (a new array)."""
    return array.astype(np.float64) if is_numpy(array) else array.double()


def float32_numpy(array) -> np.ndarray:
    """The values rounded to float32, as a numpy array in the CPU's memory (a GPU copies float32 across)."""
    return array.astype(np.float32) if is_numpy(array) else array.float().cpu().numpy()


def to_numpy(array) -> np.ndarray:
    """The values as a numpy array in the CPU's memory (no copy for a numpy array)."""
    return array if is_numpy(array) else array.cpu().numpy()


def like(values, array, dtype=None):
    """``values`` (numpy or a list) as an array of ``array``'s kind (and device)."""
    if is_numpy(array):
        return np.asarray(values, dtype=dtype)
    import torch

    return torch.as_tensor(values, dtype=None if dtype is None else getattr(torch, dtype), device=array.device)
