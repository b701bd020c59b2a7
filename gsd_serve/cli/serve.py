"""`gsd-serve serve [--config FILE]`: the whole serving stack (Ray Serve: router, drafts, target) on this machine.

Without --config it runs the equivalent of deploy/local-cpu.yaml (ports from the flags). With --config it
takes any Ray Serve config file (the schema `serve run`/`serve deploy` use: http_options, grpc_options,
applications with import_path gsd_serve.services.app:build_app, args and per-deployment overrides). REDIS_URL (or
--redis-url) becomes the prefix cache of every application that does not name one, and --api-key (or
GSD_SERVE_API_KEY) the API key of every application that does not name one. Ray's own token auth keeps
Ray's default; RAY_AUTH_MODE=disabled turns it off.
"""
from __future__ import annotations

import os
import sys
import time

from ..serving.auth import API_KEY_ENV, api_key_from_env
from ..serving.serve_config import DIRECT_HTTP_PORT, SLOW_START_ENV, endpoints, load_config


def _wait_running(names: list[str], timeout_s: float) -> None:
    from ray import serve

    deadline = time.time() + timeout_s
    while True:
        status = serve.status()
        states = {n: status.applications[n].status if n in status.applications else "NOT_STARTED" for n in names}
        failed = {n: s for n, s in states.items() if str(s).endswith(("DEPLOY_FAILED", "UNHEALTHY"))}
        if failed:
            n = next(iter(failed))
            raise RuntimeError(f"application {n} failed: {status.applications[n].message}")
        if all(str(s).endswith("RUNNING") for s in states.values()):
            return
        if time.time() > deadline:
            raise RuntimeError(f"applications not running after {timeout_s:.0f}s: {states}")
        time.sleep(1)


def cmd_serve(args) -> int:
    config = load_config(args.config, host=args.host, http_port=args.http_port, grpc_port=args.grpc_port,
                         draft_replicas=args.draft_replicas, redis_url=args.redis_url,
                         tensor_parallel_size=args.tensor_parallel_size, dtype=args.dtype,
                         target_weights=args.target_weights, draft_weights=args.draft_weights,
                         api_key=api_key_from_env(args.api_key), direct_http_port=args.direct_http_port)
    if args.dry_run:
        print("\n".join(endpoints(config)))
        return 0
    # Ray's token auth stays at Ray's default (on for a new local cluster): RAY_AUTH_MODE=disabled turns it off
    # the local cluster started here inherits this environment (SLOW_START_ENV: time for Serve's proxy to start)
    for k, v in {"RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                 **SLOW_START_ENV}.items():
        os.environ.setdefault(k, v)
    import ray
    from ray.serve._private import api as serve_api
    from ray.serve.config import gRPCOptions
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(config)
    if args.address:
        ray.init(address=args.address, namespace="serve", log_to_driver=False)
    else:
        ray.init(namespace="serve", include_dashboard=False, log_to_driver=False)
    import signal

    def stop(signum, frame):
        raise KeyboardInterrupt

    # after ray.init (its handler aborts the process): SIGTERM and SIGINT shut the stack down cleanly
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        client = serve_api.serve_start(http_options=schema.http_options.model_dump(),
                                       proxy_location=schema.proxy_location,
                                       grpc_options=gRPCOptions(**schema.grpc_options.model_dump()))
        client.deploy_apps(schema, _blocking=False)
        names = [a["name"] for a in config["applications"]]
        print(f"gsd-serve: deploying {', '.join(names)} ...", file=sys.stderr, flush=True)
        _wait_running(names, args.timeout)
        print("gsd-serve: serving", flush=True)
        print("\n".join(endpoints(config)), flush=True)
        if args.exit_when_ready:
            return 0
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("gsd-serve: shutting down", file=sys.stderr, flush=True)
        return 0
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        from ray import serve

        if not args.address and ray.is_initialized():
            serve.shutdown()
        ray.shutdown()


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
