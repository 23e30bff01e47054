"""Names and constants of the on-disk trajectory store (documented in docs/store.md)."""

FORMAT_VERSION = 1
DEFAULT_STORE = "cmdtool.zarr"
STORE_ENV_VAR = "CMDTOOL_STORE"

ATTRS_KEY = "cmdtool"            # root-group attribute holding layout, time axis and format version
TRAJECTORIES = "trajectories"    # float32 (N, T)
INTEGER_VALUES = "integer_values"  # int64 (n_integer, T): non-float entries kept aside for reconstruction
RESULTS = "results"              # one sub-group per analysis run
INGEST_LOCK = ".ingest.lock"     # held by the (single) writer of trajectories
RESULTS_LOCK = ".results.lock"   # held while the results index is rewritten

# Target compressed-chunk payload; rows per chunk follow from the column count.
TARGET_CHUNK_BYTES = 8 * 1024**2
MAX_CHUNK_COLUMNS = 256
INGEST_MEMORY_BUDGET = "1GiB"    # default buffer of checkpoints written together (`ingest --memory-budget`)
