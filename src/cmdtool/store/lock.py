"""Advisory file locks (flock): released by the kernel when the holder dies, so SIGKILL never leaves a stale lock."""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from pathlib import Path

from ..errors import StoreLockedError


@contextlib.contextmanager
def file_lock(path: Path, what: str, wait: float = 0.0):
    """Hold an exclusive lock on ``path``; raise :class:`StoreLockedError` if another process holds it.

    ``wait`` seconds are spent retrying before giving up (0: fail at once).
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise StoreLockedError(
                        f"{what} is in use by another cmdtool process; wait for it to finish") from None
                time.sleep(0.05)
        # The lock file's content is never written: a failed command leaves the store byte-for-byte as it was.
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock
