"""float64 block arithmetic on the CPU through numpy/OpenBLAS, in cache-sized row chunks (docs/design sec. 5.1).

On the 2-core development machine torch's CPU float64 kernels are 3-4x slower than numpy's OpenBLAS for the
passes' work (one thread, one 262,144 x 150 float32 block: float32 -> float64 0.21 s in torch, 0.06 s in numpy;
the Gram product Xᵀ X 0.51 s with ``addmm_``, 0.18 s with numpy's syrk; converting 2048-row chunks into one reused
float64 buffer and summing their Gram products 0.17-0.19 s in all). So on the CPU an accumulator converts its
block chunk by chunk (:meth:`~cmdtool.passes.local.Block.float64_chunks`) and does its products in numpy;
on CUDA it keeps torch. Both are exact float32 values in float64 arithmetic: results differ by float64 summation
order only (1e-12 relative in tests/test_passes.py). numpy's BLAS threads follow the pass's compute threads
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


def on_cpu(tensor) -> bool:
    return tensor.device.type == "cpu"


def matmul(a, b):
    """``a @ b`` of float64 torch tensors: numpy/OpenBLAS on the CPU (the result shares numpy's memory), torch on
    CUDA."""
    if not on_cpu(a):
        return a @ b
    import torch

    return torch.from_numpy(np.matmul(a.numpy(), b.numpy()))


def to_float64_(target, source):
    """Copy the float32 tensor ``source`` into the float64 tensor ``target`` (numpy's conversion on the CPU)."""
    if on_cpu(target):
        np.copyto(target.numpy(), source.numpy())
    else:
        target.copy_(source)
    return target
