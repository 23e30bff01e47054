"""Storage: the chunked zarr trajectory store, its block reader and its results.

The names below are imported on first use (PEP 562): ``cmdtool.store.format`` and ``cmdtool.store.layout`` are
plain Python, and importing them (e.g. for the CLI's defaults) does not import zarr.
"""

_LAZY = {
    "Layout": ".layout", "TensorEntry": ".layout", "TimeRecord": ".layout",
    "Result": ".results", "ResultsCatalog": ".results", "ResultWriter": ".results",
    "RowBlock": ".reader", "TrajectoryStore": ".store", "default_store_path": ".store", "from_array": ".store",
    "open_store": ".store",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_LAZY)
