"""Serve autoscaling from the load the draft and target replicas measure themselves.

The router calls draft and target replicas on their own gRPC ports, not through Serve, so Serve's
autoscaler sees no ongoing requests on them: its default policy (target_ongoing_requests) would never
scale them. Each replica therefore reports what it measures (`record_autoscaling_stats`, from its
LoadMeter over the last `load_window_s`):

    gsd_active_sessions   sessions that had a call in the window
    gsd_busy              fraction of the window its model computed (1.0: saturated)
    gsd_queued            calls waiting for the model
    gsd_batch_fill        sessions per fused forward

and `ReplicaLoadPolicy` turns them into a replica count:

    desired = max(sum(active sessions) / target_sessions, sum(busy) / target_busy, current x (1 + queued / target_queued
              per replica) when calls queue)

Serve then applies the deployment's min/max replicas and upscale/downscale delays as for any policy.
Use it in a deployment's autoscaling_config:

    autoscaling_config:
      min_replicas: 1
      max_replicas: 8
      policy:
        policy_function: gsd_serve.services.autoscaling:ReplicaLoadPolicy
        policy_kwargs: {target_sessions: 16, target_busy: 0.75}

This module is pickled by value into Serve's controller: it imports nothing beyond the standard library.
"""
from __future__ import annotations

import math

METRICS = ("gsd_active_sessions", "gsd_busy", "gsd_queued", "gsd_batch_fill")
POLICY_PATH = "gsd_serve.services.autoscaling:ReplicaLoadPolicy"


def autoscaling_stats(snapshot: dict) -> dict[str, float]:
    """A LoadMeter snapshot as Serve's custom autoscaling metrics."""
    return {"gsd_active_sessions": float(snapshot.get("active_sessions", 0)),
            "gsd_busy": float(snapshot.get("busy", 0.0)),
            "gsd_queued": float(snapshot.get("queued", 0)),
            "gsd_batch_fill": float(snapshot.get("batch_fill", 0.0))}


class ReplicaLoadPolicy:
    """A Serve autoscaling policy (class form: Serve passes policy_kwargs to the constructor)."""

    def __init__(self, target_sessions: float = 16.0, target_busy: float = 0.75, target_queued: float = 4.0):
        for name, v in (("target_sessions", target_sessions), ("target_busy", target_busy),
                        ("target_queued", target_queued)):
            if v is not None and v < 0:
                raise ValueError(f"{name} must be >= 0 (0 or null: not used), got {v}")
        self.target_sessions = target_sessions
        self.target_busy = target_busy
        self.target_queued = target_queued

    def desired(self, current: int, sessions: float, busy: float, queued: float) -> float:
        """The replica count the measured load asks for (before Serve's bounds and delays)."""
        want = 0.0
        if self.target_sessions:
            want = max(want, sessions / self.target_sessions)
        if self.target_busy:
            want = max(want, busy / self.target_busy)
        if self.target_queued and current and queued / current > self.target_queued:
            want = max(want, current + 1)      # calls pile up: one more, whatever the other signals say
        return float(math.ceil(want - 1e-9)) if want > 0 else 0.0

    def __call__(self, ctx):
        metrics = ctx.aggregated_metrics or {}

        def total(name: str) -> float:
            return float(sum((metrics.get(name) or {}).values()))

        current = ctx.current_num_replicas
        if current == 0:
            return ctx.target_num_replicas, {}
        sessions, busy, queued = total("gsd_active_sessions"), total("gsd_busy"), total("gsd_queued")
        if not metrics:            # nothing reported yet (replicas starting): keep what there is
            return ctx.target_num_replicas, {}
        desired = self.desired(current, sessions, busy, queued)
        return desired, {"gsd_sessions": sessions, "gsd_busy": busy, "gsd_queued": queued, "gsd_desired": desired}
