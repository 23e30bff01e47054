"""Utilities shared by every part of the package: units, thread limits, progress, the compute device, system
calls, the plotting style, output folders and the Dask client."""
