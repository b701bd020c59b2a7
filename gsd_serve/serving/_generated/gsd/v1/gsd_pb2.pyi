from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SessionStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SESSION_STATUS_UNSPECIFIED: _ClassVar[SessionStatus]
    SESSION_STATUS_OK: _ClassVar[SessionStatus]
    SESSION_STATUS_RESYNC: _ClassVar[SessionStatus]
    SESSION_STATUS_ERROR: _ClassVar[SessionStatus]
SESSION_STATUS_UNSPECIFIED: SessionStatus
SESSION_STATUS_OK: SessionStatus
SESSION_STATUS_RESYNC: SessionStatus
SESSION_STATUS_ERROR: SessionStatus

class SamplingParams(_message.Message):
    __slots__ = ("temperature", "top_k", "top_p", "seed")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_k: int
    top_p: float
    seed: int
    def __init__(self, temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ...) -> None: ...

class SpecConfig(_message.Message):
    __slots__ = ("method", "k", "merge_context", "sibling_threshold", "confidence_threshold", "max_depth", "max_width", "budget", "lookup", "planner", "shared_lookup")
    METHOD_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    MERGE_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    SIBLING_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    MAX_DEPTH_FIELD_NUMBER: _ClassVar[int]
    MAX_WIDTH_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    LOOKUP_FIELD_NUMBER: _ClassVar[int]
    PLANNER_FIELD_NUMBER: _ClassVar[int]
    SHARED_LOOKUP_FIELD_NUMBER: _ClassVar[int]
    method: str
    k: int
    merge_context: int
    sibling_threshold: float
    confidence_threshold: float
    max_depth: int
    max_width: int
    budget: int
    lookup: int
    planner: bool
    shared_lookup: bool
    def __init__(self, method: _Optional[str] = ..., k: _Optional[int] = ..., merge_context: _Optional[int] = ..., sibling_threshold: _Optional[float] = ..., confidence_threshold: _Optional[float] = ..., max_depth: _Optional[int] = ..., max_width: _Optional[int] = ..., budget: _Optional[int] = ..., lookup: _Optional[int] = ..., planner: _Optional[bool] = ..., shared_lookup: _Optional[bool] = ...) -> None: ...

class TokenGraph(_message.Message):
    __slots__ = ("tokens", "parents", "depths", "edge_src", "edge_dst", "edge_prob", "merge_edges", "merge_context")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    PARENTS_FIELD_NUMBER: _ClassVar[int]
    DEPTHS_FIELD_NUMBER: _ClassVar[int]
    EDGE_SRC_FIELD_NUMBER: _ClassVar[int]
    EDGE_DST_FIELD_NUMBER: _ClassVar[int]
    EDGE_PROB_FIELD_NUMBER: _ClassVar[int]
    MERGE_EDGES_FIELD_NUMBER: _ClassVar[int]
    MERGE_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedScalarFieldContainer[int]
    parents: _containers.RepeatedScalarFieldContainer[int]
    depths: _containers.RepeatedScalarFieldContainer[int]
    edge_src: _containers.RepeatedScalarFieldContainer[int]
    edge_dst: _containers.RepeatedScalarFieldContainer[int]
    edge_prob: _containers.RepeatedScalarFieldContainer[float]
    merge_edges: int
    merge_context: int
    def __init__(self, tokens: _Optional[_Iterable[int]] = ..., parents: _Optional[_Iterable[int]] = ..., depths: _Optional[_Iterable[int]] = ..., edge_src: _Optional[_Iterable[int]] = ..., edge_dst: _Optional[_Iterable[int]] = ..., edge_prob: _Optional[_Iterable[float]] = ..., merge_edges: _Optional[int] = ..., merge_context: _Optional[int] = ...) -> None: ...

class Features(_message.Message):
    __slots__ = ("start", "rows", "width", "bf16")
    START_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    BF16_FIELD_NUMBER: _ClassVar[int]
    start: int
    rows: int
    width: int
    bf16: bytes
    def __init__(self, start: _Optional[int] = ..., rows: _Optional[int] = ..., width: _Optional[int] = ..., bf16: _Optional[bytes] = ...) -> None: ...

