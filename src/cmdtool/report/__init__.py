"""Reporters: turn analysis results back into things users open (checkpoints, and later plots and html)."""

from .checkpoints import build_state_dict, source_format, write_state_dict

__all__ = ["build_state_dict", "source_format", "write_state_dict"]
