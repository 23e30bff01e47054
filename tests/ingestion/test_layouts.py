"""Checkpoint folders laid out the way common trainers write them (docs/formats.md), built with the real torch,
safetensors and torch.distributed.checkpoint writers from a small model trained a few real optimizer steps
between saves: labels, which files are taken or skipped, values equal to the source, and a reconstruction from
the store that loads with ``load_state_dict(strict=True)``."""

from __future__ import annotations

import argparse
import enum
import json
import random
from collections import OrderedDict, namedtuple

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

import cmdtool
from cmdtool.errors import CheckpointError, UsageError
from cmdtool.ingestion.checkpoints import build_state_dict
from cmdtool_cli.app import app


class TrainingArguments:
    """Stands for transformers' TrainingArguments: a pickled class that must never be unpickled."""

    def __init__(self):
        self.output_dir, self.learning_rate = "run", 1e-3


def tiny_model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.BatchNorm1d(12), torch.nn.ReLU(),
                               torch.nn.Linear(12, 3))


class Trainer:
    """A real training loop: AdamW on a fixed regression batch, a few steps between saves."""

    def __init__(self, seed: int = 0, model: torch.nn.Module | None = None):
        torch.manual_seed(seed)
        self.model = model or tiny_model()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=0.05)
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=5)
        self.x, self.y = torch.randn(32, 6), torch.randn(32, 3)
        self.step = 0

    def train(self, steps: int = 3) -> dict[str, torch.Tensor]:
        self.model.train()
        for _ in range(steps):
            self.optimizer.zero_grad()
            torch.nn.functional.mse_loss(self.model(self.x), self.y).backward()
            self.optimizer.step()
            self.scheduler.step()
            self.step += 1
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}


def assert_store_equals(store_path, states: dict[int, dict], strip: str = "", model_factory=tiny_model):
    """Labels, tensors and values as the sources; every column rebuilt from the store loads strictly. The key
    order is the source's, except for safetensors, which keeps none (its keys come sorted)."""
    store = cmdtool.open_store(store_path)
    assert store.labels.tolist() == sorted(states)
    for column, label in enumerate(store.labels.tolist()):
        rebuilt = build_state_dict(store, store.read_column(column), column)
        source = {k.removeprefix(strip): v for k, v in states[label].items()}
        sort = sorted if store.time_axis[column].source.endswith(".safetensors") else list
        assert list(rebuilt) == sort(source)
        for name, tensor in source.items():
            assert rebuilt[name].dtype == tensor.dtype
            torch.testing.assert_close(rebuilt[name], tensor, rtol=0, atol=0)
        model_factory().load_state_dict(rebuilt, strict=True)
    return store


# ------------------------------------------------------------------------------------------ Hugging Face
def write_hf_run(run, steps=(2, 4, 6), final=True):
    """transformers.Trainer output: checkpoint-N/ folders (model + optimizer/scheduler/RNG/args/state files)
    and, at the top, the final model saved by trainer.save_model()."""
    trainer, states = Trainer(), {}
    for step in steps:
        state = trainer.train(2)
        states[step] = state
        folder = run / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        (folder / "config.json").write_text(json.dumps({"model_type": "tiny", "hidden_size": 12}))
        torch.save(trainer.optimizer.state_dict(), folder / "optimizer.pt")
        torch.save(trainer.scheduler.state_dict(), folder / "scheduler.pt")
        torch.save({"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.get_rng_state()},
                   folder / "rng_state.pth")
        torch.save(TrainingArguments(), folder / "training_args.bin")
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step, "epoch": step / 2}))
    if final:
        save_file(trainer.train(1), str(run / "model.safetensors"), metadata={"format": "pt"})
        (run / "config.json").write_text("{}")
        torch.save(TrainingArguments(), run / "training_args.bin")
    return states


def test_hf_trainer_output_folder(tmp_path):
    states = write_hf_run(tmp_path / "run")
    report = cmdtool.ingest([tmp_path / "run"], tmp_path / "s.zarr")
    assert report.added == [2, 4, 6]
    notes = " | ".join(report.skipped)
    assert f"{tmp_path / 'run' / 'model.safetensors'}: no epoch number in" in notes and "--set-label" in notes
    assert "training_args.bin: trainer state" in notes
    store = assert_store_equals(tmp_path / "s.zarr", states)
    # the model file was read, never the optimizer/RNG/argument pickles (those would be refused)
    assert store.time_axis[0].source.endswith("checkpoint-2/model.safetensors")
    assert store.time_axis[0].extra["folder"].endswith("checkpoint-2")


