"""Subcommands that live in their own modules (bench, tune, serve) register here."""
from __future__ import annotations


def register(sub) -> None:
    for module in ("bench", "serve_cli"):
        try:
            mod = __import__(f"gsd_serve.{module}", fromlist=["register"])
        except ModuleNotFoundError as exc:
            if exc.name != f"gsd_serve.{module}":
                raise
            continue
        mod.register(sub)
