"""The ``cdfkd`` command line; ``main`` is the console script's entry point."""

from cdfkd.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