def test_hf_checkpoint_folders_named_one_by_one_and_alone(tmp_path):
    states = write_hf_run(tmp_path / "run")
    folders = sorted((tmp_path / "run").glob("checkpoint-*"))  # what the shell gives for run/checkpoint-*
    assert cmdtool.ingest(folders, tmp_path / "a.zarr").added == [2, 4, 6]
    assert_store_equals(tmp_path / "a.zarr", states)
    assert cmdtool.ingest([tmp_path / "run" / "checkpoint-4"], tmp_path / "b.zarr").added == [4]
    # a folder without a number in its name: the label comes from trainer_state.json
    (tmp_path / "run" / "checkpoint-6").rename(tmp_path / "run" / "last-checkpoint")
    assert cmdtool.ingest([tmp_path / "run" / "last-checkpoint"], tmp_path / "c.zarr").added == [6]


def test_hf_final_model_taken_with_set_label_and_label_pattern_on_folders(tmp_path):
    write_hf_run(tmp_path / "run")
    final = tmp_path / "run" / "model.safetensors"
    report = cmdtool.ingest([tmp_path / "run"], tmp_path / "s.zarr", set_labels={str(final): 8})
    assert report.added == [2, 4, 6, 8]
    report = cmdtool.ingest([tmp_path / "run"], tmp_path / "p.zarr", label_pattern=r"checkpoint-(\d+)")
    assert report.added == [2, 4, 6]


