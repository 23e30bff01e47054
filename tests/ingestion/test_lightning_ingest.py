"""Ingest of what a real PyTorch Lightning Trainer writes by default: its tree below default_root_dir, a
pathlib.Path hyperparameter in every .ckpt, last.ckpt beside the epochs; and the allow-list of the weights-only
loader (standard data types built, a user's class only when named with --allow-global)."""

from __future__ import annotations

import argparse
import collections
import datetime
import decimal
import fractions
import os
import pathlib
import shutil
import sys
import uuid

import pytest
import torch
from typer.testing import CliRunner

from cmdtool.errors import UsageError
from cmdtool.ingestion.formats import allowed_globals, load_torch_file
from cmdtool_cli.app import app

pl = pytest.importorskip("pytorch_lightning")


class PathModule(pl.LightningModule):
    def __init__(self, data_dir: pathlib.Path = pathlib.Path("/data/mnist"), lr: float = 0.1):
        super().__init__()
        self.save_hyperparameters()
        self.layer = torch.nn.Linear(4, 2)

    def training_step(self, batch, index):
        x, y = batch
        return torch.nn.functional.mse_loss(self.layer(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


def fit(root, epochs=3):
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(16, 4), torch.randn(16, 2))
    trainer = pl.Trainer(default_root_dir=root, max_epochs=epochs, accelerator="cpu", enable_progress_bar=False,
                         enable_model_summary=False, log_every_n_steps=1,
                         callbacks=[pl.callbacks.ModelCheckpoint(save_top_k=-1, save_last=True)])
    trainer.fit(PathModule(), torch.utils.data.DataLoader(data, batch_size=8))


@pytest.fixture(scope="module")
def lightning_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("lightning") / "runs"
    fit(root)
    return root


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_the_default_tree_is_found_and_last_ckpt_is_recognised_as_the_last_epoch(lightning_root, tmp_path):
    checkpoints = lightning_root / "lightning_logs" / "version_0" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == [
        "epoch=0-step=2.ckpt", "epoch=1-step=4.ckpt", "epoch=2-step=6.ckpt", "last.ckpt"]
    assert isinstance(torch.load(checkpoints / "last.ckpt", weights_only=False)["hyper_parameters"]["data_dir"],
                      pathlib.PurePath)
    result = invoke("ingest", lightning_root, "--store", tmp_path / "s.zarr")
    assert result.exit_code == 0, result.output
    assert f"{lightning_root}: took the checkpoints in {checkpoints} (Lightning's default tree)" in result.stderr
    assert (f"{checkpoints / 'last.ckpt'}: the same content as {checkpoints / 'epoch=2-step=6.ckpt'} (epoch 2); "
            f"skipped as that checkpoint") in result.stderr
    assert "epochs 0..2 added" in result.stdout
    # -q hides notes, not the result
    again = invoke("ingest", lightning_root, "--store", tmp_path / "s.zarr", "-q")
    assert again.exit_code == 0 and again.stderr == ""
    assert again.stdout.strip() == f"{tmp_path / 's.zarr'}: up to date (3 checkpoints, nothing new)"


def test_several_runs_ask_for_one_with_a_command_that_works(lightning_root, tmp_path):
    root = tmp_path / "runs"
    shutil.copytree(lightning_root, root)
    shutil.copytree(root / "lightning_logs" / "version_0", root / "lightning_logs" / "version_1")
    result = invoke("ingest", root, "--store", tmp_path / "s.zarr")
    latest = root / "lightning_logs" / "version_1" / "checkpoints"
    assert result.exit_code == 2 and result.stderr.strip() == (
        f"error: {root}: 2 runs with checkpoints (lightning_logs/version_0/checkpoints, "
        f"lightning_logs/version_1/checkpoints); name the one to ingest, e.g. `cmdtool ingest {latest}`")
    assert not (tmp_path / "s.zarr").exists()
    assert invoke("ingest", latest, "--store", tmp_path / "s.zarr").exit_code == 0


def test_an_unlabelled_file_that_differs_gets_a_label_suggestion_that_works(lightning_root, tmp_path):
    run = tmp_path / "checkpoints"
    shutil.copytree(lightning_root / "lightning_logs" / "version_0" / "checkpoints", run)
    state = torch.load(run / "last.ckpt", weights_only=False)
    state["state_dict"]["layer.bias"] += 1
    torch.save(state, run / "last.ckpt")
    result = invoke("ingest", run, "--store", tmp_path / "s.zarr")
    note = f"{run / 'last.ckpt'}: no epoch number in 'last'; skipped as an alias or final copy (to take it as a " \
           f"new last epoch: --set-label {run / 'last.ckpt'}=3)"
    assert result.exit_code == 0 and note in result.stderr, result.output
    taken = invoke("ingest", run, "--store", tmp_path / "s.zarr", "--set-label", f"{run / 'last.ckpt'}=3")
    assert taken.exit_code == 0 and "epochs 3..3 added" in taken.stdout, taken.output


def test_standard_data_types_are_built_and_nothing_else(tmp_path):
    values = {"path": pathlib.Path("/a/b"), "pure": pathlib.PurePosixPath("x/y"),
              "windows": pathlib.PureWindowsPath("c:/data"), "namespace": argparse.Namespace(a=1, b="c"),
              "ordered": collections.OrderedDict(a=1), "counter": collections.Counter("aab"),
              "frozen": frozenset({1, 2}), "slice": slice(1, 5, 2), "range": range(3),
              "when": datetime.datetime(2024, 5, 6, 7, 8, 9, tzinfo=datetime.timezone.utc),
              "day": datetime.date(2020, 1, 2), "time": datetime.time(3, 4), "delta": datetime.timedelta(days=2),
              "decimal": decimal.Decimal("1.25"), "fraction": fractions.Fraction(1, 3),
              "uuid": uuid.UUID("12345678-1234-5678-1234-567812345678"), "set": {1, 2}, "complex": 1 + 2j}
    torch.save({"state_dict": {"w": torch.ones(2)}, "hyper_parameters": values}, tmp_path / "epoch_1.ckpt")
    loaded = load_torch_file(tmp_path / "epoch_1.ckpt")["hyper_parameters"]
    assert loaded == values and all(type(loaded[k]) is type(v) for k, v in values.items())


def test_a_users_class_needs_allow_global_and_the_import_path_is_restored(tmp_path, monkeypatch):
    package = tmp_path / "project"
    package.mkdir()
    (package / "mycfg.py").write_text("class TrainConfig:\n    def __init__(self, lr=0.1):\n        self.lr = lr\n"
                                      "def helper():\n    return 1\n")
    monkeypatch.chdir(package)
    monkeypatch.syspath_prepend(str(package))
    import mycfg

    torch.save({"state_dict": {"w": torch.ones(3)}, "cfg": mycfg.TrainConfig(0.5)}, tmp_path / "epoch_1.ckpt")
    monkeypatch.delitem(sys.modules, "mycfg")
    sys.path.remove(str(package))  # importable only through the working directory now
    path_before = list(sys.path)

    refused = invoke("ingest", tmp_path / "epoch_1.ckpt", "--store", tmp_path / "s.zarr")
    assert refused.exit_code == 2 and refused.stderr.count("\n") == 1
    assert "needs mycfg.TrainConfig, which could run code" in refused.stderr
    assert "pass --allow-global mycfg.TrainConfig" in refused.stderr and not (tmp_path / "s.zarr").exists()

    taken = invoke("ingest", tmp_path / "epoch_1.ckpt", "--store", tmp_path / "s.zarr",
                   "--allow-global", "mycfg.TrainConfig")
    assert taken.exit_code == 0, taken.output
    assert sys.path == path_before
    with pytest.raises(UsageError, match="not a class"), allowed_globals(["mycfg.helper"]):
        pass
    with pytest.raises(UsageError, match="no module 'nomodule'"), allowed_globals(["nomodule.Thing"]):
        pass
    # outside the block the class is refused again: nothing process-wide was changed
    with allowed_globals(["mycfg.TrainConfig"]):
        assert load_torch_file(tmp_path / "epoch_1.ckpt")["cfg"].lr == 0.5
    with pytest.raises(UsageError, match="refused"):
        load_torch_file(tmp_path / "epoch_1.ckpt")
    assert os.getcwd() == str(package)


def test_allow_global_refuses_what_runs_code_and_never_suggests_it(tmp_path):
    from tests.failures.test_bad_input import Exploit

    for name in ("subprocess.Popen", "os.system", "builtins.eval"):
        with pytest.raises(UsageError, match="refused"), allowed_globals([name]):
            pass
    marker = tmp_path / "pwned"
    torch.save({"w": Exploit(marker)}, tmp_path / "epoch_1.pt")
    result = invoke("ingest", tmp_path / "epoch_1.pt", "--store", tmp_path / "s.zarr")
    assert result.exit_code == 2 and "refused: unpickling it needs posix.system" in result.stderr
    assert "--allow-global" not in result.stderr and not marker.exists()


def test_a_resave_under_another_name_is_the_same_content(tmp_path):
    """torchvision's references save checkpoint.pth and model_N.pth with two torch.save calls: the zips differ
    in their bytes (the inner folder is named after the file) but not in their entries."""
    from cmdtool.ingestion.discover import content_digest

    state = {"model": {"w": torch.arange(6.0)}, "epoch": 2, "args": argparse.Namespace(lr=0.1)}
    torch.save(state, tmp_path / "model_2.pth")
    torch.save(state, tmp_path / "checkpoint.pth")
    state["epoch"] = 3
    torch.save(state, tmp_path / "other.pth")
    assert (tmp_path / "model_2.pth").read_bytes() != (tmp_path / "checkpoint.pth").read_bytes()
    assert content_digest([tmp_path / "model_2.pth"]) == content_digest([tmp_path / "checkpoint.pth"])
    assert content_digest([tmp_path / "model_2.pth"]) != content_digest([tmp_path / "other.pth"])
    torch.save({"model": {"w": torch.zeros(6)}, "epoch": 1, "args": argparse.Namespace(lr=0.1)},
               tmp_path / "model_1.pth")
    (tmp_path / "other.pth").unlink()
    result = invoke("ingest", tmp_path, "--store", tmp_path / "s.zarr")
    assert result.exit_code == 0 and "epochs 1..2 added" in result.stdout, result.output
    assert (f"{tmp_path / 'checkpoint.pth'}: the same content as {tmp_path / 'model_2.pth'} (epoch 2); skipped as "
            f"that checkpoint") in result.stderr


def test_reconstruct_writes_a_container_that_holds_a_users_class_only_with_allow_global(tmp_path, monkeypatch):
    package = tmp_path / "project"
    package.mkdir()
    (package / "runcfg.py").write_text("class RunConfig:\n    def __init__(self, lr=0.1):\n        self.lr = lr\n")
    monkeypatch.chdir(package)
    monkeypatch.syspath_prepend(str(package))
    import runcfg

    (tmp_path / "ckpts").mkdir()
    for epoch in (1, 2, 3):
        torch.save({"state_dict": {"w": torch.full((3,), float(epoch))}, "cfg": runcfg.RunConfig(0.5)},
                   tmp_path / "ckpts" / f"epoch_{epoch}.ckpt")
    store = tmp_path / "s.zarr"
    assert invoke("ingest", tmp_path / "ckpts", "--store", store, "--allow-global", "runcfg.RunConfig").exit_code == 0

    refused = invoke("reconstruct", "--epoch", "3", "-m", "ema", "--store", store, "--out", tmp_path / "out")
    assert refused.exit_code == 2 and refused.stderr.count("\n") == 1, refused.output
    assert "pass --allow-global runcfg.RunConfig" in refused.stderr and not (tmp_path / "out").exists()

    written = invoke("reconstruct", "--epoch", "3", "-m", "ema", "--store", store, "--out", tmp_path / "out",
                     "--allow-global", "runcfg.RunConfig", "--json")
    assert written.exit_code == 0, written.output
    import json

    path = json.loads(written.stdout)[0]["path"]
    with allowed_globals(["runcfg.RunConfig"]):
        container = load_torch_file(pathlib.Path(path))
    assert container["cfg"].lr == 0.5 and container["state_dict"]["w"].shape == (3,)
