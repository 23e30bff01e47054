"""Shared fixtures: small real checkpoints and synthetic trajectory stores with known structure."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cmdtool.store import from_array


def small_cnn() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(), torch.nn.Flatten(),
        torch.nn.Linear(4 * 6 * 6, 10))


def write_checkpoints(folder, n_epochs: int = 8, seed: int = 0, dtype=torch.float32, fmt: str = "pt",
                      model: torch.nn.Module | None = None, name: str = "epoch_{e}"):
    """Write ``n_epochs`` checkpoints of a small CNN whose weights drift; returns the state dicts."""
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    custom_model = model is not None
    model = model or small_cnn()
    folder.mkdir(parents=True, exist_ok=True)
    states = []
    for epoch in range(1, n_epochs + 1):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        if not custom_model:
            model.train()
            model(torch.randn(4, 1, 8, 8))  # moves BatchNorm running statistics and num_batches_tracked
        state = {k: (v.to(dtype) if v.is_floating_point() else v).clone() for k, v in model.state_dict().items()}
        states.append(state)
        path = folder / f"{name.format(e=epoch)}.{fmt}"
        if fmt == "safetensors":
            save_file(state, str(path))
        elif fmt == "ckpt":
            torch.save({"state_dict": state, "epoch": epoch, "global_step": epoch * 10}, path)
        else:
            torch.save(state, path)
    return states


def move_first_epochs(folder, count: int, to):
    """Move the checkpoints of epochs 1..``count`` (as :func:`write_checkpoints` names them) from ``folder`` into
    the new folder ``to``: the first part of a run, for tests that ingest it and then append the rest."""
    to.mkdir()
    for epoch in range(1, count + 1):
        for path in folder.glob(f"epoch_{epoch}.*"):
            path.rename(to / path.name)
    return to


def planted_modes(n_rows: int = 600, n_cols: int = 30, n_modes: int = 3, noise: float = 0.0, seed: int = 0):
    """Trajectories that are exactly affine images of ``n_modes`` reference curves (plus optional noise).

    Returns (W, mode_of_row, A, B, curves).
    """
    rng = np.random.default_rng(seed)
    t = np.linspace(0, 1, n_cols)
    curves = np.stack([np.sin((m + 1) * 2.1 * t + m) + (m + 1) * t ** (m + 1) for m in range(n_modes)])
    mode_of_row = rng.integers(0, n_modes, n_rows)
    a = rng.uniform(0.5, 2.0, n_rows) * rng.choice([-1, 1], n_rows)
    b = rng.normal(0, 1, n_rows)
    W = a[:, None] * curves[mode_of_row] + b[:, None]
    if noise:
        W = W + noise * rng.normal(size=W.shape) * W.std(axis=1, keepdims=True)
    return W.astype(np.float32), mode_of_row, a, b, curves


@pytest.fixture
def planted_store(tmp_path):
    W, modes, a, b, curves = planted_modes()
    store = from_array(tmp_path / "planted.zarr", W, labels=range(1, W.shape[1] + 1),
                       tensors={"layer1.weight": (20, 10), "layer1.bias": (200,), "layer2.weight": (200,)},
                       target_chunk_bytes=4 * 64 * 30)
    return store, W, modes


@pytest.fixture
def random_store(tmp_path):
    rng = np.random.default_rng(1)
    W = rng.normal(size=(500, 17)).cumsum(axis=1).astype(np.float32)
    store = from_array(tmp_path / "random.zarr", W, labels=range(10, 27), target_chunk_bytes=4 * 17 * 64)
    return store, W


def interruptible_by_sigint() -> None:
    """``preexec_fn`` of a child that tests send SIGINT to: Ctrl-C's default disposition, as in a terminal. A
    test run started in the background of a non-interactive shell (``make test &``) inherits SIGINT ignored,
    and Python then installs no KeyboardInterrupt handler in the child: the signal would be lost."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def spawn_waiting_child(script: str, *args, **popen_options):
    """Run ``script`` (python source) in a child that has done its imports, prints "ready" and then waits for a
    line on stdin before the work to be killed: kill points then land in the work, not in the imports.
    Start several at once so that their imports overlap."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.Popen([sys.executable, "-c", script, *map(str, args)], env=env, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, preexec_fn=interruptible_by_sigint,
                            **popen_options)


def release(proc) -> None:
    """Wait for the child's "ready" and let it start its work."""
    assert proc.stdout.readline().strip() == "ready"
    proc.stdin.write("go\n")
    proc.stdin.flush()


def kill_after(proc, seconds: float) -> None:
    """SIGKILL ``proc`` ``seconds`` into its work and reap it. Call it after :func:`release`: the child's "ready"
    line is the readiness signal, so the delay places the kill inside the work (a fraction of the work's
    measured duration), never inside the child's imports."""
    import signal
    import time

    time.sleep(seconds)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def s3_bucket_at(endpoint: str, bucket: str):
    """Point boto and s3fs at an S3 server on ``endpoint`` (as a user's AWS_ENDPOINT_URL and credentials
    would), make ``bucket`` there, and yield its filesystem; the environment is restored after."""
    import fsspec

    patch = pytest.MonkeyPatch()
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint}.items():
        patch.setenv(key, value)
    patch.setitem(fsspec.config.conf, "s3", {"endpoint_url": endpoint})
    fsspec.filesystem("s3").clear_instance_cache()
    fs = fsspec.filesystem("s3")
    fs.mkdir(bucket)
    try:
        yield fs
    finally:
        patch.undo()
        fsspec.filesystem("s3").clear_instance_cache()
