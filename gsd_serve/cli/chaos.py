"""`gsd-serve chaos`: faults under load on this machine, checked for exactness.

Starts its own Ray cluster, Serve (HTTP and gRPC on free loopback ports), a redis-server and the gsd
application (2 draft and 2 target replicas, float32, an API key), then streams chat completions from
`--streams` clients while it kills a draft replica, kills a target replica and restarts Redis, in turn,
for `--minutes`. Every answer must equal the in-process engine's greedy output; every replica must be
replaced. Prints (and with --out writes) a JSON report: requests, faults, failures, mismatches,
recovery times. Exit status 0 only when the run passed. Talks to loopback addresses only.
"""
from __future__ import annotations

import json
import sys

from .args import positive_int


def cmd_chaos(args) -> int:
    from ..tools.reliability import local_run

    report = local_run("chaos", args.minutes * 60, args.streams, args.max_tokens, settle_s=args.settle)
    report["command"] = "gsd-serve " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["chaos"] else "gsd-serve chaos"
    return _emit(report, args.out)


def _emit(report: dict, out: str | None) -> int:
    text = json.dumps(report, indent=2)
    print(text)
    if out:
        from pathlib import Path

        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n", encoding="utf-8")
    return 0 if report.get("passed") else 1


def register(sub) -> None:
    p = sub.add_parser("chaos", help="kill draft and target replicas and restart Redis under load; check exactness",
                       description=__doc__)
    p.add_argument("--minutes", type=float, default=5.0, help="how long faults are injected (default 5)")
    p.add_argument("--streams", type=positive_int("--streams"), default=8, help="concurrent client streams (8)")
    p.add_argument("--max-tokens", type=positive_int("--max-tokens"), default=32, help="tokens per answer (32)")
    p.add_argument("--settle", type=float, default=10.0, help="seconds between a recovery and the next fault (10)")
    p.add_argument("--out", help="also write the JSON report here (e.g. bench/results/DATE-CPU-chaos/chaos.json)")
    p.set_defaults(func=cmd_chaos)