class TokenLogprob(_message.Message):
    __slots__ = ("token", "logprob", "top_tokens", "top_logprobs")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    TOP_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    token: int
    logprob: float
    top_tokens: _containers.RepeatedScalarFieldContainer[int]
    top_logprobs: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, token: _Optional[int] = ..., logprob: _Optional[float] = ..., top_tokens: _Optional[_Iterable[int]] = ..., top_logprobs: _Optional[_Iterable[float]] = ...) -> None: ...

class ResponseFormat(_message.Message):
    __slots__ = ("type", "schema")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    SCHEMA_FIELD_NUMBER: _ClassVar[int]
    type: str
    schema: str
    def __init__(self, type: _Optional[str] = ..., schema: _Optional[str] = ...) -> None: ...

class ProposeRequest(_message.Message):
    __slots__ = ("session_id", "delta_start", "delta", "last_path", "root_index", "spec", "sampling", "max_depth", "features", "chain", "chain_probs", "has_chain")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    DELTA_START_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    LAST_PATH_FIELD_NUMBER: _ClassVar[int]
    ROOT_INDEX_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    MAX_DEPTH_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    CHAIN_FIELD_NUMBER: _ClassVar[int]
    CHAIN_PROBS_FIELD_NUMBER: _ClassVar[int]
    HAS_CHAIN_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    delta_start: int
    delta: _containers.RepeatedScalarFieldContainer[int]
    last_path: _containers.RepeatedScalarFieldContainer[int]
    root_index: int
    spec: SpecConfig
    sampling: SamplingParams
    max_depth: int
    features: Features
    chain: _containers.RepeatedScalarFieldContainer[int]
    chain_probs: _containers.RepeatedScalarFieldContainer[float]
    has_chain: bool
    def __init__(self, session_id: _Optional[str] = ..., delta_start: _Optional[int] = ..., delta: _Optional[_Iterable[int]] = ..., last_path: _Optional[_Iterable[int]] = ..., root_index: _Optional[int] = ..., spec: _Optional[_Union[SpecConfig, _Mapping]] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., max_depth: _Optional[int] = ..., features: _Optional[_Union[Features, _Mapping]] = ..., chain: _Optional[_Iterable[int]] = ..., chain_probs: _Optional[_Iterable[float]] = ..., has_chain: _Optional[bool] = ...) -> None: ...

