"""Thread settings shared by the library, always scoped: a cmdtool call leaves torch's and BLAS's thread counts
as it found them.

torch's intra-op thread count and the BLAS libraries' thread counts are process-wide. :func:`thread_limits` sets
them for a block and puts back what was there before when the last such block of the process ends, also when
blocks overlap in several threads (two passes at once) or end in another order than they began: the first block
to set a count records it (torch's only where a block asks for torch threads: a CPU pass computes in numpy and
leaves torch alone, unimported), every block sets its own, and the last to end restores the record. While blocks
overlap, the most recently begun one's counts hold.
"""

from __future__ import annotations

import contextlib
import threading

_guard = threading.Lock()
_open_blocks = 0
_torch_before: int | None = None   # torch's count, taken by the first open block that set it
_blas_before = None                # threadpoolctl's record of the BLAS counts, taken by the first block that set them


@contextlib.contextmanager
def thread_limits(torch_threads: int | None, blas_threads: int | None = None):
    """Run the block with, unless None, ``torch_threads`` torch intra-op threads and ``blas_threads`` threads
    in every BLAS library loaded (threadpoolctl); both restored afterwards (see the module). With
    ``torch_threads=None`` torch is neither imported nor changed."""
    global _open_blocks, _torch_before, _blas_before
    with _guard:
        _open_blocks += 1
        try:
            if blas_threads is not None:
                from threadpoolctl import threadpool_limits

                limits = threadpool_limits(limits=blas_threads, user_api="blas")  # records, then sets
                if _blas_before is None:
                    _blas_before = limits
            if torch_threads is not None:
                import torch

                if _torch_before is None:
                    _torch_before = torch.get_num_threads()
                if torch.get_num_threads() != torch_threads:
                    torch.set_num_threads(torch_threads)
        except BaseException:
            _close_block()
            raise
    try:
        yield
    finally:
        with _guard:
            _close_block()


def _close_block() -> None:
    """One block ends (``_guard`` held): the last one puts the recorded counts back."""
    global _open_blocks, _torch_before, _blas_before
    _open_blocks -= 1
    if _open_blocks:
        return
    if _blas_before is not None:
        _blas_before.restore_original_limits()
        _blas_before = None
    if _torch_before is not None:
        import torch  # imported by the block that recorded the count

        if torch.get_num_threads() != _torch_before:
            torch.set_num_threads(_torch_before)
    _torch_before = None


@contextlib.contextmanager
def one_torch_thread():
    """Run the block with one torch intra-op thread, then restore the previous count. For work that several
    threads only slow down: tiny convolutions (thread start-up dominates) and memory-bound copies next to other
    busy threads (ingest's copies, whose OpenMP workers would contend with the hash thread and the encoders)."""
    with thread_limits(1):
        yield
