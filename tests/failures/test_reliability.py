"""Corruption detection, fuzzed checkpoint files, read-only locations, concurrent readers."""

from __future__ import annotations

import os
import signal
import stat
import time

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

import cmdtool
from cmdtool.errors import CmdtoolError, CorruptionError
from cmdtool.store.verify import verify_store
from cmdtool_cli.app import app

from tests.conftest import write_checkpoints


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


@pytest.mark.slow
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
    from tests.failures.test_bad_input import Exploit

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


# ------------------------------------------------------------------ a user's files are never touched (issue 10)
def _decomposed(tmp_path):
    """A store ingested from tmp_path/ck with a small CMD result (enough for report, export and reconstruct)."""
    from cmdtool.analyzers.cmd.posthoc import PosthocCMD

    write_checkpoints(tmp_path / "ck", n_epochs=6)
    cmdtool.ingest([tmp_path / "ck"], tmp_path / "s.zarr")
    store = cmdtool.open_store(tmp_path / "s.zarr", mode="r+")
    PosthocCMD(modes=2, samples=60).fit(store).save("default")
    return store


def _invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def _one_line_error(result, *needles, code=2):
    lines = result.output.strip().splitlines()
    assert result.exit_code == code and len(lines) == 1 and lines[0].startswith("error:"), result.output
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_report_out_never_deletes_a_users_folder(tmp_path):
    from tests.failures.test_bad_input import tree_digest

    store = _decomposed(tmp_path)
    mine = tmp_path / "mine"
    (mine / "sub").mkdir(parents=True)
    (mine / "notes.txt").write_text("my notes")
    (mine / "sub" / "weights.pt").write_bytes(b"precious")
    before = tree_digest(mine)
    _one_line_error(_invoke("report", "--store", store.path, "--out", mine), "cmdtool did not write", "--force")
    assert tree_digest(mine) == before and not list(tmp_path.glob(".cmdtool-partial-*"))
    # --force writes the report beside the user's files, replacing none of them; reruns need no --force
    assert _invoke("report", "--store", store.path, "--out", mine, "--force").exit_code == 0
    assert _invoke("report", "--store", store.path, "--out", mine, "--format", "svg", "-q").exit_code == 0
    after = tree_digest(mine)
    assert {k: after[k] for k in before} == before
    assert (mine / "index.html").is_file() and list(mine.glob("*.svg"))
    assert not list(mine.glob("*.png"))  # the first run's own figures are replaced, the user's files are not
    # a user's file of a name the report writes, put into a report folder, is not overwritten either
    (mine / "index.html").write_text("the user's own page")
    _one_line_error(_invoke("report", "--store", store.path, "--out", mine), "index.html")
    assert (mine / "index.html").read_text() == "the user's own page"


def test_report_out_at_the_store_or_a_source_folder_is_refused_even_with_force(tmp_path, monkeypatch):
    from tests.failures.test_bad_input import tree_digest

    store = _decomposed(tmp_path)
    before, sources = tree_digest(store.path), tree_digest(tmp_path / "ck")
    for out in (store.path, store.path / "results", tmp_path / "ck", tmp_path / "ck" / "report"):
        for force in ((), ("--force",)):
            _one_line_error(_invoke("report", "--store", store.path, "--out", out, *force), "cmdtool never writes")
    assert tree_digest(store.path) == before and tree_digest(tmp_path / "ck") == sources
    # `--out .` beside the store: refused as a folder cmdtool did not write; with --force the report goes in
    # beside the store, which is left byte for byte as it was (it used to be renamed away, or half-moved)
    monkeypatch.chdir(tmp_path)
    _one_line_error(_invoke("report", "--store", "s.zarr", "--out", "."), "cmdtool did not write")
    assert _invoke("report", "--store", "s.zarr", "--out", ".", "--force").exit_code == 0
    assert (tmp_path / "index.html").is_file() and tree_digest(store.path) == before
    assert verify_store(cmdtool.open_store(tmp_path / "s.zarr")).ok


def test_export_landscape_reconstruct_follow_the_same_rule(tmp_path):
    from cmdtool.utils.output_folder import MARKER, OutputFolder

    store = _decomposed(tmp_path)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    _one_line_error(_invoke("export", "--store", store.path, "--out", mine), "cmdtool did not write")
    _one_line_error(_invoke("reconstruct", "--store", store.path, "-e", 6, "--out", mine), "cmdtool did not write")
    with pytest.raises(CmdtoolError, match="cmdtool did not write"):  # landscape saves through the same rule
        OutputFolder(mine, "landscape", store=store)
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    # reconstruct onto a source checkpoint: refused (exit 2), the checkpoint unchanged, --force or not
    source = tmp_path / "ck" / "epoch_3.pt"
    data = source.read_bytes()
    for force in ((), ("--force",)):
        _one_line_error(_invoke("reconstruct", "--store", store.path, "-e", 3, "--out", source, *force),
                        "is the source checkpoint of epoch 3")
    assert source.read_bytes() == data
    # a file the user owns needs --force; a folder cmdtool wrote takes more epochs without it
    (tmp_path / "theirs.pt").write_bytes(b"x")
    _one_line_error(_invoke("reconstruct", "--store", store.path, "-e", 6, "--out", tmp_path / "theirs.pt"),
                    "cmdtool did not write it")
    assert _invoke("reconstruct", "--store", store.path, "-e", 5, "--out", tmp_path / "rec").exit_code == 0
    assert _invoke("reconstruct", "--store", store.path, "-e", 6, "--out", tmp_path / "rec").exit_code == 0
    assert sorted(p.name for p in (tmp_path / "rec").iterdir()) == [
        MARKER, "cmd_default_epoch5.pt", "cmd_default_epoch6.pt"]


