"""Small real training runs saved by the trainers themselves, for the sessions in docs/formats.md and
docs/commands.md ("What reconstruct writes", "reconstruct"): a plain loop of a torch.compile model, PyTorch
Lightning with ModelCheckpoint(save_top_k=-1, save_last=True), the Hugging Face Trainer (a tiny GPT-2, tied
embeddings) and torch.distributed.checkpoint. Each model is tiny and built from a config (no hub).

    python examples/trainer_runs.py --out /tmp/runs     # writes loop/, lightning/, hf_run/, fsdp_run/ there
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import torch


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


def plain_loop(out: Path) -> None:
    """loop/ckpt_E.pt: {'epoch', 'model_state_dict', 'optimizer_state_dict'} of a torch.compile'd model."""
    torch.manual_seed(0)
    model = torch.compile(tiny_model(), backend="eager")
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    (out / "loop").mkdir(parents=True)
    for epoch in range(6):
        train(model, optimizer, seed=epoch)
        torch.save({"epoch": epoch, "model_state_dict": model.state_dict(),
                    "optimizer_state_dict": optimizer.state_dict()}, out / "loop" / f"ckpt_{epoch}.pt")


def distributed_checkpoint(out: Path) -> None:
    """fsdp_run/step_N/: dcp.save({'model', 'optim', 'step'}) every 4 steps."""
    import torch.distributed.checkpoint as dcp

    torch.manual_seed(1)
    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    for step in range(4, 28, 4):
        train(model, optimizer, steps=4, seed=step)
        dcp.save({"model": model.state_dict(), "optim": optimizer.state_dict(), "step": step},
                 checkpoint_id=str(out / "fsdp_run" / f"step_{step}"), no_dist=True)


def lightning(out: Path) -> None:
    """lightning/lightning_logs/version_0/checkpoints/: Lightning's default tree, six epochs and last.ckpt."""
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import ModelCheckpoint

    class Regressor(pl.LightningModule):
        def __init__(self, hidden: int = 12, lr: float = 0.05):
            super().__init__()
            self.save_hyperparameters()
            self.net = torch.nn.Sequential(torch.nn.Linear(6, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 3))

        def training_step(self, batch, index):
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)

    torch.manual_seed(2)
    data = torch.utils.data.TensorDataset(torch.randn(16, 6), torch.randn(16, 3))
    trainer = pl.Trainer(max_epochs=6, default_root_dir=str(out / "lightning"), accelerator="cpu", devices=1,
                         callbacks=[ModelCheckpoint(save_top_k=-1, save_last=True)], enable_progress_bar=False,
                         enable_model_summary=False, log_every_n_steps=1)
    trainer.fit(Regressor(), torch.utils.data.DataLoader(data, batch_size=8))


def hugging_face(out: Path) -> None:
    """hf_run/checkpoint-N/ every 2 steps of a tiny GPT-2 (tied embeddings), and the final model at the top."""
    import transformers

    torch.manual_seed(3)
    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=40, n_positions=16,
                                     bos_token_id=0, eos_token_id=0)
    ids = torch.randint(0, 40, (16, 8))
    data = [{"input_ids": ids[i], "labels": ids[i]} for i in range(16)]
    args = transformers.TrainingArguments(output_dir=str(out / "hf_run"), max_steps=12, save_steps=2,
                                          per_device_train_batch_size=4, report_to=[], use_cpu=True,
                                          learning_rate=1e-2, logging_steps=100, disable_tqdm=True)
    trainer = transformers.Trainer(model=transformers.GPT2LMHeadModel(config), args=args, train_dataset=data)
    trainer.train()
    trainer.save_model()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="a new or empty folder")
    out = parser.parse_args().out
    if out.exists() and any(out.iterdir()):
        parser.error(f"--out {out} is not empty")
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    for build in (plain_loop, distributed_checkpoint, lightning, hugging_face):
        build(out)
        print(f"{build.__name__}: done", flush=True)


if __name__ == "__main__":
    main()
