"""The in-process engine: plain decoding and chain / tree / graph speculation through one loop."""
from __future__ import annotations

import dataclasses
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator

import torch

from .config import SpecConfig
from .drafting import DraftSession
from .governor import SpeculationGovernor
from .runner import ModelRunner
from .sampling import SamplingParams, TokenChooser
from .verification import TargetSession


@dataclass
class GenerationStats:
    method: str = "ar"
    new_tokens: int = 0
    target_forwards: int = 0     # prefill included
    rounds: int = 0              # target forwards after the prefill
    draft_forwards: int = 0
    draft_tokens: int = 0        # tokens fed to the draft after the prompt: catch-up and proposals
    draft_proposal_tokens: int = 0  # of those, drafted nodes fed to draft their children
    draft_prefill_tokens: int = 0   # the prompt, fed with the first round
    verified_tokens: int = 0     # tree tokens fed to the target in verification
    accepted_tokens: int = 0     # draft tokens accepted (bonus tokens not counted)
    merge_edges: int = 0
    plain_steps: int = 0         # rounds an adaptive speculator (SpecConfig.adaptive) decoded plainly
    mean_accept_len: float = 0.0  # emitted tokens / target forwards
    draft_tokens_per_round: float = 0.0
    seconds: float = 0.0
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0
    tokens_per_s: float = 0.0
    accept_lengths: dict[int, int] = field(default_factory=dict)  # tokens emitted per round -> count

    def finish(self, seconds: float) -> None:
        self.seconds = seconds
        self.mean_accept_len = self.new_tokens / self.target_forwards if self.target_forwards else 0.0
        self.draft_tokens_per_round = self.draft_tokens / self.rounds if self.rounds else 0.0
        self.tokens_per_s = self.new_tokens / seconds if seconds > 0 else 0.0

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["accept_lengths"] = {str(k): v for k, v in sorted(self.accept_lengths.items())}
        return d


@dataclass
class GenerationResult:
    token_ids: list[int]
    finish_reason: str           # "stop" (a stop token) or "length"
    stats: GenerationStats


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
    """Generates with a target model, and a draft model for the speculative methods.

    target/draft are transformers causal LMs sharing one tokenizer. `draft_output_ids` is the reduced
    output vocabulary of a distilled draft (None: its full vocabulary).
    """

    def __init__(self, target, draft=None, *, stop_token_ids: set[int] | None = None,
                 draft_output_ids: torch.Tensor | None = None, spec: SpecConfig | None = None):
        # a model, or an object with ModelRunner's interface (e.g. a tensor-parallel runner)
        self.target = target if hasattr(target, "new_cache") and hasattr(target, "forward") \
            and not isinstance(target, torch.nn.Module) else ModelRunner(target)
        self.draft = ModelRunner(draft, draft_output_ids) if draft is not None else None
        self.stop_token_ids = set(stop_token_ids or ())
        self.spec = spec or SpecConfig()
        # the latest measured plain-step time, so that an adaptive sequence need not measure it first
        self.step_seconds: float | None = None

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
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if spec.method != "ar" and self.draft is None:
            raise ValueError(f"method '{spec.method}' needs a draft model")
        box: list = []
        return Generation(self._run(list(prompt_ids), max_new_tokens, spec, sampling or SamplingParams(), box), box)

    def _run(self, prompt: list[int], max_new: int, spec: SpecConfig, sampling: SamplingParams,
             box: list) -> Iterator[list[int]]:
        stats = GenerationStats(method=spec.method)
        chooser = TokenChooser(sampling, self.target.vocab_size)
        target = TargetSession(self.target)
        draft = DraftSession(self.draft) if spec.method != "ar" else None
        governor = self.new_governor() if draft is not None and spec.adaptive else None
        out: list[int] = []
        seq = list(prompt)   # prompt + out, kept up to date rather than rebuilt every round
        finish = "length"
        start = time.perf_counter()

        def emit(tokens: list[int]) -> list[int]:
            nonlocal finish
            tokens = tokens[: max_new - len(out)]
            for i, t in enumerate(tokens):
                if t in self.stop_token_ids:
                    tokens = tokens[: i + 1]
                    finish = "stop"
                    break
            out.extend(tokens)
            seq.extend(tokens)
            return tokens

        with torch.inference_mode():
            root = target.prefill(prompt, chooser)
            chunk = emit([root])
            yield chunk
            if draft is not None:
                draft.pending = list(prompt)
            while finish != "stop" and len(out) < max_new:
                root_index = len(prompt) + len(out) - 1
                if draft is None or (governor is not None and not governor.speculate()):
                    t0 = time.perf_counter()
                    chunk = emit([target.step(root, root_index, chooser)])
                    self.step_seconds = time.perf_counter() - t0
                    stats.accept_lengths[1] = stats.accept_lengths.get(1, 0) + 1
                    if draft is not None:   # an adaptive sequence decoding plainly for now
                        governor.record_step(self.step_seconds)
                        draft.pending.append(root)   # the draft catches up in its next round's first forward
                        stats.plain_steps += 1
                else:
                    t0 = time.perf_counter()
                    context = tuple(seq[-1 - spec.merge_context:-1]) if spec.merge_context > 0 else ()
                    graph, slots = draft.propose(root, root_index, context, spec, chooser,
                                                 max_depth=max_new - len(out) - 1,
                                                 history=seq if spec.lookup else None)
                    t1 = time.perf_counter()
                    verdict = target.verify(graph, spec.budget, root_index, chooser)
                    t2 = time.perf_counter()
                    draft.commit(graph, slots, verdict.graph_path)
                    stats.draft_seconds += t1 - t0
                    stats.verify_seconds += t2 - t1
                    stats.verified_tokens += verdict.verified_tokens
                    stats.merge_edges += graph.merge_edges
                    chunk = emit(verdict.emitted)
                    # counted as emitted: a round cut short by a stop token or the length limit counts what it gave
                    n = len(chunk)
                    stats.accepted_tokens += n - 1
                    stats.accept_lengths[n] = stats.accept_lengths.get(n, 0) + 1
                    if governor is not None:
                        governor.record_round(n, t2 - t0)
                stats.rounds += 1
                chooser.forget_before(root_index)
                root = out[-1]
                yield chunk
        stats.new_tokens = len(out)
        stats.target_forwards = target.forwards
        if draft is not None:
            stats.draft_forwards = draft.forwards
            stats.draft_prefill_tokens = len(prompt)
            stats.draft_tokens = draft.tokens_fed - len(prompt)
            stats.draft_proposal_tokens = draft.proposal_fed
        stats.finish(time.perf_counter() - start)
        box.append(GenerationResult(out, finish, stats))
