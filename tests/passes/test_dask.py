"""Every pass on a Dask cluster (a LocalCluster of 2 worker processes) equals the same pass in process.

One cluster for the module (starting one takes seconds). Blocks are made small (256 rows) so that every pass
is several tasks and a tree of merges. Equality: float64 reductions to 1e-10 relative (another summation
order), per-row outputs to the same bound (each row is computed once, from the same float32 block). A worker
killed in the middle of a pass: Dask runs the task again and the result is unchanged; a task that kills every
worker it runs on fails the fit with one error and leaves the store's results as they were.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

distributed = pytest.importorskip("distributed")

from cmdtool.analyzers import get_analyzer  # noqa: E402
from cmdtool.passes import local as passes  # noqa: E402
from cmdtool.analyzers.linear_models import RowProjection  # noqa: E402
from cmdtool.workflows.averages import iter_averages  # noqa: E402
from cmdtool.utils.cluster import ClusterError, parse_scheduler, using_client  # noqa: E402
from cmdtool.errors import UsageError  # noqa: E402
from cmdtool.store import from_array, open_store  # noqa: E402

from tests.conftest import planted_modes  # noqa: E402
# the store of test_passes (3000 x 16, 128-row chunks, a NaN and an Inf row), a fresh copy for this module
from tests.passes.test_passes import BLOCK_BYTES, N_COLS, _factories, _state, store  # noqa: E402, F401

RTOL = 1e-10


@pytest.fixture(scope="module")
def client():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster, distributed.Client(cluster) as c:
        yield c


@pytest.fixture()
def small_blocks(monkeypatch):
    """Passes of 256-row blocks (12 per pass), whatever block size the caller asks for."""
    original = passes.pass_context
    monkeypatch.setattr(passes, "pass_context", lambda st, columns, device, block_bytes=0:
                        original(st, columns, device, BLOCK_BYTES))


def _assert_equal(cluster: dict, local: dict, elementwise: bool = True):
    """Equal to 1e-10 relative: every element (reductions, per-row outputs), or in norm for what is derived from
    them by an eigensolver (a rounding-level change of G moves an entry near 0 by more than 1e-10 of itself); a
    derived float32 array to float32's resolution (2^-23: G's last-bit changes move entries across a rounding
    boundary of float32)."""
    assert cluster.keys() == local.keys() and local
    for key in local:
        if elementwise or not np.issubdtype(np.asarray(local[key]).dtype, np.floating):
            np.testing.assert_allclose(cluster[key], local[key], rtol=RTOL, atol=0, err_msg=key)
        else:
            a, b = np.asarray(cluster[key], np.float64), np.asarray(local[key], np.float64)
            if key == "singular_values":  # σ = sqrt(eigenvalue of G): compare what G determines to 1e-10
                a, b = a**2, b**2
            bound = 2.0**-23 if np.asarray(local[key]).dtype == np.float32 else RTOL
            difference = np.linalg.norm(a - b)
            assert difference <= bound * np.linalg.norm(b), (key, difference)


@pytest.mark.parametrize("name", ["gram", "row_gather", "cmd_fit_pass", "pca_directions", "dmd_modes", "kwm_masks",
                                  "reconstruction", "ema_swa", "online_replay"])
def test_every_accumulator_on_the_cluster_equals_in_process(client, store, name):
    results = []
    for on_cluster in (False, True):
        writer = store.results.writer("test", f"{name}-{on_cluster}")
        acc = _factories(store, writer)[name]()
        if on_cluster:
            with using_client(client):
                stats = passes.stream(store, [acc], slice(0, N_COLS), "cpu", block_bytes=BLOCK_BYTES)
        else:
            stats = passes.stream(store, [acc], slice(0, N_COLS), "cpu", block_bytes=BLOCK_BYTES)
        results.append((_state(acc), stats.nonfinite_rows))
        writer.discard()
    (local, local_nonfinite), (remote, remote_nonfinite) = results
    _assert_equal(remote, local)
    assert remote_nonfinite == local_nonfinite == 2


def _saved(st, method: str, name: str) -> dict:
    result = st.results.get(method, name)
    return {key: result[key] for key in result.keys()}


FITS = [("cmd", {"modes": 3, "warmup": 8}), ("dmd", {"rank": 3, "save_modes": True}), ("kga", {"rank": 3}),
        ("pca", {"dims": 4}), ("pod", {"rank": 3})]


@pytest.mark.parametrize("method,options", FITS, ids=[m for m, _ in FITS])
def test_every_fit_and_reconstruction_on_the_cluster_equals_in_process(client, store, small_blocks, method, options):
    fitted = {}
    for on_cluster in (False, True):
        if store.results.exists("gram", "full"):
            store.results.delete("gram", "full")  # the Gram pass runs on each engine
        analyzer = get_analyzer(method)(device="cpu", **options)
        with using_client(client) if on_cluster else _nothing():
            analyzer.fit(store).save(f"engine-{on_cluster}")
            columns = [3, 9, N_COLS - 1]
            variants = [{}] + ([{"variant": "online"}] if method == "cmd" else [])
            recs = {f"rec{k}": analyzer.reconstruct_epochs(store, columns, **v) for k, v in enumerate(variants)}
        fitted[on_cluster] = ({**_saved(store, method, f"engine-{on_cluster}"), **recs,
                               "gram": store.results.get("gram", "full")["gram"]},
                              analyzer.metrics_["relative_error"])
    (local, local_error), (remote, remote_error) = fitted[False], fitted[True]
    _assert_equal(remote, local, elementwise=False)
    assert remote_error == pytest.approx(local_error, rel=RTOL)


def test_ema_swa_on_the_cluster_equals_in_process(client, store, small_blocks):
    def averages():
        return {f"{m}{c}": v for m, c, v in iter_averages(store, slice(2, N_COLS), [5, 10, 15], ("original", "ema",
                                                                                                 "swa"), 0.8, 3)}

    local = averages()
    with using_client(client):
        remote = averages()
    assert np.isnan(local["original5"][17]) and len(local) == 9
    np.testing.assert_equal(np.isfinite(remote["ema10"]), np.isfinite(local["ema10"]))
    for key in local:
        finite = np.isfinite(local[key])
        np.testing.assert_allclose(remote[key][finite], local[key][finite], rtol=RTOL, atol=0, err_msg=key)


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


# ------------------------------------------------------------------------------------------------ worker failure
KILL = {"marker": None, "always": False}  # set by a test on the client; start() copies it into the partials


class KillingProjection(RowProjection):
    """PCA's projection that SIGKILLs the worker process running block 1024..1279: once (a marker file tells a
    rerun from the first run), or every time."""

    def start(self, ctx):
        super().start(ctx)
        self.kill_marker, self.kill_always = KILL["marker"], KILL["always"]

    def update(self, block):
        if block.start == 1024 and _on_worker():
            if self.kill_always or not Path(self.kill_marker).exists():
                Path(self.kill_marker).touch()
                os.kill(os.getpid(), signal.SIGKILL)
        super().update(block)


def _on_worker() -> bool:
    try:
        distributed.get_worker()
        return True
    except ValueError:
        return False


@pytest.fixture()
def killing_pca(monkeypatch, tmp_path, small_blocks):
    import cmdtool.analyzers.pca as pca

    monkeypatch.setattr(pca, "RowProjection", KillingProjection)
    monkeypatch.setitem(KILL, "marker", str(tmp_path / "killed-once"))
    return tmp_path / "killed-once"


def test_a_worker_killed_mid_pass_is_replaced_and_the_result_is_unchanged(client, store, killing_pca):
    local = get_analyzer("pca")(device="cpu", dims=4).fit(store)
    expected = np.asarray(local.directions_[...])
    with using_client(client):
        remote = get_analyzer("pca")(device="cpu", dims=4).fit(store)
    assert killing_pca.exists()  # a worker did die in the pass
    np.testing.assert_allclose(np.asarray(remote.directions_[...]), expected, rtol=RTOL, atol=0)
    client.wait_for_workers(2, timeout=60)


def test_a_pass_that_keeps_killing_workers_fails_in_one_line_and_commits_nothing(client, store, killing_pca,
                                                                               monkeypatch):
    monkeypatch.setitem(KILL, "always", True)
    before = (store.results.list(), sorted(p.name for p in (store.path / "results" / "pca").iterdir())
              if (store.path / "results" / "pca").exists() else [])
    allowed = client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.allowed_failures)
    client.run_on_scheduler(lambda dask_scheduler: setattr(dask_scheduler, "allowed_failures", 0))
    try:
        with using_client(client), pytest.raises(ClusterError) as failure:
            get_analyzer("pca")(device="cpu", dims=4).fit(store).save("never")
    finally:
        client.run_on_scheduler(lambda dask_scheduler: setattr(dask_scheduler, "allowed_failures", allowed))
        client.wait_for_workers(2, timeout=60)
    assert failure.value.exit_code == 1 and "\n" not in str(failure.value)
    assert "nothing was committed" in str(failure.value)
    after = (store.results.list(), sorted(p.name for p in (store.path / "results" / "pca").iterdir())
             if (store.path / "results" / "pca").exists() else [])
    assert after == before  # no result, no staged folder left behind


# ------------------------------------------------------------------------------------------------ the CLI switch
def test_scheduler_specs():
    assert parse_scheduler(None) is None and parse_scheduler("") is None
    assert parse_scheduler("local:3") == ("local", 3)
    assert parse_scheduler("tcp://10.0.0.5:8786") == ("address", "tcp://10.0.0.5:8786")
    with pytest.raises(UsageError):
        parse_scheduler("local:0")
    with pytest.raises(UsageError):
        parse_scheduler("not a scheduler")


def test_scheduler_timeout_from_the_environment(monkeypatch):
    from cmdtool.utils.cluster import SCHEDULER_TIMEOUT_ENV_VAR, connect_timeout_from_env

    monkeypatch.delenv(SCHEDULER_TIMEOUT_ENV_VAR, raising=False)
    assert connect_timeout_from_env() == 30.0
    monkeypatch.setenv(SCHEDULER_TIMEOUT_ENV_VAR, " 2.5 ")
    assert connect_timeout_from_env() == 2.5
    for bad in ("soon", "0", "-1", "inf", "nan"):
        monkeypatch.setenv(SCHEDULER_TIMEOUT_ENV_VAR, bad)
        with pytest.raises(UsageError, match="CMDTOOL_SCHEDULER_TIMEOUT"):
            connect_timeout_from_env()


def test_an_unreachable_scheduler_fails_in_one_line_within_the_timeout(tmp_path, monkeypatch):
    """$CMDTOOL_SCHEDULER_TIMEOUT bounds the wait for a scheduler that is not there (a closed port)."""
    import socket
    import time

    from typer.testing import CliRunner

    from cmdtool.utils.cluster import on_cluster
    from cmdtool_cli.app import app

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        address = f"tcp://127.0.0.1:{sock.getsockname()[1]}"  # closed once the block ends: nothing listens
    monkeypatch.setenv("CMDTOOL_SCHEDULER_TIMEOUT", "1.5")
    started = time.perf_counter()
    with pytest.raises(ClusterError, match="cannot reach the Dask scheduler"):
        with on_cluster(address):
            pass
    assert time.perf_counter() - started < 10  # not the default 30 s
    result = CliRunner().invoke(app, ["decompose", "-m", "pca", "-q", "--scheduler", address,
                                      "--store", str(tmp_path / "none.zarr")])
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output
    assert "cannot reach the Dask scheduler" in result.output
    monkeypatch.setenv("CMDTOOL_SCHEDULER_TIMEOUT", "soon")
    result = CliRunner().invoke(app, ["decompose", "-m", "pca", "-q", "--scheduler", address,
                                      "--store", str(tmp_path / "none.zarr")])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output


@pytest.mark.slow
def test_cli_decompose_and_reconstruct_on_a_scheduler_address(client, store, tmp_path):
    """`--scheduler ADDRESS` and $CMDTOOL_SCHEDULER reach the passes; results equal the in-process ones."""
    address = client.scheduler.address
    cli = [sys.executable, "-m", "cmdtool_cli"]
    env = {**os.environ, "CMDTOOL_STORE": str(store.path)}
    run = lambda *args, **extra: subprocess.run([*cli, *args], capture_output=True, text=True,  # noqa: E731
                                                env={**env, **extra}, timeout=300)
    store.results.delete("gram", "full")
    get_analyzer("dmd")(rank=3).fit(store).save("cli-local")
    store.results.delete("gram", "full")  # the CLI's fit runs its Gram pass on the cluster
    out = run("decompose", "-m", "dmd", "--rank", "3", "--name", "cli-cluster", "-q", CMDTOOL_SCHEDULER=address)
    assert out.returncode == 0, out.stderr
    _assert_equal(_saved(store, "dmd", "cli-cluster"), _saved(store, "dmd", "cli-local"), elementwise=False)
    out = run("reconstruct", "-e", "5", "-m", "dmd", "--name", "cli-cluster", "--scheduler", address,
              "--out", str(tmp_path / "rec.pt"), "-q")
    assert out.returncode == 0 and (tmp_path / "rec.pt").is_file(), out.stderr
    out = run("decompose", "-m", "pca", "--scheduler", "local:0", "-q")
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr


# ------------------------------------------------------------------------------------------------ ingest
def _store_contents(path) -> dict:
    st = open_store(path)
    return {"trajectories": st.trajectories[...], "integers": st.integer_values[...], "labels": st.labels,
            "records": [(r.label, r.digest, r.size, r.nonfinite) for r in st.time_axis]}


def test_ingest_on_the_cluster_equals_in_process(client, tmp_path):
    """A new store, then an append whose first group starts inside a committed chunk column."""
    from cmdtool.ingestion import ingest

    from tests.conftest import move_first_epochs, write_checkpoints

    write_checkpoints(tmp_path / "ckpts", n_epochs=14)
    first = move_first_epochs(tmp_path / "ckpts", 5, tmp_path / "first")
    ingest([first, tmp_path / "ckpts"], tmp_path / "local.zarr")
    with using_client(client):
        created = ingest([first], tmp_path / "cluster.zarr", memory_budget="64KiB")  # several row slabs
        st = open_store(tmp_path / "cluster.zarr")
        assert st.chunk_shape[1] == 3  # 5 checkpoints on 2 workers: groups of 3 + 2 columns
        appended = ingest([first, tmp_path / "ckpts"], tmp_path / "cluster.zarr")
    assert created.added == [1, 2, 3, 4, 5] and appended.added == list(range(6, 15))
    local, remote = _store_contents(tmp_path / "local.zarr"), _store_contents(tmp_path / "cluster.zarr")
    for key in local:
        np.testing.assert_array_equal(np.asarray(remote[key], dtype=object), np.asarray(local[key], dtype=object),
                                      err_msg=key)


def test_ingest_on_the_cluster_keeps_the_preflight(client, tmp_path):
    """A checkpoint that does not fit the store is refused before any worker writes: the store is unchanged."""
    import torch

    from cmdtool.ingestion import ingest

    from tests.conftest import write_checkpoints

    write_checkpoints(tmp_path / "ckpts", n_epochs=4)
    ingest([tmp_path / "ckpts"], tmp_path / "s.zarr")
    before = _store_contents(tmp_path / "s.zarr")
    write_checkpoints(tmp_path / "more", n_epochs=2, name="epoch_{e}0")
    torch.save({"other.weight": torch.zeros(3)}, tmp_path / "more" / "epoch_30.pt")
    with using_client(client), pytest.raises(UsageError):
        ingest([tmp_path / "ckpts", tmp_path / "more"], tmp_path / "s.zarr")
    after = _store_contents(tmp_path / "s.zarr")
    for key in before:
        np.testing.assert_array_equal(np.asarray(after[key], dtype=object), np.asarray(before[key], dtype=object))


# ------------------------------------------------------------------------------------------------ verify
def test_verify_on_the_cluster_finds_what_in_process_finds(client, tmp_path, monkeypatch):
    import cmdtool.store.verify as verify

    W, *_ = planted_modes(2000, 8, seed=1)
    st = from_array(tmp_path / "s.zarr", W, target_chunk_bytes=4 * 8 * 250)  # 8 chunk rows
    chunk = tmp_path / "s.zarr" / "trajectories" / "c" / "1" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    (tmp_path / "s.zarr" / "trajectories" / "c" / "5" / "0").unlink()
    monkeypatch.setattr(verify, "VERIFY_TASK_BYTES", 1)  # a task per chunk row
    local = verify.verify_store(st)
    with using_client(client):
        remote = verify.verify_store(st)
    assert [(d.rows[0], d.problem) for d in local.damage] == [(250, "checksum"), (1250, "missing")]
    assert remote.to_json() == local.to_json()
