"""A small CNN trained on scikit-learn's 8x8 digits: a real run that takes seconds on a CPU.

Used by the end-to-end tests and the documentation's measurements (docs/cmd.md), and meant to be reused by
demos::

    from cmdtool import datasets
    data = datasets.load_split()
    paths = datasets.train("ckpts/", data, epochs=40)          # one checkpoint per epoch: epoch_001.pt ...
    datasets.evaluate(torch.load(paths[-1]), data)             # {"test_acc": ..., "test_loss": ...}

The network has BatchNorm layers on purpose: their running statistics are trajectories that CMD may or may
not model (``--bn-stats``), which is one of the things these runs measure.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .utils.threads import one_torch_thread


@dataclass
class DigitsSplit:
    """Train / held-out test tensors (images N x 1 x 8 x 8 in [0, 1], integer labels)."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


def load_split(test_fraction: float = 0.3, seed: int = 0) -> DigitsSplit:
    """The 1,797 digits of ``sklearn.datasets.load_digits`` split into a stratified train and test set."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        raise ImportError("cmdtool.datasets needs scikit-learn: pip install 'cmdtool[examples]'") from None

    data = load_digits()
    images = torch.tensor(data.images / 16.0, dtype=torch.float32).unsqueeze(1)
    labels = torch.tensor(data.target, dtype=torch.int64)
    train_idx, test_idx = train_test_split(range(len(labels)), test_size=test_fraction, random_state=seed,
                                           stratify=data.target)
    return DigitsSplit(images[train_idx], labels[train_idx], images[test_idx], labels[test_idx])


@functools.lru_cache(maxsize=1)
def _default_split() -> DigitsSplit:
    """The default split, built once per process: ``evaluate`` is called hundreds of times by
    ``cmdtool evaluate``, and loading the images each time would cost more than evaluating."""
    return load_split()


def shift_augment(images: torch.Tensor, generator: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Light augmentation: shift each 8x8 image by up to ``max_shift`` pixels in each direction (zero fill)."""
    n, _, height, width = images.shape
    padded = nn.functional.pad(images, (max_shift,) * 4)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(height))[:, :, None]
    cols = (dx[:, None] + torch.arange(width))[:, None, :]
    return padded[torch.arange(n)[:, None, None], 0, rows, cols].unsqueeze(1)


# Tiny convolutions are dominated by thread start-up: one thread trains them faster than several.
_one_thread = one_torch_thread


def make_model(seed: int = 0) -> nn.Module:
    """Two 3x3 conv layers with BatchNorm, max-pooling and a linear classifier (3,866 trainable parameters, plus 48
    BatchNorm running statistics)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 4 * 4, 10))


def train(out_dir: str | Path, data: DigitsSplit | None = None, epochs: int = 40, seed: int = 0,
          lr: float = 0.05, momentum: float = 0.9, batch_size: int = 64, dtype: torch.dtype | None = None,
          fmt: str = "pt", augment: bool = False) -> list[Path]:
    """Train with SGD and write one checkpoint per epoch (``epoch_001.pt`` ...); returns their paths.

    ``dtype`` casts the floating tensors of each saved state dict (e.g. torch.bfloat16); ``fmt`` is ``pt`` or
    ``safetensors``; ``augment`` shifts training images by up to one pixel (:func:`shift_augment`).
    """
    data = data or load_split()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = make_model(seed)
    optimiser = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    generator = torch.Generator().manual_seed(seed)
    paths = []
    with _one_thread():
        for epoch in range(1, epochs + 1):
            paths.append(_train_epoch(model, optimiser, data, generator, batch_size, epoch, out_dir, dtype, fmt,
                                      augment))
    return paths


def _train_epoch(model, optimiser, data, generator, batch_size, epoch, out_dir, dtype, fmt, augment=False) -> Path:
    """One pass over the shuffled training set, then the epoch's checkpoint."""
    model.train()
    order = torch.randperm(len(data.train_y), generator=generator)
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        optimiser.zero_grad()
        images = shift_augment(data.train_x[batch], generator) if augment else data.train_x[batch]
        loss = nn.functional.cross_entropy(model(images), data.train_y[batch])
        loss.backward()
        optimiser.step()
    state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().clone()
             for k, v in model.state_dict().items()}
    path = out_dir / f"epoch_{epoch:03d}.{fmt}"
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, path)
    return path


@torch.no_grad()
def evaluate(state_dict: dict, data: DigitsSplit | None = None) -> dict:
    """Held-out accuracy and loss of a state dict (loaded with strict=True, evaluated in float32)."""
    data = data or _default_split()
    model = make_model()
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()},
                          strict=True)
    model.eval()
    with _one_thread():
        logits = model(data.test_x)
    return {"test_acc": float((logits.argmax(dim=1) == data.test_y).float().mean()),
            "test_loss": float(nn.functional.cross_entropy(logits, data.test_y))}