def test_hf_sharded_final_model_at_the_top_is_skipped(tmp_path):
    states = write_hf_run(tmp_path / "run", final=False)
    last = states[6]
    names = list(last)
    save_file({k: last[k] for k in names[:2]}, str(tmp_path / "run" / "model-00001-of-00002.safetensors"))
    save_file({k: last[k] for k in names[2:]}, str(tmp_path / "run" / "model-00002-of-00002.safetensors"))
    weight_map = {k: f"model-0000{1 if i < 2 else 2}-of-00002.safetensors" for i, k in enumerate(names)}
    (tmp_path / "run" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    report = cmdtool.ingest([tmp_path / "run"], tmp_path / "s.zarr")
    assert report.added == [2, 4, 6]
    assert any(note.startswith(f"{tmp_path / 'run'}: no epoch number in") for note in report.skipped)


# ------------------------------------------------------------------------------------------ Lightning
def lightning_checkpoint(trainer: Trainer, epoch: int, state) -> dict:
    """What Lightning's Trainer.save_checkpoint writes (a LightningModule holding the network as self.model)."""
    return {"epoch": epoch, "global_step": trainer.step, "pytorch-lightning_version": "2.4.0",
            "state_dict": OrderedDict((f"model.{k}", v) for k, v in state.items()),
            "loops": {"fit_loop": {"epoch_progress": {"current": {"completed": epoch}}}},
            "callbacks": {"ModelCheckpoint{'monitor': None, 'mode': 'min'}": {"best_model_path": "",
                                                                              "best_model_score": None}},
            "optimizer_states": [trainer.optimizer.state_dict()], "lr_schedulers": [trainer.scheduler.state_dict()],
            "hparams_name": "kwargs", "hyper_parameters": {"lr": 0.05, "hidden": 12}}


def write_lightning_run(folder):
    trainer, states = Trainer(seed=1), {}
    folder.mkdir(parents=True)
    for epoch in range(3):
        state = trainer.train(3)
        states[epoch] = state
        torch.save(lightning_checkpoint(trainer, epoch, state), folder / f"epoch={epoch}-step={trainer.step}.ckpt")
    # a resumed run wrote epoch 1 again under Lightning's -v1 name; save_last and a best-model callback add aliases
    resumed = Trainer(seed=2)
    copy_state = resumed.train(3)
    torch.save(lightning_checkpoint(resumed, 1, copy_state), folder / "epoch=1-step=6-v1.ckpt")
    torch.save(lightning_checkpoint(trainer, 2, states[2]), folder / "last.ckpt")
    torch.save(lightning_checkpoint(trainer, 1, states[1]), folder / "best-epoch=1.ckpt")
    return states, copy_state


def test_lightning_folder_with_last_best_and_v1_copies(tmp_path):
    states, copy_state = write_lightning_run(tmp_path / "ck")
    report = cmdtool.ingest([tmp_path / "ck"], tmp_path / "s.zarr", strip_prefix=("model.",))
    assert report.added == [0, 1, 2]
    skipped = sorted(note.split(":")[0].rsplit("/", 1)[-1] for note in report.skipped)
    assert skipped == ["best-epoch=1.ckpt", "epoch=1-step=6-v1.ckpt", "last.ckpt"]
    assert_store_equals(tmp_path / "s.zarr", states)  # names without "model.": loads into the bare network
    # --skip on file names: leave out the first epoch-1 file and its best* alias, and the -v1 copy is taken
    report = cmdtool.ingest([tmp_path / "ck"], tmp_path / "v1.zarr", skip=("epoch=1-step=6.ckpt", "best*"),
                            strip_prefix=("model.",))
    assert report.added == [0, 1, 2]
    assert_store_equals(tmp_path / "v1.zarr", {**states, 1: copy_state})


# ------------------------------------------------------------------------------------------ DeepSpeed
def deepspeed_model_states(trainer: Trainer, state, module=None) -> dict:
    """The dict DeepSpeedEngine.save_checkpoint writes to mp_rank_00_model_states.pt (ZeRO 1/2)."""
    shapes = OrderedDict((k, v.shape) for k, v in trainer.model.named_parameters())
    return {"module": module if module is not None else state, "buffer_names": ["1.running_mean", "1.running_var"],
            "optimizer": None, "param_shapes": [shapes], "frozen_param_shapes": None, "shared_params": {},
            "frozen_param_fragments": None, "lr_scheduler": trainer.scheduler.state_dict(), "data_sampler": None,
            "random_ltd": None, "sparse_tensor_module_names": set(), "skipped_steps": 0,
            "global_steps": trainer.step, "global_samples": trainer.step * 32, "dp_world_size": 1,
            "mp_world_size": 1, "ds_config": {"train_batch_size": 32, "zero_optimization": {"stage": 2}},
            "ds_version": "0.15.1"}


class ZeroStage(enum.IntEnum):
    """Stands for DeepSpeed's ZeroStageEnum, pickled by reference in its partitions (never imported on reading)."""

    gradients = 2


FragmentAddress = namedtuple("FragmentAddress", "numel start")  # DeepSpeed's fragment_address


def zero_partitions(trainer: Trainer, ranks: int, paddings: list[int]) -> list[dict]:
    """What ZeRO stage 2 writes per data-parallel rank (zero_pp_rank_R_mp_rank_00_optim_states.pt): the fp32
    master weights flattened in named_parameters order, each followed by its alignment padding, cut into equal
    pieces (the end padded), beside the optimizer's own state."""
    pieces = []
    for (_, value), pad in zip(trainer.model.named_parameters(), paddings):
        pieces += [value.detach().float().reshape(-1), torch.full((pad,), 7.0)]
    flat = torch.cat(pieces)
    flat = torch.cat([flat, torch.full((-len(flat) % ranks,), 7.0)])
    size = len(flat) // ranks
    return [{"optimizer_state_dict": {
        "single_partition_of_fp32_groups": [flat[r * size:(r + 1) * size].clone()],
        "param_alignment_paddings": [paddings], "group_paddings": [0] * (ranks - 1) + [-len(flat) % ranks],
        "partition_count": [ranks], "zero_stage": ZeroStage.gradients,
        "param_slice_mappings": [OrderedDict((n, FragmentAddress(v.numel(), 0))
                                             for n, v in trainer.model.named_parameters())],
        "base_optimizer_state": trainer.optimizer.state_dict(), "loss_scaler": None}, "ds_version": "0.15.1"}
        for r in range(ranks)]


def write_deepspeed_run(run, zero3=False, ranks=2):
    trainer, states = Trainer(seed=3), {}
    paddings = [(1 + i) % 3 for i, _ in enumerate(trainer.model.parameters())]
    for _ in range(3):
        state = trainer.train(5)
        states[trainer.step] = state
        folder = run / f"global_step{trainer.step}"
        folder.mkdir(parents=True)
        module = {k: (torch.empty(0) if zero3 and k.endswith("weight") else v) for k, v in state.items()}
        torch.save(deepspeed_model_states(trainer, state, module), folder / "mp_rank_00_model_states.pt")
        for rank, partition in enumerate(zero_partitions(trainer, ranks, paddings)):
            torch.save(partition, folder / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
        (run / "latest").write_text(folder.name)
    (run / "zero_to_fp32.py").write_text("# DeepSpeed's conversion script\n")
    return states


def test_deepspeed_global_step_folders(tmp_path):
    states = write_deepspeed_run(tmp_path / "run")
    report = cmdtool.ingest([tmp_path / "run"], tmp_path / "s.zarr")
    assert report.added == [5, 10, 15]
    assert {note.split(":")[0].rsplit("/", 1)[-1] for note in report.skipped} == {"latest", "zero_to_fp32.py"}
    assert_store_equals(tmp_path / "s.zarr", states)
    pattern = cmdtool.ingest([tmp_path / "run"], tmp_path / "p.zarr", label_pattern=r"global_step(\d+)")
    assert pattern.added == [5, 10, 15]


def test_deepspeed_zero3_partitioned_weights_are_refused_with_the_conversion(tmp_path):
    write_deepspeed_run(tmp_path / "run", zero3=True)
    with pytest.raises(CheckpointError, match="ZeRO stage 3 .*zero_to_fp32.py"):
        cmdtool.ingest([tmp_path / "run"], tmp_path / "s.zarr")
    assert not (tmp_path / "s.zarr").exists()


# ------------------------------------------------------------------------------------------ DCP (FSDP)
def write_dcp_run(run):
    import torch.distributed.checkpoint as dcp

    trainer, states = Trainer(seed=4), {}
    for _ in range(3):
        state = trainer.train(4)
        states[trainer.step] = state
        dcp.save({"model": trainer.model.state_dict(), "optim": trainer.optimizer.state_dict(),
                  "step": trainer.step}, checkpoint_id=str(run / f"step_{trainer.step}"), no_dist=True)
    return states


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_torch_distributed_checkpoint_folders(tmp_path):
    states = write_dcp_run(tmp_path / "run")
    assert sorted(p.name for p in (tmp_path / "run" / "step_4").iterdir()) == [".metadata", "__0_0.distcp"]
    report = cmdtool.ingest([tmp_path / "run"], tmp_path / "s.zarr")
    assert report.added == [4, 8, 12]
    store = assert_store_equals(tmp_path / "s.zarr", states)  # the optimizer's tensors are not taken
    assert [e.name for e in store.layout.entries] == list(states[4])


def test_dcp_metadata_that_would_run_code_is_refused(tmp_path):
    import pickle

    from tests.failures.test_bad_input import Exploit

    write_dcp_run(tmp_path / "run")
    marker = tmp_path / "pwned"
    (tmp_path / "run" / "step_8" / ".metadata").write_bytes(pickle.dumps({"x": Exploit(marker)}))
    with pytest.raises(CheckpointError, match=r"step_8/\.metadata: not readable DCP metadata .*refused"):
        cmdtool.ingest([tmp_path / "run"], tmp_path / "s.zarr")
    assert not marker.exists() and not (tmp_path / "s.zarr").exists()


# ------------------------------------------------------------------------------------------ torchvision / timm
def test_torchvision_and_timm_checkpoints_with_argparse_namespace(tmp_path):
    trainer, states = Trainer(seed=5), {}
    args = argparse.Namespace(model="tiny", lr=0.05, epochs=3, output_dir=str(tmp_path), betas=(0.9, 0.999),
                              weights=None, distributed=False)
    (tmp_path / "timm").mkdir()
    (tmp_path / "tv").mkdir()
    for epoch in range(3):
        state = trainer.train(2)
        states[epoch] = state
        timm = {"epoch": epoch, "arch": "tiny", "state_dict": state, "optimizer": trainer.optimizer.state_dict(),
                "version": 2, "args": args, "metric": 0.5 + epoch}
        torch.save(timm, tmp_path / "timm" / f"checkpoint-{epoch}.pth.tar")
        vision = {"model": state, "optimizer": trainer.optimizer.state_dict(), "epoch": epoch, "args": args,
                  "lr_scheduler": trainer.scheduler.state_dict()}
        torch.save(vision, tmp_path / "tv" / f"model_{epoch}.pth")
    torch.save(timm, tmp_path / "timm" / "last.pth.tar")
    torch.save(timm, tmp_path / "timm" / "model_best.pth.tar")
    torch.save(vision, tmp_path / "tv" / "checkpoint.pth")
    report = cmdtool.ingest([tmp_path / "timm"], tmp_path / "timm.zarr")
    assert report.added == [0, 1, 2] and len(report.skipped) == 2
    assert_store_equals(tmp_path / "timm.zarr", states)
    report = cmdtool.ingest([tmp_path / "tv"], tmp_path / "tv.zarr")
    assert report.added == [0, 1, 2] and report.skipped[0].startswith(str(tmp_path / "tv" / "checkpoint.pth"))
    assert_store_equals(tmp_path / "tv.zarr", states)


def test_refusal_names_the_offending_global(tmp_path):
    torch.save({"state_dict": tiny_model().state_dict(), "args": TrainingArguments()}, tmp_path / "epoch_1.pth.tar")
    with pytest.raises(CheckpointError, match=r"refused: unpickling it needs "
                                              r"tests\.ingestion\.test_layouts\.TrainingArguments, "
                                              r"which could run code \(nothing was executed\)"):
        cmdtool.ingest([tmp_path], tmp_path / "s.zarr")


# ------------------------------------------------------------------------------------------ prefixes, ties
def test_dataparallel_module_prefix_in_some_files(tmp_path):
    trainer, states = Trainer(seed=6), {}
    (tmp_path / "ck").mkdir()
    for epoch in range(1, 5):
        state = trainer.train(2)
        states[epoch] = state
        saved = {f"module.{k}": v for k, v in state.items()} if epoch >= 3 else state  # DataParallel from epoch 3
        torch.save(saved, tmp_path / "ck" / f"epoch_{epoch}.pt")
    with pytest.raises(CheckpointError, match=r"carry the prefix 'module\.' .* pass --strip-prefix module\."):
        cmdtool.ingest([tmp_path / "ck"], tmp_path / "s.zarr")
    assert not (tmp_path / "s.zarr").exists()
    cmdtool.ingest([tmp_path / "ck"], tmp_path / "s.zarr", strip_prefix=("module.",))
    assert_store_equals(tmp_path / "s.zarr", states)


class TiedLM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)
        self.hidden = torch.nn.Linear(4, 4)
        self.head = torch.nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight  # tied, as language models do

    def forward(self, tokens):
        return self.head(torch.tanh(self.hidden(self.embed(tokens))))


def test_tied_weights_are_stored_once_and_reported_once(tmp_path):
    model = TiedLM()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    tokens = torch.randint(0, 10, (16,))
    (tmp_path / "ck").mkdir()
    states = {}
    for epoch in range(1, 4):
        for _ in range(2):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(tokens), tokens).backward()
            optimizer.step()
        torch.save(model.state_dict(), tmp_path / "ck" / f"epoch_{epoch}.pt")
        states[epoch] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    cmdtool.ingest([tmp_path / "ck"], tmp_path / "s.zarr")
    store = assert_store_equals(tmp_path / "s.zarr", states, model_factory=TiedLM)
    assert store.n_rows == 40 + 16 + 4  # the head's 40 values are not stored twice
    assert store.layout.by_name()["head.weight"].tied_to == "embed.weight"
    result = CliRunner().invoke(app, ["info", "--store", str(tmp_path / "s.zarr"), "--json"])
    info = json.loads(result.stdout)
    assert info["parameters"] == 60 and info["tied_tensors"] == [{"name": "head.weight", "tied_to": "embed.weight"}]
    text = CliRunner().invoke(app, ["info", "--store", str(tmp_path / "s.zarr"), "--layers"]).stdout
    assert "1 tied to another, stored once" in text and text.count("head.weight") == 1


def test_label_errors_never_ask_for_a_pattern_that_was_given(tmp_path):
    torch.save({"w": torch.zeros(2)}, tmp_path / "run_a.pt")
    torch.save({"w": torch.zeros(2)}, tmp_path / "run_b3.pt")
    with pytest.raises(UsageError) as info:
        cmdtool.ingest([tmp_path / "run_a.pt", tmp_path / "run_b3.pt"], tmp_path / "s.zarr",
                       label_pattern=r"b(\d)")
    assert "--label-pattern 'b(\\\\d)'" in str(info.value) and "pass --label-pattern" not in str(info.value)
    assert "--set-label" in str(info.value)
