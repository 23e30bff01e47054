"""Advisory file locks (flock), released by the kernel when the holder dies, so SIGKILL never leaves a stale lock;
and :func:`signals_deferred`, which keeps SIGINT/SIGTERM out of the middle of a write to the store (and stops a
writer whose lease on object storage was lost)."""

from __future__ import annotations

import contextlib
import json
import fcntl
import os
import signal
import threading
import time
from pathlib import Path

from ..errors import StoreLockedError
from . import format as fmt
from .location import RemotePath
from .remote_lock import check_leases


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


@contextlib.contextmanager
def signals_deferred(signums=(signal.SIGINT, signal.SIGTERM)):
    """Hold SIGINT and SIGTERM until the block ends, then handle the first one as it would have been.

    Around each write to the store: an interrupt then lands between writes, where the store is exactly as a
    SIGKILL would leave it (the last commit), and never inside zarr's asynchronous write, which would leave its
    tasks pending and print "Task was destroyed but it is pending" at exit. Blocks are short (one group of chunk
    writes, or one commit), so the delay is not felt. Outside the main thread signals cannot be handled; the
    block runs as is.

    Before the block, a writer on object storage checks that its locks' leases are still its own
    (:func:`~cmdtool.store.remote_lock.check_leases`): a writer whose lease was taken over stops here, before
    its next write, with :class:`~cmdtool.errors.LeaseLostError`.
    """
    check_leases()
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = {signum: signal.signal(signum, lambda s, frame: received.append(s)) for signum in signums}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if received:
            signum, handler = received[0], previous[received[0]]
            if callable(handler):
                handler(signum, None)  # Python's SIGINT handler raises KeyboardInterrupt
            elif handler == signal.SIG_DFL:
                signal.raise_signal(signum)


def lock_path(store_path: Path, name: str) -> Path:
    """The file that is flock'ed for lock ``name``: the ``zarr.json`` of the empty group ``locks/<name>``, so
    that a zarr or xarray reader sees only zarr nodes in the store. Created (with valid group metadata) on first
    use; never rewritten afterwards, so its inode, which the lock is attached to, stays the same."""
    folder = store_path / fmt.LOCKS / name
    target = folder / "zarr.json"
    if not target.is_file():
        for group in (store_path / fmt.LOCKS, folder):
            group.mkdir(parents=True, exist_ok=True)
            meta = group / "zarr.json"
            body = json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {
                "cmdtool": "advisory lock (flock on this file); see docs/store.md"}}).encode()
            try:  # O_EXCL: never replace a file another process may hold a lock on
                fd = os.open(meta, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                continue
            try:
                os.write(fd, body)
            finally:
                os.close(fd)
    return target


def store_lock(store_path: Path | RemotePath, name: str, wait: float = 0.0):
    what = f"store {store_path}" if name == fmt.INGEST_LOCK else f"results of {store_path}"
    if isinstance(store_path, RemotePath):
        from .remote_lock import lease_lock

        return lease_lock(store_path / fmt.LOCKS / name / "lease.json", what, wait=wait)
    return file_lock(lock_path(store_path, name), what, wait=wait)
