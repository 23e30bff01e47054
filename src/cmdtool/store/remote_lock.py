"""Locks of a store on object storage (S3): there is no flock there, so a lock is a *lease object*.

``locks/<name>/lease.json`` holds its holder (host, pid, a random token), the lease time and an expiry. Every
change to it is a conditional write, which S3 applies atomically to the one object (the condition is checked
and the object written as one step), so of writers racing with the same condition exactly one succeeds:

- a free lock is taken by creating the object with ``If-None-Match: *``;
- an expired lease (its holder died, or stalled for longer than the lease time) is taken over by replacing it
  with ``If-Match: <the ETag just read>``: the first replacement changes the ETag the other takers name;
- the holder renews every ``TTL / 3`` with ``If-Match: <the ETag of its own last write>``, so a renewal never
  overwrites another holder's lease. A renewal that finds the lease changed means the lock was taken over: the
  lease is *lost*, and the holder stops writing. :func:`check_leases` (called before every write to a store,
  :func:`~cmdtool.store.lock.signals_deferred`) raises :class:`~cmdtool.errors.LeaseLostError`; so does the
  end of the locked block;
- the holder releases with a conditional delete (``If-Match``): only its own lease is removed, and a lease
  taken over while it was held is reported (:class:`~cmdtool.errors.LeaseLostError`) instead of deleted.

A lease is expired when its ``expires_at`` has passed on the reading host's clock (hosts' clocks must agree to
well within the lease time, as NTP keeps them); a damaged lease (not JSON, no ``expires_at``) when its age on
the server's clock (the response's ``Date`` minus the object's ``LastModified``) exceeds the lease time.

What a lease cannot give: a holder that stalls for longer than the lease time between its last check and a
write can still make that one write after another writer took the lock (there is no fencing token that S3 could
check on the data objects). docs/store.md, "Locks", says what this means in practice.

The conditional requests go through s3fs's botocore client (``put_object`` / ``delete_object`` with ``IfMatch``
/ ``IfNoneMatch``); other fsspec filesystems are refused for writing.
"""

from __future__ import annotations

import contextlib
import email.utils
import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime

from ..errors import LeaseLostError, StoreLockedError, UsageError, first_line

LEASE_SECONDS = 120.0

# Every lease this process holds now (all threads: ingest writes from a writer thread too).
_held: set["Lease"] = set()
_held_guard = threading.Lock()


def check_leases() -> None:
    """Raise :class:`~cmdtool.errors.LeaseLostError` if a lease this process holds was lost (taken over by
    another writer). Costs no request unless renewals are overdue; then it renews first, synchronously."""
    with _held_guard:
        leases = list(_held)
    for lease in leases:
        lease.check()


class _ConditionFailed(Exception):
    """The object was not as the conditional request required (412 Precondition Failed, 409 a concurrent
    conditional write, or 404 for an ``If-Match`` on an object that is gone)."""


def _condition_failed(exc: BaseException) -> bool:
    """Whether ``exc`` (as s3fs raises it: a translated OSError whose cause is botocore's ClientError) says
    that a request's condition did not hold. A missing bucket is not that."""
    if isinstance(exc, FileExistsError):  # s3fs's translation of a failed If-None-Match
        return True
    seen = exc
    for _ in range(5):
        if seen is None:
            break
        response = getattr(seen, "response", None)
        if isinstance(response, dict):
            code = str(response.get("Error", {}).get("Code", ""))
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            return code in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey") or status in (409, 412)
        seen = seen.__cause__ or seen.__context__
    return False


@dataclass(frozen=True)
class _Read:
    """The lease object as read: its content (None when damaged), ETag, LastModified, the server's date."""

    lease: dict | None
    etag: str
    last_modified: float
    server_now: float | None