INTERRUPT_SCRIPT = """
import sys
import torch  # reads the .pt checkpoints: imported before "ready", so that interrupts land in the ingest
from cmdtool_cli.app import main
print("ready", flush=True)
sys.stdin.readline()
sys.argv = ["cmdtool", "ingest", sys.argv[1], "--store", sys.argv[2], "--memory-budget", sys.argv[3]]
main()
"""


@pytest.mark.slow
@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_interrupted_ingest_keeps_every_commit_and_resumes(tmp_path, signame):
    """Ctrl-C (or SIGTERM) during a first ingest used to delete the whole store, commits and all. Now it leaves
    what a SIGKILL would: every committed checkpoint, nothing half-deleted, no asyncio noise; a rerun completes
    the store and equals an uninterrupted ingest. Kill points: before the first commit, after random commits of
    a first ingest, and during an append."""
    from tests.conftest import release, spawn_waiting_child
    from tests.ingestion.test_ingest import _store_values, committed_checkpoints

    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Linear(256, 64))
    write_checkpoints(tmp_path / "ck", n_epochs=30, model=model)
    budget = str(3 * 33_088 * 4)  # three checkpoints per commit
    cmdtool.ingest([tmp_path / "ck"], tmp_path / "reference.zarr", memory_budget=budget)
    reference = _store_values(tmp_path / "reference.zarr")
    appended = tmp_path / "appended.zarr"
    cmdtool.ingest([tmp_path / "ck" / f"epoch_{e}.pt" for e in range(1, 10)], appended, memory_budget=budget)
    rng = np.random.default_rng(1 if signame == "SIGINT" else 2)
    cases = [(tmp_path / "first0.zarr", 0)] + [(tmp_path / f"first{i}.zarr", int(rng.integers(1, 25)))
                                                for i in (1, 2)] + [(appended, 15)]
    children = [spawn_waiting_child(INTERRUPT_SCRIPT, tmp_path / "ck", path, budget) for path, _ in cases]
    for (path, target), proc in zip(cases, children):
        release(proc)
        deadline = time.monotonic() + 60
        while target and committed_checkpoints(path) < target and proc.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.001)
        proc.send_signal(getattr(signal, signame))
        out, _ = proc.communicate(timeout=60)
        if proc.returncode not in (0, -getattr(signal, signame)):  # 0: it finished before the signal
            assert proc.returncode == (130 if signame == "SIGINT" else 143), out
        if target:
            assert committed_checkpoints(path) >= target  # committed work survived the interrupt
        cmdtool.ingest([tmp_path / "ck"], path, memory_budget=budget)  # the next run accepts what is there
        labels, values, hashes = _store_values(path)
        assert labels == reference[0] and hashes == reference[2]
        np.testing.assert_array_equal(values, reference[1])
        assert verify_store(cmdtool.open_store(path)).ok


def test_interrupt_message_is_one_line_without_asyncio_noise(tmp_path):
    """The CLI's own stderr on SIGINT: the one line, no traceback, no "Task was destroyed"."""
    import subprocess

    from tests.conftest import release, spawn_waiting_child

    write_checkpoints(tmp_path / "ck", n_epochs=400, model=torch.nn.Linear(128, 128))
    proc = spawn_waiting_child(INTERRUPT_SCRIPT, tmp_path / "ck", tmp_path / "s.zarr", 2 * 16512 * 4,
                               stderr=subprocess.PIPE)
    from tests.ingestion.test_ingest import committed_checkpoints

    release(proc)
    while committed_checkpoints(tmp_path / "s.zarr") < 20 and proc.poll() is None:
        time.sleep(0.001)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.strip().splitlines() == ["interrupted; committed work is kept, run the command again to resume"]
    assert cmdtool.open_store(tmp_path / "s.zarr").n_checkpoints >= 20


# ------------------------------------------------------------------ every reader, damaged, through the CLI
def _small_state(seed):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.LayerNorm(6), torch.nn.Linear(6, 3))
    return {k: v.clone() for k, v in model.state_dict().items()}


