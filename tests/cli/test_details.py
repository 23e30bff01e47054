"""What a user meets around the work: usage errors as one line, no progress bars in logs, normal file
permissions and safetensors metadata on reconstructed checkpoints."""

from __future__ import annotations

import os
import stat

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

import cmdtool
from cmdtool.analyzers.cmd.posthoc import PosthocCMD
from cmdtool_cli.app import app

from tests.conftest import write_checkpoints

runner = CliRunner()


@pytest.mark.parametrize("args, needle", [
    (["decompose", "--modez", "3"], "No such option: --modez"),
    (["decompose", "--modes", "abc"], "Invalid value for '--modes'"),
    (["ingest"], "Missing argument"),
    (["frobnicate"], "No such command 'frobnicate'"),
    (["ingest", "ck", "--memory-budget"], "requires an argument"),
])
def test_usage_errors_are_one_line_with_where_to_look(args, needle):
    result = runner.invoke(app, args)
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert lines[0].startswith("error: ") and needle in lines[0] and "--help`)" in lines[0]


def test_no_progress_bar_lines_when_stderr_is_not_a_terminal(tmp_path):
    write_checkpoints(tmp_path / "ck", n_epochs=3)
    (tmp_path / "ck" / "README.txt").write_text("notes")
    result = runner.invoke(app, ["ingest", str(tmp_path / "ck"), "--store", str(tmp_path / "s.zarr")])
    assert result.exit_code == 0, result.output
    assert "━" not in result.output and "ingesting" not in result.output  # CliRunner's stderr is no terminal
    assert "README.txt: not a checkpoint, skipped" in result.output       # notes still say what was left out


@pytest.fixture
def safetensors_run(tmp_path):
    states = write_checkpoints(tmp_path / "ck", n_epochs=6)
    for epoch, state in enumerate(states, start=1):  # the sources carry metadata, as HF's writers add
        (tmp_path / "ck" / f"epoch_{epoch}.pt").unlink()
        save_file(state, str(tmp_path / "ck" / f"epoch_{epoch}.safetensors"),
                  metadata={"format": "pt", "producer": "trainer-x"})
    cmdtool.ingest([tmp_path / "ck"], tmp_path / "s.zarr")
    store = cmdtool.open_store(tmp_path / "s.zarr", mode="r+")
    PosthocCMD(modes=2, samples=60).fit(store).save("default")
    return tmp_path, store


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_reconstructed_checkpoints_respect_the_umask_and_keep_metadata(safetensors_run, umask, mode):
    tmp_path, store = safetensors_run
    previous = os.umask(umask)
    try:
        one = runner.invoke(app, ["reconstruct", "-e", "6", "--store", str(store.path),
                                  "--out", str(tmp_path / "one.safetensors")])
        many = runner.invoke(app, ["reconstruct", "-e", "5", "-e", "6", "--store", str(store.path),
                                   "--out", str(tmp_path / "many")])
    finally:
        os.umask(previous)
    assert one.exit_code == 0 and many.exit_code == 0, one.output + many.output
    written = [tmp_path / "one.safetensors", *sorted((tmp_path / "many").glob("*.safetensors"))]
    assert len(written) == 3
    for path in written:
        assert stat.S_IMODE(path.stat().st_mode) == mode, path  # was 0600, from the temporary file
        with safe_open(str(path), framework="pt") as handle:
            assert handle.metadata() == {"format": "pt", "producer": "trainer-x"}
    # a source without metadata (a .pt) written as safetensors gets the {"format": "pt"} loaders expect
    write_checkpoints(tmp_path / "pt", n_epochs=4)
    cmdtool.ingest([tmp_path / "pt"], tmp_path / "p.zarr")
    PosthocCMD(modes=2, samples=60).fit(cmdtool.open_store(tmp_path / "p.zarr", mode="r+")).save("default")
    result = runner.invoke(app, ["reconstruct", "-e", "4", "--store", str(tmp_path / "p.zarr"), "--format",
                                 "safetensors", "--out", str(tmp_path / "p4.safetensors")])
    assert result.exit_code == 0, result.output
    with safe_open(str(tmp_path / "p4.safetensors"), framework="pt") as handle:
        assert handle.metadata() == {"format": "pt"}
        assert set(handle.keys()) == set(torch.load(tmp_path / "pt" / "epoch_4.pt", weights_only=True))


def _help_texts(command):
    """Every help string of a click/typer command and its options, as written in the code."""
    texts = [command.help or ""]
    texts += [getattr(param, "help", None) or "" for param in command.params]
    return texts


def test_help_texts_keep_bracketed_words_such_as_extras():
    """Rich markup would swallow `[dask]` in `pip install 'cmdtool[dask]'`: every bracketed word a help text
    names must reach the rendered --help (written as `\\[dask]` in the code)."""
    import re

    from cmdtool_cli.commands import COMMANDS, load_command

    checked = 0
    for name in COMMANDS:
        command = load_command(name)
        rendered = " ".join(runner.invoke(app, [name, "--help"], env={"COLUMNS": "400"}).output.split())
        for text in _help_texts(command):
            for word in re.findall(r"\\?\[[a-z0-9_,-]+\]", text):
                checked += 1
                assert word.lstrip("\\") in rendered, (name, word)
    assert checked >= 1  # at least the --scheduler help's `cmdtool[dask]`


def test_info_in_a_pipe_shows_whole_tensor_names(tmp_path):
    """Not a terminal (a pipe, a file, CliRunner): the table takes its natural width, no name is cut with '…'."""
    import numpy as np

    from cmdtool.store import from_array

    long_name = "model.encoder.layers.11.self_attention.output_projection.low_rank_adapter.weight"
    W = np.arange(60 * 4, dtype=np.float32).reshape(60, 4)
    from_array(tmp_path / "s.zarr", W, labels=range(4), tensors={long_name: (6, 5), "head.bias": (30,)})
    out = CliRunner().invoke(app, ["info", "--store", str(tmp_path / "s.zarr")])
    assert out.exit_code == 0, out.output
    row = next(line for line in out.stdout.splitlines() if long_name in line)
    assert "…" not in out.stdout and row.split() == [long_name, "│", "6x5", "│", "float32", "│", "parameter", "│",
                                                      "30"]
