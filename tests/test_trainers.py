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
    assert record["path"].endswith("cmd_default_epoch3.pt") and record["container"].startswith("torch checkpoint")
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
    (tmp_path / "metrics.py").write_text(
        "import torch\n"
        "def factory():\n"
        "    return torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.BatchNorm1d(12), torch.nn.ReLU(),\n"
        "                               torch.nn.Linear(12, 3))\n"
        "def norm(model):\n"
        "    return {'norm': float(sum(p.norm() for p in model.parameters()))}\n"
        "def loads(state):\n"
        "    factory().load_state_dict(state)\n"
        "    return {'ok': 1.0}\n")
    metrics = tmp_path / "metrics.py"
    for fn, factory in ((f"{metrics}:norm", f"{metrics}:factory"), (f"{metrics}:loads", None)):
        options = ["--model-factory", factory] if factory else []
        failed = cli("evaluate", "--fn", fn, *options, "-m", "original", "--every", 10, "--store", store, code=2
                     if factory else 1)
        assert len(failed.output.strip().splitlines()) == 1 and f"--strip-prefix {prefix}" in failed.output
        cli("evaluate", "--fn", fn, *options, "-m", "original,cmd", "--every", 10, "--strip-prefix", prefix,
            "--store", store, "-q")


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
        return {"model": fresh.state_dict(), "optim": fresh_optimizer.state_dict(), "step": 0, "note": {"run": "", "lr": 0.0}}

    loaded, source = template(), template()
    dcp.load(loaded, checkpoint_id=str(folder), no_dist=True)
    dcp.load(source, checkpoint_id=str(tmp_path / "run" / "step_12"), no_dist=True)
    assert loaded["step"] == 12 and loaded["note"] == {"run": "dcp", "lr": 0.05}
    assert_same_tree(loaded["optim"], source["optim"])
    assert_modelled(loaded["model"], modelled, source["model"])
    tiny_model().load_state_dict(loaded["model"], strict=True)


# ------------------------------------------------------------------------------ DeepSpeed's model states
def test_deepspeed_model_states_with_module_replaced(tmp_path):
    from test_layouts import write_deepspeed_run

    write_deepspeed_run(tmp_path / "run")
    store, _ = ingest_decompose(tmp_path, tmp_path / "run")
    record, modelled = reconstruct(tmp_path, store, 10)
    folder = tmp_path / "recon" / "cmd_default_epoch10"
    assert record["path"] == str(folder) and record["format"] == "deepspeed"
    source_folder = tmp_path / "run" / "global_step10"
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in source_folder.iterdir())
    written = torch.load(folder / "mp_rank_00_model_states.pt", weights_only=True)
    source = torch.load(source_folder / "mp_rank_00_model_states.pt", weights_only=True)
    assert list(written) == list(source)
    for key in source:
        if key != "module":
            assert_same_tree(written[key], source[key])
    assert_modelled(written["module"], modelled, source["module"])
    name = "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    assert (folder / name).read_bytes() == (source_folder / name).read_bytes()


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
