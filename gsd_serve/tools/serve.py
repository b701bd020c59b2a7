"""Running a Ray Serve config of gsd-serve (`gsd-serve serve`): a local Ray cluster started here, or a running
one joined, the applications deployed, and everything shut down on SIGTERM or SIGINT."""
from __future__ import annotations

import os
import sys
import time

from ..serving.serve_config import SLOW_START_ENV, endpoints


# Serve's controller checks its deployments every 0.1 s by default; every 0.5 s is still prompt for a replica's
# failure or an autoscaling decision. Ray's metrics (for Prometheus/Grafana, which a one-machine stack does not
# run) are not collected; gsd-serve's own /metrics is unaffected.
QUIET_RAY_ENV = {"RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5", "RAY_enable_metrics_collection": "0",
                 "RAY_SERVE_METRICS_EXPORT_INTERVAL_MS": "1000"}


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


def run(config: dict, address: str | None = None, timeout_s: float = 600, exit_when_ready: bool = False) -> int:
    """Serve `config` (a validated Serve config: serving.serve_config.load_config) until interrupted; on a new
    local Ray cluster unless `address` names one to join. Prints the endpoints once every application runs."""
    # Ray's token auth stays at Ray's default (on for a new local cluster): RAY_AUTH_MODE=disabled turns it off
    # the local cluster started here inherits this environment (SLOW_START_ENV: time for Serve's proxy to start)
    for k, v in {"RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                 **SLOW_START_ENV}.items():
        os.environ.setdefault(k, v)
    if not address:
        # a one-machine stack started here: Serve's controller loop and Ray's metrics export as quiet as they go
        # (on a 2-core machine an idle stack's background work stalls the forwards; docs/serving.md), read
        # by the cluster's processes at their start; a value set in the environment wins
        for k, v in QUIET_RAY_ENV.items():
            os.environ.setdefault(k, v)
    import ray
    from ray.serve._private import api as serve_api
    from ray.serve.config import gRPCOptions
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(config)
    if address:
        ray.init(address=address, namespace="serve", log_to_driver=False)
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
        _wait_running(names, timeout_s)
        print("gsd-serve: serving", flush=True)
        print("\n".join(endpoints(config)), flush=True)
        if exit_when_ready:
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

        if not address and ray.is_initialized():
            serve.shutdown()
        ray.shutdown()
