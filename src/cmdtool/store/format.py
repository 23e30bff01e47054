"""Names and constants of the on-disk trajectory store (documented in docs/store.md)."""

FORMAT_VERSION = 2
DEFAULT_STORE = "cmdtool.zarr"
STORE_ENV_VAR = "CMDTOOL_STORE"

ATTRS_KEY = "cmdtool"            # root-group attribute holding layout, time axis and format version
TRAJECTORIES = "trajectories"    # float32 (parameter, epoch)
INTEGER_VALUES = "integer_values"  # int64 (integer_row, epoch): non-float entries kept aside for reconstruction
RESULTS = "results"              # one sub-group per analysis run

# Coordinate arrays (format 2): what xarray / Pangeo readers see as labels.
EPOCH = "epoch"                  # int64 (epoch,): the label of every column (as long as `trajectories` is wide)
TENSOR = "tensor"                # string (tensor,): names of the trajectory tensors, in row order
TENSOR_INDEX = "tensor_index"    # int32 (parameter,): which `tensor` each row belongs to
DIMS_TRAJECTORIES = ("parameter", "epoch")
DIMS_INTEGER_VALUES = ("integer_row", "epoch")

# Locks (format 2): empty zarr groups under `locks/` whose zarr.json is held with flock, so that the store holds
# nothing a zarr/xarray reader does not recognise. Format 1 kept plain files in the root instead.
LOCKS = "locks"
INGEST_LOCK = "ingest"           # held by the (single) writer of trajectories (ingest, rechunk, migration)
RESULTS_LOCK = "results"         # held while the results index is rewritten
V1_LOCK_FILES = (".ingest.lock", ".results.lock")

# A rechunk writes the new arrays under this group, then swaps them in (docs/store.md, "Rechunk").
STAGING = "staging"

# Target uncompressed chunk payload; rows per chunk follow from the column count.
TARGET_CHUNK_BYTES = 8 * 1024**2
MAX_CHUNK_COLUMNS = 256
INGEST_MEMORY_BUDGET = "1GiB"    # default buffer of checkpoints written together (`ingest --memory-budget`; rechunk's)
# The row blocks the analyses read (passes.DEFAULT_BLOCK_BYTES): chunk rows are capped so that a block of whole
# chunk rows over every column stays about this size, whatever the model: without the cap, stores of large
# models (narrow chunks, tall rows) get blocks several times larger than small models' and the analyses' peaks
# follow. The cost is smaller chunk files for narrow chunks (224 KB at Tc = 1).
READ_BLOCK_BYTES = 32 * 1024**2
# Checkpoints a new store's chunk rows are sized for when its first ingest brings fewer: a block spans every
# column and is whole chunk rows, so rows sized for a first ingest of 30 of 90 checkpoints would make the smallest
# block 3x the read block once all 90 are in, and for 1 of 150 (ingesting during training) 9x. Stores with wide
# chunks (smaller models) are not affected: their rows are capped lower anyway.
PLANNED_CHECKPOINTS = 150
DIGEST = "xxh3_128"  # content hash of every ingested file: non-cryptographic and faster than sha256
# Codecs a store can be written with (`--codec`): both keep the crc32c checksum of every chunk.
CODECS = ("lz4", "none")
DEFAULT_CODEC = "lz4"
