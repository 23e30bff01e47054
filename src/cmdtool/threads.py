"""Thread settings shared by the library."""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def one_torch_thread():
    """Run the block with one torch intra-op thread, then restore the previous count. For work that several
    threads only slow down: tiny convolutions (thread start-up dominates) and memory-bound copies next to other
    busy threads (ingest: 150 copies of 4 MB took 0.03 s with one thread and 1.4 s with two on the 2-core
    development machine under load)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