class ProposeResponse(_message.Message):
    __slots__ = ("status", "graph", "draft_forwards", "draft_tokens", "seconds", "replica_id", "features_missing")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    GRAPH_FIELD_NUMBER: _ClassVar[int]
    DRAFT_FORWARDS_FIELD_NUMBER: _ClassVar[int]
    DRAFT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    FEATURES_MISSING_FIELD_NUMBER: _ClassVar[int]
    status: SessionStatus
    graph: TokenGraph
    draft_forwards: int
    draft_tokens: int
    seconds: float
    replica_id: str
    features_missing: int
    def __init__(self, status: _Optional[_Union[SessionStatus, str]] = ..., graph: _Optional[_Union[TokenGraph, _Mapping]] = ..., draft_forwards: _Optional[int] = ..., draft_tokens: _Optional[int] = ..., seconds: _Optional[float] = ..., replica_id: _Optional[str] = ..., features_missing: _Optional[int] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("session_ids",)
    SESSION_IDS_FIELD_NUMBER: _ClassVar[int]
    session_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, session_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class ReleaseResponse(_message.Message):
    __slots__ = ("released",)
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    released: int
    def __init__(self, released: _Optional[int] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class InfoResponse(_message.Message):
    __slots__ = ("replica_id", "kind", "model", "session_ids", "max_sessions", "prefix_cache_hits", "prefix_cache_queries", "prefix_tokens_saved", "pid", "rss_bytes", "torch_threads", "session_bytes", "max_session_bytes", "feature_layers", "load", "forwards", "forward_sessions", "widest_forward")
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SESSION_IDS_FIELD_NUMBER: _ClassVar[int]
    MAX_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_HITS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_QUERIES_FIELD_NUMBER: _ClassVar[int]
    PREFIX_TOKENS_SAVED_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    TORCH_THREADS_FIELD_NUMBER: _ClassVar[int]
    SESSION_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_SESSION_BYTES_FIELD_NUMBER: _ClassVar[int]
    FEATURE_LAYERS_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    FORWARDS_FIELD_NUMBER: _ClassVar[int]
    FORWARD_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    WIDEST_FORWARD_FIELD_NUMBER: _ClassVar[int]
    replica_id: str
    kind: str
    model: str
    session_ids: _containers.RepeatedScalarFieldContainer[str]
    max_sessions: int
    prefix_cache_hits: int
    prefix_cache_queries: int
    prefix_tokens_saved: int
    pid: int
    rss_bytes: int
    torch_threads: int
    session_bytes: int
    max_session_bytes: int
    feature_layers: _containers.RepeatedScalarFieldContainer[int]
    load: ReplicaLoad
    forwards: int
    forward_sessions: int
    widest_forward: int
    def __init__(self, replica_id: _Optional[str] = ..., kind: _Optional[str] = ..., model: _Optional[str] = ..., session_ids: _Optional[_Iterable[str]] = ..., max_sessions: _Optional[int] = ..., prefix_cache_hits: _Optional[int] = ..., prefix_cache_queries: _Optional[int] = ..., prefix_tokens_saved: _Optional[int] = ..., pid: _Optional[int] = ..., rss_bytes: _Optional[int] = ..., torch_threads: _Optional[int] = ..., session_bytes: _Optional[int] = ..., max_session_bytes: _Optional[int] = ..., feature_layers: _Optional[_Iterable[int]] = ..., load: _Optional[_Union[ReplicaLoad, _Mapping]] = ..., forwards: _Optional[int] = ..., forward_sessions: _Optional[int] = ..., widest_forward: _Optional[int] = ...) -> None: ...

class ReplicaLoad(_message.Message):
    __slots__ = ("active_sessions", "queued", "busy", "batch_fill")
    ACTIVE_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    BUSY_FIELD_NUMBER: _ClassVar[int]
    BATCH_FILL_FIELD_NUMBER: _ClassVar[int]
    active_sessions: int
    queued: int
    busy: float
    batch_fill: float
    def __init__(self, active_sessions: _Optional[int] = ..., queued: _Optional[int] = ..., busy: _Optional[float] = ..., batch_fill: _Optional[float] = ...) -> None: ...

class PrefillRequest(_message.Message):
    __slots__ = ("session_id", "tokens", "sampling", "feature_layers")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    FEATURE_LAYERS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    tokens: _containers.RepeatedScalarFieldContainer[int]
    sampling: SamplingParams
    feature_layers: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, session_id: _Optional[str] = ..., tokens: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., feature_layers: _Optional[_Iterable[int]] = ...) -> None: ...

class PrefillResponse(_message.Message):
    __slots__ = ("first_token", "cached_tokens", "seconds", "replica_id", "features")
    FIRST_TOKEN_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    first_token: int
    cached_tokens: int
    seconds: float
    replica_id: str
    features: Features
    def __init__(self, first_token: _Optional[int] = ..., cached_tokens: _Optional[int] = ..., seconds: _Optional[float] = ..., replica_id: _Optional[str] = ..., features: _Optional[_Union[Features, _Mapping]] = ...) -> None: ...

class VerifyItem(_message.Message):
    __slots__ = ("session_id", "delta_start", "delta", "graph", "root_index", "budget", "sampling", "size_by_cost", "round_overhead_s")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    DELTA_START_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    GRAPH_FIELD_NUMBER: _ClassVar[int]
    ROOT_INDEX_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    SIZE_BY_COST_FIELD_NUMBER: _ClassVar[int]
    ROUND_OVERHEAD_S_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    delta_start: int
    delta: _containers.RepeatedScalarFieldContainer[int]
    graph: TokenGraph
    root_index: int
    budget: int
    sampling: SamplingParams
    size_by_cost: bool
    round_overhead_s: float
    def __init__(self, session_id: _Optional[str] = ..., delta_start: _Optional[int] = ..., delta: _Optional[_Iterable[int]] = ..., graph: _Optional[_Union[TokenGraph, _Mapping]] = ..., root_index: _Optional[int] = ..., budget: _Optional[int] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., size_by_cost: _Optional[bool] = ..., round_overhead_s: _Optional[float] = ...) -> None: ...

class VerifyRequest(_message.Message):
    __slots__ = ("items", "feature_layers")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    FEATURE_LAYERS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[VerifyItem]
    feature_layers: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, items: _Optional[_Iterable[_Union[VerifyItem, _Mapping]]] = ..., feature_layers: _Optional[_Iterable[int]] = ...) -> None: ...

