"""The pass engine: streaming passes over the row blocks of a store, in this process (:mod:`.local`) or as Dask
tasks (:mod:`.dask_engine`), feeding accumulators that follow one contract."""
