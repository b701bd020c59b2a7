"""`gsd-serve soak`: steady load on this machine for a while; memory and leftovers checked.

Starts the same local stack as `gsd-serve chaos` (own Ray cluster, Serve on loopback, redis-server, 2 draft
and 2 target replicas, an API key) and streams chat completions from `--streams` clients for `--minutes`.
Passes when no request failed, every answer equals the in-process engine's greedy output, the resident
memory of every process (router and workers) stays within 10% of its level after warm-up, and afterwards
no session, in-flight request or queued Verify item is left. Prints (and with --out writes) a JSON report.
"""
from __future__ import annotations

import sys

from .args import positive_int
from .chaos import _emit


def cmd_soak(args) -> int:
    from ..tools.reliability import local_run

    report = local_run("soak", args.minutes * 60, args.streams, args.max_tokens,
                       warmup_s=args.warmup * 60 if args.warmup is not None else None)
    report["command"] = "gsd-serve " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["soak"] else "gsd-serve soak"
    return _emit(report, args.out)


def register(sub) -> None:
    p = sub.add_parser("soak", help="steady load for a while: memory flat, no leftover sessions or requests",
                       description=__doc__)
    p.add_argument("--minutes", type=float, default=10.0, help="how long the load runs (default 10)")
    p.add_argument("--warmup", type=float, default=None,
                   help="minutes of warm-up before memory is compared (default: a quarter, at most 2)")
    p.add_argument("--streams", type=positive_int("--streams"), default=16, help="concurrent client streams (16)")
    p.add_argument("--max-tokens", type=positive_int("--max-tokens"), default=32, help="tokens per answer (32)")
    p.add_argument("--out", help="also write the JSON report here (e.g. bench/results/DATE-CPU-soak/soak.json)")
    p.set_defaults(func=cmd_soak)
