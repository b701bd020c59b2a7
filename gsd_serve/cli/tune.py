"""`gsd-serve tune`: search speculation settings for this machine and save the fastest (tools/tune.py)."""
from __future__ import annotations

from .args import add_model_args, build_engine


def cmd_tune(args) -> int:
    from ..tools.tune import search

    search(args, build_engine)
    return 0


def register(sub) -> None:
    t = sub.add_parser("tune", help="search speculation settings for this hardware and save the fastest",
                       description="Coordinate search over k, merge context, thresholds, depth, width and budget on "
                                   "a subset of prompts; keeps only lossless settings; saves the fastest as the "
                                   "default configuration (explicit flags still override).")
    t.add_argument("--prompts")
    t.add_argument("--limit", type=int, default=6)
    t.add_argument("--max-new-tokens", type=int, default=64)
    t.add_argument("--sweeps", type=int, default=2)
    t.add_argument("--time-limit", type=float, default=0.0, help="seconds (0 = none)")
    t.add_argument("--save", help="where to save (default: the cache directory's tuned.json)")
    add_model_args(t)
    t.set_defaults(func=cmd_tune)
