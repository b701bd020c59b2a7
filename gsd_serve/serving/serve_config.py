"""Ray Serve configurations of gsd-serve: this machine's default (deploy/local-cpu.yaml) and the checks a
config file gets before anything starts (the schema `serve run`/`serve deploy` use)."""
from __future__ import annotations

import os

DEFAULT_APP = "gsd"
APP_IMPORT_PATH = "gsd_serve.services.app:build_app"
GRPC_SERVICER_FUNCTIONS = ["gsd_serve.serving.rpc.add_RouterServicer_to_server",
                           "gsd_serve.serving.rpc.add_HealthServicer_to_server"]


DIRECT_HTTP_PORT = 8001     # the router replicas' own HTTP port in the default config (no Serve proxy hop)

# Serve gives a new proxy 5 s to report ready: a busy 2-core machine can starve it past that, which once failed a
# whole `gsd-serve serve`. Set (unless already set) in the environment of every local cluster gsd-serve starts.
SLOW_START_ENV = {"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "120", "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "60"}


def free_port() -> int:
    """A free TCP port on the loopback interface (for a config's ports, a throwaway server's, a test's)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_config(host: str = "127.0.0.1", http_port: int = 8000, grpc_port: int = 9000,
                   draft_replicas: int = 1, direct_http_port: int = DIRECT_HTTP_PORT) -> dict:
    """The one-CPU-machine configuration (deploy/local-cpu.yaml); direct_http_port 0: no direct port."""
    args = {"model_name": "gsd-smollm2-135m", "grpc_host": "127.0.0.1", "spec": {"method": "gsd"}}
    if direct_http_port > 0:
        args.update(direct_http_port=direct_http_port, direct_http_host=host)
    return {
        "proxy_location": "HeadOnly",
        "http_options": {"host": host, "port": http_port},
        "grpc_options": {"port": grpc_port, "grpc_servicer_functions": list(GRPC_SERVICER_FUNCTIONS)},
        "applications": [{
            "name": DEFAULT_APP,
            "route_prefix": "/",
            "import_path": APP_IMPORT_PATH,
            "args": args,
            "deployments": [
                {"name": "Router", "num_replicas": 1, "ray_actor_options": {"num_cpus": 0}},
                {"name": "Draft", "num_replicas": draft_replicas, "ray_actor_options": {"num_cpus": 0}},
                {"name": "Target", "num_replicas": 1, "ray_actor_options": {"num_cpus": 0}},
            ],
        }],
    }


def load_config(config_file: str | None = None, *, host: str = "127.0.0.1", http_port: int = 8000,
                grpc_port: int = 9000, draft_replicas: int = 1, redis_url: str | None = None,
                tensor_parallel_size: int | None = None, dtype: str | None = None,
                api_key: str | None = None, target_weights: str | None = None,
                draft_weights: str | None = None, direct_http_port: int = DIRECT_HTTP_PORT) -> dict:
    """A validated Serve config: the file's, else this machine's default; REDIS_URL (or redis_url) becomes
    the prefix cache of every application that names none, tensor_parallel_size overrides the apps', and
    api_key (from --api-key or $GSD_SERVE_API_KEY) protects every application that names none.
    direct_http_port: the router replicas' own HTTP port in the default config (0: none); a config file names
    its own per application (args.direct_http_port), and no two applications may share one."""
    if config_file:
        import yaml

        try:
            with open(config_file, encoding="utf-8") as f:
                config = yaml.safe_load(f)
        except OSError as exc:
            raise ValueError(f"cannot read {config_file}: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise ValueError(f"{config_file}: not valid YAML ({exc})") from None
        if not isinstance(config, dict) or not config.get("applications"):
            raise ValueError(f"{config_file}: a Ray Serve config needs an 'applications' list")
    else:
        config = default_config(host, http_port, grpc_port, draft_replicas, direct_http_port)
    redis_url = redis_url or os.environ.get("REDIS_URL")
    tp = tensor_parallel_size
    for app in config["applications"]:
        app_args = app.setdefault("args", {}) or {}
        app["args"] = app_args
        if dtype is not None:
            app_args["dtype"] = dtype
        if target_weights is not None:
            app_args["target_weights"] = target_weights
        if draft_weights is not None:
            app_args["draft_weights"] = draft_weights
        if api_key and not app_args.get("api_key"):
            app_args["api_key"] = api_key
        if redis_url and not app_args.get("redis_url"):
            app_args["redis_url"] = redis_url
        if tp is not None:
            app_args["tensor_parallel_size"] = tp
            if tp > 1 and "cpus_per_rank" not in app_args and not app_args.get("gpus_per_rank"):
                # one machine: the ranks share its cores (a bundle may hold a fraction of a CPU)
                app_args["cpus_per_rank"] = max(0.25, min(1.0, (os.cpu_count() or 1) / tp))
        size = int(app_args.get("tensor_parallel_size", 1))
        if size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {size}")
        if size > 1:
            from ..models.tensor_parallel import check_spec_tp_size

            check_spec_tp_size(str(app_args.get("target", "smollm2-135m-instruct")), size)
    check_direct_ports(config)
    from ray.serve.schema import ServeDeploySchema

    try:
        ServeDeploySchema.model_validate(config)
    except Exception as exc:  # noqa: BLE001 (pydantic's error, shown to the user)
        raise ValueError(f"invalid Serve config: {str(exc).splitlines()[0]} ...") from None
    return config


def client_host(host: str) -> str:
    """The address a local client dials for a server bound to `host` (a wildcard bind: loopback)."""
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


def check_direct_ports(config: dict) -> None:
    """Each application's direct HTTP port is its own, and neither proxy's."""
    taken = {int((config.get("http_options") or {}).get("port", 8000)): "Serve's HTTP proxy",
             int((config.get("grpc_options") or {}).get("port", 9000)): "Serve's gRPC proxy"}
    for app in config["applications"]:
        raw = (app.get("args") or {}).get("direct_http_port")
        if raw in (None, 0):
            continue
        try:
            port = int(raw)
        except (TypeError, ValueError):
            raise ValueError(f"application {app.get('name')}: direct_http_port must be a port number, got {raw!r}") from None
        if not 0 < port < 65536:
            raise ValueError(f"application {app.get('name')}: direct_http_port must be in 1..65535, got {port}")
        if port in taken:
            raise ValueError(f"application {app.get('name')}: direct_http_port {port} is already {taken[port]}'s")
        taken[port] = f"application {app.get('name')}"


def endpoints(config: dict) -> list[str]:
    http = config.get("http_options") or {}
    host = client_host(http.get("host", "127.0.0.1"))
    port = http.get("port", 8000)
    grpc_port = (config.get("grpc_options") or {}).get("port", 9000)
    lines = []
    for app in config["applications"]:
        prefix = (app.get("route_prefix") or "/").rstrip("/")
        base = f"http://{host}:{port}{prefix}"
        lines += [f"{app['name']}: OpenAI-compatible HTTP  {base}/v1  (completions, chat/completions, models)"]
        direct = int(app["args"].get("direct_http_port") or 0)
        if direct:
            dhost = client_host(str(app["args"].get("direct_http_host", "127.0.0.1")))
            lines.append(f"{app['name']}: the same, direct  http://{dhost}:{direct}/v1  (served by the router "
                         f"replicas themselves: no hop through Serve's proxy)")
        lines += [f"{app['name']}: health {base}/health   metrics {base}/metrics",
                  f"{app['name']}: gRPC gsd.v1.Router     {host}:{grpc_port}  (metadata application={app['name']})",
                  f"{app['name']}: API key " + ("required (Authorization: Bearer KEY; /health and /metrics open)"
                                               if app["args"].get("api_key") else "none (anyone who can reach the "
                                               "ports may generate: set --api-key or GSD_SERVE_API_KEY)")]
    redis = {a["args"].get("redis_url") for a in config["applications"] if a["args"].get("redis_url")}
    lines.append("prefix cache: " + (", ".join(sorted(redis)) if redis else "off (set REDIS_URL or --redis-url)"))
    return lines
