"""Writers on object storage: the lease lock that excludes a second writer (conditional writes on the lease
object), a writer that loses its lease and stops, and what a killed remote ingest leaves behind.

Against moto's S3 server on 127.0.0.1, run here one request at a time: S3 checks a conditional write's condition
and writes the object as one step, while moto's threaded server checks and then writes in separate steps
without a lock (``moto/s3/responses.py``, ``put_object``), so two requests interleaved there can both pass the
same condition. Serving one request at a time gives the test server S3's atomicity; the writers are separate
processes with their own clients, as two real writers are.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

from typer.testing import CliRunner  # noqa: E402

import cmdtool  # noqa: E402
from cmdtool.errors import LeaseLostError, StoreLockedError, UsageError  # noqa: E402
from cmdtool_cli.app import app  # noqa: E402

from tests.conftest import free_port, move_first_epochs, s3_bucket_at, write_checkpoints  # noqa: E402

BUCKET = "writers"
runner = CliRunner()


class _OneRequestAtATime:
    """A WSGI app served one request at a time (the response is produced inside the lock)."""

    def __init__(self, app):
        self.app, self.lock = app, threading.Lock()

    def __call__(self, environ, start_response):
        with self.lock:
            return list(self.app(environ, start_response))


@pytest.fixture(scope="module")
def s3():
    import logging

    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    port = free_port()
    server = make_server("127.0.0.1", port, _OneRequestAtATime(DomainDispatcherApplication(create_backend_app)),
                         threaded=True, request_handler=MotoRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield from s3_bucket_at(f"http://127.0.0.1:{port}", BUCKET)
    finally:
        server.shutdown()
        thread.join()


def _remote(key: str):
    from cmdtool.store.location import RemotePath

    return RemotePath("s3", key)


def _foreign_lease(expires_at: float, pid: int = 1) -> bytes:
    return json.dumps({"host": "elsewhere", "pid": pid, "token": f"foreign-{pid}", "ttl": 60.0,
                       "expires_at": expires_at}).encode()


# ------------------------------------------------------------------------------------ two writer processes
WRITER = """
import contextlib, sys, time
from cmdtool.errors import StoreLockedError
from cmdtool.store.location import RemotePath
from cmdtool.store.remote_lock import lease_lock

print("ready", flush=True)
for line in sys.stdin:
    key, start_at = line.split()
    held = contextlib.ExitStack()
    time.sleep(max(0.0, float(start_at) - time.time()))
    try:
        lease = held.enter_context(lease_lock(RemotePath("s3", key), "store", ttl=60))
    except StoreLockedError:
        print("refused", flush=True)
        continue
    print("won", lease.token, flush=True)
    sys.stdin.readline()  # hold it until told to release
    held.close()
    print("released", flush=True)