class S3Object:
    """Conditional reads and writes of one S3 object through s3fs's botocore client."""

    def __init__(self, fs, path: str):
        if not hasattr(fs, "_call_s3"):
            protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
            raise UsageError(f"cannot write to a {protocol}:// store: cmdtool's writer lock on object storage needs "
                             f"S3's conditional writes (If-Match, If-None-Match) and is implemented for s3:// only; "
                             f"such stores can be read; write a local copy instead")
        self.fs = fs
        self.bucket, self.key, _ = fs.split_path(path)
        missing = self._run(self._unsupported_conditions)
        if missing:  # s3fs drops parameters its botocore does not know: the writes would be unconditional
            raise UsageError(f"cannot write to an s3:// store with this botocore: it has no {', '.join(missing)}, "
                             f"which cmdtool's writer lock needs (conditional writes); upgrade it: pip install -U "
                             f"s3fs aiobotocore botocore")

    async def _unsupported_conditions(self) -> list[str]:
        """The conditional-request parameters the installed botocore's S3 model lacks (none since late 2024)."""
        await self.fs.set_session()
        model = (await self.fs.get_s3(self.bucket)).meta.service_model
        needed = {"PutObject": ("IfMatch", "IfNoneMatch"), "DeleteObject": ("IfMatch",)}
        return [f"{operation} {name}" for operation, names in needed.items()
                for name in names if name not in model.operation_model(operation).input_shape.members]

    def _run(self, coroutine, *args):
        from fsspec.asyn import sync

        return sync(self.fs.loop, coroutine, *args)

    async def _get(self) -> _Read | None:
        try:
            response = await self.fs._call_s3("get_object", Bucket=self.bucket, Key=self.key)
        except FileNotFoundError:
            return None
        try:
            body = await response["Body"].read()
        finally:
            response["Body"].close()
        try:
            lease = json.loads(body)
            if not isinstance(lease, dict) or not isinstance(lease.get("expires_at"), (int, float)):
                lease = None
        except ValueError:
            lease = None
        date = response.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
        server_now = None
        with contextlib.suppress(TypeError, ValueError):
            server_now = email.utils.parsedate_to_datetime(date).timestamp() if date else None
        modified = response["LastModified"]
        return _Read(lease, response["ETag"],
                     modified.timestamp() if isinstance(modified, datetime) else float(modified), server_now)

    async def _put(self, body: bytes, condition: dict) -> str:
        try:
            response = await self.fs._call_s3("put_object", Bucket=self.bucket, Key=self.key, Body=body,
                                              **condition)
        except Exception as exc:  # noqa: BLE001 - classified here; anything else is raised as it came
            if _condition_failed(exc):
                raise _ConditionFailed() from exc
            raise
        return response["ETag"]

    async def _delete(self, etag: str) -> None:
        try:
            await self.fs._call_s3("delete_object", Bucket=self.bucket, Key=self.key, IfMatch=etag)
        except Exception as exc:  # noqa: BLE001
            if _condition_failed(exc):
                raise _ConditionFailed() from exc
            raise

    def read(self) -> _Read | None:
        """The object (None when there is none)."""
        return self._run(self._get)

    def create(self, body: bytes) -> str:
        """Create the object if there is none (``If-None-Match: *``); its ETag, or :class:`_ConditionFailed`."""
        return self._run(self._put, body, {"IfNoneMatch": "*"})

    def replace(self, body: bytes, etag: str) -> str:
        """Replace the object if its ETag is ``etag`` (``If-Match``); the new ETag, or :class:`_ConditionFailed`."""
        return self._run(self._put, body, {"IfMatch": etag})

    def delete(self, etag: str) -> None:
        """Delete the object if its ETag is ``etag`` (``If-Match``), else :class:`_ConditionFailed`."""
        self._run(self._delete, etag)


