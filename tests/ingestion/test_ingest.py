"""Ingest: exact values for every format, ordering and labels, append, resume after SIGKILL, the lock."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import cmdtool
from cmdtool.errors import StoreLockedError, UsageError
from cmdtool.ingestion import discover, parse_label
from cmdtool.store import format as fmt
from cmdtool.store.lock import file_lock
from cmdtool.store.lock import lock_path

from tests.conftest import kill_after, release, spawn_waiting_child, write_checkpoints


def dense_from_states(states, names=None) -> np.ndarray:
    """Reference W: float32 values of every floating tensor, in ``names`` order (default: state-dict order),
    one column per checkpoint."""
    names = names or [k for k, v in states[0].items() if v.is_floating_point()]
    cols = [torch.cat([s[name].to(torch.float32).reshape(-1) for name in names]) for s in states]
    return torch.stack(cols, dim=1).numpy()


def read_all(store) -> np.ndarray:
    return np.concatenate([b.data for b in store.iter_blocks()], axis=0)


@pytest.mark.parametrize("fmt_name", ["pt", "pth", "bin", "ckpt", "safetensors"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_values_equal_checkpoints_exactly(tmp_path, fmt_name, dtype):
    states = write_checkpoints(tmp_path / "ck", n_epochs=5, dtype=dtype, fmt=fmt_name)
    report = cmdtool.ingest([tmp_path / "ck"], tmp_path / "s.zarr")
    store = cmdtool.open_store(tmp_path / "s.zarr")
    assert report.added == [1, 2, 3, 4, 5]
    names = [e.name for e in store.layout.trajectory_entries]
    if fmt_name != "safetensors":  # safetensors keeps no insertion order; its keys come sorted
        assert names == [k for k, v in states[0].items() if v.is_floating_point()]
    assert store.shape == (dense_from_states(states).shape[0], 5)
    np.testing.assert_array_equal(read_all(store), dense_from_states(states, names))
    # integers are kept aside per checkpoint (BatchNorm's num_batches_tracked counts 1, 2, 3, ...)
    assert [int(store.read_integer_column(c)[0]) for c in range(5)] == [1, 2, 3, 4, 5]
    entry = store.layout.by_name()["0.weight"]
    assert entry.dtype == str(dtype).removeprefix("torch.") and entry.shape == (4, 1, 3, 3)
    assert store.layout.by_name()["1.running_mean"].kind == "buffer"


@pytest.mark.parametrize("shard_format", ["safetensors", "bin"])
def test_sharded_folder_is_one_checkpoint(tmp_path, shard_format):
    states = []
    for epoch in (1, 2, 3):
        torch.manual_seed(epoch)
        state = {"a.weight": torch.randn(3, 4), "b.weight": torch.randn(5), "c.bias": torch.randn(2)}
        states.append(state)
        folder = tmp_path / "run" / f"checkpoint-{epoch}"
        folder.mkdir(parents=True)
        part1, part2 = {"a.weight": state["a.weight"]}, {"b.weight": state["b.weight"], "c.bias": state["c.bias"]}
        names = [f"model-0000{i}-of-00002.{shard_format}" for i in (1, 2)]
        for part, name in zip((part1, part2), names):
            save_file(part, str(folder / name)) if shard_format == "safetensors" else torch.save(part, folder / name)
        weight_map = {"a.weight": names[0], "b.weight": names[1], "c.bias": names[1]}
        (folder / f"model.{shard_format}.index.json").write_text(json.dumps({"weight_map": weight_map}))
    report = cmdtool.ingest([tmp_path / "run"], tmp_path / "s.zarr")
    assert report.added == [1, 2, 3]
    store = cmdtool.open_store(tmp_path / "s.zarr")
    assert [e.name for e in store.layout.entries] == ["a.weight", "b.weight", "c.bias"]
    np.testing.assert_array_equal(read_all(store), dense_from_states(states))


def test_natural_order_and_default_label_rule(tmp_path):
    for name in ["epoch_10", "epoch_2", "epoch_1"]:
        torch.save({"w": torch.zeros(3)}, tmp_path / f"{name}.pt")
    found = discover([tmp_path])
    assert [s.label for s in found.sources] == [1, 2, 10]
    assert parse_label("epoch=3-step=400") == 3          # Lightning names: the epoch wins
    assert parse_label("checkpoint-step500") == 500
    assert parse_label("run7_ckpt_0042") == 42           # else the last number
    assert parse_label("ep12_x", r"ep(\d+)") == 12       # a user pattern overrides
    assert parse_label("final") is None


def test_label_pattern_and_positions(tmp_path):
    for name in ["a", "b", "c"]:
        torch.save({"w": torch.zeros(3)}, tmp_path / f"model_{name}.pt")
    assert [s.label for s in discover([tmp_path]).sources] == [0, 1, 2]  # no numbers: positions
    (tmp_path / "model_d7.pt").write_bytes((tmp_path / "model_a.pt").read_bytes())
    # beside a numbered file, unnumbered ones are skipped with a note naming them (aliases such as last.ckpt)
    found = discover([tmp_path])
    assert [s.label for s in found.sources] == [7]
    assert [note.split(":")[0] for note in found.skipped] == [str(tmp_path / f"model_{n}.pt") for n in "abc"]
    # named one by one, an unnumbered file is an error that says how to label it
    with pytest.raises(UsageError, match="cannot read an epoch label .* pass --label-pattern REGEX or --set-label"):
        discover([tmp_path / "model_a.pt", tmp_path / "model_d7.pt"])
    sources = discover([tmp_path / "model_d7.pt"], label_pattern=r"d(\d)").sources
    assert sources[0].label == 7


def test_duplicate_labels_refused(tmp_path):
    torch.save({"w": torch.zeros(3)}, tmp_path / "epoch_1.pt")
    torch.save({"w": torch.ones(3)}, tmp_path / "epoch-1.pth")
    with pytest.raises(UsageError, match="duplicate epoch label 1"):
        cmdtool.ingest([tmp_path], tmp_path / "s.zarr")
    assert not (tmp_path / "s.zarr").exists()
    # the same content under two names is one checkpoint: the second is skipped as the first
    torch.save({"w": torch.zeros(3)}, tmp_path / "epoch-1.pth")
    report = cmdtool.ingest([tmp_path], tmp_path / "s.zarr")
    assert report.added == [1] and report.skipped == [
        f"{tmp_path / 'epoch_1.pt'}: the same content as {tmp_path / 'epoch-1.pth'} (epoch 1); skipped as that "
        f"checkpoint"]


def test_non_checkpoint_files_are_skipped_with_a_note(tmp_path):
    write_checkpoints(tmp_path, n_epochs=2)
    (tmp_path / "README.txt").write_text("notes")
    (tmp_path / "optimizer_state.json").write_text("{}")
    report = cmdtool.ingest([tmp_path], tmp_path / "s.zarr")
    assert report.added == [1, 2]
    assert len(report.skipped) == 2 and all("skipped" in note for note in report.skipped)


def test_append_adds_only_new_checkpoints(tmp_path):
    states = write_checkpoints(tmp_path / "ck", n_epochs=9)
    for epoch in range(6, 10):  # pretend training has not reached epochs 6..9 yet
        (tmp_path / "ck" / f"epoch_{epoch}.pt").rename(tmp_path / f"later_{epoch}.pt")
    first = cmdtool.ingest([tmp_path / "ck"], tmp_path / "s.zarr", memory_budget="8KiB")
    assert first.added == [1, 2, 3, 4, 5]
    for epoch in range(6, 10):
        (tmp_path / f"later_{epoch}.pt").rename(tmp_path / "ck" / f"epoch_{epoch}.pt")
    second = cmdtool.ingest([tmp_path / "ck"], tmp_path / "s.zarr", memory_budget="8KiB")
    assert second.added == [6, 7, 8, 9] and second.unchanged == [1, 2, 3, 4, 5]
    store = cmdtool.open_store(tmp_path / "s.zarr")
    np.testing.assert_array_equal(read_all(store), dense_from_states(states))
    third = cmdtool.ingest([tmp_path / "ck"], tmp_path / "s.zarr")
    assert third.added == [] and len(third.unchanged) == 9


def test_changed_content_is_an_error_unless_forced(tmp_path):
    states = write_checkpoints(tmp_path / "ck", n_epochs=4)
    cmdtool.ingest([tmp_path / "ck"], tmp_path / "s.zarr")
    changed = {k: (v + 1 if v.is_floating_point() else v) for k, v in states[1].items()}
    time.sleep(0.01)
    torch.save(changed, tmp_path / "ck" / "epoch_2.pt")
    with pytest.raises(UsageError, match="content changed since epoch 2"):
        cmdtool.ingest([tmp_path / "ck"], tmp_path / "s.zarr")
    report = cmdtool.ingest([tmp_path / "ck"], tmp_path / "s.zarr", force=True)
    assert report.replaced == [2]
    states[1] = changed
    np.testing.assert_array_equal(read_all(cmdtool.open_store(tmp_path / "s.zarr")), dense_from_states(states))


def test_epoch_before_the_last_is_refused(tmp_path):
    write_checkpoints(tmp_path / "ck", n_epochs=3, name="epoch_{e}0")   # epochs 10, 20, 30
    cmdtool.ingest([tmp_path / "ck"], tmp_path / "s.zarr")
    torch.save(torch.load(tmp_path / "ck" / "epoch_10.pt"), tmp_path / "ck" / "epoch_15.pt")
    with pytest.raises(UsageError, match="falls before the store's last epoch 30"):
        cmdtool.ingest([tmp_path / "ck"], tmp_path / "s.zarr")


def test_include_exclude_and_no_buffers(tmp_path):
    write_checkpoints(tmp_path / "ck", n_epochs=2)
    cmdtool.ingest([tmp_path / "ck"], tmp_path / "a.zarr", exclude=("4.*",), buffers=False)
    store = cmdtool.open_store(tmp_path / "a.zarr")
    roles = {e.name: e.role for e in store.layout.entries}
    assert roles["4.weight"] == "excluded" and roles["1.running_mean"] == "excluded"
    assert roles["0.weight"] == "trajectory" and store.n_rows == 36 + 4 + 4 + 4
    cmdtool.ingest([tmp_path / "ck"], tmp_path / "b.zarr", include=("0.*",))
    assert cmdtool.open_store(tmp_path / "b.zarr").n_rows == 40
    with pytest.raises(UsageError, match="was created with"):
        cmdtool.ingest([tmp_path / "ck"], tmp_path / "a.zarr", exclude=("0.*",))


def test_nan_and_inf_are_stored_and_counted(tmp_path):
    states = write_checkpoints(tmp_path / "ck", n_epochs=3)
    states[1]["4.weight"][0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    torch.save(states[1], tmp_path / "ck" / "epoch_2.pt")
    report = cmdtool.ingest([tmp_path / "ck"], tmp_path / "s.zarr")
    assert report.nonfinite == {2: 3}
    store = cmdtool.open_store(tmp_path / "s.zarr")
    assert [r.nonfinite for r in store.time_axis] == [0, 3, 0]
    np.testing.assert_array_equal(read_all(store), dense_from_states(states))  # NaN == NaN in assert_array_equal


def test_second_writer_is_stopped_with_a_message(tmp_path):
    write_checkpoints(tmp_path / "ck", n_epochs=2)
    cmdtool.ingest([tmp_path / "ck"], tmp_path / "s.zarr")
    with file_lock(lock_path(tmp_path / "s.zarr", fmt.INGEST_LOCK), "test holder"):
        with pytest.raises(StoreLockedError, match="in use by another cmdtool process"):
            cmdtool.ingest([tmp_path / "ck"], tmp_path / "s.zarr")


def test_memory_budget_sets_chunk_columns(tmp_path):
    write_checkpoints(tmp_path / "ck", n_epochs=6)
    cmdtool.ingest([tmp_path / "ck"], tmp_path / "s.zarr", memory_budget=8 * 1506 * 4)  # two buffers of 4
    assert cmdtool.open_store(tmp_path / "s.zarr").chunk_shape[1] == 4


KILL_SCRIPT = """
import sys, cmdtool
import torch  # reads the .pt checkpoints: imported before "ready", so that kill points land in the ingest
print("ready", flush=True)
sys.stdin.readline()
cmdtool.ingest([sys.argv[1]], sys.argv[2], memory_budget=sys.argv[3])
"""


def _store_values(store_path):
    store = cmdtool.open_store(store_path)
    return store.labels.tolist(), read_all(store), [r.digest for r in store.time_axis]


def committed_checkpoints(store_path) -> int:
    try:
        return len(json.loads((store_path / "zarr.json").read_text())["attributes"]["cmdtool"]["time_axis"])
    except (OSError, ValueError, KeyError):
        return 0


def kill_when(proc, store_path, committed: int, extra_delay: float) -> None:
    """SIGKILL the child once the store lists ``committed`` checkpoints (0: right away), after a short delay."""
    deadline = time.monotonic() + 60
    while committed and committed_checkpoints(store_path) < committed and proc.poll() is None:
        assert time.monotonic() < deadline, "child made no progress"
        time.sleep(0.0005)
    kill_after(proc, extra_delay)


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Linear(256, 64))
    write_checkpoints(tmp_path / "ck", n_epochs=40, model=model)
    budget = str(3 * 33_088 * 4)  # three checkpoints per flush: 14 commit points
    cmdtool.ingest([tmp_path / "ck"], tmp_path / "reference.zarr", memory_budget=budget)
    reference = _store_values(tmp_path / "reference.zarr")
    rng = np.random.default_rng(0)
    # kill points: during the preflight / first buffer (0), and just after random commits
    targets = [0] + sorted(int(x) for x in rng.integers(1, 37, 7))
    children = [spawn_waiting_child(KILL_SCRIPT, tmp_path / "ck", tmp_path / f"killed{i}.zarr", budget)
                for i in range(len(targets))]  # their imports overlap
    for attempt, (target, proc) in enumerate(zip(targets, children)):
        store_path = tmp_path / f"killed{attempt}.zarr"
        release(proc)
        kill_when(proc, store_path, target, extra_delay=float(rng.uniform(0, 0.005)))
        if target:
            assert committed_checkpoints(store_path) >= target  # killed after that commit
        cmdtool.ingest([tmp_path / "ck"], store_path, memory_budget=budget)  # resume
        labels, values, hashes = _store_values(store_path)
        assert labels == reference[0] == list(range(1, 41))
        np.testing.assert_array_equal(values, reference[1])
        assert hashes == reference[2]


def test_narrow_chunks_of_a_first_ingest_keep_blocks_small_after_appends(tmp_path, monkeypatch):
    """A store whose first ingest brings 3 checkpoints of a model too big for more than one chunk column (Tc = 1)
    gets chunk rows sized for fmt.PLANNED_CHECKPOINTS columns, not for 3: a row block is whole chunk rows over
    every column, so rows sized for 3 would make the smallest block 50x the read block once 150 are appended."""
    monkeypatch.setattr(fmt, "READ_BLOCK_BYTES", 4 * fmt.PLANNED_CHECKPOINTS * 1000)  # rows capped at 1,000
    states = [{"w": torch.randn(20_000)} for _ in range(3)]
    (tmp_path / "ck").mkdir()
    for epoch, state in enumerate(states, 1):
        torch.save(state, tmp_path / "ck" / f"epoch_{epoch}.pt")
    cmdtool.ingest([tmp_path / "ck"], tmp_path / "s.zarr", memory_budget=8 * 20_000)
    store = cmdtool.open_store(tmp_path / "s.zarr")
    assert store.chunk_shape == (1000, 1), store.chunk_shape
    np.testing.assert_array_equal(read_all(store), dense_from_states(states))