"""


class _Writer:
    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, "-c", WRITER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=dict(os.environ))
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [self.lines.put(x.strip()) for x in self.proc.stdout], daemon=True).start()

    def send(self, text: str) -> None:
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()

    def reply(self, timeout: float = 30.0) -> str:
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            self.proc.kill()
            raise AssertionError(f"writer gave no answer: {self.proc.stderr.read()}") from None

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.mark.slow
def test_two_writer_processes_racing_for_the_lease_win_it_exactly_once(s3):
    """50 trials, two processes released at the same instant on the same lease: a missing one (both create
    with If-None-Match) or an expired one (both replace it with If-Match on the ETag they read). Exactly one
    wins each time, and holds the lease object; the other is refused while it holds it."""
    writers = [_Writer(), _Writer()]
    try:
        assert [w.reply() for w in writers] == ["ready", "ready"]
        winners = []
        for trial in range(50):
            key = f"{BUCKET}/race/{trial}/lease.json"
            if trial % 2:
                s3.pipe_file(key, _foreign_lease(expires_at=time.time() - 1))  # its holder died
            start_at = time.time() + 0.05
            for w in writers:
                w.send(f"{key} {start_at}")
            replies = [w.reply() for w in writers]
            assert sorted(r.split()[0] for r in replies) == ["refused", "won"], (trial, replies)
            winner = next(i for i, r in enumerate(replies) if r.startswith("won"))
            s3.invalidate_cache()
            assert json.loads(s3.cat_file(key))["token"] == replies[winner].split()[1]
            writers[winner].send("release")
            assert writers[winner].reply() == "released"
            assert not s3.exists(key)
            winners.append(winner)
        print("wins by writer:", winners.count(0), winners.count(1))
    finally:
        for w in writers:
            w.close()


# ----------------------------------------------------------------------------------------- in this process
def test_a_renewal_that_finds_the_lease_taken_stops_the_writer_and_never_overwrites_it(s3):
    from cmdtool.store.remote_lock import check_leases, lease_lock

    lease_path = _remote(f"{BUCKET}/lost/lease.json")
    taken = _foreign_lease(expires_at=time.time() + 60, pid=77)
    with pytest.raises(LeaseLostError, match="lost the writer lock .*taken over by pid 77 on elsewhere"):
        with lease_lock(lease_path, "store s3://writers/lost", ttl=0.6) as lease:  # renewed every 0.2 s
            first = json.loads(s3.cat_file(lease_path.key))
            deadline = time.monotonic() + 5
            while json.loads(s3.cat_file(lease_path.key))["renewed_at"] == first["renewed_at"]:
                assert time.monotonic() < deadline, "never renewed"
                time.sleep(0.05)
            s3.pipe_file(lease_path.key, taken)  # another writer took it over
            deadline = time.monotonic() + 5
            while lease.lost is None and time.monotonic() < deadline:
                time.sleep(0.05)
            with pytest.raises(LeaseLostError) as stopped:
                check_leases()  # what every write to a store does first
            assert len(str(stopped.value).splitlines()) == 1
    s3.invalidate_cache()
    assert s3.cat_file(lease_path.key) == taken  # neither renewed over nor deleted
    check_leases()  # released: nothing held any more


def test_a_stalled_writer_checks_its_lease_before_writing(s3):
    """A writer whose renewals stopped (the process stalled) renews before its next write: it goes on if its
    lease is still there, and stops if another writer took it over meanwhile."""
    from cmdtool.store.remote_lock import check_leases, lease_lock

    lease_path = _remote(f"{BUCKET}/stalled/lease.json")
    with pytest.raises(LeaseLostError):  # the block's end says so too
        with lease_lock(lease_path, "store", ttl=60) as lease:
            lease.confirmed_at -= 100  # as if nothing had been renewed for 100 s
            check_leases()  # nobody took it: renewed now
            assert time.time() - lease.confirmed_at < 5
            lease.confirmed_at -= 100
            s3.pipe_file(lease_path.key, _foreign_lease(expires_at=time.time() + 60))
            with pytest.raises(LeaseLostError, match="taken over by pid 1"):
                check_leases()
            with pytest.raises(LeaseLostError):
                check_leases()
    assert json.loads(s3.cat_file(lease_path.key))["pid"] == 1
    s3.rm_file(lease_path.key)


def test_a_damaged_lease_expires_by_its_age_on_the_server(s3):
    from cmdtool.store.remote_lock import lease_lock

    lease_path = _remote(f"{BUCKET}/damaged/lease.json")
    s3.pipe_file(lease_path.key, b"{}")  # parses, but says nothing: held until it is older than the lease time
    with pytest.raises(StoreLockedError, match="in use by another cmdtool process"):
        with lease_lock(lease_path, "store", ttl=60):
            pass
    s3.pipe_file(lease_path.key, b"\x00 torn")
    started = time.monotonic()
    with lease_lock(lease_path, "store", ttl=1.0, wait=20) as lease:  # server clock: 1 s resolution
        waited = time.monotonic() - started
        assert json.loads(s3.cat_file(lease_path.key))["token"] == lease.token
    assert 0.5 < waited < 15, waited  # held at first, taken over once older than 1 s (2-3 s here)
    assert not s3.exists(lease_path.key)


def test_an_ingest_whose_lease_is_taken_stops_with_one_line_and_keeps_its_commits(s3, tmp_path, monkeypatch):
    """An append into an S3 store whose writer stalls and loses its lease mid-run: exit 1, one line, the new
    holder's lease untouched, the store's metadata not written after the takeover (no commit, and no putting
    back of the time axis either: the store is the new holder's), and its checkpoints those committed before."""
    import importlib

    from cmdtool.store import remote_lock

    ingest_module = importlib.import_module("cmdtool.ingestion.ingest")  # (cmdtool.ingest is also the function)

    write_checkpoints(tmp_path / "ck", n_epochs=6, fmt="safetensors")
    first = move_first_epochs(tmp_path / "ck", 2, tmp_path / "first")
    store = f"s3://{BUCKET}/ingest.zarr"
    cmdtool.ingest([first], store)
    lease_key = f"{BUCKET}/ingest.zarr/locks/ingest/lease.json"
    root_key = f"{BUCKET}/ingest.zarr/zarr.json"
    taken = _foreign_lease(expires_at=time.time() + 60, pid=99)
    record, calls, root_when_taken = ingest_module.time_record, [], []

    def stall_then_lose(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the process stalls; another writer takes the lease over
            for lease in list(remote_lock._held):
                lease.confirmed_at -= 1000
            s3.pipe_file(lease_key, taken)
            root = json.loads(s3.cat_file(root_key))  # ... and writes to the store
            root["attributes"]["written by"] = "the new holder"
            s3.pipe_file(root_key, json.dumps(root).encode())
            root_when_taken.append(s3.cat_file(root_key))
        return record(*args, **kwargs)

    monkeypatch.setattr(ingest_module, "time_record", stall_then_lose)
    result = runner.invoke(app, ["ingest", str(tmp_path / "ck"), "--store", store])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1, result.output
    assert "lost the writer lock" in lines[0] and "pid 99 on elsewhere" in lines[0]
    s3.invalidate_cache()
    assert s3.cat_file(lease_key) == taken
    assert s3.cat_file(root_key) == root_when_taken[0]  # not written after the takeover
    assert cmdtool.open_store(store).labels.tolist() in ([1, 2], [1, 2, 3])  # up to the last commit before it
    s3.rm_file(lease_key)
    monkeypatch.setattr(ingest_module, "time_record", record)
    cmdtool.ingest([tmp_path / "ck"], store)  # the next run goes on from there
    assert cmdtool.open_store(store).labels.tolist() == [1, 2, 3, 4, 5, 6]


def test_a_botocore_without_conditional_writes_is_refused(s3, monkeypatch):
    """s3fs drops the parameters its botocore does not know, so without IfMatch the writes would be plain PUTs:
    the lock refuses to start instead (a botocore older than late 2024, simulated by its S3 model)."""
    from cmdtool.store.remote_lock import lease_lock

    members = s3.s3.meta.service_model.operation_model("PutObject").input_shape.members
    monkeypatch.delitem(members, "IfMatch")
    with pytest.raises(UsageError, match="has no PutObject IfMatch"):
        with lease_lock(_remote(f"{BUCKET}/old-botocore/lease.json"), "store"):
            pass
    assert not s3.exists(f"{BUCKET}/old-botocore/lease.json")


def test_stores_on_filesystems_without_conditional_writes_are_not_written(tmp_path):
    from cmdtool.store.location import RemotePath
    from cmdtool.store.remote_lock import lease_lock

    pytest.importorskip("fsspec")
    with pytest.raises(UsageError, match="cannot write to a memory:// store"):
        with lease_lock(RemotePath("memory", "run.zarr/locks/ingest/lease.json"), "store"):
            pass


# ----------------------------------------------------------------------------- a killed remote ingest's staging
KILLED = """
import sys, time
import cmdtool
from cmdtool.ingestion.remote import CheckpointStaging

download = CheckpointStaging._download

def stop_after_the_first(self, local, remote):
    download(self, local, remote)
    if not local.name.endswith(".json"):
        print(self.root, flush=True)
        time.sleep(600)  # killed here, with a checkpoint staged

CheckpointStaging._download = stop_after_the_first
cmdtool.ingest([sys.argv[1]], sys.argv[2])
"""


def test_the_next_ingest_removes_the_staging_folder_of_a_killed_one(s3, tmp_path):
    write_checkpoints(tmp_path / "ck", n_epochs=3, fmt="pt")
    s3.put(str(tmp_path / "ck") + "/", f"{BUCKET}/killed/", recursive=True)
    store = tmp_path / "k.zarr"
    proc = subprocess.Popen([sys.executable, "-c", KILLED, f"s3://{BUCKET}/killed/", str(store)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ))
    try:
        staged = Path(proc.stdout.readline().strip())
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert staged.name.startswith(".cmdtool-staging-") and staged.parent == tmp_path, proc.stderr.read()
    assert any(p.stat().st_blocks for p in staged.rglob("epoch_*.pt"))  # a checkpoint was staged
    from cmdtool.ingestion.remote import _host, _process_started

    me, started = os.getpid(), _process_started(os.getpid()) or 0
    kept = [tmp_path / ".cmdtool-staging-otherhost-12345-0-abcdefgh",  # another host's: not judged here
            tmp_path / f".cmdtool-staging-{_host()}-{me}-{started}-live0001",  # a live owner (this process)
            tmp_path / ".cmdtool-staging-k2j4l5x9"]  # a name that records no owner
    reused = tmp_path / f".cmdtool-staging-{_host()}-{me}-{started + 1}-reused01"  # the pid, another process
    for folder in (*kept, reused):
        folder.mkdir()
        (folder / "file").write_bytes(b"x")
    report = cmdtool.ingest([f"s3://{BUCKET}/killed/"], store)
    assert report.added == [1, 2, 3]
    assert not staged.exists() and all(folder.exists() for folder in kept)
    assert sorted(p.name for p in tmp_path.glob(".cmdtool-staging-*")) == sorted(p.name for p in kept) \
        or not started  # without /proc a reused pid cannot be told from its first owner
