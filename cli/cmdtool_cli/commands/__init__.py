"""One module per command; each exposes ``register(app)``. A new command is a module plus a line here."""

from . import compare, decompose, evaluate, info, ingest, landscape, migrate, rechunk, reconstruct, report, verify

MODULES = [ingest, info, decompose, reconstruct, compare, evaluate, landscape, report, verify, rechunk, migrate]


def register_all(app) -> None:
    for module in MODULES:
        module.register(app)
