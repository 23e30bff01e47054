"""Locks of a store on object storage (S3, GCS): there is no flock there, so a lock is a *lease object*.

``locks/<name>/lease.json`` holds the owner (host, pid, a random token) and an expiry. It is created with a
conditional put (``If-None-Match: *``, fsspec's ``"xb"`` mode): of two writers racing, exactly one create succeeds;
the other gets "in use". While the lock is held a background thread renews the expiry every ``TTL / 3``; the
holder deletes the object when it is done. A holder killed with SIGKILL (or cut off from the network) leaves its
lease behind, which blocks the store until it expires (``TTL`` = 120 s): then the next writer deletes it and takes
the lock. Guarantee: mutual exclusion between writers whose lease renewals reach the store, on a backend with
conditional create (``If-None-Match: *``: AWS S3 since 2024, moto); a writer stalled for longer than the TTL can lose its
lock without knowing it (documented in docs/store.md).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid

from ..errors import StoreLockedError

LEASE_SECONDS = 120.0


def _read(fs, key: str) -> dict | None:
    try:
        return json.loads(fs.cat_file(key))
    except FileNotFoundError:
        return None
    except ValueError:  # a torn or foreign object: treat as held until its time-stamp says otherwise
        return {}


def _create_exclusively(fs, key: str, body: bytes) -> bool:
    """Create ``key`` only if no object of that name exists; False when one does."""
    try:
        with fs.open(key, "xb") as handle:
            handle.write(body)
        return True
    except FileExistsError:
        return False
    except OSError as exc:  # some s3fs versions wrap the 412 Precondition Failed
        if "precondition" in str(exc).lower() or "412" in str(exc):
            return False
        raise


@contextlib.contextmanager
def lease_lock(lease, what: str, wait: float = 0.0, ttl: float = LEASE_SECONDS):
    """Hold the lease object ``lease`` (a :class:`~cmdtool.store.location.RemotePath`); raise
    :class:`StoreLockedError` if another live writer holds it after ``wait`` seconds."""
    fs, key = lease.fs, lease.key
    token = uuid.uuid4().hex
    owner = {"host": socket.gethostname(), "pid": os.getpid(), "token": token}

    def body() -> bytes:
        return json.dumps({**owner, "expires_at": time.time() + ttl}).encode()

    deadline = time.monotonic() + wait
    while True:
        fs.invalidate_cache(key)
        if _create_exclusively(fs, key, body()):
            break
        held = _read(fs, key)
        if held is not None and float(held.get("expires_at", time.time() + ttl)) < time.time():
            with contextlib.suppress(FileNotFoundError):
                fs.rm_file(key)  # an expired lease: its holder died; take it over (the create above decides races)
            continue
        if time.monotonic() >= deadline:
            by = f" (pid {held.get('pid')} on {held.get('host')})" if held else ""
            raise StoreLockedError(f"{what} is in use by another cmdtool process{by}; wait for it to finish "
                                   f"(a lease left by a killed process expires {ttl:.0f} s after its last renewal)")
        time.sleep(0.2)

    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(ttl / 3):
            with contextlib.suppress(Exception):  # a failed renewal is retried at the next tick
                fs.pipe_file(key, body())

    renewer = threading.Thread(target=renew, name="cmdtool-lease", daemon=True)
    renewer.start()
    try:
        yield
    finally:
        stop.set()
        renewer.join()
        held = _read(fs, key)
        if held and held.get("token") == token:
            with contextlib.suppress(FileNotFoundError):
                fs.rm_file(key)
