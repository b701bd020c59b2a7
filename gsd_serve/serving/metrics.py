"""Prometheus metrics of the router, named after vLLM's spec-decode metrics (gsd_ prefix)."""
from __future__ import annotations


class Metrics:
    """Prometheus metrics, named after vLLM's spec-decode metrics (gsd_ prefix)."""

    def __init__(self, model_name: str):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        r = self.registry = CollectorRegistry()
        m = ["model_name"]
        self.model_name = model_name
        lat = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)
        self._c = {
            "drafts": Counter("gsd_num_drafts", "Speculation rounds with a draft", m, registry=r),
            "lookups": Counter("gsd_num_lookup_rounds", "Speculation rounds that verified a lookup chain alone", m,
                               registry=r),
            "draft_tokens": Counter("gsd_num_draft_tokens", "Proposed tokens verified by the target", m, registry=r),
            "accepted": Counter("gsd_num_accepted_tokens", "Proposed tokens accepted", m, registry=r),
            "prompt_tokens": Counter("gsd_prompt_tokens", "Prompt tokens", m, registry=r),
            "generation_tokens": Counter("gsd_generation_tokens", "Generated tokens", m, registry=r),
            "success": Counter("gsd_request_success", "Finished requests", m + ["finished_reason"], registry=r),
            "rejected": Counter("gsd_request_rejected", "Refused requests", m + ["reason"], registry=r),
            "cancelled": Counter("gsd_request_cancelled", "Requests cancelled (client gone) or failed", m + ["reason"],
                                 registry=r),
            "failovers": Counter("gsd_replica_failovers", "Calls that failed over to another replica",
                                 m + ["kind"], registry=r),
            "resyncs": Counter("gsd_session_resyncs", "Sessions rebuilt on a replica", m + ["kind"], registry=r),
            "pc_queries": Counter("gsd_prefix_cache_queries", "Prefills that asked the prefix cache", m, registry=r),
            "pc_hits": Counter("gsd_prefix_cache_hits", "Prefills that restored cached blocks", m, registry=r),
            "pc_saved": Counter("gsd_prefix_cache_tokens_saved", "Prompt tokens not prefilled", m, registry=r),
            "feature_bytes": Counter("gsd_feature_bytes", "Target features received and handed to drafts (bytes)",
                                     m, registry=r),
        }
        self.running = Gauge("gsd_num_requests_running", "Requests in flight", m, registry=r)
        self.latency = Histogram("gsd_e2e_request_latency_seconds", "Request latency", m, buckets=lat, registry=r)
        self.ttft = Histogram("gsd_time_to_first_token_seconds", "Time to first token", m, buckets=lat, registry=r)

    def inc(self, name: str, n: float = 1, **labels) -> None:
        if n:
            self._c[name].labels(model_name=self.model_name, **labels).inc(n)

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)
