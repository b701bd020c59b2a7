"""The gRPC API (protos/gsd/v1/gsd.proto): the generated stubs, conversions, channel options.

The stubs are generated, never edited, into `gsd_serve/serving/_generated/` and committed there, so an
installed wheel needs neither protoc nor the proto sources. protoc's virtual include path maps `protos/`
onto that folder, so the generated modules import each other as `gsd_serve.serving._generated.gsd.v1`.
After editing the proto, regenerate them:

    python -m gsd_serve.serving.protogen

tests/test_rpc_stubs.py fails while the committed stubs do not match the proto.
"""
from __future__ import annotations

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]


from ._generated.gsd.v1 import gsd_pb2 as pb  # noqa: E402
from ._generated.gsd.v1 import gsd_pb2_grpc as pb_grpc  # noqa: E402

from ..core.config import SpecConfig  # noqa: E402
from ..core.graph import NEVER_MERGE, TokenGraph  # noqa: E402
from ..core.sampling import SamplingParams  # noqa: E402

OK = pb.SESSION_STATUS_OK
RESYNC = pb.SESSION_STATUS_RESYNC


def add_RouterServicer_to_server(servicer, server) -> None:  # noqa: N802 (the name Serve expects)
    """For Ray Serve's `grpc_servicer_functions`: an import path that needs no generated module on sys.path."""
    pb_grpc.add_RouterServicer_to_server(servicer, server)


def add_HealthServicer_to_server(servicer, server) -> None:  # noqa: N802
    from grpc_health.v1 import health_pb2_grpc

    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)


# ---------------------------------------------------------------- conversions

def graph_to_proto(graph) -> "pb.TokenGraph":
    src, dst, prob = [], [], []
    for v, edges in enumerate(graph.edges):
        for child, p in edges:
            src.append(v)
            dst.append(child)
            prob.append(p)
    return pb.TokenGraph(tokens=graph.tokens, parents=graph.parent, depths=graph.depth, edge_src=src,
                         edge_dst=dst, edge_prob=prob, merge_edges=graph.merge_edges,
                         merge_context=graph.merge_context)


def root_graph_proto(root: int) -> "pb.TokenGraph":
    """The graph of a round without drafting: the root alone (verifying it is one plain decoding step)."""
    return pb.TokenGraph(tokens=[root], parents=[-1], depths=[0])


class GraphError(ValueError):
    """A TokenGraph message that is not a rooted DAG with valid edges."""


def graph_from_proto(msg: "pb.TokenGraph"):
    """A TokenGraph with the message's nodes and edges (validated)."""

    n = len(msg.tokens)
    if n < 1:
        raise GraphError("graph has no root")
    if len(msg.parents) != n or len(msg.depths) != n:
        raise GraphError("graph tokens, parents and depths differ in length")
    m = len(msg.edge_src)
    if len(msg.edge_dst) != m or len(msg.edge_prob) != m:
        raise GraphError("graph edge arrays differ in length")
    g = TokenGraph(int(msg.tokens[0]), NEVER_MERGE)
    g.tokens = list(msg.tokens)
    g.parent = list(msg.parents)
    g.depth = list(msg.depths)
    g.logprob = [0.0] * n
    g.confident = [True] * n
    g.edges = [[] for _ in range(n)]
    g.merge_edges = int(msg.merge_edges)
    last_src = -1
    for s, d, p in zip(msg.edge_src, msg.edge_dst, msg.edge_prob):
        if not (0 <= s < n and 0 < d < n) or s < last_src:
            raise GraphError("graph edge out of range or not grouped by source")
        if not (p == p) or p < 0.0 or p > 1.0 + 1e-6:
            raise GraphError("graph edge probability outside [0, 1]")
        last_src = s
        g.edges[s].append((int(d), float(p)))
    if g.parent[0] != -1 or any(not (0 <= g.parent[v] < n) for v in range(1, n)):
        raise GraphError("graph parents out of range")
    # every edge goes one level deeper along its path; merge edges point to nodes with their own depth,
    # so check acyclicity directly: a topological order must exist
    indeg = [0] * n
    for edges in g.edges:
        for d, _ in edges:
            indeg[d] += 1
    stack = [v for v in range(n) if indeg[v] == 0]
    seen = 0
    while stack:
        v = stack.pop()
        seen += 1
        for d, _ in g.edges[v]:
            indeg[d] -= 1
            if indeg[d] == 0:
                stack.append(d)
    if seen != n:
        raise GraphError("graph has a cycle")
    return g



def sampling_from_proto(msg: "pb.SamplingParams"):
    return SamplingParams(temperature=float(msg.temperature), top_k=int(msg.top_k),
                          top_p=float(msg.top_p) if msg.top_p > 0 else 1.0,
                          seed=int(msg.seed) if msg.HasField("seed") else None)


def sampling_to_proto(params) -> "pb.SamplingParams":
    msg = pb.SamplingParams(temperature=params.temperature, top_k=params.top_k, top_p=params.top_p)
    if params.seed is not None:
        msg.seed = params.seed
    return msg


def spec_to_proto(spec) -> "pb.SpecConfig":
    return pb.SpecConfig(method=spec.method, k=spec.k, merge_context=spec.merge_context,
                         sibling_threshold=spec.sibling_threshold, confidence_threshold=spec.confidence_threshold,
                         max_depth=spec.max_depth, max_width=spec.max_width, budget=spec.budget,
                         lookup=spec.lookup)


def spec_from_proto(msg: "pb.SpecConfig", default=None):
    """A SpecConfig (validated by its constructor); empty fields take `default`'s values."""
    base = default or SpecConfig()
    if not msg.method:
        return base
    return SpecConfig(method=msg.method, k=msg.k or base.k, merge_context=msg.merge_context,
                      sibling_threshold=msg.sibling_threshold, confidence_threshold=msg.confidence_threshold,
                      max_depth=msg.max_depth or base.max_depth, max_width=msg.max_width or base.max_width,
                      budget=msg.budget or base.budget, lookup=msg.lookup)


def stats_to_proto(stats) -> "pb.GenerateStats":
    """A request's DecodeStats as the gsd.v1 GenerateStats message."""
    return pb.GenerateStats(rounds=stats.rounds, accepted_tokens=stats.accepted_tokens,
                            verified_tokens=stats.verified_tokens, draft_tokens=stats.draft_tokens,
                            mean_accept_len=stats.mean_accept_len, cached_prompt_tokens=stats.cached_prompt_tokens,
                            resyncs=stats.resyncs, seconds=stats.seconds)
