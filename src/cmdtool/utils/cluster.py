"""Where passes and ingest run: in this process (the default) or on a Dask cluster (docs/scale.md).

``with on_cluster("tcp://host:8786"):`` (or ``"local:N"`` for a :class:`distributed.LocalCluster` of N worker
processes on this machine) makes every pass started inside the block run as Dask work on that cluster
(:func:`cmdtool.passes.dask_engine.run_pass`) and ingest write by groups of checkpoint columns on it;
:func:`active_client` is how the pass runner and ingest ask. Nothing here imports dask until a cluster is asked
for, so the in-process path and `cmdtool --help` never pay for it.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import re

from ..errors import CmdtoolError, UsageError

SCHEDULER_ENV_VAR = "CMDTOOL_SCHEDULER"
SCHEDULER_TIMEOUT_ENV_VAR = "CMDTOOL_SCHEDULER_TIMEOUT"
DEFAULT_CONNECT_TIMEOUT = 30.0

_client: contextvars.ContextVar = contextvars.ContextVar("cmdtool_dask_client", default=None)


class ClusterError(CmdtoolError):
    """The cluster could not be reached, or its workers kept dying while running a pass (exit 1)."""


def active_client():
    """The :class:`distributed.Client` of the enclosing :func:`on_cluster` block, or None (run in process)."""
    return _client.get()


def parse_scheduler(spec: str | None) -> tuple[str, int | str] | None:
    """``None``/``""``/``"none"`` -> None (in process); ``"local:N"`` -> ("local", N); otherwise ("address", spec)
    (``tcp://host:8786``, ``host:8786``, ``tls://...``, as `dask scheduler` prints it)."""
    if spec is None or not spec.strip() or spec.strip().lower() in ("none", "in-process"):
        return None
    spec = spec.strip()
    match = re.fullmatch(r"local(?::(\d+))?", spec)
    if match:
        workers = int(match.group(1)) if match.group(1) else (os.cpu_count() or 1)
        if workers < 1:
            raise UsageError(f"--scheduler {spec}: a local cluster needs at least 1 worker")
        return ("local", workers)
    if not re.fullmatch(r"([a-z]+://)?[A-Za-z0-9_.\-\[\]:]+(:\d+)?/?", spec):
        raise UsageError(f"cannot read --scheduler {spec!r}: give a scheduler address (tcp://host:8786) or local:N")
    return ("address", spec)


def connect_timeout_from_env() -> float:
    """Seconds to wait for a scheduler: ``$CMDTOOL_SCHEDULER_TIMEOUT``, else 30."""
    text = os.environ.get(SCHEDULER_TIMEOUT_ENV_VAR, "").strip()
    if not text:
        return DEFAULT_CONNECT_TIMEOUT
    try:
        seconds = float(text)
    except ValueError:
        seconds = float("nan")
    if not seconds > 0 or seconds == float("inf"):
        raise UsageError(f"${SCHEDULER_TIMEOUT_ENV_VAR}={text!r}: give the seconds to wait for the Dask scheduler "
                         f"as a positive number (default {DEFAULT_CONNECT_TIMEOUT:g})")
    return seconds


def _import_distributed():
    try:
        import distributed
    except ImportError:
        raise UsageError("running on a Dask cluster needs the dask extra: pip install 'cmdtool[dask]'") from None
    return distributed


@contextlib.contextmanager
def on_cluster(spec: str | None, connect_timeout: float | None = None):
    """Run the passes (and ingest) started inside the block on the cluster ``spec`` (see :func:`parse_scheduler`);
    ``None`` runs them in process. A ``local:N`` cluster is started for the block and closed after it.
    ``connect_timeout``: seconds to wait for a scheduler address (default ``$CMDTOOL_SCHEDULER_TIMEOUT``, else 30).

    One worker thread per worker process: a task's float64 block arithmetic is already as wide as the block, and
    N processes side by side do not contend for the GIL or for the zarr decoder.
    """
    parsed = parse_scheduler(spec)
    if parsed is None:
        yield None
        return
    if connect_timeout is None:
        connect_timeout = connect_timeout_from_env()
    distributed = _import_distributed()
    kind, value = parsed
    with contextlib.ExitStack() as stack:
        if kind == "local":
            cluster = stack.enter_context(distributed.LocalCluster(
                n_workers=value, threads_per_worker=1, processes=True, dashboard_address=None))
            client = stack.enter_context(distributed.Client(cluster))
        else:
            try:
                client = stack.enter_context(distributed.Client(value, timeout=connect_timeout))
            except (OSError, TimeoutError) as exc:
                raise ClusterError(f"cannot reach the Dask scheduler at {value}: {exc}") from None
        token = _client.set(client)
        try:
            yield client
        finally:
            _client.reset(token)


@contextlib.contextmanager
def using_client(client):
    """Run the passes started inside the block on an existing :class:`distributed.Client` (a library user's own
    cluster, a test's LocalCluster); the client is not closed afterwards."""
    token = _client.set(client)
    try:
        yield client
    finally:
        _client.reset(token)


def store_address(store) -> str:
    """The string a worker opens a store by (:func:`cmdtool.store.open_store`): what the client opened it with."""
    return str(getattr(store, "url", None) or store.path)


def killed_worker_error(exc: BaseException, what: str, kept: str = "nothing was committed") -> ClusterError | None:
    """The one-line error for a Dask task that kept killing its workers (``distributed.KilledWorker``), or None."""
    if type(exc).__name__ != "KilledWorker":
        return None
    return ClusterError(f"{what} failed on the Dask cluster: workers died running it more often than the "
                        f"scheduler retries (distributed.scheduler.allowed-failures); {kept}")


__all__ = ["SCHEDULER_ENV_VAR", "SCHEDULER_TIMEOUT_ENV_VAR", "ClusterError", "active_client",
           "connect_timeout_from_env", "killed_worker_error", "on_cluster", "parse_scheduler", "store_address",
           "using_client"]
