"""Bad input: one-line error, non-zero exit, and the store exactly as it was (or no store at all)."""

from __future__ import annotations

import hashlib
import os
import pickle
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import cmdtool
from cmdtool.errors import CheckpointError, UsageError
from cmdtool_cli.app import app

from tests.conftest import write_checkpoints

runner = CliRunner()


def tree_digest(path: Path) -> dict:
    """Every file under ``path`` with its bytes' hash: 'byte for byte as before'."""
    out = {}
    for root, _, files in os.walk(path):
        for name in files:
            full = Path(root) / name
            out[str(full.relative_to(path))] = hashlib.sha256(full.read_bytes()).hexdigest()
    return out


class Exploit:
    """Unpickling this would call os.system; weights_only loading must refuse it without running it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def base_store(tmp_path):
    write_checkpoints(tmp_path / "ck", n_epochs=3)
    cmdtool.ingest([tmp_path / "ck"], tmp_path / "s.zarr")
    return tmp_path / "s.zarr"


def run_cli(*args):
    return runner.invoke(app, list(map(str, args)))


def assert_one_line_error(result, *needles, code=2):
    assert result.exit_code == code, result.output
    lines = result.output.strip().splitlines()
    text = lines[-1]  # progress bars may precede it on stderr
    assert text.startswith("error:"), result.output
    assert sum("error:" in line for line in lines) == 1
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in text, text


def test_code_executing_pickle_is_refused_and_never_run(tmp_path, base_store):
    marker = tmp_path / "pwned"
    bad = tmp_path / "new" / "epoch_4.pt"
    bad.parent.mkdir()
    torch.save({"w": Exploit(marker)}, bad)
    before = tree_digest(base_store)
    result = run_cli("ingest", bad, "--store", base_store)
    assert_one_line_error(result, "epoch_4.pt", "refused", "safetensors")
    assert not marker.exists()
    assert tree_digest(base_store) == before


def test_plain_pickle_file_with_pt_suffix_is_refused(tmp_path):
    marker = tmp_path / "pwned2"
    bad = tmp_path / "epoch_1.pt"
    bad.write_bytes(pickle.dumps({"w": Exploit(marker)}))
    with pytest.raises(CheckpointError, match="epoch_1.pt"):
        cmdtool.ingest([bad], tmp_path / "s.zarr")
    assert not marker.exists()
    assert not (tmp_path / "s.zarr").exists()


@pytest.mark.parametrize("damage", ["truncate", "zero", "garbage"])
def test_damaged_files_leave_the_store_as_it_was(tmp_path, base_store, damage):
    source = tmp_path / "ck" / "epoch_3.pt"
    bad = tmp_path / "new" / "epoch_4.pt"
    bad.parent.mkdir()
    data = source.read_bytes()
    bad.write_bytes({"truncate": data[: len(data) // 2], "zero": b"", "garbage": os.urandom(4000)}[damage])
    before = tree_digest(base_store)
    result = run_cli("ingest", bad, "--store", base_store)
    assert_one_line_error(result, "epoch_4.pt")
    assert tree_digest(base_store) == before


def test_mismatched_keys_and_shapes_name_the_tensors(tmp_path, base_store):
    state = torch.load(tmp_path / "ck" / "epoch_1.pt")
    state["4.weight"] = torch.zeros(10, 5)
    del state["0.bias"]
    state["extra.weight"] = torch.zeros(2)
    (tmp_path / "new").mkdir()
    torch.save(state, tmp_path / "new" / "epoch_7.pt")
    before = tree_digest(base_store)
    result = run_cli("ingest", tmp_path / "new", "--store", base_store)
    assert_one_line_error(result, "0.bias", "extra.weight", "4.weight", "(10, 5)")
    assert tree_digest(base_store) == before


def test_a_bad_file_among_good_ones_writes_nothing(tmp_path, base_store):
    write_checkpoints(tmp_path / "more", n_epochs=6)
    for epoch in (1, 2, 3):
        (tmp_path / "more" / f"epoch_{epoch}.pt").unlink()
    (tmp_path / "more" / "epoch_5.pt").write_bytes(b"\x00" * 100)
    before = tree_digest(base_store)
    result = run_cli("ingest", tmp_path / "more", "--store", base_store)
    assert_one_line_error(result, "epoch_5.pt")
    assert tree_digest(base_store) == before
    assert cmdtool.open_store(base_store).n_checkpoints == 3


def test_empty_folder_and_missing_path(tmp_path):
    (tmp_path / "empty").mkdir()
    assert_one_line_error(run_cli("ingest", tmp_path / "empty", "--store", tmp_path / "s.zarr"),
                          "no checkpoints found")
    assert_one_line_error(run_cli("ingest", tmp_path / "nope", "--store", tmp_path / "s.zarr"), "no such file")
    assert not (tmp_path / "s.zarr").exists()


def test_store_path_that_is_a_file(tmp_path):
    write_checkpoints(tmp_path / "ck", n_epochs=1)
    (tmp_path / "s.zarr").write_text("not a store")
    assert_one_line_error(run_cli("ingest", tmp_path / "ck", "--store", tmp_path / "s.zarr"), "is a file")
    assert_one_line_error(run_cli("info", "--store", tmp_path / "s.zarr"), "is a file")
    assert (tmp_path / "s.zarr").read_text() == "not a store"


def test_no_floating_point_tensors(tmp_path):
    torch.save({"steps": torch.tensor([1, 2, 3])}, tmp_path / "epoch_1.pt")
    with pytest.raises(CheckpointError, match="no floating-point tensors"):
        cmdtool.ingest([tmp_path / "epoch_1.pt"], tmp_path / "s.zarr")


def test_unsupported_dtype(tmp_path):
    torch.save({"w": torch.zeros(3, dtype=torch.complex64)}, tmp_path / "epoch_1.pt")
    with pytest.raises(CheckpointError, match="unsupported dtype complex64"):
        cmdtool.ingest([tmp_path / "epoch_1.pt"], tmp_path / "s.zarr")


def test_newer_store_format_is_refused(tmp_path, base_store):
    import zarr

    group = zarr.open_group(base_store, mode="r+")
    meta = dict(group.attrs["cmdtool"])
    meta["format_version"] = 99
    group.attrs["cmdtool"] = meta
    assert_one_line_error(run_cli("info", "--store", base_store), "format version 99", code=1)


def test_info_on_missing_store_says_how_to_create_one(tmp_path):
    with pytest.raises(UsageError, match="cmdtool ingest"):
        cmdtool.open_store(tmp_path / "nothing.zarr")
