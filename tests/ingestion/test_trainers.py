"""Real trainers end to end (docs/formats.md, "What reconstruct writes"): each run is trained a few steps with the
real library and saved by it, then `cmdtool ingest` (no options), `decompose`, `reconstruct --epoch E`, and the
reconstruction is loaded with the trainer's own loader. The loaded weights must be the modelled ones (those of a
bare `reconstruct --format pt`, which differ from the source's) and everything else the source's."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from cmdtool_cli.app import app

runner = CliRunner()


def cli(*args, code: int = 0):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == code, result.output
    return result


def tiny_model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.BatchNorm1d(12), torch.nn.ReLU(),
                               torch.nn.Linear(12, 3))


# The --fn/--model-factory module of the evaluate and landscape tests: the factory builds tiny_model()
METRICS = (
    "import torch\n"
    "def factory():\n"
    "    return torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.BatchNorm1d(12), torch.nn.ReLU(),\n"
    "                               torch.nn.Linear(12, 3))\n"
    "def norm(model):\n"
    "    return {'norm': float(sum(p.detach().norm() for p in model.parameters()))}\n"
    "def loads(state):\n"
    "    factory().load_state_dict(state)\n"
    "    return {'ok': 1.0}\n")


def write_metrics(folder):
    """Write METRICS to ``folder``/metrics.py and return its path."""
    path = folder / "metrics.py"
    path.write_text(METRICS)
    return path


def train(model, optimizer, steps: int = 2, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    x, y = torch.randn(32, 6, generator=generator), torch.randn(32, 3, generator=generator)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()


def ingest_decompose(tmp_path, source, *ingest_options):
    """Ingest ``source`` and fit CMD with two modes; returns (store path, ingest output)."""
    store = tmp_path / "run.zarr"
    ingested = cli("ingest", source, "--store", store, *ingest_options)
    cli("decompose", "--modes", "2", "--store", store, "-q")
    return store, ingested.output


def reconstruct(tmp_path, store, epoch: int, *options) -> tuple[dict, dict]:
    """``reconstruct --epoch E`` (its --json record) and the bare modelled state dict of that epoch."""
    record = json.loads(cli("reconstruct", "--epoch", epoch, "--store", store, "--out", tmp_path / "recon",
                            "--json", *options).stdout)[0]
    bare = tmp_path / f"bare{epoch}.pt"
    cli("reconstruct", "--epoch", epoch, "--store", store, "--format", "pt", "--out", bare, "--force")
    return record, torch.load(bare, weights_only=True)


def assert_only_weights_differ(written: dict, source: dict, key: str, modelled: dict) -> None:
    """A container dict as its source, entry by entry, except ``written[key]``, which holds the modelled weights."""
    assert list(written) == list(source)
    for name in source:
        if name != key:
            assert_same_tree(written[name], source[name])
    assert_modelled(written[key], modelled, source[key])


def assert_modelled(loaded: dict, modelled: dict, source: dict, prefix: str = "") -> None:
    """``loaded`` holds the modelled tensors (under ``prefix`` + the store's names) and differs from the source."""
    assert sorted(loaded) == sorted(prefix + name for name in modelled)
    for name, tensor in modelled.items():
        assert torch.equal(loaded[prefix + name], tensor), name
    assert any(not torch.equal(loaded[name], source[name]) for name in source if source[name].is_floating_point())


def assert_same_tree(a, b) -> None:
    """Nested dicts/lists of tensors and plain values, equal leaf by leaf."""
    assert type(a) is type(b) or (isinstance(a, dict) and isinstance(b, dict)), (type(a), type(b))
    if isinstance(a, dict):
        assert list(a) == list(b)
        for key in a:
            assert_same_tree(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same_tree(x, y)
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    else:
        assert a == b


# ------------------------------------------------------------------------------ a plain loop's checkpoint dict
@pytest.mark.parametrize("wrapper, prefix", [pytest.param("compile", "_orig_mod.", marks=pytest.mark.slow),
                                             ("dataparallel", "module.")])
def test_plain_loop_dict_with_torch_compile_and_dataparallel_prefixes(tmp_path, wrapper, prefix):
    torch.manual_seed(0)
    model = tiny_model()
    wrapped = torch.compile(model, backend="eager") if wrapper == "compile" else torch.nn.DataParallel(model)
    optimizer = torch.optim.AdamW(wrapped.parameters(), lr=0.05)
    run = tmp_path / "run"
    run.mkdir()
    sources = {}
    for epoch in range(5):
        train(wrapped, optimizer, seed=epoch)
        sources[epoch] = {"epoch": epoch, "model_state_dict": wrapped.state_dict(),
                          "optimizer_state_dict": optimizer.state_dict(), "loss": 0.5 / (epoch + 1)}
        torch.save(sources[epoch], run / f"ckpt_{epoch}.pt")
    store, said = ingest_decompose(tmp_path, run)
    assert f"carries the prefix '{prefix}'" in said and f"--strip-prefix {prefix}" in said

    record, modelled = reconstruct(tmp_path, store, 3)
    assert record["path"].endswith("cmd_default_epoch3.pt")
    assert record["container"] == "checkpoint dict, weights under 'model_state_dict'"
    ckpt = torch.load(record["path"], weights_only=True)
    source = torch.load(run / "ckpt_3.pt", weights_only=True)
    assert list(ckpt) == list(source) and ckpt["epoch"] == 3 and ckpt["loss"] == source["loss"]
    assert_same_tree(ckpt["optimizer_state_dict"], source["optimizer_state_dict"])
    assert_modelled(ckpt["model_state_dict"], modelled, source["model_state_dict"])
    assert all(name.startswith(prefix) for name in modelled)  # the store holds the names as saved
    # loads where the source loads: into the wrapped model and its optimizer
    wrapped.load_state_dict(ckpt["model_state_dict"], strict=True)
    optimizer.load_state_dict(ckpt["optimizer_state_dict"])

    # into the bare model, without re-ingesting
    record = json.loads(cli("reconstruct", "--epoch", 3, "--store", store, "--out", tmp_path / "bare_recon",
                            "--strip-prefix", prefix, "--json").stdout)[0]
    bare = torch.load(record["path"], weights_only=True)["model_state_dict"]
    tiny_model().load_state_dict(bare, strict=True)
    assert all(torch.equal(bare[name.removeprefix(prefix)], tensor) for name, tensor in modelled.items())
    cli("reconstruct", "--epoch", 3, "--store", store, "--strip-prefix", "model.", code=2)

    # evaluate: a one-line error naming the option, then the option
    metrics = write_metrics(tmp_path)
    for fn, factory in ((f"{metrics}:norm", f"{metrics}:factory"), (f"{metrics}:loads", None)):
        options = ["--model-factory", factory] if factory else []
        failed = cli("evaluate", "--fn", fn, *options, "-m", "original", "--every", 10, "--store", store, code=2
                     if factory else 1)
        assert len(failed.output.strip().splitlines()) == 1 and f"--strip-prefix {prefix}" in failed.output
        cli("evaluate", "--fn", fn, *options, "-m", "original,cmd", "--every", 10, "--strip-prefix", prefix,
            "--store", store, "-q")


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_prefix_stripped_at_ingest_is_put_back_where_each_checkpoint_had_it(tmp_path, suffix):
    from safetensors.torch import load_file, save_file

    save = (lambda state, path: save_file(state, str(path))) if suffix == ".safetensors" else torch.save
    load = (lambda path: load_file(str(path))) if suffix == ".safetensors" else torch.load
    torch.manual_seed(4)
    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    (tmp_path / "dp").mkdir()
    for epoch in range(1, 5):
        train(model, optimizer, seed=epoch)
        state = model.state_dict()
        saved = {f"module.{k}": v for k, v in state.items()} if epoch >= 3 else state  # DataParallel from epoch 3
        save(saved, tmp_path / "dp" / f"epoch_{epoch}{suffix}")
    store, said = ingest_decompose(tmp_path, tmp_path / "dp", "--strip-prefix", "module.")
    assert "stored without the prefix 'module.'" in said
    for epoch, prefix in ((1, ""), (3, "module.")):
        record, modelled = reconstruct(tmp_path, store, epoch)
        assert record["path"].endswith(f"cmd_default_epoch{epoch}{suffix}")
        assert not any(name.startswith("module.") for name in modelled)  # --format: the stored names
        assert_modelled(load(record["path"]), modelled, load(tmp_path / "dp" / f"epoch_{epoch}{suffix}"), prefix)
    # one file named by --out: the container when it is one of that kind, else a bare state dict
    cli("reconstruct", "--epoch", 3, "--store", store, "--out", tmp_path / f"one{suffix}")
    assert all(name.startswith("module.") for name in load(tmp_path / f"one{suffix}"))
    other = ".pt" if suffix == ".safetensors" else ".safetensors"
    cli("reconstruct", "--epoch", 3, "--store", store, "--out", tmp_path / f"one{other}")
    assert not any(name.startswith("module.") for name in (load_file if other == ".safetensors" else torch.load)(
        str(tmp_path / f"one{other}")))


# ------------------------------------------------------------------------------ torch.distributed.checkpoint
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_dcp_written_back_as_dcp_loads_with_dcp_load(tmp_path):
    import torch.distributed.checkpoint as dcp

    torch.manual_seed(1)
    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    for step in range(4, 20, 4):
        train(model, optimizer, steps=4, seed=step)
        dcp.save({"model": model.state_dict(), "optim": optimizer.state_dict(), "step": step,
                  "note": {"run": "dcp", "lr": 0.05}}, checkpoint_id=str(tmp_path / "run" / f"step_{step}"),
                 no_dist=True)
    store, _ = ingest_decompose(tmp_path, tmp_path / "run")
    record, modelled = reconstruct(tmp_path, store, 12)
    folder = tmp_path / "recon" / "cmd_default_epoch12"
    assert record["path"] == str(folder) and record["format"] == "dcp"
    assert sorted(p.name for p in folder.iterdir()) == [".metadata", "__0_0.distcp"]

    def template():
        fresh = tiny_model()
        fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=0.05)
        train(fresh, fresh_optimizer, steps=1)  # the optimizer's state exists, to be overwritten
        return {"model": fresh.state_dict(), "optim": fresh_optimizer.state_dict(), "step": 0,
                "note": {"run": "", "lr": 0.0}}

    loaded, source = template(), template()
    dcp.load(loaded, checkpoint_id=str(folder), no_dist=True)
    dcp.load(source, checkpoint_id=str(tmp_path / "run" / "step_12"), no_dist=True)
    assert loaded["step"] == 12 and loaded["note"] == {"run": "dcp", "lr": 0.05}
    assert_same_tree(loaded["optim"], source["optim"])
    assert_modelled(loaded["model"], modelled, source["model"])
    tiny_model().load_state_dict(loaded["model"], strict=True)


# ------------------------------------------------------------------------------ DeepSpeed's model states
def test_deepspeed_model_states_with_module_replaced(tmp_path):
    from tests.ingestion.test_layouts import write_deepspeed_run

    write_deepspeed_run(tmp_path / "run")
    store, _ = ingest_decompose(tmp_path, tmp_path / "run")
    record, modelled = reconstruct(tmp_path, store, 10)
    folder = tmp_path / "recon" / "cmd_default_epoch10"
    assert record["path"] == str(folder) and record["format"] == "deepspeed"
    source_folder = tmp_path / "run" / "global_step10"
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in source_folder.iterdir())
    written = torch.load(folder / "mp_rank_00_model_states.pt", weights_only=True)
    source = torch.load(source_folder / "mp_rank_00_model_states.pt", weights_only=True)
    assert_only_weights_differ(written, source, "module", modelled)
    # ZeRO's fp32 master weights, from which DeepSpeed's load_checkpoint restores the module, are the modelled
    # weights too; padding, moments and DeepSpeed's own objects are as saved
    names = list(source["param_shapes"][0])
    ranks = [torch.load(folder / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt", weights_only=False)
             for r in range(2)]
    sources = [torch.load(source_folder / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt", weights_only=False)
               for r in range(2)]
    merged = torch.cat([p["optimizer_state_dict"]["single_partition_of_fp32_groups"][0] for p in ranks])
    merged_source = torch.cat([p["optimizer_state_dict"]["single_partition_of_fp32_groups"][0] for p in sources])
    expected, offset = merged_source.clone(), 0
    for name, pad in zip(names, sources[0]["optimizer_state_dict"]["param_alignment_paddings"][0]):
        n = modelled[name].numel()
        expected[offset:offset + n] = modelled[name].reshape(-1)
        offset += n + pad
    assert torch.equal(merged, expected) and not torch.equal(merged, merged_source)
    for got, was in zip(ranks, sources):
        got["optimizer_state_dict"].pop("single_partition_of_fp32_groups")
        was["optimizer_state_dict"].pop("single_partition_of_fp32_groups")
        assert_same_tree(got, was)


def test_deepspeed_mixed_precision_master_weights_are_the_modelled_ones(tmp_path):
    """bf16/fp16 without ZeRO: the model states' optimizer holds fp32 master copies (``fp32_groups``, no
    param_shapes) that load_checkpoint copies into the module; they are matched to the module's weights by value
    and replaced."""
    from tests.ingestion.test_layouts import Trainer, deepspeed_model_states

    trainer, run = Trainer(seed=4), tmp_path / "run"
    for _ in range(4):
        trainer.train(5)
        masters = [p.detach().clone() for p in trainer.model.parameters()]
        module = {k: v.to(torch.bfloat16) if v.is_floating_point() else v
                  for k, v in trainer.model.state_dict().items()}
        states = deepspeed_model_states(trainer, module, module)
        states.update(param_shapes=None, optimizer={"fp32_groups": [masters], "cur_scale": 1.0,
                                                    "optimizer_state_dict": trainer.optimizer.state_dict()})
        folder = run / f"global_step{trainer.step}"
        folder.mkdir(parents=True)
        torch.save(states, folder / "mp_rank_00_model_states.pt")
    store, _ = ingest_decompose(tmp_path, run)
    _, modelled = reconstruct(tmp_path, store, 10)
    written = torch.load(tmp_path / "recon" / "cmd_default_epoch10" / "mp_rank_00_model_states.pt",
                         weights_only=True)
    source = torch.load(run / "global_step10" / "mp_rank_00_model_states.pt", weights_only=True)
    names = [n for n, _ in trainer.model.named_parameters()]
    for name, master, was in zip(names, written["optimizer"]["fp32_groups"][0], source["optimizer"]["fp32_groups"][0]):
        assert master.dtype == torch.float32 and torch.equal(master, modelled[name].float()), name
    assert any(not torch.equal(a, b) for a, b in zip(written["optimizer"]["fp32_groups"][0],
                                                       source["optimizer"]["fp32_groups"][0]))
    assert_same_tree(written["optimizer"]["optimizer_state_dict"], source["optimizer"]["optimizer_state_dict"])


# ------------------------------------------------------------------------------ output rules
def test_reconstruct_never_overwrites_and_writes_nothing_on_failure(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    torch.manual_seed(2)
    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    for epoch in range(4):
        train(model, optimizer, seed=epoch)
        torch.save({"epoch": epoch, "model_state_dict": model.state_dict()}, run / f"e{epoch}.pth.tar")
    store, _ = ingest_decompose(tmp_path, run)
    mine = tmp_path / "mine.pth.tar"
    mine.write_bytes(b"user data")
    failed = cli("reconstruct", "--epoch", 2, "--store", store, "--out", mine, code=2)
    assert "cmdtool did not write it" in failed.output and mine.read_bytes() == b"user data"
    # a source that changed since ingest is refused before anything is written
    torch.save({"epoch": 2, "model_state_dict": {"other": torch.zeros(1)}}, run / "e2.pth.tar")
    failed = cli("reconstruct", "--epoch", 2, "--store", store, "--out", tmp_path / "recon", code=2)
    assert "no longer matches" in failed.output and "--format pt" in failed.output
    assert not (tmp_path / "recon").exists() and not list(tmp_path.glob(".cmdtool-partial-*"))
    record = json.loads(cli("reconstruct", "--epoch", 3, "--store", store, "--out", tmp_path / "recon",
                            "--json").stdout)[0]
    assert record["path"].endswith("cmd_default_epoch3.pth.tar")
    assert torch.load(record["path"], weights_only=True)["epoch"] == 3
    (run / "e3.pth.tar").unlink()
    failed = cli("reconstruct", "--epoch", 3, "--store", store, "--out", tmp_path / "recon2", code=2)
    assert "no longer exists" in failed.output and "--format" in failed.output
    cli("reconstruct", "--epoch", 3, "--store", store, "--out", tmp_path / "recon2", "--format", "safetensors")


# ------------------------------------------------------------------------------ Hugging Face
def assert_copied(folder, source_folder, weights: set[str]) -> None:
    """Every file of the source checkpoint folder is there; all but the weights byte for byte."""
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in source_folder.iterdir())
    for path in source_folder.iterdir():
        if path.name not in weights:
            assert (folder / path.name).read_bytes() == path.read_bytes(), path.name


@pytest.mark.slow
def test_hf_trainer_gpt2_safetensors_with_tied_embeddings_loads_with_from_pretrained(tmp_path):
    transformers = pytest.importorskip("transformers")

    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=40, n_positions=16,
                                     bos_token_id=0, eos_token_id=0)
    ids = torch.randint(0, 40, (16, 8))
    data = [{"input_ids": ids[i], "labels": ids[i]} for i in range(16)]
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=8, save_steps=2,
                                          per_device_train_batch_size=4, report_to=[], use_cpu=True,
                                          learning_rate=1e-2, logging_steps=100, disable_tqdm=True)
    trainer = transformers.Trainer(model=transformers.GPT2LMHeadModel(config), args=args, train_dataset=data)
    trainer.train()
    trainer.save_model()  # the final model at the top of the run: skipped by ingest (no step number)
    store, said = ingest_decompose(tmp_path, tmp_path / "run")
    assert "+4 checkpoints" in said
    record, modelled = reconstruct(tmp_path, store, 6)
    folder = tmp_path / "recon" / "cmd_default_epoch6"
    assert record["path"] == str(folder) and record["format"] == "hf-folder"
    assert_copied(folder, tmp_path / "run" / "checkpoint-6", {"model.safetensors"})

    loaded = transformers.GPT2LMHeadModel.from_pretrained(folder)
    source = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "run" / "checkpoint-6")
    state = loaded.state_dict()
    assert "lm_head.weight" not in modelled  # tied: save_pretrained leaves it out, from_pretrained ties it
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()
    assert_modelled({k: state[k] for k in modelled}, modelled, {k: source.state_dict()[k] for k in modelled})


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["bin", "sharded"])
def test_hf_bert_bin_with_tied_decoder_and_sharded_safetensors(tmp_path, layout):
    transformers = pytest.importorskip("transformers")

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=20, max_position_embeddings=16)
    model = transformers.BertForMaskedLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    ids = torch.randint(0, 30, (8, 8))
    for step in range(1, 5):
        for _ in range(2):
            optimizer.zero_grad()
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
        folder = tmp_path / "run" / f"checkpoint-{step}"
        if layout == "bin":  # what save_pretrained wrote before safetensors: a torch file, tied tensors shared
            config.save_pretrained(folder)
            torch.save(model.state_dict(), folder / "pytorch_model.bin")
        else:
            model.save_pretrained(folder, max_shard_size="8KB")
    source_folder = tmp_path / "run" / "checkpoint-3"
    weights = {p.name for p in source_folder.iterdir() if p.name != "config.json"}
    assert layout == "bin" or len(weights) > 2  # several shards and their index
    store, _ = ingest_decompose(tmp_path, tmp_path / "run")
    record, modelled = reconstruct(tmp_path, store, 3)
    folder = tmp_path / "recon" / "cmd_default_epoch3"
    assert record["format"] == ("hf-folder" if layout == "bin" else "sharded")
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in source_folder.iterdir())
    assert (folder / "config.json").read_bytes() == (source_folder / "config.json").read_bytes()
    if layout == "bin":
        written = torch.load(folder / "pytorch_model.bin", weights_only=True)
        assert written["cls.predictions.decoder.weight"].data_ptr() == \
            written["bert.embeddings.word_embeddings.weight"].data_ptr()  # tied again, as in the source
    else:
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        assert index == json.loads((source_folder / "model.safetensors.index.json").read_text())

    loaded = transformers.BertForMaskedLM.from_pretrained(folder)
    source = transformers.BertForMaskedLM.from_pretrained(source_folder)
    state, source_state = loaded.state_dict(), source.state_dict()
    assert loaded.cls.predictions.decoder.weight.data_ptr() == loaded.bert.embeddings.word_embeddings.weight.data_ptr()
    assert_modelled({k: state[k] for k in modelled}, modelled, {k: source_state[k] for k in modelled})


