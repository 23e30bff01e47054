"""Options, output and error handling shared by every command."""

from __future__ import annotations

import functools
import inspect
import json
import signal
import sys
import traceback

from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from cmdtool.utils.cluster import SCHEDULER_ENV_VAR
from cmdtool.errors import CmdtoolError, UsageError
from cmdtool.store.location import storage_error
from cmdtool.utils.progress import RichProgress
from cmdtool.store import format as fmt

from .param_flags import long_flag

state = {"debug": False}
# soft_wrap: long lines are not broken when output goes to a pipe or a file
console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)

StoreOption = typer.Option(fmt.DEFAULT_STORE, "--store", "-s", envvar=fmt.STORE_ENV_VAR,
                           help="Trajectory store to use: a folder, or an fsspec URL such as s3://bucket/run.zarr "
                                "(the s3 extra: docs/store.md). Also set by $CMDTOOL_STORE.",
                           show_default=True)
JsonOption = typer.Option(False, "--json", help="Print the result as JSON on stdout (for scripts).")
QuietOption = typer.Option(False, "--quiet", "-q", help="No progress bars or notes.")
EpochsOption = typer.Option(None, "--epochs",
                            help="Epoch window A:B of labels (inclusive; either end may be left out).")
ForceOutputOption = typer.Option(False, "--force", help="Also write into a non-empty folder that cmdtool did not "
                                 "write (files of the same names are replaced, nothing else is touched). Never "
                                 "lifts the rule against writing inside the store or a checkpoint folder.")

AllowGlobalOption = typer.Option(
    [], "--allow-global", metavar="MODULE.NAME",
    help="Also let the weights-only loader build this class found in a torch checkpoint (repeatable), e.g. "
         "--allow-global mypackage.config.TrainConfig: the module is imported and objects of that class are "
         "built from the file's data, on your own responsibility (as torch.serialization.add_safe_globals). "
         "Standard data types (pathlib paths, argparse.Namespace, datetime, ...) need no option: docs/formats.md.")

SchedulerOption = typer.Option(
    None, "--scheduler", envvar=SCHEDULER_ENV_VAR, metavar="ADDRESS",
    help="Run the passes (ingest: the writes, by groups of chunk columns) on a Dask cluster: a scheduler "
         "address (tcp://host:8786, as `dask scheduler` prints it) or local:N for N worker processes on this "
         "machine. Results equal the in-process ones. Also set by "
         f"${SCHEDULER_ENV_VAR}; default: in this process. Needs `pip install 'cmdtool\\[dask]'`; see docs/scale.md.")


def with_scheduler(command):
    """``command`` with the ``--scheduler`` option: its body runs inside :func:`cmdtool.utils.cluster.on_cluster`, so
    every pass it starts runs on that cluster (the library chooses the engine; the command does not know)."""
    signature = inspect.signature(command)
    params = list(signature.parameters.values())
    at = next((k for k, p in enumerate(params) if p.kind is inspect.Parameter.VAR_KEYWORD), len(params))
    scheduler = inspect.Parameter("scheduler", inspect.Parameter.KEYWORD_ONLY, default=SchedulerOption,
                                  annotation=Optional[str])
    params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
              else p for p in params]

    @functools.wraps(command)
    def wrapper(*args, scheduler: Optional[str] = None, **kwargs):
        from cmdtool.utils.cluster import on_cluster

        with on_cluster(scheduler):
            return command(*args, **kwargs)

    wrapper.__signature__ = signature.replace(parameters=params[:at] + [scheduler] + params[at:])
    wrapper.__annotations__ = {**getattr(command, "__annotations__", {}), "scheduler": Optional[str]}
    return wrapper


# click's exception classes, found through typer's public BadParameter (typer vendors click in newer releases)
_CLICK_ERRORS = {cls.__name__: cls for cls in typer.BadParameter.__mro__}
ClickException, ClickUsageError = _CLICK_ERRORS["ClickException"], _CLICK_ERRORS["UsageError"]


