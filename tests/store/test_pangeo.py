"""The store in the Pangeo stack (xarray, dask, plain zarr without warnings) and the migration from format 1."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import zarr

import cmdtool
from cmdtool.store import format as fmt

from tests.conftest import write_checkpoints

V1_STORE = Path(__file__).parents[1] / "data" / "v1_store.zarr"


@pytest.fixture
def ingested(tmp_path):
    states = write_checkpoints(tmp_path / "ck", n_epochs=5, name="epoch_{e}0")  # labels 10, 20, ... 50
    cmdtool.ingest([tmp_path / "ck"], tmp_path / "s.zarr")
    return cmdtool.open_store(tmp_path / "s.zarr"), states


def expected_tensor_index(store):
    return np.repeat(np.arange(len(store.layout.trajectory_entries)),
                     [e.numel for e in store.layout.trajectory_entries])


def test_xarray_opens_the_store_with_labels(ingested):
    xr = pytest.importorskip("xarray")
    store, states = ingested
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "not recognized as a component of a Zarr hierarchy" (lock files)
        ds = xr.open_zarr(store.path, consolidated=False)
    assert ds.trajectories.dims == ("parameter", "epoch")
    assert ds.sizes["parameter"] == store.n_rows and ds.sizes["epoch"] == 5
    assert ds.epoch.values.tolist() == [10, 20, 30, 40, 50]
    names = [e.name for e in store.layout.trajectory_entries]
    assert ds.tensor.values.tolist() == names
    np.testing.assert_array_equal(ds.tensor_index.values, expected_tensor_index(store))
    # a tensor's trajectory at an epoch, selected by labels only
    entry = store.layout.by_name()["4.weight"]
    mask = (ds.tensor_index == names.index("4.weight")).compute()
    rows = ds.trajectories.sel(epoch=30)[mask.values]
    np.testing.assert_array_equal(rows.values, states[2]["4.weight"].reshape(-1).numpy())
    assert entry.numel == rows.size


def test_dask_from_zarr_sees_the_committed_array(ingested):
    da = pytest.importorskip("dask.array")
    store, _ = ingested
    W = da.from_zarr(str(store.path), component=fmt.TRAJECTORIES)
    assert W.shape == store.shape
    assert W.chunks[0][0] == store.chunk_shape[0]
    np.testing.assert_array_equal(W.sum(axis=0).compute(), store.trajectories[:, :].sum(axis=0))
    labels = da.from_zarr(str(store.path), component=fmt.EPOCH).compute()
    assert labels.tolist() == store.labels.tolist()


def test_walking_the_hierarchy_meets_only_zarr_nodes(ingested):
    store, _ = ingested
    from cmdtool.analyzers import get_analyzer

    writable = cmdtool.open_store(store.path, mode="r+")
    analyzer = get_analyzer("dmd").from_options({"rank": "2", "device": "cpu"})
    analyzer.fit(writable)
    analyzer.save("default")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        members = dict(zarr.open_group(store.path, mode="r").members(max_depth=None))
    assert {"trajectories", "epoch", "tensor", "tensor_index", "results", "locks/ingest"} <= set(members)
    assert not list(store.path.glob(".*.lock"))


def test_a_killed_append_leaves_no_columns_for_other_readers_after_the_next_ingest(tmp_path):
    write_checkpoints(tmp_path / "ck", n_epochs=4)
    cmdtool.ingest([tmp_path / "ck"], tmp_path / "s.zarr")
    store = cmdtool.open_store(tmp_path / "s.zarr", mode="r+")
    store.resize_columns(6)  # what a kill between a write and its commit leaves
    assert store.trajectories.shape[1] == 6 and store.n_checkpoints == 4
    cmdtool.ingest([tmp_path / "ck"], tmp_path / "s.zarr")  # nothing new: only the repair
    store = cmdtool.open_store(tmp_path / "s.zarr")
    assert store.trajectories.shape[1] == store.epoch_coordinate.shape[0] == 4


@pytest.fixture
def v1_copy(tmp_path):
    path = tmp_path / "v1.zarr"
    shutil.copytree(V1_STORE, path)
    return path


def test_format_1_store_reads_without_migration(v1_copy):
    before = sorted(p.relative_to(v1_copy).as_posix() for p in v1_copy.rglob("*"))
    store = cmdtool.open_store(v1_copy)
    assert store.format_version == 1 and store.shape == (1506, 6)
    assert store.results.get("dmd", "default").metrics
    assert sorted(p.relative_to(v1_copy).as_posix() for p in v1_copy.rglob("*")) == before  # nothing written


def test_format_1_store_is_migrated_by_a_writer(v1_copy):
    xr = pytest.importorskip("xarray")
    old = cmdtool.open_store(v1_copy)
    values, labels, revision = old.trajectories[:, :], old.labels.tolist(), old.revision
    dmd_error = old.results.get("dmd", "default").metrics
    store = cmdtool.open_store(v1_copy, mode="r+")  # the first writer migrates
    assert store.format_version == fmt.FORMAT_VERSION and store.meta["migrated_from"] == 1
    assert store.revision == revision  # values did not change: cached results stay valid
    np.testing.assert_array_equal(store.trajectories[:, :], values)
    assert store.results.get("dmd", "default").metrics == dmd_error
    assert not (v1_copy / ".ingest.lock").exists() and not (v1_copy / ".results.lock").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = xr.open_zarr(v1_copy, consolidated=False)
        dict(zarr.open_group(v1_copy, mode="r").members(max_depth=None))
    assert ds.epoch.values.tolist() == labels
    np.testing.assert_array_equal(ds.tensor_index.values, expected_tensor_index(store))
    from cmdtool.store.verify import verify_store

    assert verify_store(store).ok
    assert cmdtool.open_store(v1_copy, mode="r+").format_version == fmt.FORMAT_VERSION  # idempotent


def test_migrate_command(v1_copy):
    from typer.testing import CliRunner

    from cmdtool_cli.app import app

    result = CliRunner().invoke(app, ["migrate", "--store", str(v1_copy), "--json"])
    assert result.exit_code == 0, result.output
    assert '"from_version": 1' in result.output
    result = CliRunner().invoke(app, ["migrate", "--store", str(v1_copy)])
    assert result.exit_code == 0 and "already" in result.output


def test_verify_checks_the_coordinates(ingested):
    from cmdtool.store.verify import verify_store

    store, _ = ingested
    assert verify_store(store).ok
    writable = cmdtool.open_store(store.path, mode="r+")
    writable.write_labels(0, [11])  # a label that disagrees with the time axis
    report = verify_store(cmdtool.open_store(store.path))
    assert [d.array for d in report.damage] == ["epoch"] and "differ" in report.damage[0].problem
