"""Options, output and error handling shared by every command."""

from __future__ import annotations

import functools
import json
import sys
import traceback

import typer
from rich.console import Console

from cmdtool.errors import CmdtoolError
from cmdtool.progress import RichProgress
from cmdtool.store import format as fmt

state = {"debug": False}
# soft_wrap: long lines are not broken when output goes to a pipe or a file
console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)

StoreOption = typer.Option(fmt.DEFAULT_STORE, "--store", "-s", envvar=fmt.STORE_ENV_VAR,
                           help="Trajectory store to use (a folder). Also set by $CMDTOOL_STORE.",
                           show_default=True)
JsonOption = typer.Option(False, "--json", help="Print the result as JSON on stdout (for scripts).")
QuietOption = typer.Option(False, "--quiet", "-q", help="No progress bars or notes.")
EpochsOption = typer.Option(None, "--epochs",
                            help="Epoch window A:B of labels (inclusive; either end may be left out).")


def progress_for(quiet: bool) -> RichProgress:
    return RichProgress(console=err_console, enabled=not quiet)


def print_json(data) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def error_text(exc: CmdtoolError) -> str:
    """The error's line; a library parameter it names is spelled as the command-line flag (modes -> --modes)."""
    render = getattr(exc, "render", None)
    return render(lambda name: "--" + name.replace("_", "-")) if render is not None else str(exc)


def fail(message: str, code: int = 2):
    err_console.print(f"[bold red]error:[/bold red] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def handle_errors(func):
    """Turn library errors into one line on stderr and an exit code (2 misuse, 1 failure); --debug re-raises."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except CmdtoolError as exc:
            if state["debug"]:
                traceback.print_exc()
            fail(error_text(exc), exc.exit_code)
        except KeyboardInterrupt:
            err_console.print("interrupted; committed work is kept, run the command again to resume")
            raise typer.Exit(130)
        except (typer.Exit, typer.Abort):
            raise
        except OSError as exc:
            if state["debug"]:
                raise
            fail(f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc), 1)
        except Exception as exc:  # noqa: BLE001
            if state["debug"]:
                raise
            fail(f"internal error: {type(exc).__name__}: {exc} (rerun with --debug for a traceback)", 1)

    return wrapper