# ------------------------------------------------------------------------------ PyTorch Lightning
def lightning_regressor(pl):
    class Regressor(pl.LightningModule):
        def __init__(self, hidden: int = 12, lr: float = 0.05, name: str = "regressor", data_dir=None):
            super().__init__()
            self.save_hyperparameters()
            self.net = torch.nn.Sequential(torch.nn.Linear(6, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 3))

        def training_step(self, batch, index):
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)

    return Regressor


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore")
def test_lightning_checkpoints_load_with_load_from_checkpoint(tmp_path):
    pl = pytest.importorskip("pytorch_lightning")
    from pytorch_lightning.callbacks import ModelCheckpoint

    Regressor = lightning_regressor(pl)
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(16, 6), torch.randn(16, 3))
    trainer = pl.Trainer(max_epochs=5, default_root_dir=str(tmp_path / "run"), accelerator="cpu", devices=1,
                         callbacks=[ModelCheckpoint(save_top_k=-1, save_last=True)], enable_progress_bar=False,
                         enable_model_summary=False, log_every_n_steps=1)
    from pathlib import Path

    trainer.fit(Regressor(hidden=12, lr=0.05, name="tiny", data_dir=Path("/data/x")),
                torch.utils.data.DataLoader(data, batch_size=8))
    checkpoints = tmp_path / "run" / "lightning_logs" / "version_0" / "checkpoints"
    store, said = ingest_decompose(tmp_path, tmp_path / "run")
    assert "last.ckpt" in said and "epochs 0..4 added" in said
    record, modelled = reconstruct(tmp_path, store, 3)
    assert record["path"].endswith("cmd_default_epoch3.ckpt") and record["container"] == "Lightning checkpoint"

    with torch.serialization.safe_globals([type(Path())]):
        written = torch.load(record["path"], weights_only=True)
        source = torch.load(checkpoints / "epoch=3-step=8.ckpt", weights_only=True)
    assert_only_weights_differ(written, source, "state_dict", modelled)
    with torch.serialization.safe_globals([type(Path())]):  # Lightning's loader needs it for the source too
        Regressor.load_from_checkpoint(checkpoints / "epoch=3-step=8.ckpt")
        loaded = Regressor.load_from_checkpoint(record["path"])
    assert dict(loaded.hparams) == {"hidden": 12, "lr": 0.05, "name": "tiny", "data_dir": Path("/data/x")}
    assert_modelled(loaded.state_dict(), modelled, source["state_dict"])
    # the bare network, from the same store
    record = json.loads(cli("reconstruct", "--epoch", 3, "--store", store, "--strip-prefix", "net.", "--format",
                            "safetensors", "--out", tmp_path / "net.safetensors", "--json").stdout)[0]
    from safetensors.torch import load_file

    net = Regressor().net
    net.load_state_dict(load_file(record["path"]), strict=True)


