"""Stores on S3 through fsspec, against a real S3-compatible server (moto's standalone server) on 127.0.0.1.

The same checkpoints go into a local store and an S3 store; every command reads both, and the results must
agree: stored floats exactly, analysis results to 1e-12. One server for the module; stores are small.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

from typer.testing import CliRunner  # noqa: E402

import cmdtool  # noqa: E402
from cmdtool.errors import StoreLockedError, UsageError  # noqa: E402
from cmdtool_cli.app import app  # noqa: E402

from tests.conftest import free_port, move_first_epochs, s3_bucket_at, write_checkpoints  # noqa: E402

runner = CliRunner()
BUCKET = "runs"


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on 127.0.0.1 and a bucket; the environment points boto/s3fs at it (as a user's
    AWS_ENDPOINT_URL / credentials would)."""
    import logging


    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield from s3_bucket_at(f"http://127.0.0.1:{port}", BUCKET)
    finally:
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
    first = move_first_epochs(tmp_path / "ck", 3, tmp_path / "first")
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


# ------------------------------------------------------------------------------ checkpoints on S3 as inputs
def _write_layout(folder, layout: str):
    """Checkpoints of one layout in ``folder``: plain .pt files, .safetensors files, HF Trainer checkpoint-N/
    folders (with optimizer/RNG files never read, trainer_state.json) or torch.distributed.checkpoint folders."""
    if layout in ("pt", "safetensors"):
        write_checkpoints(folder, n_epochs=4, fmt=layout)
    elif layout == "hf":
        from tests.ingestion.test_layouts import write_hf_run

        write_hf_run(folder, steps=(2, 4, 6, 8), final=True)
    else:
        from tests.ingestion.test_layouts import write_dcp_run

        write_dcp_run(folder)


def _staging_watch(monkeypatch):
    """Record, after each download of a checkpoint, the bytes the staging folder really holds on disk
    (placeholders are sparse: no blocks) and how many checkpoint files are downloaded at once."""
    from cmdtool.ingestion.remote import CheckpointStaging

    seen = {"disk": 0, "files": 0, "downloads": 0, "roots": set()}
    fetch = CheckpointStaging.fetch

    def watched(self, source):
        fetch(self, source)
        if self.is_remote(source):
            seen["downloads"] += 1
            seen["roots"].add(self.root)
            disk = sum(os.stat(os.path.join(d, f)).st_blocks * 512 for d, _, fs in os.walk(self.root) for f in fs)
            seen["disk"] = max(seen["disk"], disk)
            seen["files"] = max(seen["files"], len(self._downloaded))

    monkeypatch.setattr(CheckpointStaging, "fetch", watched)
    return seen


@pytest.mark.parametrize("layout", ["pt", "safetensors", "hf", pytest.param("dcp", marks=pytest.mark.filterwarnings(
    "ignore::UserWarning"))])
def test_ingest_from_s3_equals_ingest_from_the_local_folder(s3, tmp_path, monkeypatch, layout):
    """The same checkpoints from a local folder and from s3://: equal stores (values, labels, digests); the
    time records name the URLs; a rerun reads nothing; a new remote checkpoint appends; at most two
    checkpoints are ever staged, and the staging folder is gone afterwards."""
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "tmp"))  # where an s3 store's staging goes
    (tmp_path / "tmp").mkdir()
    _write_layout(tmp_path / "ck", layout)
    last = sorted((p for p in (tmp_path / "ck").iterdir() if not p.name.startswith(("model", "config",
                                                                                   "training"))),
                  key=lambda p: int(re.findall(r"\d+", p.name)[-1]))[-1]
    last = Path(shutil.move(last, tmp_path / last.name))  # held back: appended later
    prefix = f"{BUCKET}/in-{layout}"
    s3.put(str(tmp_path / "ck") + "/", prefix + "/", recursive=True)
    url = f"s3://{prefix}/"
    seen = _staging_watch(monkeypatch)
    local = cmdtool.ingest([tmp_path / "ck"], tmp_path / "local.zarr")
    assert seen["downloads"] == 0
    for store in (tmp_path / "from-url.zarr", f"s3://{BUCKET}/from-{layout}.zarr"):
        report = cmdtool.ingest([url], store)
        assert report.added == local.added and report.skipped == [
            note.replace(str(tmp_path / "ck"), f"s3://{prefix}") for note in local.skipped]
        a, b = cmdtool.open_store(tmp_path / "local.zarr"), cmdtool.open_store(store)
        assert b.labels.tolist() == a.labels.tolist() and b.shape == a.shape
        np.testing.assert_array_equal(b.read_columns(slice(0, b.n_checkpoints)),
                                      a.read_columns(slice(0, a.n_checkpoints)))
        assert [r.digest for r in b.time_axis] == [r.digest for r in a.time_axis]
        for record, local_record in zip(b.time_axis, a.time_axis):
            assert record.source == local_record.source.replace(str(tmp_path / "ck"), f"s3://{prefix}")
            assert record.source.startswith(f"s3://{prefix}/") and record.size == local_record.size
            assert record.extra.get("folder", f"s3://{prefix}").startswith(f"s3://{prefix}")
            key = record.source[len("s3://"):]  # a file, or a checkpoint folder (DCP) of files
            listed = [s3.info(key)] if s3.isfile(key) else list(s3.find(key, detail=True).values())
            assert record.mtime == max(info["LastModified"].timestamp() for info in listed)
        downloads = seen["downloads"]
        again = cmdtool.ingest([url], store)  # unchanged: size and mtime as listed, nothing downloaded
        assert again.unchanged == report.added and not again.added and seen["downloads"] == downloads
        # a new checkpoint on S3 appends
        target = f"{prefix}/{last.name}"
        s3.put(str(last), target, recursive=last.is_dir())
        appended = cmdtool.ingest([url], store)
        s3.rm(target, recursive=True)
        cmdtool.ingest([tmp_path / "ck", last], tmp_path / "local-all.zarr")
        a = cmdtool.open_store(tmp_path / "local-all.zarr")
        b = cmdtool.open_store(store)
        assert appended.added == [a.labels[-1]] and b.labels.tolist() == a.labels.tolist()
        np.testing.assert_array_equal(b.read_columns(slice(0, b.n_checkpoints)),
                                      a.read_columns(slice(0, a.n_checkpoints)))
        _remove_whole(tmp_path / "local-all.zarr")
    # staged: two checkpoints at most, on disk (placeholders take none); every staging folder removed
    largest = max(r.size for r in cmdtool.open_store(tmp_path / "from-url.zarr").time_axis)
    assert 1 <= seen["files"] <= 2  # each layout here has one checkpoint file (plus metadata, read at listing)
    assert 0 < seen["disk"] <= 2 * largest + 64 * 1024, (seen, largest)
    assert seen["roots"] and not any(Path(r).exists() for r in seen["roots"])
    assert not list(tmp_path.glob(".cmdtool-staging-*")) and not list((tmp_path / "tmp").glob(".cmdtool-staging-*"))


