"""One module per command; each exposes ``register(app)``. A new command is a module plus a line here."""

from . import compare, decompose, evaluate, info, ingest, landscape, reconstruct, verify

MODULES = [ingest, info, decompose, reconstruct, compare, verify, evaluate, landscape]


def register_all(app) -> None:
    for module in MODULES:
        module.register(app)