def _write_reader_layout(kind, folder, epoch):
    """One checkpoint of epoch ``epoch`` in the layout ``kind`` under ``folder``; returns the files a damage can
    hit (every file the reader opens)."""
    import json
    import warnings
    from pathlib import Path

    state = _small_state(epoch)
    if kind == "pt":
        torch.save(state, folder / f"epoch_{epoch}.pt")
        return [folder / f"epoch_{epoch}.pt"]
    if kind == "ckpt":  # Lightning's container, with a pathlib hyperparameter
        torch.save({"state_dict": state, "epoch": epoch, "pytorch-lightning_version": "2.6.0",
                    "hyper_parameters": {"data_dir": Path("/data")}}, folder / f"epoch={epoch}-step={epoch}.ckpt")
        return [folder / f"epoch={epoch}-step={epoch}.ckpt"]
    if kind == "safetensors":
        save_file(state, str(folder / f"epoch_{epoch}.safetensors"))
        return [folder / f"epoch_{epoch}.safetensors"]
    if kind == "bin":  # an HF Trainer folder with pytorch_model.bin
        (folder / f"checkpoint-{epoch}").mkdir()
        torch.save(state, folder / f"checkpoint-{epoch}" / "pytorch_model.bin")
        return [folder / f"checkpoint-{epoch}" / "pytorch_model.bin"]
    if kind in ("sharded", "sharded-bin"):
        sub = folder / f"checkpoint-{epoch}"
        sub.mkdir()
        names = list(state)
        suffix, base = (".safetensors", "model") if kind == "sharded" else (".bin", "pytorch_model")
        shards = {f"{base}-0000{k + 1}-of-00002{suffix}": names[k::2] for k in range(2)}
        for shard, keys in shards.items():
            part = {key: state[key] for key in keys}
            save_file(part, str(sub / shard)) if kind == "sharded" else torch.save(part, sub / shard)
        index = sub / f"{base}{suffix}.index.json"
        index.write_text(json.dumps({"metadata": {}, "weight_map": {k: s for s, ks in shards.items() for k in ks}}))
        return [index, *(sub / shard for shard in shards)]
    if kind == "deepspeed":
        sub = folder / f"global_step{epoch}"
        sub.mkdir()
        torch.save({"module": state, "param_shapes": [{k: v.shape for k, v in state.items()}]},
                   sub / "mp_rank_00_model_states.pt")
        return [sub / "mp_rank_00_model_states.pt"]
    if kind == "dcp":
        import torch.distributed.checkpoint as dcp

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.save({"model": state}, checkpoint_id=str(folder / f"epoch_{epoch}"), no_dist=True)
        return [folder / f"epoch_{epoch}" / ".metadata", folder / f"epoch_{epoch}" / "__0_0.distcp"]
    raise AssertionError(kind)


def _damages(size):
    """(name, function of the bytes) for a file of ``size`` bytes: truncations at several offsets (0 bytes
    included) must always be refused; flipped bytes may hit tensor data that no format checks (ingested)."""
    cuts = [("empty", lambda d: b"")] + [(f"cut@{at}", lambda d, at=at: d[:at])
                                         for at in sorted({1, 8, size // 3, size // 2, size - 1}) if 0 < at < size]
    flips = [(f"flip@{at}", lambda d, at=at: d[:at] + bytes([d[at] ^ 0xFF]) + d[at + 1:])
             for at in sorted({0, 9, size // 4, size // 2, size - 2})]
    return cuts, flips


READERS = ("pt", "ckpt", "safetensors", "bin", "sharded", "sharded-bin", "deepspeed", "dcp")


@pytest.mark.parametrize("kind", READERS)
def test_every_reader_refuses_a_damaged_file_in_one_line_and_writes_nothing(tmp_path, kind):
    """Through `cmdtool ingest`: a run whose epoch 1 is in the store and whose epoch 2 is damaged (each file
    that reader opens; truncated, emptied or with a byte flipped). A truncation is always one stderr line naming
    the file, exit 2, and the store byte for byte as before; a flipped byte is either that or (in tensor data,
    which none of these formats checksums) an ingest."""
    import shutil

    from tests.failures.test_bad_input import tree_digest

    template = tmp_path / "template"
    template.mkdir()
    _write_reader_layout(kind, template, 1)
    result = _invoke("ingest", template, "--store", tmp_path / "base.zarr", "-q")
    assert result.exit_code == 0, result.output
    before = tree_digest(tmp_path / "base.zarr")
    files = _write_reader_layout(kind, template, 2)
    outcomes = {"refused": 0, "ingested": 0}
    for index, target in enumerate(files):
        data = target.read_bytes()
        cuts, flips = _damages(len(data))
        for name, damage in cuts + flips:
            case = tmp_path / f"{index}-{name}"
            shutil.copytree(template, case / "run")
            shutil.copytree(tmp_path / "base.zarr", case / "s.zarr")
            damaged = case / "run" / target.relative_to(template)
            damaged.write_bytes(damage(data))
            result = _invoke("ingest", case / "run", "--store", case / "s.zarr", "-q")
            if result.exit_code == 0 and name.startswith("flip"):
                outcomes["ingested"] += 1
                continue
            lines = result.stderr.strip().splitlines()
            assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error:"), \
                (kind, name, damaged, result.output)
            assert str(damaged) in lines[0] or (damaged.name == ".metadata" and str(damaged.parent) in lines[0]), \
                (kind, name, lines[0])
            assert tree_digest(case / "s.zarr") == before, (kind, name)
            outcomes["refused"] += 1
            shutil.rmtree(case)
    assert outcomes["refused"] >= len(files) * 4, outcomes
