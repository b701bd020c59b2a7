"""The in-process engine: drives the decode loop (decode.py) with local draft and target sessions."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator

import torch

from .config import SpecConfig
from .costs import ForwardCosts
from .decode import Chunk, DecodeStats, Prefill, Propose, Sequence, Step, Verify, decode
from .drafting import DraftSession
from .lookup import SharedSuffixIndex
from .planner import Planner
from .sampling import SamplingParams, TokenChooser, TokenLogprob
from .verification import TargetSession

COST_SEED_SIZES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)

GenerationStats = DecodeStats   # the name the engine's results have always used


@dataclass
class GenerationResult:
    token_ids: list[int]
    finish_reason: str           # "stop" (a stop token or string) or "length"
    stats: DecodeStats
    text_end: int | None = None  # a stop string ended the output: characters of its decoded text before it
    logprobs: list[TokenLogprob] | None = None   # one per output token, when asked for


class Generation:
    """An iterator over chunks of new token ids; `result` is set once it is exhausted."""

    def __init__(self, chunks: Iterator[list[int]], result_box: list):
        self._chunks = chunks
        self._box = result_box

    def __iter__(self) -> Iterator[list[int]]:
        return self._chunks

    def __next__(self) -> list[int]:
        return next(self._chunks)

    @property
    def result(self) -> GenerationResult | None:
        return self._box[0] if self._box else None


class Engine:
    """Generates with a target runner, and a draft runner for the speculative methods.

    `target` and `draft` are runners (gsd_serve.models.ModelRunner, a tensor-parallel runner, or
    anything with their interface: `new_cache`, `forward`, `vocab_size`, `output_ids`, `to_full_ids`).
    `gsd_serve.models.load_engine` builds one from model names.

    One `Planner` serves every request of the engine: what it learns of forward costs and acceptance on
    one request informs the next, and finished requests feed its cross-request index (at most
    `shared_lookup_tokens` tokens; 0: none).
    """

    def __init__(self, target, draft=None, *, stop_token_ids: set[int] | None = None,
                 spec: SpecConfig | None = None, shared_lookup_tokens: int = 100_000):
        for what, runner in (("target", target), ("draft", draft)):
            if runner is not None and isinstance(runner, torch.nn.Module):
                raise TypeError(f"Engine takes runners: wrap the {what} model in gsd_serve.models.ModelRunner")
        self.target = target
        self.draft = draft
        self.stop_token_ids = set(stop_token_ids or ())
        self.spec = spec or SpecConfig()
        self.shared = SharedSuffixIndex(shared_lookup_tokens) if shared_lookup_tokens > 0 else None
        self._planner: Planner | None = None

    def forget_requests(self) -> None:
        """Empty the cross-request index (a benchmark's warm-up must not hand its answers to the measured runs)."""
        if self.shared is not None:
            self.shared = SharedSuffixIndex(self.shared.max_tokens)
            if self._planner is not None:
                self._planner.shared = self.shared

    @property
    def planner(self) -> Planner:
        """The engine's planner, its target cost model seeded with the runner's measured forward times (a table
        remembered per CPU, where the runner has one) and corrected by every forward the engine times."""
        if self._planner is None:
            costs = getattr(self.target, "forward_seconds", None)
            seed = (list(COST_SEED_SIZES), [costs(n) for n in COST_SEED_SIZES]) if costs is not None else None
            self._planner = Planner(ForwardCosts(seed), shared=self.shared)
        return self._planner

    @property
    def dtype_name(self) -> str:
        """The target's dtype ("float32", "bfloat16", ...), for reports."""
        return str(getattr(self.target, "dtype", "float32")).removeprefix("torch.")

    def generate(self, prompt_ids: list[int], max_new_tokens: int = 64, spec: SpecConfig | None = None,
                 sampling: SamplingParams | None = None, stop=None, logprobs: int | None = None, grammar=None
                 ) -> GenerationResult:
        gen = self.stream(prompt_ids, max_new_tokens, spec, sampling, stop, logprobs, grammar)
        for _ in gen:
            pass
        return gen.result

    def stream(self, prompt_ids: list[int], max_new_tokens: int = 64, spec: SpecConfig | None = None,
               sampling: SamplingParams | None = None, stop=None, logprobs: int | None = None, grammar=None
               ) -> Generation:
        """`stop`: a core.stops.StopStrings (it holds the tokenizer that decodes the text it searches); the
        output ends at the token that completes the first stop string, and the result's `text_end` says where
        the text ends. `logprobs` (None: off): the result carries each output token's TokenLogprob with this
        many most probable alternatives. `grammar` (JSON mode: a fresh core.grammar.GrammarConstraint, from a
        GrammarCompiler over the engine's stop tokens): every output token is the target's choice among the
        tokens it allows."""
        spec = spec or self.spec
        seq = Sequence(prompt_ids, max_new_tokens, self.stop_token_ids, stop, grammar)   # validates both
        if spec.method != "ar" and self.draft is None:
            raise ValueError(f"method '{spec.method}' needs a draft model")
        box: list = []
        return Generation(self._run(seq, spec, sampling or SamplingParams(), box, logprobs), box)

    def _run(self, seq: Sequence, spec: SpecConfig, sampling: SamplingParams, box: list,
             logprobs: int | None = None) -> Iterator[list[int]]:
        chooser = TokenChooser(sampling, self.target.vocab_size, logprobs, seq.grammar)
        planner = self.planner.sequence(sampling.greedy, spec.planner, spec.shared_lookup) \
            if spec.method != "ar" else None
        draft = DraftSession(self.draft, on_forward=planner.observe_draft) if planner is not None else None
        # a feature draft reads the target's hidden states: the target keeps them as it computes them
        layers = tuple(self.draft.feature_layers) if draft is not None and draft.uses_features else ()
        target = TargetSession(self.target, feature_layers=layers)
        loop = decode(seq, spec, planner, DecodeStats(method=spec.method))
        slots: list[int] = []
        answer = None
        with torch.inference_mode():
            while True:
                try:
                    request = loop.send(answer)
                except StopIteration as done:
                    stats = done.value
                    break
                answer = None
                if isinstance(request, Chunk):
                    chooser.forget_before(seq.root_index)
                    yield request.tokens
                elif isinstance(request, Propose):
                    n = max(spec.merge_context, 0)
                    context = tuple(seq.tokens[-1 - n:-1]) if n > 0 else ()
                    answer, slots = draft.propose(seq.root, seq.root_index, context, spec, chooser,
                                                  max_depth=request.max_depth, chain=list(request.chain),
                                                  chain_probs=list(request.chain_probs))
                elif isinstance(request, Verify):
                    t0 = time.perf_counter()
                    answer = target.verify_tree(request.tree, seq.root_index, chooser)
                    if planner is not None:
                        planner.observe_target(len(request.tree), time.perf_counter() - t0)
                    if answer.graph_path and len(slots) != len(request.graph):   # a chain the draft never saw
                        slots = [-1] * len(request.graph)
                    draft.commit(request.graph, slots, answer.graph_path)
                    draft.add_features(seq.root_index, answer.features)
                    slots = []
                elif isinstance(request, Step):
                    t0 = time.perf_counter()
                    answer = target.step(seq.root, seq.root_index, chooser)
                    if planner is not None:
                        planner.observe_target(1, time.perf_counter() - t0)
                    if draft is not None:   # the draft catches up in its next round's first forward
                        draft.pending.append(seq.root)
                        draft.add_features(seq.root_index, target.last_features)
                elif isinstance(request, Prefill):
                    answer = target.prefill(seq.tokens, chooser)
                    if draft is not None:
                        draft.pending = list(seq.tokens)
                        draft.add_features(0, target.last_features)
        stats.target_forwards = target.forwards
        if self.shared is not None:
            self.shared.add(seq.tokens)
        if draft is not None:
            stats.draft_forwards = draft.forwards
            # the draft reads the prompt only when it first drafts (the planner may never let it)
            stats.draft_prefill_tokens = min(seq.prompt_len, draft.tokens_fed)
            stats.draft_tokens = draft.tokens_fed - stats.draft_prefill_tokens
            stats.draft_proposal_tokens = draft.proposal_fed
            stats.draft_features_missing = draft.features_missing
            stats.finish(stats.seconds)
        lps = [chooser.logprobs[i] for i in range(seq.prompt_len, len(seq.tokens))] if logprobs is not None else None
        box.append(GenerationResult(seq.output, seq.finish_reason, stats, seq.text_end, lps))
