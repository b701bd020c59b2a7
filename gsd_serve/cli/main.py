"""The `gsd-serve` command line: the parser and the entry point."""
from __future__ import annotations

import argparse
import os
import sys

from .args import EXIT_USAGE, CliError

SUBCOMMANDS = ("generate", "bench", "tune", "distill", "serve", "chaos", "soak", "bench_serve")


def make_parser() -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(
        prog="gsd-serve",
        description="Graph-structured speculative decoding: generate, benchmark, distill drafts, serve.")
    parser.add_argument("--version", action="version", version=f"gsd-serve {__import__('gsd_serve').__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in SUBCOMMANDS:
        importlib.import_module(f"{__package__}.{name}").register(sub)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    """The errors a command reports as one line: bad arguments, prompts, configs, models. ModelLoadError
    only once its module is loaded (it cannot be raised before), so that a command which fails on its
    arguments never imports torch and transformers."""
    from ..core.config import ConfigError
    from ..core.prompts import PromptError

    loading = sys.modules.get("gsd_serve.models.checkpoints")
    return (CliError, ConfigError, PromptError, ValueError) + ((loading.ModelLoadError,) if loading else ())


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import warnings
    warnings.filterwarnings("ignore")
    parser = make_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except _user_errors() as exc:
        print(f"gsd-serve {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"gsd-serve {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
