"""Workflows built on the analyzers: comparing methods, evaluating a metric on modelled checkpoints, the loss
landscape and weight averages (EMA / SWA)."""
