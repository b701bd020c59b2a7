"""The in-process engine: drives the decode loop (decode.py) with local draft and target sessions."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator

import torch

from .config import SpecConfig
from .decode import Chunk, DecodeStats, Prefill, Propose, Sequence, Step, Verify, decode
from .drafting import DraftSession
from .governor import SpeculationGovernor
from .sampling import SamplingParams, TokenChooser
from .verification import TargetSession

GenerationStats = DecodeStats   # the name the engine's results have always used


@dataclass
class GenerationResult:
    token_ids: list[int]
    finish_reason: str           # "stop" (a stop token) or "length"
    stats: DecodeStats


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
    """

    def __init__(self, target, draft=None, *, stop_token_ids: set[int] | None = None,
                 spec: SpecConfig | None = None):
        for what, runner in (("target", target), ("draft", draft)):
            if runner is not None and isinstance(runner, torch.nn.Module):
                raise TypeError(f"Engine takes runners: wrap the {what} model in gsd_serve.models.ModelRunner")
        self.target = target
        self.draft = draft
        self.stop_token_ids = set(stop_token_ids or ())
        self.spec = spec or SpecConfig()
        # the latest measured plain-step time, so that an adaptive sequence need not measure it first
        self.step_seconds: float | None = None

    @property
    def dtype_name(self) -> str:
        """The target's dtype ("float32", "bfloat16", ...), for reports."""
        return str(getattr(self.target, "dtype", "float32")).removeprefix("torch.")

    def new_governor(self) -> SpeculationGovernor:
        return SpeculationGovernor(step_seconds=self.step_seconds)

    def generate(self, prompt_ids: list[int], max_new_tokens: int = 64, spec: SpecConfig | None = None,
                 sampling: SamplingParams | None = None) -> GenerationResult:
        gen = self.stream(prompt_ids, max_new_tokens, spec, sampling)
        for _ in gen:
            pass
        return gen.result

    def stream(self, prompt_ids: list[int], max_new_tokens: int = 64, spec: SpecConfig | None = None,
               sampling: SamplingParams | None = None) -> Generation:
        spec = spec or self.spec
        seq = Sequence(prompt_ids, max_new_tokens, self.stop_token_ids)   # validates both
        if spec.method != "ar" and self.draft is None:
            raise ValueError(f"method '{spec.method}' needs a draft model")
        box: list = []
        return Generation(self._run(seq, spec, sampling or SamplingParams(), box), box)

    def _run(self, seq: Sequence, spec: SpecConfig, sampling: SamplingParams, box: list) -> Iterator[list[int]]:
        chooser = TokenChooser(sampling, self.target.vocab_size)
        draft = DraftSession(self.draft) if spec.method != "ar" else None
        # a feature draft reads the target's hidden states: the target keeps them as it computes them
        layers = tuple(self.draft.feature_layers) if draft is not None and draft.uses_features else ()
        target = TargetSession(self.target, feature_layers=layers)
        governor = self.new_governor() if draft is not None and spec.adaptive else None
        loop = decode(seq, spec, governor, DecodeStats(method=spec.method))
        slots: list[int] = []
        answer = None
        draft_ema: float | None = None    # seconds of a drafting round (moving average), for sizing trees
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
                    t0 = time.perf_counter()
                    answer, slots = draft.propose(seq.root, seq.root_index, context, spec, chooser,
                                                  max_depth=request.max_depth,
                                                  history=seq.tokens if spec.lookup else None)
                    draft_s = time.perf_counter() - t0
                    draft_ema = draft_s if draft_ema is None else 0.8 * draft_ema + 0.2 * draft_s
                elif isinstance(request, Verify):
                    answer = target.verify(request.graph, spec.budget, seq.root_index, chooser,
                                           overhead_seconds=draft_ema if spec.size_by_cost else None)
                    draft.commit(request.graph, slots, answer.graph_path)
                    draft.add_features(seq.root_index, answer.features)
                elif isinstance(request, Step):
                    t0 = time.perf_counter()
                    answer = target.step(seq.root, seq.root_index, chooser)
                    self.step_seconds = time.perf_counter() - t0
                    if draft is not None:   # the draft catches up in its next round's first forward
                        draft.pending.append(seq.root)
                        draft.add_features(seq.root_index, target.last_features)
                elif isinstance(request, Prefill):
                    answer = target.prefill(seq.tokens, chooser)
                    if draft is not None:
                        draft.pending = list(seq.tokens)
                        draft.add_features(0, target.last_features)
        stats.target_forwards = target.forwards
        if draft is not None:
            stats.draft_forwards = draft.forwards
            stats.draft_prefill_tokens = seq.prompt_len
            stats.draft_tokens = draft.tokens_fed - seq.prompt_len
            stats.draft_proposal_tokens = draft.proposal_fed
            stats.draft_features_missing = draft.features_missing
            stats.finish(stats.seconds)
        box.append(GenerationResult(seq.output, seq.finish_reason, stats))
