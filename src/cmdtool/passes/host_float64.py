"""float64 block arithmetic on the CPU through numpy/OpenBLAS, in cache-sized row chunks (docs/design sec. 5.1).

torch's CPU float64 kernels are several times slower than numpy's OpenBLAS for the passes' work (the float32 to
float64 conversion and the Gram product Xᵀ X; ``bench/cpu_float64.py`` compares the two paths per accumulator).
So on the CPU an accumulator converts its block chunk by chunk
(:meth:`~cmdtool.passes.contract.Block.float64_chunks`) and does its products in numpy; on CUDA it keeps torch.
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
