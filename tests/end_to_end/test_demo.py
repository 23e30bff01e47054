"""examples/demo.py, the tour of docs/demo.md: a real digits run through every command, and its output folder rule."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cmdtool.store import open_store
from cmdtool.workflows.evaluate import Evaluation

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "src"), str(REPO / "cli")]))
    done = subprocess.run([sys.executable, str(REPO / "examples" / "demo.py"), "--epochs", "6", "--out",
                           str(tmp_path / "demo")], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "== summary: held-out test accuracy" in done.stdout
    run = Evaluation.load(open_store(tmp_path / "demo" / "cmdtool.zarr"), "default")
    assert set(run.methods()) == {"original", "ema", "swa", "cmd", "cmd-online", "dmd", "pca"}
    accuracy = run.curve("original", "test_acc")[1]
    assert len(accuracy) == 6 and accuracy[-1] > 0.8      # a real run learns the digits in a few epochs
    assert (tmp_path / "demo" / "landscape").is_dir() and (tmp_path / "demo" / "compare_errors.png").is_file()


def test_demo_replaces_only_its_own_folder(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("demo_script", REPO / "examples" / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    users = tmp_path / "mine"
    users.mkdir()
    (users / "notes.txt").write_text("keep me")
    with pytest.raises(SystemExit, match="did not write"):
        demo.start_fresh(users)
    assert (users / "notes.txt").read_text() == "keep me"
    ours = tmp_path / "demo"
    demo.start_fresh(ours)
    (ours / "old-output.txt").write_text("from an earlier demo")
    demo.start_fresh(ours)
    assert [p.name for p in ours.iterdir()] == [demo.DEMO_MARKER]
