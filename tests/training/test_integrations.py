"""The Lightning and Hugging Face wrappers of EmbeddedCMD, each on a real tiny training run (skipped when the
framework is not installed; `make test` installs both through the test extra)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from cmdtool.ingestion import ingest
from cmdtool.store import open_store

from tests.training.test_embedded import tiny_task

KWARGS = dict(modes=3, warmup=3, every=2, fraction=0.25, samples=100)


def assert_embedded_on_cmd_model(cmd):
    """Alg. 4 by default (freeze="epoch" with the least-squares tie, no hook in the trainer's optimizer) and,
    after the last epoch, embedded weights equal a_i r_m + b_i (float32) but those chosen at that epoch's
    decision, which Alg. 4 ties from the next epoch's end on."""
    assert cmd.freeze == "epoch" and cmd.reference_gradient == "projection" and cmd.frozen.optimizer is None
    references = cmd.frozen.reference_values().numpy()
    params = dict(cmd.model.named_parameters())
    tied = untied = 0
    for name in cmd.frozen.parts:
        flat, a, b, ref = cmd.frozen.coefficients(name)
        got = params[name].detach().reshape(-1)[torch.as_tensor(flat)].cpu().numpy()
        equal = got == (a * references[ref] + b).astype(np.float32)
        tied, untied = tied + int(equal.sum()), untied + int((~equal).sum())
    assert tied > 0 and untied <= cmd.history_[-1].get("embedded_now", 0)


def test_lightning_callback_embeds_logs_and_resumes_from_its_ckpt(tmp_path):
    try:
        import lightning.pytorch as pl
    except ImportError:
        pl = pytest.importorskip("pytorch_lightning", reason="Lightning not installed")
    from cmdtool.training.integrations import EmbeddedCMDLightning

    model, x, y = tiny_task()

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = model

        def training_step(self, batch, _):
            return nn.functional.cross_entropy(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    def loader():
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32, shuffle=False)

    def trainer(epochs, callback):
        return pl.Trainer(max_epochs=epochs, callbacks=[callback], logger=pl.loggers.CSVLogger(tmp_path),
                          default_root_dir=tmp_path, enable_progress_bar=False, enable_model_summary=False,
                          accelerator="cpu", deterministic=True)

    module = Module()
    callback = EmbeddedCMDLightning(**KWARGS)
    run = trainer(7, callback)
    run.fit(module, loader())
    cmd = callback.cmd
    assert len(cmd.history_) == 7 and cmd.trained_fraction() < 1
    assert_embedded_on_cmd_model(cmd)
    assert "cmd/trained_fraction" in run.logged_metrics
    # resume: the .ckpt holds the callback's state and loads with weights_only=True
    ckpt = next((tmp_path).rglob("*.ckpt"))
    saved = torch.load(ckpt, weights_only=True)
    assert any("EmbeddedCMDLightning" in key for key in saved["callbacks"])
    resumed = EmbeddedCMDLightning(**KWARGS)
    trainer(9, resumed).fit(Module(), loader(), ckpt_path=str(ckpt))
    assert [r["epoch"] for r in resumed.cmd.history_] == list(range(9))
    assert resumed.cmd.history_[:7] == cmd.history_
    assert_embedded_on_cmd_model(resumed.cmd)
    # cmdtool ingest reads the Lightning checkpoint unchanged (the callback state is only tensors and values)
    ingest([str(ckpt)], str(tmp_path / "store.zarr"))
    assert open_store(tmp_path / "store.zarr").n_checkpoints == 1


class HFClassifier(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x, labels=None):
        logits = self.net(x)
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return {"loss": loss, "logits": logits}


def test_huggingface_callback_embeds_logs_saves_and_resumes(tmp_path):
    transformers = pytest.importorskip("transformers", reason="transformers not installed")
    pytest.importorskip("accelerate", reason="accelerate not installed")
    from cmdtool.training.integrations import STATE_FILE, EmbeddedCMDHuggingFace

    model, x, y = tiny_task()
    data = [{"x": x[i], "labels": y[i]} for i in range(len(y))]

    def trainer(epochs, callback, net):
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / "out"), num_train_epochs=epochs, per_device_train_batch_size=32,
            learning_rate=0.1, optim="sgd", lr_scheduler_type="constant", save_strategy="epoch",
            logging_strategy="epoch", report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
            dataloader_num_workers=0)
        return transformers.Trainer(model=HFClassifier(net), args=args, train_dataset=data, callbacks=[callback])

    callback = EmbeddedCMDHuggingFace(**KWARGS)
    run = trainer(7, callback, model)
    run.train()
    cmd = callback.cmd
    assert len(cmd.history_) == 7 and cmd.trained_fraction() < 1
    assert_embedded_on_cmd_model(cmd)
    assert any("cmd/trained_fraction" in entry for entry in run.state.log_history)
    checkpoints = sorted((tmp_path / "out").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert checkpoints and all((c / STATE_FILE).is_file() for c in checkpoints)
    resumed = EmbeddedCMDHuggingFace(**KWARGS)
    fresh, _, _ = tiny_task(1)
    trainer(9, resumed, fresh).train(resume_from_checkpoint=str(checkpoints[-1]))
    assert len(resumed.cmd.history_) == 9 and resumed.cmd.history_[:7] == cmd.history_
    assert_embedded_on_cmd_model(resumed.cmd)
    # `cmdtool ingest out/` takes the checkpoint-N/ folders as they are (the extra embedded_cmd.state is ignored)
    ingest([str(tmp_path / "out")], str(tmp_path / "store.zarr"))
    assert open_store(tmp_path / "store.zarr").n_checkpoints == len(list((tmp_path / "out").glob("checkpoint-*")))