# ------------------------------------------------------------------------------ accelerate
@pytest.mark.slow
def test_accelerate_save_state_folders_load_with_load_state(tmp_path):
    accelerate = pytest.importorskip("accelerate")
    from accelerate.utils import ProjectConfiguration

    torch.manual_seed(0)
    accelerator = accelerate.Accelerator(cpu=True, project_config=ProjectConfiguration(
        project_dir=str(tmp_path / "run"), automatic_checkpoint_naming=True))
    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    model, optimizer = accelerator.prepare(model, optimizer)
    sources = {}
    for epoch in range(4):
        train(model, optimizer, seed=epoch)
        accelerator.save_state()
        sources[epoch] = {k: v.clone() for k, v in model.state_dict().items()}
    checkpoints = tmp_path / "run" / "checkpoints"
    store, _ = ingest_decompose(tmp_path, checkpoints)
    record, modelled = reconstruct(tmp_path, store, 2)
    folder = tmp_path / "recon" / "cmd_default_epoch2"
    assert record["path"] == str(folder) and record["format"] == "hf-folder"
    assert_copied(folder, checkpoints / "checkpoint_2", {"model.safetensors"})
    accelerator.load_state(str(folder))
    assert_modelled(model.state_dict(), modelled, sources[2])


def test_landscape_strip_prefix_and_one_line_load_error(tmp_path):
    torch.manual_seed(5)
    model = torch.nn.DataParallel(tiny_model())
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    (tmp_path / "run").mkdir()
    for epoch in range(5):
        train(model, optimizer, seed=epoch)
        torch.save(model.state_dict(), tmp_path / "run" / f"epoch_{epoch}.pt")
    store, _ = ingest_decompose(tmp_path, tmp_path / "run")
    write_metrics(tmp_path)
    options = ["--fn", f"{tmp_path}/metrics.py:norm", "--model-factory", f"{tmp_path}/metrics.py:factory",
               "--epoch", 3, "--mode", 0, "--points", 3, "--store", store]
    failed = cli("landscape", *options, "--out", tmp_path / "l1", code=2)
    assert len(failed.output.strip().splitlines()) == 1 and "--strip-prefix module." in failed.output
    assert not (tmp_path / "l1").exists()
    cli("landscape", *options, "--strip-prefix", "module.", "--out", tmp_path / "l2", "-q")
    assert (tmp_path / "l2").is_dir()
