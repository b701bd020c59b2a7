"""The Target deployment: a gsd_serve.serving.target_worker.TargetWorker served over gRPC (gsd.v1.Target) by each replica.

A replica holds the whole target model; with tensor_parallel_size N it spans N ranks (Ray actors, one per
placement-group bundle of the replica: GPUs on a node, CPUs here). A dead rank fails the replica's health
check and Serve replaces the replica whole; routers rebuild its sessions elsewhere. The Redis prefix cache is shared by all target replicas.
"""
from __future__ import annotations

import os

from ray import serve

from .common import GrpcReplica, RegistryView, app_name, env_setup, load_models, session_bytes


class TargetReplica(GrpcReplica):
    kind = "target"

    def __init__(self, args: dict | None = None):
        args = dict(args or {})
        self.threads = env_setup(args, "target")   # before torch is imported (OpenMP reads its settings once)
        from ..serving.prefix_cache import PrefixCache, model_fingerprint
        from ..serving.target_worker import TargetWorker
        name = str(args.get("target", "smollm2-135m-instruct"))
        registry = RegistryView(app_name())

        def drafts() -> list[tuple[str, str]]:
            """The application's live draft replicas, for the rounds this replica's sessions draft."""
            return [(e["replica_id"], e["address"]) for e in registry.list("draft")]

        common = dict(name=name, max_sessions=int(args.get("max_sessions", 64)),
                      ttl_s=float(args.get("session_ttl_s", 300)), max_session_bytes=session_bytes(args),
                      drafts=drafts, prefill_chunk=int(args.get("prefill_chunk", 64)),
                      prefill_share=float(args.get("prefill_share", 1.5)),
                      shared_lookup_tokens=int(args.get("shared_lookup_tokens", 100_000)))
        tp = int(args.get("tensor_parallel_size", 1))
        gpus_per_rank = float(args.get("gpus_per_rank", 0))
        if tp > 1 or gpus_per_rank > 0:
            # ranks as Ray actors in this replica's placement group (bundle i holds rank i)
            from ray.util import get_current_placement_group

            from transformers import AutoConfig

            from ..models import resolve
            from ..models.tensor_parallel import make_target_runner

            runner = make_target_runner(name, tp, transport="ray", gpus_per_rank=gpus_per_rank,
                                        cpus_per_rank=float(args.get("cpus_per_rank", 1)),
                                        dtype=args.get("dtype", "auto"),
                                        placement_group=get_current_placement_group())
            config = AutoConfig.from_pretrained(resolve(name), local_files_only=True)
            worker = TargetWorker(runner=runner, max_seq_len=int(config.max_position_embeddings), **common)
        else:
            from ..serving.threads import MODEL_THREAD

            def build() -> TargetWorker:    # on the thread every forward will run on (one OpenMP team)
                model, _ = load_models(args, "target")
                redis_url = args.get("redis_url", os.environ.get("REDIS_URL")) or None
                cache = PrefixCache(redis_url, model_fingerprint(model, name),
                                    block_size=int(args.get("prefix_block_size", 32)),
                                    ttl_s=int(args.get("prefix_ttl_s", 3600)),
                                    max_entry_bytes=int(args.get("prefix_max_entry_bytes", 16 * 1024 * 1024)))
                return TargetWorker(model, prefix_cache=cache, device=args.get("target_device"),
                                    shared_redis_url=redis_url, **common)

            worker = MODEL_THREAD.run(build)
        self._serve(worker, args, "target_grpc_port")


Target = serve.deployment(TargetReplica, name="Target", ray_actor_options={"num_cpus": 0},
                          max_ongoing_requests=100, health_check_period_s=5)
