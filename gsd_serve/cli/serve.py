"""`gsd-serve serve [--config FILE]`: the whole serving stack (Ray Serve: router, drafts, target) on this machine.

Without --config it runs the equivalent of deploy/local-cpu.yaml (ports from the flags). With --config it
takes any Ray Serve config file (the schema `serve run`/`serve deploy` use: http_options, grpc_options,
applications with import_path gsd_serve.services.app:build_app, args and per-deployment overrides). REDIS_URL (or
--redis-url) becomes the prefix cache of every application that does not name one, and --api-key (or
GSD_SERVE_API_KEY) the API key of every application that does not name one. Ray's own token auth keeps
Ray's default; RAY_AUTH_MODE=disabled turns it off.
"""
from __future__ import annotations

from ..serving.auth import API_KEY_ENV, api_key_from_env
from ..serving.serve_config import DIRECT_HTTP_PORT, endpoints, load_config


def cmd_serve(args) -> int:
    config = load_config(args.config, host=args.host, http_port=args.http_port, grpc_port=args.grpc_port,
                         draft_replicas=args.draft_replicas, redis_url=args.redis_url,
                         tensor_parallel_size=args.tensor_parallel_size, dtype=args.dtype,
                         target_weights=args.target_weights, draft_weights=args.draft_weights,
                         api_key=api_key_from_env(args.api_key), direct_http_port=args.direct_http_port)
    if args.dry_run:
        print("\n".join(endpoints(config)))
        return 0
    from ..tools.serve import run

    return run(config, args.address, args.timeout, args.exit_when_ready)


def register(sub) -> None:
    p = sub.add_parser("serve", help="start the serving stack (Ray Serve: router, draft and target replicas)",
                       description=__doc__)
    p.add_argument("--config", help="a Ray Serve config file (e.g. deploy/local-cpu.yaml); default: this machine")
    p.add_argument("--address", help="join a running Ray cluster (e.g. auto) instead of starting one")
    p.add_argument("--host", default="127.0.0.1", help="HTTP bind address without --config (default 127.0.0.1)")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=9000)
    p.add_argument("--direct-http-port", type=int, default=DIRECT_HTTP_PORT,
                   help="without --config: the router replicas also serve the same HTTP API on this port "
                        f"themselves, skipping Serve's proxy (default {DIRECT_HTTP_PORT}; 0: off)")
    p.add_argument("--draft-replicas", type=int, default=1)
    p.add_argument("--redis-url", help="prefix cache (default: $REDIS_URL; none: no prefix cache)")
    p.add_argument("--tensor-parallel-size", type=int, default=None, metavar="N",
                   help="shard each target replica over N ranks (Ray actors in one STRICT_PACK placement group; "
                        "GPUs with gpus_per_rank in the config, else CPUs); overrides the config's field")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"),
                   help="both models' dtype in every replica (overrides the config's `dtype` arg; default auto)")
    p.add_argument("--target-weights", choices=("auto", "dense", "gguf"),
                   help="the default target's weights in every target replica: gguf runs its own GGUF blocks in "
                        "this project's C kernels, auto does so on CPUs where that measures faster (overrides the "
                        "config's `target_weights` arg; default auto)")
    p.add_argument("--draft-weights", choices=("auto", "dense", "q8"),
                   help="the drafts' weights in every draft replica: q8 runs them on Q8_0 blocks (exact output), auto "
                        "where the target runs GGUF blocks (overrides the config's `draft_weights` arg; default auto)")
    p.add_argument("--api-key", metavar="KEY",
                   help=f"require Authorization: Bearer KEY on /v1/* and gRPC Router calls (default: ${API_KEY_ENV}; "
                        "/health and /metrics stay open)")
    p.add_argument("--timeout", type=float, default=600, help="seconds to wait for the applications to run")
    p.add_argument("--dry-run", action="store_true", help="validate the config, print the endpoints, start nothing")
    p.add_argument("--exit-when-ready", action="store_true", help=argparse_suppress())
    p.set_defaults(func=cmd_serve)


def argparse_suppress():
    import argparse

    return argparse.SUPPRESS
