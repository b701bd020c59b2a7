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

# Size limits, applied before any work. A legitimate worker call is far below them: a Verify of 32 sessions
# that all resync 8k-token sequences is ~1.3 MB; a Generate request is a prompt.
MAX_WORKER_REQUEST_BYTES = 16 * 1024 * 1024    # larger worker calls: RESOURCE_EXHAUSTED, unparsed
MAX_ROUTER_REQUEST_BYTES = 4 * 1024 * 1024     # larger gsd.v1.Router requests: RESOURCE_EXHAUSTED, unparsed
MAX_GRAPH_NODES = 4096                          # nodes of a token graph (a Propose's bound or a Verify's graph)
MAX_GRAPH_EDGES = 4 * MAX_GRAPH_NODES
MAX_VERIFY_ITEMS = 256                          # sessions in one Verify call
WORKER_SERVER_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_WORKER_REQUEST_BYTES),
]


from ._generated.gsd.v1 import gsd_pb2 as pb  # noqa: E402
from ._generated.gsd.v1 import gsd_pb2_grpc as pb_grpc  # noqa: E402

from ..core.config import SpecConfig  # noqa: E402
from ..core.graph import NEVER_MERGE, TokenGraph  # noqa: E402
from ..core.sampling import SamplingParams  # noqa: E402
from .errors import TooLarge  # noqa: E402

OK = pb.SESSION_STATUS_OK
RESYNC = pb.SESSION_STATUS_RESYNC
ERROR = pb.SESSION_STATUS_ERROR


class RejectedRequest:
    """What a malformed or oversized gsd.v1.Router request deserializes to in Serve's gRPC proxy.

    A deserializer that raises makes gRPC answer UNKNOWN, and Serve's proxy keeps the servicer's
    deserializer; so ours never raises: it hands the router this (picklable) verdict, which the router
    answers with `code` (INVALID_ARGUMENT or RESOURCE_EXHAUSTED) without doing any work."""

    def __init__(self, code: str, message: str):
        self.code = code            # a grpc.StatusCode name
        self.message = message

    @property
    def status(self):
        import grpc

        return getattr(grpc.StatusCode, self.code)


def tolerant_parser(message_type, max_bytes: int, rejected=None):
    """A request deserializer that refuses more than `max_bytes` unparsed and never raises on bad bytes:
    it returns `rejected(code, message)` instead (a RejectedRequest by default)."""
    from google.protobuf.message import DecodeError

    rejected = rejected or RejectedRequest
    name = message_type.DESCRIPTOR.full_name

    def parse(raw: bytes):
        if len(raw) > max_bytes:
            return rejected("RESOURCE_EXHAUSTED", f"the {name} message has {len(raw)} bytes; at most {max_bytes} "
                                                  "are accepted")
        try:
            return message_type.FromString(raw)
        except (DecodeError, ValueError, RuntimeError) as exc:   # also recursion limits of nested garbage
            return rejected("INVALID_ARGUMENT", f"not a valid {name} message ({type(exc).__name__})")
    return parse


def method_handlers(service: str, servicer, max_bytes: int) -> dict:
    """The service's rpc method handlers (as the generated add_*_to_server builds them) with tolerant
    request parsing: a handler receives a message or a RejectedRequest."""
    import grpc

    desc = pb.DESCRIPTOR.services_by_name[service.rsplit(".", 1)[-1]]
    handlers = {}
    for m in desc.methods:
        request = getattr(pb, m.input_type.name)
        response = getattr(pb, m.output_type.name)
        make = grpc.unary_stream_rpc_method_handler if m.server_streaming else grpc.unary_unary_rpc_method_handler
        handlers[m.name] = make(getattr(servicer, m.name), request_deserializer=tolerant_parser(request, max_bytes),
                                response_serializer=response.SerializeToString)
    return handlers


def add_servicer(service: str, servicer, server, max_bytes: int) -> None:
    """Register `servicer` for `service` (e.g. "gsd.v1.Target") with tolerant request parsing."""
    import grpc

    handlers = method_handlers(service, servicer, max_bytes)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
    server.add_registered_method_handlers(service, handlers)


def add_RouterServicer_to_server(servicer, server) -> None:  # noqa: N802 (the name Serve expects)
    """For Ray Serve's `grpc_servicer_functions`: an import path that needs no generated module on sys.path.
    Requests are parsed tolerantly (malformed or oversized: a RejectedRequest the router refuses)."""
    add_servicer("gsd.v1.Router", servicer, server, MAX_ROUTER_REQUEST_BYTES)


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


class GraphTooLarge(TooLarge):
    """A TokenGraph message over MAX_GRAPH_NODES nodes or MAX_GRAPH_EDGES edges (refused before it is read)."""


def graph_from_proto(msg: "pb.TokenGraph"):
    """A TokenGraph with the message's nodes and edges (validated)."""

    n = len(msg.tokens)
    if n < 1:
        raise GraphError("graph has no root")
    m = len(msg.edge_src)
    if n > MAX_GRAPH_NODES or m > MAX_GRAPH_EDGES:
        raise GraphTooLarge(f"the graph has {n} nodes and {m} edges; at most {MAX_GRAPH_NODES} and "
                            f"{MAX_GRAPH_EDGES} are accepted")
    if len(msg.parents) != n or len(msg.depths) != n:
        raise GraphError("graph tokens, parents and depths differ in length")
    if len(msg.edge_dst) != m or len(msg.edge_prob) != m:
        raise GraphError("graph edge arrays differ in length")
    if msg.depths[0] != 0 or any(not 0 < d < n for d in msg.depths[1:]):
        raise GraphError("graph depths out of range")
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
                         lookup=spec.lookup, planner=spec.planner, shared_lookup=spec.shared_lookup)


