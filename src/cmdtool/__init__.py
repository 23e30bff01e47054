"""cmdtool: post-hoc analysis of neural-network training dynamics from saved checkpoints.

Quick use::

    import cmdtool
    cmdtool.ingest(["ckpts/"], "run.zarr")
    store = cmdtool.open_store("run.zarr")
    for start, stop, block in store.iter_blocks():   # row blocks of W (N x T), read ahead in a thread
        ...
"""

from .errors import CmdtoolError, UsageError
from .ingest import ingest
from .store import TrajectoryStore, open_store

__version__ = "0.1.0"

__all__ = ["CmdtoolError", "TrajectoryStore", "UsageError", "ingest", "open_store", "__version__"]
