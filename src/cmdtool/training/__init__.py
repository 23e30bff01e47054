"""Training-time methods: optimizer wrappers and callbacks that use the training dynamics while a model trains."""

from .kga import KGA

__all__ = ["KGA"]
