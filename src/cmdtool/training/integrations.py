"""Embedded CMD in the trainers people use: a Lightning callback and a Hugging Face ``TrainerCallback``.

Both are thin: they build an :class:`~cmdtool.training.embedded.EmbeddedCMD` on the model and the trainer's
optimizer when training starts, call :meth:`~cmdtool.training.embedded.EmbeddedCMD.on_epoch_end` after every
training epoch, log the trained fraction and the CMD model's error, and save/restore its state with the
trainer's checkpoints so a killed run resumes::

    # pip install cmdtool[lightning]
    trainer = lightning.pytorch.Trainer(callbacks=[EmbeddedCMDLightning(modes=10, warmup=20)])
    # pip install cmdtool[huggingface]
    trainer = transformers.Trainer(..., callbacks=[EmbeddedCMDHuggingFace(modes=10, warmup=20)])

Keyword arguments are those of :class:`~cmdtool.training.embedded.EmbeddedCMD`. The frameworks are optional:
importing a class whose framework is missing raises an ImportError naming the extra to install.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from .embedded import EmbeddedCMD

# beside the model files in a Hugging Face checkpoint-N/ folder; written by torch.save, but not named like a
# checkpoint (.pt/.bin/...) so that `cmdtool ingest` still takes the folder as one checkpoint
STATE_FILE = "embedded_cmd.state"


def _lightning():
    try:
        import lightning.pytorch as pl
    except ImportError:
        try:
            import pytorch_lightning as pl
        except ImportError:
            raise ImportError("EmbeddedCMDLightning needs Lightning: pip install 'cmdtool[lightning]'") from None
    return pl


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ImportError("EmbeddedCMDHuggingFace needs transformers: pip install 'cmdtool[huggingface]'") from None
    return transformers


def _log_values(record: dict) -> dict:
    values = {"cmd/trained_fraction": record["trained_fraction"], "cmd/embedded_fraction": record["embedded_fraction"]}
    if "cmd_error" in record:
        values["cmd/error"] = record["cmd_error"]
    return values


def __getattr__(name: str):
    # the classes subclass the frameworks' callback bases, so they are built on first access
    if name == "EmbeddedCMDLightning":
        return _lightning_callback()
    if name == "EmbeddedCMDHuggingFace":
        return _huggingface_callback()
    raise AttributeError(name)


@functools.cache
def _lightning_callback():
    pl = _lightning()

    class EmbeddedCMDLightning(pl.Callback):
        """Embedded CMD for a Lightning ``Trainer`` (single optimizer). State goes into the ``.ckpt``."""

        def __init__(self, **kwargs):
            self.kwargs = kwargs
            self.cmd: EmbeddedCMD | None = None
            self._pending: dict | None = None

        def on_train_start(self, trainer, pl_module):
            optimizer = trainer.optimizers[0] if trainer.optimizers else None
            self.cmd = EmbeddedCMD(pl_module, optimizer=optimizer, **self.kwargs)
            if self._pending:
                self.cmd.load_state_dict(self._pending)
                self._pending = None

        def on_train_epoch_end(self, trainer, pl_module):
            record = self.cmd.on_epoch_end(trainer.current_epoch)
            pl_module.log_dict(_log_values(record), on_epoch=True)

        def on_train_end(self, trainer, pl_module):
            self.cmd.close()

        def state_dict(self) -> dict:
            return self.cmd.state_dict() if self.cmd is not None else {}

        def load_state_dict(self, state_dict: dict) -> None:
            self._pending = state_dict or None

    EmbeddedCMDLightning.__module__ = __name__
    return EmbeddedCMDLightning


@functools.cache
def _huggingface_callback():
    transformers = _transformers()

    class EmbeddedCMDHuggingFace(transformers.TrainerCallback):
        """Embedded CMD for a Hugging Face ``Trainer``. Its state is saved as ``embedded_cmd.state`` in each
        ``checkpoint-N/`` folder and read back when training resumes from one."""

        def __init__(self, **kwargs):
            self.kwargs = kwargs
            self.cmd: EmbeddedCMD | None = None

        def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
            self.cmd = EmbeddedCMD(model, optimizer=optimizer, **self.kwargs)
            saved = Path(args.output_dir) / f"checkpoint-{state.global_step}" / STATE_FILE
            if state.global_step > 0 and saved.is_file():  # resuming from that checkpoint
                self.cmd.load_state_dict(torch.load(saved, weights_only=True))

        def on_epoch_end(self, args, state, control, **kwargs):
            record = self.cmd.on_epoch_end(round(state.epoch))
            state.log_history.append({"epoch": state.epoch, "step": state.global_step, **_log_values(record)})

        def on_save(self, args, state, control, **kwargs):
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir() and self.cmd is not None:
                torch.save(self.cmd.state_dict(), folder / STATE_FILE)

        def on_train_end(self, args, state, control, **kwargs):
            self.cmd.close()

    EmbeddedCMDHuggingFace.__module__ = __name__
    return EmbeddedCMDHuggingFace
