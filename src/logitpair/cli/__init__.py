"""The ``logitpair`` command line. Nothing in the package imports this layer."""

from logitpair.cli.main import main

__all__ = ["main"]