def check_spec_size(spec) -> None:
    """Refuse a speculation config whose drafted graph could exceed MAX_GRAPH_NODES (levels x expanded nodes
    x candidates, plus the lookup chain): a Propose is bounded before any drafting."""
    bound = spec.max_depth * spec.max_width * spec.k + spec.lookup + 1
    if bound > MAX_GRAPH_NODES:
        raise TooLarge(f"max_depth x max_width x k = {spec.max_depth} x {spec.max_width} x {spec.k} could draft "
                       f"{bound} nodes; at most {MAX_GRAPH_NODES} are accepted")


def spec_from_proto(msg: "pb.SpecConfig", default=None):
    """A SpecConfig (validated by its constructor); empty fields take `default`'s values."""
    base = default or SpecConfig()
    if not msg.method:
        return base
    return SpecConfig(method=msg.method, k=msg.k or base.k, merge_context=msg.merge_context,
                      sibling_threshold=msg.sibling_threshold, confidence_threshold=msg.confidence_threshold,
                      max_depth=msg.max_depth or base.max_depth, max_width=msg.max_width or base.max_width,
                      budget=msg.budget or base.budget, lookup=msg.lookup,
                      planner=msg.planner if msg.HasField("planner") else base.planner,
                      shared_lookup=msg.shared_lookup if msg.HasField("shared_lookup") else base.shared_lookup)


MAX_FEATURE_BYTES = 64 * 1024 * 1024             # features in one message (a long prompt of a wide target)


def features_to_proto(feats, start: int) -> "pb.Features":
    """The target's features [rows, width] of positions start.. as bf16 bytes (half of fp32 on the wire; the
    draft only reads them, so their rounding can change a draft, never an output)."""
    import torch

    f = feats.detach().to(torch.bfloat16).contiguous()
    return pb.Features(start=start, rows=f.shape[0], width=f.shape[1] if f.dim() == 2 else 0,
                       bf16=f.view(torch.int16).numpy().tobytes())


def features_from_proto(msg: "pb.Features"):
    """(start, tensor [rows, width] float32) of a Features message, or None when it carries none; a message whose
    byte count does not match its shape is refused (GraphError's sibling: a ValueError, INVALID_ARGUMENT)."""
    import torch

    if msg is None or not msg.rows:
        return None
    if msg.width < 1 or len(msg.bf16) != 2 * msg.rows * msg.width:
        raise ValueError(f"features: {len(msg.bf16)} bytes do not hold {msg.rows} x {msg.width} bf16 values")
    t = torch.frombuffer(bytearray(msg.bf16), dtype=torch.int16).view(torch.bfloat16)
    return int(msg.start), t.view(msg.rows, msg.width).float()


def stats_to_proto(stats) -> "pb.GenerateStats":
    """A request's DecodeStats as the gsd.v1 GenerateStats message."""
    return pb.GenerateStats(rounds=stats.rounds, accepted_tokens=stats.accepted_tokens,
                            verified_tokens=stats.verified_tokens, draft_tokens=stats.draft_tokens,
                            mean_accept_len=stats.mean_accept_len, cached_prompt_tokens=stats.cached_prompt_tokens,
                            resyncs=stats.resyncs, seconds=stats.seconds, plain_rounds=stats.plain_steps,
                            lookup_rounds=stats.lookup_rounds, drafted_rounds=stats.drafted_rounds,
                            lookup_accepted=stats.lookup_accepted, draft_forwards=stats.draft_forwards,
                            ttft=stats.ttft, failovers=stats.failovers, draft_failovers=stats.draft_failovers,
                            draft_features_missing=stats.draft_features_missing, feature_bytes=stats.feature_bytes,
                            grammar_pruned=stats.grammar_pruned)


def format_to_proto(fmt) -> "pb.ResponseFormat":
    """A core.grammar.ResponseFormat (None: no constraint) as the gsd.v1 message."""
    if fmt is None:
        return pb.ResponseFormat()
    return pb.ResponseFormat(type=fmt.kind, schema=fmt.schema)


def format_from_proto(msg: "pb.ResponseFormat"):
    """The ResponseFormat a gsd.v1 message asks for, None for none; raises core.grammar.GrammarError naming
    what is wrong."""
    import json

    from ..core.grammar import GrammarError, parse_response_format

    if msg.type in ("", "text"):
        return None
    value = {"type": msg.type}
    if msg.type == "json_schema":
        try:
            value["json_schema"] = {"schema": json.loads(msg.schema) if msg.schema else None}
        except (ValueError, RecursionError):
            raise GrammarError("'response_format.schema' is not valid JSON") from None
    return parse_response_format(value)


def logprob_to_proto(lp) -> "pb.TokenLogprob":
    return pb.TokenLogprob(token=lp.token, logprob=lp.logprob, top_tokens=lp.top_tokens, top_logprobs=lp.top_logprobs)


def logprob_from_proto(m: "pb.TokenLogprob"):
    from ..core.sampling import TokenLogprob

    return TokenLogprob(m.token, m.logprob, tuple(m.top_tokens), tuple(m.top_logprobs))
