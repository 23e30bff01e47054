"""Bare read of a store from disk: evict its chunk files from the page cache (fadvise DONTNEED, after a sync),
then time one pass of store.iter_blocks at the passes' block size, then a second (warm) one.

Usage: PYTHONPATH=src python bench/cold_read.py STORE"""
import os
import sys
import time
from pathlib import Path

def evict(folder: Path) -> int:
    n = 0
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
            n += 1
    return n

store_path = Path(sys.argv[1])
os.sync()
files = evict(store_path / "trajectories")
import cmdtool  # noqa: E402  (imported after the eviction, so that its own reads are not evicted)
from cmdtool.passes.local import DEFAULT_BLOCK_BYTES  # noqa: E402
store = cmdtool.open_store(store_path)
started = time.perf_counter()
cpu = time.process_time()
for block in store.iter_blocks(block_bytes=DEFAULT_BLOCK_BYTES):
    pass
print(f"{files} files, chunks {store.chunk_shape}: cold read {time.perf_counter() - started:.2f} s "
      f"(cpu {time.process_time() - cpu:.2f} s)")
started = time.perf_counter()
for block in store.iter_blocks(block_bytes=DEFAULT_BLOCK_BYTES):
    pass
print(f"  warm read {time.perf_counter() - started:.2f} s")
