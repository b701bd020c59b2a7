"""The gsd-serve Ray Serve application: Router.bind(args, Draft.bind(args), Target.bind(args)).

`import_path: gsd_serve.services.app:build_app` in a Serve config; `args` is this application's configuration:

    target, draft          model specs (default: the embedded SmolLM2-135M-Instruct and its draft)
    dtype                  auto | float32 | bfloat16 | float16 for both models (default auto: bf16 on GPUs and
                           on CPUs with fast bf16 units, else fp32)
    model_name             the name clients pass as `model` (default gsd-smollm2-135m)
    redis_url              the prefix cache, and the cross-request lookup index the target replicas share
                           (default: $REDIS_URL; none = neither: each target replica keeps its own index)
    grpc_host              where replicas bind their gRPC port: 127.0.0.1 (one machine) or auto (cluster)
    direct_http_port, direct_http_host   each router replica also serves the HTTP API on this port itself (no hop
                           through Serve's proxy; one replica per machine holds it); default none
    spec                   {method, k, merge_context, ..., budget} (default: gsd)
    router                 RouterConfig fields (max_inflight, max_prompt_tokens, request_timeout_s, ...)
    max_sessions, session_ttl_s, prefix_block_size, prefix_ttl_s, prefix_max_entry_bytes
    prefill_chunk          the fewest prompt tokens a target replica feeds per forward while others decode
                           (default 64); prefill_share: a forward may spend that many times its decoding
                           rows' cost on prompt tokens (default 1.5; serving/scheduler.py)
    shared_lookup_tokens   the bound of each target replica's cross-request index (default 100000; 0: none)
    draft_max_batch        Propose calls a draft replica drafts together (default 64)
    tensor_parallel_size, gpus_per_rank, cpus_per_rank   the target's ranks (Ray actors in the replica's
                           placement group: one bundle per rank); draft_device / target_device (cuda) for
                           single-device replicas
    replicas               {draft: N, target: N, router: N} (a config file's `deployments` overrides win)
    autoscaling            {draft: {...}, target: {...}}: Serve autoscaling_config per deployment; without a
                           `policy`, ReplicaLoadPolicy (autoscaling.py: the load the replicas measure)
    torch_threads, draft_torch_threads, target_torch_threads   threads of the replicas' forwards (default: the
                           CPUs Ray gives the replica, all cores with num_cpus 0)
    max_session_bytes      memory the sessions of one replica may hold (default: a quarter of the machine's)
    load_window_s          the window replicas measure their load over (default 10 s)
"""
from __future__ import annotations

from ..serving.serve_config import GRPC_SERVICER_FUNCTIONS  # noqa: F401 (what a Serve config's grpc_options names)
from .draft import Draft
from .router import Router
from .target import Target


def target_bundles(args: dict) -> list[dict] | None:
    """One placement-group bundle per tensor-parallel rank (None for a single-process target)."""
    tp = int(args.get("tensor_parallel_size", 1))
    gpus = float(args.get("gpus_per_rank", 0))
    if tp <= 1 and gpus <= 0:
        return None
    bundle = {"CPU": float(args.get("cpus_per_rank", 1))}
    if gpus > 0:
        bundle["GPU"] = gpus
    return [dict(bundle) for _ in range(tp)]


def autoscaling_config(conf: dict) -> dict:
    """A deployment's autoscaling_config with ReplicaLoadPolicy unless it names its own policy."""
    from .autoscaling import POLICY_PATH

    conf = dict(conf)
    conf.setdefault("policy", {"policy_function": POLICY_PATH})
    return conf


def build_app(args: dict | None = None):
    args = dict(args or {})
    n = dict(args.get("replicas") or {})
    scale = dict(args.get("autoscaling") or {})
    draft = Draft.options(num_replicas=int(n["draft"])) if "draft" in n else Draft
    target = Target.options(num_replicas=int(n["target"])) if "target" in n else Target
    if "draft" in scale:
        draft = Draft.options(autoscaling_config=autoscaling_config(scale["draft"]))
    if "target" in scale:
        target = Target.options(autoscaling_config=autoscaling_config(scale["target"]))
    bundles = target_bundles(args)
    if bundles is not None:   # a config file's placement_group_bundles for Target still win
        target = target.options(placement_group_bundles=bundles, placement_group_strategy="STRICT_PACK")
    router = Router.options(num_replicas=int(n["router"])) if "router" in n else Router
    return router.bind(args, draft.bind(args), target.bind(args))