class VerifyResult(_message.Message):
    __slots__ = ("session_id", "status", "graph_path", "emitted", "verified_tokens", "cached_tokens", "tree_path", "error", "error_code", "features")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    GRAPH_PATH_FIELD_NUMBER: _ClassVar[int]
    EMITTED_FIELD_NUMBER: _ClassVar[int]
    VERIFIED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TREE_PATH_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    status: SessionStatus
    graph_path: _containers.RepeatedScalarFieldContainer[int]
    emitted: _containers.RepeatedScalarFieldContainer[int]
    verified_tokens: int
    cached_tokens: int
    tree_path: _containers.RepeatedScalarFieldContainer[int]
    error: str
    error_code: int
    features: Features
    def __init__(self, session_id: _Optional[str] = ..., status: _Optional[_Union[SessionStatus, str]] = ..., graph_path: _Optional[_Iterable[int]] = ..., emitted: _Optional[_Iterable[int]] = ..., verified_tokens: _Optional[int] = ..., cached_tokens: _Optional[int] = ..., tree_path: _Optional[_Iterable[int]] = ..., error: _Optional[str] = ..., error_code: _Optional[int] = ..., features: _Optional[_Union[Features, _Mapping]] = ...) -> None: ...

class VerifyResponse(_message.Message):
    __slots__ = ("results", "seconds", "replica_id", "forward_seconds", "rows", "sessions")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    FORWARD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[VerifyResult]
    seconds: float
    replica_id: str
    forward_seconds: float
    rows: int
    sessions: int
    def __init__(self, results: _Optional[_Iterable[_Union[VerifyResult, _Mapping]]] = ..., seconds: _Optional[float] = ..., replica_id: _Optional[str] = ..., forward_seconds: _Optional[float] = ..., rows: _Optional[int] = ..., sessions: _Optional[int] = ...) -> None: ...

class DecodeRequest(_message.Message):
    __slots__ = ("session_id", "tokens", "max_tokens", "sampling", "spec", "stop_token_ids", "feature_layers", "top_logprobs", "response_format", "output_tokens")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FEATURE_LAYERS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FORMAT_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    tokens: _containers.RepeatedScalarFieldContainer[int]
    max_tokens: int
    sampling: SamplingParams
    spec: SpecConfig
    stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
    feature_layers: _containers.RepeatedScalarFieldContainer[int]
    top_logprobs: int
    response_format: ResponseFormat
    output_tokens: int
    def __init__(self, session_id: _Optional[str] = ..., tokens: _Optional[_Iterable[int]] = ..., max_tokens: _Optional[int] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., spec: _Optional[_Union[SpecConfig, _Mapping]] = ..., stop_token_ids: _Optional[_Iterable[int]] = ..., feature_layers: _Optional[_Iterable[int]] = ..., top_logprobs: _Optional[int] = ..., response_format: _Optional[_Union[ResponseFormat, _Mapping]] = ..., output_tokens: _Optional[int] = ...) -> None: ...

class DecodeChunk(_message.Message):
    __slots__ = ("tokens", "finish_reason", "stats", "replica_id", "cached_tokens", "logprobs")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedScalarFieldContainer[int]
    finish_reason: str
    stats: GenerateStats
    replica_id: str
    cached_tokens: int
    logprobs: _containers.RepeatedCompositeFieldContainer[TokenLogprob]
    def __init__(self, tokens: _Optional[_Iterable[int]] = ..., finish_reason: _Optional[str] = ..., stats: _Optional[_Union[GenerateStats, _Mapping]] = ..., replica_id: _Optional[str] = ..., cached_tokens: _Optional[int] = ..., logprobs: _Optional[_Iterable[_Union[TokenLogprob, _Mapping]]] = ...) -> None: ...

