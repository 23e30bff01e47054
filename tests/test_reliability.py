"""Corruption detection, fuzzed checkpoint files, read-only locations, concurrent readers."""

from __future__ import annotations

import os
import signal
import stat

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

import cmdtool
from cmdtool.errors import CmdtoolError, CorruptionError
from cmdtool.store.verify import verify_store
from cmdtool_cli.app import app

from conftest import write_checkpoints


@pytest.fixture
def store_path(tmp_path):
    write_checkpoints(tmp_path / "ck", n_epochs=6)
    cmdtool.ingest([tmp_path / "ck"], tmp_path / "s.zarr")
    return tmp_path / "s.zarr"


def flip_byte(path, offset_fraction=0.5):
    data = bytearray(path.read_bytes())
    data[int(len(data) * offset_fraction)] ^= 0xFF
    path.write_bytes(bytes(data))


def test_damaged_chunk_is_reported_with_array_and_rows(store_path):
    flip_byte(store_path / "trajectories" / "c" / "0" / "0")
    store = cmdtool.open_store(store_path)
    with pytest.raises(CorruptionError, match=r"'trajectories' in rows 0\.\.1505, columns 0\.\.5 failed its checksum"):
        list(store.iter_blocks())
    report = verify_store(store)
    assert not report.ok
    assert [(d.array, d.rows, d.problem) for d in report.damage] == [("trajectories", (0, 1506), "checksum")]
    result = CliRunner().invoke(app, ["verify", "--store", str(store_path)])
    assert result.exit_code == 1
    assert "trajectories: rows 0..1505, columns 0..5: checksum" in result.output


def test_missing_chunk_is_reported(store_path):
    (store_path / "integer_values" / "c" / "0" / "0").unlink()
    report = verify_store(cmdtool.open_store(store_path))
    assert [(d.array, d.problem) for d in report.damage] == [("integer_values", "missing")]


def test_clean_store_verifies(store_path):
    result = CliRunner().invoke(app, ["verify", "--store", str(store_path), "--json"])
    assert result.exit_code == 0 and '"ok": true' in result.output


def test_reader_sees_a_consistent_time_axis_during_append(tmp_path):
    write_checkpoints(tmp_path / "ck", n_epochs=8)
    for epoch in (5, 6, 7, 8):
        (tmp_path / "ck" / f"epoch_{epoch}.pt").rename(tmp_path / f"later_{epoch}.pt")
    cmdtool.ingest([tmp_path / "ck"], tmp_path / "s.zarr")
    reader = cmdtool.open_store(tmp_path / "s.zarr")   # opened before the append
    before = np.concatenate([b.data for b in reader.iter_blocks()])
    for epoch in (5, 6, 7, 8):
        (tmp_path / f"later_{epoch}.pt").rename(tmp_path / "ck" / f"epoch_{epoch}.pt")
    cmdtool.ingest([tmp_path / "ck"], tmp_path / "s.zarr")
    after_for_old_reader = np.concatenate([b.data for b in reader.iter_blocks()])
    assert reader.n_checkpoints == 4 and after_for_old_reader.shape == before.shape
    np.testing.assert_array_equal(after_for_old_reader, before)
    assert cmdtool.open_store(tmp_path / "s.zarr").n_checkpoints == 8


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_read_only_location_fails_cleanly(tmp_path):
    write_checkpoints(tmp_path / "ck", n_epochs=2)
    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        result = CliRunner().invoke(app, ["ingest", str(tmp_path / "ck"), "--store", str(locked / "s.zarr")])
        assert result.exit_code == 1 and "error:" in result.output and "Traceback" not in result.output
    finally:
        locked.chmod(stat.S_IRWXU)


def _fuzz_cases(rng, sources, n_cases):
    for case in range(n_cases):
        source = sources[case % len(sources)]
        data = bytearray(source.read_bytes())
        if rng.random() < 0.5:
            data = data[: int(rng.integers(0, len(data)))]
        else:
            for _ in range(int(rng.integers(1, 8))):
                data[int(rng.integers(0, len(data)))] = int(rng.integers(0, 256))
        yield case, source.suffix, bytes(data)


def test_fuzzed_checkpoints_give_clean_errors_and_never_hang(tmp_path):
    """Random truncations and byte flips of valid .pt and .safetensors files (seeded): every case either
    ingests or raises a one-line CmdtoolError; no other exception type, no hang (an alarm guards each case)."""
    write_checkpoints(tmp_path / "pt", n_epochs=1)
    write_checkpoints(tmp_path / "st", n_epochs=1, fmt="safetensors")
    sources = [tmp_path / "pt" / "epoch_1.pt", tmp_path / "st" / "epoch_1.safetensors"]
    rng = np.random.default_rng(1234)
    outcomes = {"ingested": 0, "refused": 0}

    def on_alarm(signum, frame):
        raise TimeoutError("fuzz case hung")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    try:
        for case, suffix, data in _fuzz_cases(rng, sources, 300):
            folder = tmp_path / f"case{case}"
            folder.mkdir()
            (folder / f"epoch_1{suffix}").write_bytes(data)
            signal.alarm(10)
            try:
                cmdtool.ingest([folder], folder / "s.zarr")
                outcomes["ingested"] += 1
            except CmdtoolError as exc:
                assert "\n" not in str(exc) and "epoch_1" in str(exc), str(exc)
                assert not (folder / "s.zarr").exists()
                outcomes["refused"] += 1
            finally:
                signal.alarm(0)
    finally:
        signal.signal(signal.SIGALRM, previous)
    assert outcomes["refused"] > 100 and outcomes["ingested"] + outcomes["refused"] == 300


