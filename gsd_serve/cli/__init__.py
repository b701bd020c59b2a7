"""The `gsd-serve` command: generate, bench, tune, distill and serve, one module each (main.py builds the
parser from their `register` functions).

The top layer: may import gsd_serve.core, gsd_serve.models and gsd_serve.serving; nothing imports it.
"""
from .args import EXIT_ERROR, EXIT_USAGE, CliError
from .main import main

__all__ = ["EXIT_ERROR", "EXIT_USAGE", "CliError", "main"]
