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


class LeaseLostError(StoreLockedError):
    """A writer's lock on object storage was taken over by another writer while it was held (its lease was not
    renewed in time); the writer stopped writing (docs/store.md, "Locks")."""


class CorruptionError(StoreError):
    """A chunk of the store failed its checksum."""


class ParameterError(UsageError):
    """A parameter of an analyzer (or of another library call) has a value it cannot take.

    The message is a template whose ``{name}`` fields are parameter names: ``str(error)`` spells them as the
    library does (``modes``), and the command line spells them as its flags (``--modes``) through
    :meth:`render`. ``parameters`` lists the names, the first one being the parameter at fault.
    """

    def __init__(self, template: str, *parameters: str, **values):
        self.template, self.parameters, self.values = template, parameters, values
        super().__init__(self.render())

    def render(self, spell=lambda name: name) -> str:
        """The message with each parameter name written as ``spell(name)`` (e.g. a command-line flag)."""
        return self.template.format(**{name: spell(name) for name in self.parameters}, **self.values)


class NotFittedError(UsageError):
    """A fitted model's result was asked of an analyzer that was not fitted (or whose fit failed)."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its class name when it has none), for one-line errors that
    quote what a library said."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