def test_safetensors_header_that_lies_about_sizes(tmp_path):
    import json
    import struct

    save_file({"w": torch.arange(6, dtype=torch.float32)}, str(tmp_path / "epoch_1.safetensors"))
    data = (tmp_path / "epoch_1.safetensors").read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    header["w"]["shape"] = [600]  # claims 2400 bytes, holds 24
    raw = json.dumps(header).encode()
    raw += b" " * ((8 - len(raw) % 8) % 8)
    (tmp_path / "epoch_1.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])
    with pytest.raises(CmdtoolError, match="epoch_1.safetensors"):
        cmdtool.ingest([tmp_path / "epoch_1.safetensors"], tmp_path / "s.zarr")
    assert not (tmp_path / "s.zarr").exists()


def _sharded(folder, weight_map):
    import json

    folder.mkdir(parents=True)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def test_index_naming_a_missing_shard(tmp_path):
    _sharded(tmp_path / "checkpoint-1", {"w": "model-00001.safetensors"})
    with pytest.raises(CmdtoolError, match="shard 'model-00001.safetensors' is missing"):
        cmdtool.ingest([tmp_path], tmp_path / "s.zarr")


def test_index_pointing_outside_its_folder_is_refused(tmp_path):
    save_file({"w": torch.zeros(3)}, str(tmp_path / "outside.safetensors"))
    _sharded(tmp_path / "run" / "checkpoint-1", {"w": "../../outside.safetensors"})
    with pytest.raises(CmdtoolError, match="outside the checkpoint folder; refused"):
        cmdtool.ingest([tmp_path / "run"], tmp_path / "s.zarr")


def test_symlinked_exploit_is_refused_too(tmp_path):
    from test_bad_input import Exploit

    marker = tmp_path / "pwned"
    torch.save({"w": Exploit(marker)}, tmp_path / "payload.bin")
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "epoch_1.pt").symlink_to(tmp_path / "payload.bin")
    with pytest.raises(CmdtoolError, match="refused"):
        cmdtool.ingest([tmp_path / "ck"], tmp_path / "s.zarr")
    assert not marker.exists()


def test_disk_full_mid_ingest_fails_cleanly_and_keeps_the_store_usable(tmp_path, monkeypatch):
    import errno

    import zarr.storage._local as local

    write_checkpoints(tmp_path / "ck", n_epochs=10)
    for epoch in range(5, 11):
        (tmp_path / "ck" / f"epoch_{epoch}.pt").rename(tmp_path / f"later_{epoch}.pt")
    cmdtool.ingest([tmp_path / "ck"], tmp_path / "s.zarr", memory_budget=2 * 1506 * 4)
    before = np.concatenate([b.data for b in cmdtool.open_store(tmp_path / "s.zarr").iter_blocks()])
    for epoch in range(5, 11):
        (tmp_path / f"later_{epoch}.pt").rename(tmp_path / "ck" / f"epoch_{epoch}.pt")

    real_put, calls = local._put, {"n": 0}

    def put_until_full(path, value, exclusive=False):
        calls["n"] += 1
        if calls["n"] > 3 and "c" in path.parts:  # chunk writes fail after a few: the disk is full
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_put(path, value, exclusive=exclusive)

    monkeypatch.setattr(local, "_put", put_until_full)
    result = CliRunner().invoke(app, ["ingest", str(tmp_path / "ck"), "--store", str(tmp_path / "s.zarr"),
                                      "--memory-budget", str(2 * 1506 * 4)])
    monkeypatch.setattr(local, "_put", real_put)
    assert result.exit_code == 1, result.output
    assert "No space left on device" in result.output and "Traceback" not in result.output
    store = cmdtool.open_store(tmp_path / "s.zarr")
    assert store.labels.tolist() == [1, 2, 3, 4]
    np.testing.assert_array_equal(np.concatenate([b.data for b in store.iter_blocks()]), before)
    assert verify_store(store).ok
    cmdtool.ingest([tmp_path / "ck"], tmp_path / "s.zarr")  # space again: the append completes
    assert cmdtool.open_store(tmp_path / "s.zarr").labels.tolist() == list(range(1, 11))
