"""cmdtool: post-hoc analysis of neural-network training dynamics from saved checkpoints.

Quick use::

    import cmdtool
    cmdtool.ingest(["ckpts/"], "run.zarr")
    store = cmdtool.open_store("run.zarr")
    for start, stop, block in store.iter_blocks():   # row blocks of W (N x T), read ahead in a thread
        ...

What these names need (torch, zarr) is imported on first use, so that importing a light part of the package
(the errors, the analyzer registry for ``cmdtool --help``) stays fast.
"""

from .errors import CmdtoolError, UsageError

__version__ = "0.1.0"


def ingest(*args, **kwargs):
    """Stream checkpoints into a trajectory store: :func:`cmdtool.ingestion.ingest.ingest` (imports torch)."""
    from .ingestion.ingest import ingest as run_ingest

    return run_ingest(*args, **kwargs)


def open_store(*args, **kwargs):
    """Open a trajectory store: :func:`cmdtool.store.store.open_store` (imports zarr)."""
    from .store.store import open_store as run_open_store

    return run_open_store(*args, **kwargs)


def __getattr__(name: str):
    if name == "TrajectoryStore":
        from .store.store import TrajectoryStore

        return TrajectoryStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["CmdtoolError", "TrajectoryStore", "UsageError", "ingest", "open_store", "__version__"]