class Lease:
    """One writer's lease on a lock object (see the module's docstring). :meth:`acquire`, then renewals by a
    background thread, :meth:`check` before writes, :meth:`release`."""

    def __init__(self, obj: S3Object, what: str, ttl: float = LEASE_SECONDS):
        self.obj, self.what, self.ttl = obj, what, float(ttl)
        self.token = uuid.uuid4().hex
        self.owner = {"host": socket.gethostname(), "pid": os.getpid(), "token": self.token}
        self.etag: str | None = None
        self.confirmed_at = 0.0  # wall-clock time at which the last write of ours that the store took began
        self.lost: str | None = None  # why the lease is lost, once it is
        self._io = threading.Lock()  # one conditional write at a time (the renewer thread, a writer's check)
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def _body(self, now: float) -> bytes:
        return json.dumps({**self.owner, "ttl": self.ttl, "renewed_at": now, "expires_at": now + self.ttl}).encode()

    def _expired(self, held: _Read) -> bool:
        if held.lease is not None:
            return float(held.lease["expires_at"]) < time.time()
        now = held.server_now if held.server_now is not None else time.time()
        return now - held.last_modified > self.ttl  # a damaged lease: by its age on the server

    def _ours(self, held: _Read | None) -> bool:
        return held is not None and held.lease is not None and held.lease.get("token") == self.token

    def _adopt(self, held: _Read) -> None:
        """A write of ours that the store took although its answer said otherwise (a retried request)."""
        self.etag = held.etag
        self.confirmed_at = float(held.lease.get("renewed_at", held.lease["expires_at"] - self.ttl))

    def _replace(self, etag: str) -> tuple[bool, _Read | None]:
        """Replace the lease object by a fresh one of ours, ``If-Match: etag``: (True, None) when the store took it
        (or took an earlier try of it, whose answer was lost: re-read and adopted), else (False, what it holds now:
        another writer's lease, a damaged object, or None when it was deleted). Take-over and renewal both write
        this way."""
        now = time.time()
        try:
            self.etag, self.confirmed_at = self.obj.replace(self._body(now), etag), now
            return True, None
        except _ConditionFailed:
            held = self.obj.read()
            if self._ours(held):
                self._adopt(held)
                return True, None
            return False, held

    # ------------------------------------------------------------------------------------------- taking
    def acquire(self, wait: float = 0.0) -> None:
        deadline = time.monotonic() + wait
        while True:
            holder = self._try_take()
            if holder is None:
                break
            if time.monotonic() >= deadline:
                by = f" (pid {holder.get('pid')} on {holder.get('host')})" if holder else ""
                raise StoreLockedError(f"{self.what} is in use by another cmdtool process{by}; wait for it to "
                                       f"finish (a lease left by a killed process expires {self.ttl:.0f} s after "
                                       f"its last renewal)")
            time.sleep(0.2)
        with _held_guard:
            _held.add(self)
        self._renewer = threading.Thread(target=self._renew_until_stopped, name="cmdtool-lease", daemon=True)
        self._renewer.start()

    def _try_take(self) -> dict | None:
        """Take the lease if it is free or expired: None when taken, else what its holder wrote ({} when the
        object is damaged)."""
        for _ in range(10):  # a lease deleted between our create and our read: create again at once
            now = time.time()
            try:
                self.etag, self.confirmed_at = self.obj.create(self._body(now)), now
                return None
            except _ConditionFailed:
                pass
            held = self.obj.read()
            if held is None:
                continue
            if self._ours(held):
                self._adopt(held)
                return None
            if not self._expired(held):
                return held.lease or {}
            # of the writers that read this same expired lease, one replacement succeeds
            taken, again = self._replace(held.etag)
            if taken:
                return None
            if again is not None:
                return again.lease or {}
        return {}

    # ------------------------------------------------------------------------------------------ holding
    def renew(self) -> bool:
        """Extend the lease if it is still ours (``If-Match`` on our last ETag); False, with :attr:`lost`
        set, when another writer has taken it. Errors of the request itself (network) are raised."""
        with self._io:
            if self.lost:
                return False
            taken, held = self._replace(self.etag)
            if not taken:
                self._set_lost(held)
            return taken

    def _set_lost(self, held: _Read | None) -> None:
        silent = time.time() - self.confirmed_at
        if held is None:
            by = "its lease was deleted by another process"
        elif held.lease is None:
            by = "its lease was replaced by a damaged object"
        else:
            by = f"its lease was taken over by pid {held.lease.get('pid')} on {held.lease.get('host')}"
        self.lost = (f"{self.what}: this process lost the writer lock ({by}; its last renewal was {silent:.0f} s "
                     f"ago, the lease time is {self.ttl:.0f} s) and stopped writing")

    def _renew_until_stopped(self) -> None:
        interval = self.ttl / 3
        while not self._stop.wait(interval):
            try:
                if not self.renew():
                    return
                interval = self.ttl / 3
            except Exception:  # noqa: BLE001 - a failed request (network): try again soon
                interval = max(0.05, self.ttl / 12)

    def check(self) -> None:
        """Raise :class:`LeaseLostError` if the lease is lost. When renewals are overdue (the process stalled,
        or its requests failed) renew first; if the store cannot be reached and less than a third of the lease
        time is left, stop too."""
        if self.lost:
            raise LeaseLostError(self.lost)
        silent = time.time() - self.confirmed_at
        if silent <= self.ttl / 2:
            return
        try:
            if self.renew():
                return
        except Exception as exc:  # noqa: BLE001
            if silent < self.ttl * 2 / 3:
                return
            raise LeaseLostError(f"{self.what}: could not renew the writer lock's lease for {silent:.0f} s "
                                 f"({first_line(exc)}); stopped writing, as another writer may take it over")
        raise LeaseLostError(self.lost)

    def release(self) -> None:
        """Stop renewing and delete the lease if it is still ours; :attr:`lost` is set when it was not."""
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        with _held_guard:
            _held.discard(self)
        with self._io:
            if self.lost or self.etag is None:
                return
            try:
                self.obj.delete(self.etag)
            except _ConditionFailed:
                held = self.obj.read()
                if self._ours(held):  # ours after all (a renewal's answer was lost): delete that one
                    with contextlib.suppress(Exception):
                        self.obj.delete(held.etag)
                    return
                self._set_lost(held)
            except Exception:  # noqa: BLE001 - the store cannot be reached: the lease expires by itself
                pass


@contextlib.contextmanager
def lease_lock(lease_path, what: str, wait: float = 0.0, ttl: float = LEASE_SECONDS):
    """Hold the lease object ``lease_path`` (a :class:`~cmdtool.store.location.RemotePath`) for the block.

    Raises :class:`~cmdtool.errors.StoreLockedError` if another live writer holds it after ``wait`` seconds,
    and :class:`~cmdtool.errors.LeaseLostError` (from a write inside the block, or at its end) if another
    writer took it over meanwhile. Yields the :class:`Lease`."""
    lease = Lease(S3Object(lease_path.fs, lease_path.key), what, ttl)
    lease.acquire(wait)
    try:
        yield lease
    except BaseException:
        lease.release()
        raise
    lease.release()
    if lease.lost:
        raise LeaseLostError(lease.lost)


__all__ = ["LEASE_SECONDS", "Lease", "S3Object", "check_leases", "lease_lock"]
