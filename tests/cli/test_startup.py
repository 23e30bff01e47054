"""Start-up (issue #11): `cmdtool --help`, `info` and `verify` import neither torch nor matplotlib, and `report`
imports no torch; each command runs in a fresh process and is checked for what it imported."""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest

from tests.analyzers.test_contract import make, store  # noqa: F401 (store: a fixture)


@pytest.mark.parametrize("args, allowed", [
    (["--help"], set()),
    (["info"], set()),             # from the store's metadata documents (store/metadata.py)
    (["verify", "-q"], {"numpy"}),  # chunk files decoded with numcodecs (store/chunk_files.py)
])
def test_startup_imports_only_what_the_command_needs(store, args, allowed):
    """`cmdtool --help`, `info` and `verify` start fast (issue #11): torch takes ~1 s to import, zarr ~0.5 s,
    matplotlib ~0.5 s, numpy ~0.1 s; each command runs in a fresh process and is checked for what it imported."""
    script = ("import sys\nfrom cmdtool_cli.app import app\n"
              "try:\n    app(sys.argv[2:] + (['--store', sys.argv[1]] if sys.argv[2] != '--help' else []))\n"
              "except SystemExit as exit:\n    assert not exit.code, exit.code\n"
              "print('IMPORTED', sorted(m for m in ('torch', 'matplotlib', 'scipy', 'zarr', 'numpy') "
              "if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", script, str(store.path), *args], capture_output=True, text=True,
                         check=True)
    imported = next(line for line in out.stdout.splitlines() if line.startswith("IMPORTED "))
    assert set(ast.literal_eval(imported[len("IMPORTED "):])) <= allowed, out.stdout[-2000:]


def test_report_of_every_analysis_imports_no_torch(store, tmp_path):
    """`cmdtool report` reads the saved results and draws them with numpy and matplotlib: no torch (~1 s)."""
    for method in ("cmd", "dmd", "pca", "pod"):
        make(method).fit(store).save("default")
    script = ("import sys\nfrom cmdtool_cli.app import app\n"
              "try:\n    app(['report', '--store', sys.argv[1], '--out', sys.argv[2], '-q'])\n"
              "except SystemExit as exit:\n    assert not exit.code, exit.code\n"
              "print('IMPORTED', sorted(m for m in ('torch',) if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", script, str(store.path), str(tmp_path / "report")],
                         capture_output=True, text=True, check=True)
    assert "IMPORTED []" in out.stdout, out.stdout[-2000:]
    assert (tmp_path / "report" / "index.html").is_file()