def allowing_globals(names: list[str]):
    """The block in which the loader also builds the classes ``names`` (--allow-global); refused on a cluster,
    whose worker processes would not know them."""
    from cmdtool.utils.cluster import active_client
    from cmdtool.ingestion.formats import allowed_globals

    if names and active_client() is not None:
        raise UsageError("--allow-global applies in this process only; run this command without --scheduler")
    return allowed_globals(names)


def progress_for(quiet: bool) -> RichProgress:
    """Progress bars only on a terminal (a log file or a pipe gets no bar lines); notes unless --quiet."""
    return RichProgress(console=err_console, enabled=not quiet, bars=err_console.is_terminal)


def print_table(table) -> None:
    """A table on stdout: fitted to the width of a terminal; in a pipe or a file at its natural width, so that no
    cell (a long tensor name) is cut with '…' at 80 columns."""
    if console.is_terminal:
        console.print(table)
        return
    natural = console.measure(table, options=console.options.update_width(1_000_000)).maximum
    width = console.width
    console.width = max(width, natural)
    try:
        console.print(table)
    finally:
        console.width = width


def print_json(data) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def error_text(exc: CmdtoolError) -> str:
    """The error's line; a library parameter it names is spelled as the command-line flag (modes -> --modes)."""
    render = getattr(exc, "render", None)
    return render(long_flag) if render is not None else str(exc)


def say_error(message: str) -> None:
    err_console.print(f"[bold red]error:[/bold red] {escape(message)}", highlight=False, soft_wrap=True)


def fail(message: str, code: int = 2):
    say_error(message)
    raise typer.Exit(code)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every command cleans up (staging folders, locks) the same way."""


def _raise_terminated(signum, frame):
    raise Terminated()


def handle_errors(func):
    """Turn library errors into one line on stderr and an exit code (2 misuse, 1 failure); --debug re-raises.

    SIGINT and SIGTERM end the command like a SIGKILL at that moment would (committed work kept, nothing
    half-written), but with the cleanup run and one line said: exit 130 (SIGINT) or 143 (SIGTERM)."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        previous_term = signal.getsignal(signal.SIGTERM)
        try:
            signal.signal(signal.SIGTERM, _raise_terminated)
        except ValueError:  # not the main thread: keep the default
            previous_term = None
        try:
            return func(*args, **kwargs)
        except CmdtoolError as exc:
            if state["debug"]:
                traceback.print_exc()
            fail(error_text(exc), exc.exit_code)
        except KeyboardInterrupt as exc:
            err_console.print("interrupted; committed work is kept, run the command again to resume",
                              highlight=False)
            raise typer.Exit(143 if isinstance(exc, Terminated) else 130)
        except (typer.Exit, typer.Abort):
            raise
        except OSError as exc:
            if state["debug"]:
                raise
            error = storage_error(exc)
            if error is not None:  # object storage: no credentials, access denied, no bucket
                fail(error_text(error), error.exit_code)
            fail(f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc), 1)
        except Exception as exc:  # noqa: BLE001
            if state["debug"]:
                raise
            error = storage_error(exc)
            if error is not None:
                fail(error_text(error), error.exit_code)
            fail(f"internal error: {type(exc).__name__}: {exc} (rerun with --debug for a traceback)", 1)
        finally:
            if previous_term is not None:
                signal.signal(signal.SIGTERM, previous_term)

    return wrapper


class OneLineErrors(TyperGroup):
    """Usage errors (bad value, missing option, unknown command) as one line with the fix, exit 2, like every
    other error, instead of click's multi-line box."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            code = super().main(args, prog_name, complete_var, False, **extra)
        except ClickUsageError as exc:
            if exc.ctx is not None and type(exc).__name__ == "NoArgsIsHelpError":
                sys.stdout.write(exc.ctx.get_help() + "\n")  # `cmdtool` alone: the help, as before
                sys.exit(0)
            where = exc.ctx.command_path if exc.ctx is not None else "cmdtool"
            message = " ".join(exc.format_message().split())
            say_error(f"{message} (see `{where} --help`)")
            sys.exit(exc.exit_code)
        except ClickException as exc:
            say_error(" ".join(exc.format_message().split()))
            sys.exit(exc.exit_code)
        except typer.Abort:
            say_error("aborted")
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)