class ChatMessage(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("model", "prompt", "messages", "prompt_token_ids", "max_tokens", "sampling", "raw", "timeout_s", "stop", "top_logprobs", "response_format")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    RAW_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FORMAT_FIELD_NUMBER: _ClassVar[int]
    model: str
    prompt: str
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    max_tokens: int
    sampling: SamplingParams
    raw: bool
    timeout_s: float
    stop: _containers.RepeatedScalarFieldContainer[str]
    top_logprobs: int
    response_format: ResponseFormat
    def __init__(self, model: _Optional[str] = ..., prompt: _Optional[str] = ..., messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., max_tokens: _Optional[int] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., raw: _Optional[bool] = ..., timeout_s: _Optional[float] = ..., stop: _Optional[_Iterable[str]] = ..., top_logprobs: _Optional[int] = ..., response_format: _Optional[_Union[ResponseFormat, _Mapping]] = ...) -> None: ...

class GenerateStats(_message.Message):
    __slots__ = ("rounds", "accepted_tokens", "verified_tokens", "draft_tokens", "mean_accept_len", "cached_prompt_tokens", "resyncs", "seconds", "plain_rounds", "lookup_rounds", "drafted_rounds", "lookup_accepted", "draft_forwards", "ttft", "failovers", "draft_failovers", "draft_features_missing", "feature_bytes", "grammar_pruned")
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    VERIFIED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DRAFT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MEAN_ACCEPT_LEN_FIELD_NUMBER: _ClassVar[int]
    CACHED_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    RESYNCS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    PLAIN_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    LOOKUP_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    DRAFTED_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    LOOKUP_ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    DRAFT_FORWARDS_FIELD_NUMBER: _ClassVar[int]
    TTFT_FIELD_NUMBER: _ClassVar[int]
    FAILOVERS_FIELD_NUMBER: _ClassVar[int]
    DRAFT_FAILOVERS_FIELD_NUMBER: _ClassVar[int]
    DRAFT_FEATURES_MISSING_FIELD_NUMBER: _ClassVar[int]
    FEATURE_BYTES_FIELD_NUMBER: _ClassVar[int]
    GRAMMAR_PRUNED_FIELD_NUMBER: _ClassVar[int]
    rounds: int
    accepted_tokens: int
    verified_tokens: int
    draft_tokens: int
    mean_accept_len: float
    cached_prompt_tokens: int
    resyncs: int
    seconds: float
    plain_rounds: int
    lookup_rounds: int
    drafted_rounds: int
    lookup_accepted: int
    draft_forwards: int
    ttft: float
    failovers: int
    draft_failovers: int
    draft_features_missing: int
    feature_bytes: int
    grammar_pruned: int
    def __init__(self, rounds: _Optional[int] = ..., accepted_tokens: _Optional[int] = ..., verified_tokens: _Optional[int] = ..., draft_tokens: _Optional[int] = ..., mean_accept_len: _Optional[float] = ..., cached_prompt_tokens: _Optional[int] = ..., resyncs: _Optional[int] = ..., seconds: _Optional[float] = ..., plain_rounds: _Optional[int] = ..., lookup_rounds: _Optional[int] = ..., drafted_rounds: _Optional[int] = ..., lookup_accepted: _Optional[int] = ..., draft_forwards: _Optional[int] = ..., ttft: _Optional[float] = ..., failovers: _Optional[int] = ..., draft_failovers: _Optional[int] = ..., draft_features_missing: _Optional[int] = ..., feature_bytes: _Optional[int] = ..., grammar_pruned: _Optional[int] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("id", "text", "token_ids", "finish_reason", "prompt_tokens", "completion_tokens", "stats", "logprobs")
    ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    id: str
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    stats: GenerateStats
    logprobs: _containers.RepeatedCompositeFieldContainer[TokenLogprob]
    def __init__(self, id: _Optional[str] = ..., text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., finish_reason: _Optional[str] = ..., prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., stats: _Optional[_Union[GenerateStats, _Mapping]] = ..., logprobs: _Optional[_Iterable[_Union[TokenLogprob, _Mapping]]] = ...) -> None: ...

class GenerateChunk(_message.Message):
    __slots__ = ("id", "text", "token_ids", "finish_reason", "stats", "prompt_tokens", "completion_tokens", "logprobs")
    ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    id: str
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    finish_reason: str
    stats: GenerateStats
    prompt_tokens: int
    completion_tokens: int
    logprobs: _containers.RepeatedCompositeFieldContainer[TokenLogprob]
    def __init__(self, id: _Optional[str] = ..., text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., finish_reason: _Optional[str] = ..., stats: _Optional[_Union[GenerateStats, _Mapping]] = ..., prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., logprobs: _Optional[_Iterable[_Union[TokenLogprob, _Mapping]]] = ...) -> None: ...
