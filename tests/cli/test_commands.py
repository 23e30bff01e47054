"""The command table and the CLI's tables over the analyzers: every command module listed with its summary, the
flag spellings and printed layouts name only what exists, parameters are spelled as flags in errors."""

from __future__ import annotations

from typer.testing import CliRunner

import cmdtool.analyzers as registry
from cmdtool.analyzers import available_methods, get_analyzer
from cmdtool_cli.app import app
from cmdtool_cli.param_flags import SPELLINGS
from cmdtool_cli.summaries import BLOCKS, generic_blocks

from tests.analyzers.test_contract import REPO, make, runner, store  # noqa: F401 (store: a fixture)


def test_cli_tables_name_only_what_exists():
    """The CLI's spelling table names parameters some analyzer declares, and every built-in method has its printed
    layout (a stale entry after a rename would silently fall back to the default)."""
    declared = {p.name for cls in (get_analyzer(m) for m in available_methods()) for p in cls.params}
    assert set(SPELLINGS) <= declared
    assert set(BLOCKS) == set(registry.BUILTIN)


def test_a_method_without_a_cli_layout_prints_its_summary_numbers(store):
    pca = make("pca").fit(store)
    [table] = generic_blocks(pca)
    assert table.title == "pca / unsaved" and table.columns == [("figure", "left"), ("value", "right")]
    assert [row[0] for row in table.rows] == ["relative_error", "relative_error_motion", "stored_floats",
                                              "fit_seconds", "dims", "explained_variance_ratio_total",
                                              "final_epoch_error", "worst_epoch_error"]
    assert table.rows[0][1] == f"{pca.metrics_['relative_error']:.4g}" and table.rows[4][1] == str(pca.dims_)


def test_cli_spells_parameters_as_flags(store):
    out = runner.invoke(app, ["decompose", "--modes", "500", "--samples", "50", "--store", str(store.path)])
    assert out.exit_code == 2
    assert ("--modes 500 is more than the 50 sampled weights: raise --samples to at least 500 (the store has "
            "400 weights to sample), or lower --modes") in out.output
    out = runner.invoke(app, ["decompose", "--modes", "5", "--samples", "5000", "--store", str(store.path)])
    assert out.exit_code == 0  # every weight is sampled: 400 >= 5 modes
    out = runner.invoke(app, ["decompose", "--modes", "500", "--samples", "5000", "--store", str(store.path)])
    assert out.exit_code == 2 and "all the weights CMD models in this store: lower --modes to at most 400" in out.output
    out = runner.invoke(app, ["decompose", "-m", "kga", "--window", "0", "--store", str(store.path)])
    assert out.exit_code == 2 and "--window must be at least 1 (got 0)" in out.output
    out = runner.invoke(app, ["decompose", "-m", "pod", "--epochs", "5:1", "--store", str(store.path)])
    assert out.exit_code == 2 and "selects no checkpoint" in out.output


def test_command_table_matches_the_commands():
    """`cmdtool --help` lists commands from a table (their modules are imported when used): every entry is a
    registered command whose own help starts with the summary shown, and no command module is left out."""
    from cmdtool_cli.commands import COMMANDS, load_command

    modules = {p.stem for p in (REPO / "cli" / "cmdtool_cli" / "commands").glob("*.py") if p.stem != "__init__"}
    assert {module for module, _ in COMMANDS.values()} == modules
    for name, (_, summary) in COMMANDS.items():
        command = load_command(name)
        assert command.name == name
        assert " ".join(command.help.split()).startswith(summary), name
    listing = CliRunner().invoke(app, ["--help"]).output
    assert all(name in listing for name in COMMANDS)
