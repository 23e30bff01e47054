"""Exceptions that carry a one-line message for the user.

The CLI maps them to exit codes: :class:`UsageError` (bad input, wrong option, missing prerequisite) -> 2,
any other :class:`CmdtoolError` (a failure while doing valid work) -> 1. Library users catch them as usual.
"""


class CmdtoolError(Exception):
    """A failure with a message fit to show a user as one line."""

    exit_code = 1


class UsageError(CmdtoolError):
    """The user asked for something that cannot be done as asked (bad input, option or state)."""

    exit_code = 2


class CheckpointError(UsageError):
    """A checkpoint file cannot be read safely or does not fit the store."""


class StoreError(CmdtoolError):
    """The trajectory store is missing, locked, corrupt or of an unknown format."""


class StoreLockedError(StoreError):
    exit_code = 1


class CorruptionError(StoreError):
    """A chunk of the store failed its checksum."""
