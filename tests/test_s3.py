"""Stores on S3 through fsspec, against a real S3-compatible server (moto's standalone server) on 127.0.0.1.

The same checkpoints go into a local store and an S3 store; every command reads both, and the results must
agree: stored floats exactly, analysis results to 1e-12. One server for the module; stores are small.
"""

from __future__ import annotations

import json
import socket
import threading

import numpy as np
import pytest
import torch

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

from typer.testing import CliRunner  # noqa: E402

import cmdtool  # noqa: E402
from cmdtool.errors import StoreLockedError, UsageError  # noqa: E402
from cmdtool_cli.app import app  # noqa: E402

from conftest import write_checkpoints  # noqa: E402

runner = CliRunner()
BUCKET = "runs"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on 127.0.0.1 and a bucket; the environment points boto/s3fs at it (as a user's
    AWS_ENDPOINT_URL / credentials would)."""
    import logging

    import fsspec

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    port = _free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    patch = pytest.MonkeyPatch()
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint}.items():
        patch.setenv(key, value)
    patch.setitem(fsspec.config.conf, "s3", {"endpoint_url": endpoint})
    fsspec.filesystem("s3").clear_instance_cache()
    fs = fsspec.filesystem("s3")
    fs.mkdir(BUCKET)
    yield fs
    patch.undo()
    server.stop()


@pytest.fixture(scope="module")
def stores(s3, tmp_path_factory):
    """The same 8 checkpoints ingested (through the CLI) into a local store and into an S3 store."""
    tmp = tmp_path_factory.mktemp("s3")
    write_checkpoints(tmp / "ck", n_epochs=8, fmt="safetensors")
    local, remote = str(tmp / "local.zarr"), f"s3://{BUCKET}/run.zarr"
    for store in (local, remote):
        result = runner.invoke(app, ["ingest", str(tmp / "ck"), "--store", store, "--json"])
        assert result.exit_code == 0, result.output
    return tmp, local, remote


def test_ingest_into_s3_stores_exactly_the_local_values(stores):
    tmp, local, remote = stores
    a, b = cmdtool.open_store(local), cmdtool.open_store(remote)
    assert b.shape == a.shape and b.labels.tolist() == a.labels.tolist() == list(range(1, 9))
    np.testing.assert_array_equal(b.read_columns(slice(0, b.n_checkpoints)), a.read_columns(slice(0, 8)))
    np.testing.assert_array_equal(b.integer_values[...], a.integer_values[...])
    assert [r.digest for r in b.time_axis] == [r.digest for r in a.time_axis]
    assert str(b.path) == remote and b.trajectories.store.__class__.__name__ == "FsspecStore"


def test_info_and_verify_read_the_s3_store(stores, s3):
    tmp, local, remote = stores
    info = json.loads(runner.invoke(app, ["info", "--store", remote, "--json"]).output)
    local_info = json.loads(runner.invoke(app, ["info", "--store", local, "--json"]).output)
    assert info["store"] == remote
    assert info["parameters"] == local_info["parameters"] and info["checkpoints"] == 8
    assert info["trajectory_bytes_on_disk"] == local_info["trajectory_bytes_on_disk"] > 0
    good = runner.invoke(app, ["verify", "--store", remote, "--json"])
    assert good.exit_code == 0 and json.loads(good.output)["ok"], good.output
    # a chunk deleted on the server is reported missing, then put back
    key = f"{BUCKET}/run.zarr/trajectories/c/0/0"
    saved = s3.cat_file(key)
    s3.rm_file(key)
    try:
        bad = runner.invoke(app, ["verify", "--store", remote, "--json"])
        assert bad.exit_code == 1
        assert {d["problem"] for d in json.loads(bad.output)["damage"]} == {"missing"}
    finally:
        s3.pipe_file(key, saved)


def test_decompose_and_reconstruct_on_s3_equal_the_local_store(stores, s3):
    tmp, local, remote = stores
    for store in (local, remote):
        result = runner.invoke(app, ["decompose", "--modes", "2", "--store", store, "--quiet", "--json"])
        assert result.exit_code == 0, result.output
    a = cmdtool.open_store(local).results.get("cmd", "default")
    b = cmdtool.open_store(remote).results.get("cmd", "default")
    assert a.keys() == b.keys()
    for key in a.keys():
        np.testing.assert_allclose(b[key], a[key], rtol=0, atol=1e-12, err_msg=key)
    # the commit point is the index object; the staged result lies under its own fresh key
    index = json.loads(s3.cat_file(f"{BUCKET}/run.zarr/results/zarr.json"))["attributes"]["index"]
    assert index["cmd/default"].startswith("cmd/") and "@" in index["cmd/default"]
    for store, out in ((local, "l.safetensors"), (remote, "r.safetensors")):
        result = runner.invoke(app, ["reconstruct", "-e", "6", "--store", store, "--out", str(tmp / out)])
        assert result.exit_code == 0, result.output
    from safetensors.torch import load_file

    left, right = load_file(str(tmp / "l.safetensors")), load_file(str(tmp / "r.safetensors"))
    assert left.keys() == right.keys()
    for key in left:
        torch.testing.assert_close(right[key], left[key], rtol=0, atol=1e-12)


def test_a_second_decompose_replaces_the_result_and_removes_the_old_one(stores, s3):
    tmp, local, remote = stores
    for _ in range(2):
        result = runner.invoke(app, ["decompose", "--modes", "2", "--name", "again", "--store", remote, "--quiet"])
        assert result.exit_code == 0, result.output
    index = json.loads(s3.cat_file(f"{BUCKET}/run.zarr/results/zarr.json"))["attributes"]["index"]
    s3.invalidate_cache()
    folders = {p.rsplit("/", 1)[-1] for p in s3.ls(f"{BUCKET}/run.zarr/results/cmd") if "@" in p}
    assert folders == {v.split("/", 1)[1] for k, v in index.items() if k.startswith("cmd/")}  # the replaced one: gone


def test_appending_to_an_s3_store_keeps_the_committed_columns(s3, tmp_path):
    write_checkpoints(tmp_path / "ck", n_epochs=6, fmt="pt")
    first = tmp_path / "first"
    first.mkdir()
    for path in sorted((tmp_path / "ck").glob("*.pt"))[:3]:
        path.rename(first / path.name)
    remote = f"s3://{BUCKET}/append.zarr"
    cmdtool.ingest([first], remote)
    before = cmdtool.open_store(remote).read_columns(slice(0, 3))
    report = cmdtool.ingest([first, tmp_path / "ck"], remote)
    store = cmdtool.open_store(remote)
    assert store.labels.tolist() == [1, 2, 3, 4, 5, 6] and len(report.added) == 3
    np.testing.assert_array_equal(store.read_columns(slice(0, 3)), before)
    cmdtool.ingest([tmp_path / "ck"], tmp_path / "local.zarr")  # epochs 4..6 alone, as a check of the new ones
    np.testing.assert_array_equal(store.read_columns(slice(3, 6)),
                                  cmdtool.open_store(tmp_path / "local.zarr").read_columns(slice(0, 3)))


def test_a_held_lease_refuses_a_second_writer_until_it_expires(stores, s3):
    from cmdtool.store.location import store_location
    from cmdtool.store.remote_lock import lease_lock

    tmp, local, remote = stores
    lease = store_location(remote) / "locks" / "ingest" / "lease.json"
    with lease_lock(lease, "store", ttl=60):
        assert s3.exists(lease.key)
        result = runner.invoke(app, ["ingest", str(tmp / "ck"), "--store", remote])
        assert result.exit_code != 0 and "in use by another cmdtool process" in result.output, result.output
        with pytest.raises(StoreLockedError):
            with lease_lock(lease, "store", wait=0.5):
                pass
    assert not s3.exists(lease.key)  # released
    # a lease whose holder died (never renewed, expired) is taken over
    s3.pipe_file(lease.key, json.dumps({"host": "gone", "pid": 1, "token": "x", "expires_at": 0}).encode())
    with lease_lock(lease, "store"):
        assert json.loads(s3.cat_file(lease.key))["pid"] != 1
    assert not s3.exists(lease.key)


def test_racing_writers_get_the_lease_exactly_once(s3):
    from cmdtool.store.remote_lock import _create_exclusively

    key = f"{BUCKET}/race/lease.json"
    wins, barrier = [], threading.Barrier(8)

    def contend(i):
        barrier.wait()
        if _create_exclusively(s3, key, str(i).encode()):
            wins.append(i)

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1 and s3.cat_file(key) == str(wins[0]).encode()


def test_rechunk_is_refused_on_s3_with_one_line(stores):
    tmp, local, remote = stores
    result = runner.invoke(app, ["rechunk", "--store", remote, "--chunk-rows", "64"])
    assert result.exit_code == 2 and "object storage has no rename" in result.output
    with pytest.raises(UsageError):
        from cmdtool.store.rechunk import rechunk

        rechunk(remote, chunk_rows=64)


def test_file_urls_are_local_stores(tmp_path):
    from cmdtool.store.location import store_location

    rng = np.random.default_rng(0)
    values = rng.standard_normal((300, 5)).astype(np.float32)
    cmdtool.store.from_array(tmp_path / "u.zarr", values)
    store = cmdtool.open_store(f"file://{tmp_path}/u.zarr")
    assert store.path == tmp_path / "u.zarr" and store_location(f"file://{tmp_path}") == tmp_path
    np.testing.assert_array_equal(store.read_columns(slice(0, 5)), values)


def test_checkpoints_on_s3_are_refused_with_one_line(stores):
    tmp, local, remote = stores
    result = runner.invoke(app, ["ingest", f"s3://{BUCKET}/ck/", "--store", remote])
    assert result.exit_code == 2 and "local or mounted folders only" in result.output, result.output
    assert cmdtool.open_store(remote).n_checkpoints == 8


def test_the_cli_starts_without_fsspec_or_s3fs():
    import subprocess
    import sys

    code = ("import sys, cmdtool_cli.app\n"
            "print([m for m in ('fsspec', 's3fs', 'torch', 'matplotlib') if m in sys.modules])\n"
            "import cmdtool.store.store\n"  # zarr imports fsspec itself; s3fs only comes with an s3:// URL
            "print('s3fs' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["[]", "False"]


def test_a_dask_cluster_runs_the_passes_on_an_s3_store(stores, s3):
    """Both halves of #16 together: workers open the S3 store by its URL (credentials and endpoint from the
    environment they inherit) and the result equals the in-process one on the local store."""
    pytest.importorskip("distributed")
    tmp, local, remote = stores
    for store, extra in ((local, ()), (remote, ("--scheduler", "local:2"))):
        result = runner.invoke(app, ["decompose", "-m", "pca", "--dims", "3", "--name", "cluster", "--store", store,
                                     "--quiet", "--json", *extra])
        assert result.exit_code == 0, result.output
    a = cmdtool.open_store(local).results.get("pca", "cluster")
    b = cmdtool.open_store(remote).results.get("pca", "cluster")
    assert a.keys() == b.keys()
    for key in a.keys():
        np.testing.assert_allclose(b[key], a[key], rtol=1e-10, atol=1e-12, err_msg=key)