def _remove_whole(path):
    shutil.rmtree(path)


def test_ingest_from_s3_through_the_cli_and_set_label_by_url(s3, tmp_path):
    write_checkpoints(tmp_path / "ck", n_epochs=3, fmt="safetensors")
    (tmp_path / "ck" / "epoch_3.safetensors").rename(tmp_path / "ck" / "final.safetensors")
    s3.put(str(tmp_path / "ck") + "/", f"{BUCKET}/cli/", recursive=True)
    result = runner.invoke(app, ["ingest", f"s3://{BUCKET}/cli/", "--store", str(tmp_path / "c.zarr"), "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["added"] == [1, 2] and out["skipped"][0].startswith(f"s3://{BUCKET}/cli/final.safetensors: ")
    result = runner.invoke(app, ["ingest", f"s3://{BUCKET}/cli/", "--store", str(tmp_path / "c.zarr"), "--json",
                                 "--set-label", f"s3://{BUCKET}/cli/final.safetensors=3"])
    assert result.exit_code == 0 and json.loads(result.output)["added"] == [3], result.output
    assert cmdtool.open_store(tmp_path / "c.zarr").time_axis[2].source == f"s3://{BUCKET}/cli/final.safetensors"
    assert not list(tmp_path.glob(".cmdtool-staging-*"))


def test_an_interrupted_remote_ingest_removes_its_staging_folder(s3, tmp_path, monkeypatch):
    from cmdtool.ingestion.remote import CheckpointStaging

    write_checkpoints(tmp_path / "ck", n_epochs=4, fmt="pt")
    s3.put(str(tmp_path / "ck") + "/", f"{BUCKET}/interrupted/", recursive=True)
    download = CheckpointStaging._download
    calls = []

    def interrupted(self, local, remote):
        calls.append(self.root)
        if len(calls) == 3:
            raise KeyboardInterrupt
        download(self, local, remote)

    monkeypatch.setattr(CheckpointStaging, "_download", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cmdtool.ingest([f"s3://{BUCKET}/interrupted"], tmp_path / "i.zarr")
    assert calls and not calls[0].exists() and not list(tmp_path.glob(".cmdtool-staging-*"))
    monkeypatch.setattr(CheckpointStaging, "_download", download)
    report = cmdtool.ingest([f"s3://{BUCKET}/interrupted"], tmp_path / "i.zarr")  # resumes
    assert cmdtool.open_store(tmp_path / "i.zarr").labels.tolist() == [1, 2, 3, 4] and report.added


def test_url_checkpoints_are_refused_on_a_cluster_and_when_copying_left_out_tensors(s3, tmp_path):
    from cmdtool.utils.cluster import using_client
    from cmdtool.ingestion.ingest import open_recorded_source

    write_checkpoints(tmp_path / "ck", n_epochs=2, fmt="pt")
    s3.put(str(tmp_path / "ck") + "/", f"{BUCKET}/refused/", recursive=True)
    with using_client(object()), pytest.raises(UsageError, match="ingested in this process only"):
        cmdtool.ingest([f"s3://{BUCKET}/refused/"], tmp_path / "r.zarr")
    assert not (tmp_path / "r.zarr").exists()
    cmdtool.ingest([f"s3://{BUCKET}/refused/"], tmp_path / "r.zarr", exclude=("*.bias",))
    from cmdtool.errors import CheckpointError

    with pytest.raises(CheckpointError, match="on object storage"):
        open_recorded_source(cmdtool.open_store(tmp_path / "r.zarr"), 0)


# ---------------------------------------------------------------- one-line errors: buckets, credentials, access
def _one_line_failure(result, code):
    lines = result.output.strip().splitlines()
    assert result.exit_code == code and len(lines) == 1 and lines[0].startswith("error:"), result.output
    return lines[0]


def test_a_missing_bucket_is_one_line_and_writes_nothing(stores, tmp_path):
    tmp, local, remote = stores
    line = _one_line_failure(runner.invoke(app, ["ingest", "s3://no-such-bucket/ck/", "--store",
                                                 str(tmp_path / "m.zarr")]), 2)
    assert "no-such-bucket" in line and "does not exist" in line
    assert not (tmp_path / "m.zarr").exists() and not list(tmp_path.iterdir())
    line = _one_line_failure(runner.invoke(app, ["ingest", str(tmp / "ck"), "--store",
                                                 "s3://no-such-bucket/run.zarr"]), 2)
    assert "no such bucket" in line
    line = _one_line_failure(runner.invoke(app, ["info", "--store", "s3://no-such-bucket/run.zarr"]), 2)
    line = _one_line_failure(runner.invoke(app, ["ingest", f"s3://{BUCKET}/no-such-folder/", "--store",
                                                 str(tmp_path / "m.zarr")]), 2)
    assert "no such file or folder" in line and not list(tmp_path.iterdir())


@pytest.fixture()
def no_credentials(s3, tmp_path, monkeypatch):
    """No AWS credentials anywhere boto looks (environment, empty config files, no instance metadata)."""
    import fsspec

    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    (tmp_path / "empty").write_text("")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "empty"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "empty"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    fsspec.filesystem("s3").clear_instance_cache()
    yield
    fsspec.filesystem("s3").clear_instance_cache()


def test_missing_credentials_are_one_line_for_checkpoints_and_stores(stores, no_credentials, tmp_path):
    tmp, local, remote = stores
    (tmp_path / "out").mkdir()
    line = _one_line_failure(runner.invoke(app, ["ingest", f"s3://{BUCKET}/in-pt/", "--store",
                                                 str(tmp_path / "out" / "n.zarr")]), 2)
    assert "no credentials" in line and f"s3://{BUCKET}/in-pt" in line
    assert not list((tmp_path / "out").iterdir())
    line = _one_line_failure(runner.invoke(app, ["ingest", str(tmp / "ck"), "--store",
                                                 f"s3://{BUCKET}/n.zarr"]), 2)
    assert "no credentials" in line
    _one_line_failure(runner.invoke(app, ["info", "--store", remote]), 2)


def test_access_denied_is_one_line(stores, tmp_path, monkeypatch):
    """moto's server accepts any credentials and ignores bucket policies unless auth is switched on for the
    whole process, so the refusal is the one s3fs raises for a 403 (PermissionError), raised by the filesystem."""
    import fsspec
    from botocore.exceptions import ClientError

    from cmdtool.store.location import storage_error

    fs = fsspec.filesystem("s3")

    def denied(*args, **kwargs):
        raise PermissionError("Access Denied")

    monkeypatch.setattr(fs, "info", denied)  # s3fs mirrors its sync methods onto the instance
    (tmp_path / "out").mkdir()
    line = _one_line_failure(runner.invoke(app, ["ingest", f"s3://{BUCKET}/denied/", "--store",
                                                 str(tmp_path / "out" / "d.zarr")]), 1)
    assert "access denied" in line and not list((tmp_path / "out").iterdir())
    error = ClientError({"Error": {"Code": "AccessDenied", "Message": "Access Denied"}}, "GetObject")
    assert storage_error(error, "s3://b/k").exit_code == 1
    assert storage_error(ValueError("other")) is None
    # a local file's permission error is the file system's, not the object store's
    assert storage_error(PermissionError(13, "Permission denied", str(tmp_path / "x"))) is None


def test_the_cli_starts_without_fsspec_or_s3fs():
    import subprocess
    import sys

    code = ("import sys, cmdtool_cli.app\n"
            "print([m for m in ('fsspec', 's3fs', 'torch', 'matplotlib') if m in sys.modules])\n"
            "import cmdtool.store.store\n"  # zarr imports fsspec itself; s3fs only comes with an s3:// URL
            "print('s3fs' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["[]", "False"]


@pytest.mark.slow
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
