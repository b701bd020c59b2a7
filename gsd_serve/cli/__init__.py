"""The `gsd-serve` command: generate, bench, tune, distill, serve, bench-serve, chaos and soak, one module each
(main.py builds the parser from their `register` functions). Each parses its arguments and calls into
gsd_serve.training or gsd_serve.tools (generate drives the Engine itself).

The top layer: may import every other layer (core, models, training, serving, tools); nothing imports it.
"""
from .args import EXIT_ERROR, EXIT_USAGE, CliError
from .main import main

__all__ = ["EXIT_ERROR", "EXIT_USAGE", "CliError", "main"]
