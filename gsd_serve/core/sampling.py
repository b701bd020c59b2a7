"""Token choice: greedy, or sampling from the temperature/top-k/top-p warped distribution.

Sampling uses the Gumbel-max trick with noise that depends only on (seed, absolute token index):
token i is argmax(warped_logits + g_i). Whatever the method (plain decoding or any speculation), the
token emitted at index i is the target's choice on the true prefix with the same noise g_i, so every
method samples exactly the warped target distribution and, for one seed, emits the same tokens as
plain sampling. The draft may use the same noise to propose (coupled proposals), which raises
acceptance without touching the output distribution: the draft only decides how many tokens a
target forward confirms.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

_MIX = 0x9E3779B97F4A7C15
MAX_TOP_LOGPROBS = 20      # alternatives a request may ask for with each token's logprob (as OpenAI)


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 means greedy; top_k 0 and top_p 1.0 mean no truncation."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not (self.temperature >= 0.0 and self.temperature <= 100.0):
            raise ValueError(f"temperature must be in [0, 100], got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and not (0 <= self.seed < 2**63):
            raise ValueError(f"seed must be in [0, 2**63), got {self.seed}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class TokenLogprob:
    """A chosen token's log-probability under the target's own distribution (the log-softmax of its raw logits:
    no temperature, top-k or top-p, as OpenAI reports them) and the `top` most probable tokens there."""

    token: int
    logprob: float
    top_tokens: tuple[int, ...] = ()
    top_logprobs: tuple[float, ...] = ()


class TokenChooser:
    """Chooses tokens for rows of logits, each row predicting a known absolute token index.

    With `top_logprobs` (None: off) the verifier notes each committed choice's TokenLogprob with that many
    alternatives in `logprobs` (absolute token index -> TokenLogprob); drivers read them from there.
    With a `grammar` (a core.grammar.GrammarConstraint: JSON mode) each token is chosen one at a time (`pick`)
    from logits masked to what the grammar allows after the tokens before it; its logprobs are those of the
    masked distribution."""

    def __init__(self, params: SamplingParams, vocab_size: int, top_logprobs: int | None = None, grammar=None):
        self.params = params
        self.grammar = grammar
        self.vocab_size = vocab_size
        self.seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
        self._noise: dict[int, torch.Tensor] = {}
        self.top_logprobs = top_logprobs
        self.logprobs: dict[int, TokenLogprob] = {}

    def note(self, logits: torch.Tensor, tokens, indices) -> None:
        """Record the log-probabilities of `tokens` (chosen from the rows of `logits`, at absolute indices
        `indices`) when they are asked for; nothing otherwise."""
        if self.top_logprobs is None:
            return
        lsm = torch.log_softmax(logits.float(), dim=-1)
        tokens = [int(t) for t in (tokens.tolist() if torch.is_tensor(tokens) else tokens)]
        indices = [int(i) for i in (indices.tolist() if torch.is_tensor(indices) else indices)]
        rows = torch.arange(len(tokens), device=lsm.device)
        chosen = lsm[rows, torch.tensor(tokens, dtype=torch.long, device=lsm.device)].tolist()
        if self.top_logprobs > 0:
            top = torch.topk(lsm, min(self.top_logprobs, lsm.shape[-1]), dim=-1)
            top_ids, top_lps = top.indices.tolist(), top.values.tolist()
        else:
            top_ids = top_lps = [[] for _ in tokens]
        for r, (t, i) in enumerate(zip(tokens, indices)):
            # alternatives of probability 0 (masked by a grammar, cut by top-k/top-p) are no alternatives; their
            # -inf is not a JSON number either
            alt = [(a, lp) for a, lp in zip(top_ids[r], top_lps[r]) if lp != float("-inf")]
            self.logprobs[i] = TokenLogprob(t, chosen[r], tuple(a for a, _ in alt), tuple(lp for _, lp in alt))

    def pick(self, row: torch.Tensor, index: int) -> int:
        """The token at absolute index `index` from one row of logits [V] (the next token after committed or
        accepted ones), noted; under a grammar, chosen from the masked row and consumed into the grammar."""
        if self.grammar is not None:
            row = self.grammar.mask_logits(row)
        rows = row[None]
        token = self.choose(rows, torch.tensor([index]))
        self.note(rows, token, [index])
        chosen = int(token[0])
        if self.grammar is not None:
            self.grammar.consume([chosen])
        return chosen

    def noise(self, index: int) -> torch.Tensor:
        """Gumbel noise for the token at absolute index `index` (cached until `forget_before`)."""
        g = self._noise.get(index)
        if g is None:
            gen = torch.Generator().manual_seed((self.seed * _MIX + index * 1_000_003) % (2**63))
            u = torch.rand(self.vocab_size, generator=gen, dtype=torch.float64)
            g = (-torch.log(-torch.log(u.clamp(1e-300, 1.0 - 1e-16)))).to(torch.float32)
            self._noise[index] = g
        return g

    def noise_rows(self, indices: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.noise(int(i)) for i in indices.tolist()])

    def forget_before(self, index: int) -> None:
        for key in [k for k in self._noise if k < index]:
            del self._noise[key]

    def warp(self, logits: torch.Tensor) -> torch.Tensor:
        """Temperature, then top-k, then top-p (the order transformers uses); masked entries are -inf."""
        p = self.params
        logits = logits.float() / p.temperature
        if p.top_k and p.top_k < logits.shape[-1]:
            kth = torch.topk(logits, p.top_k, dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
            probs = torch.softmax(sorted_logits, dim=-1)
            # drop a token when the mass strictly before it already reaches top_p (the top token always stays)
            drop_sorted = (torch.cumsum(probs, dim=-1) - probs) >= p.top_p
            drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
            logits = logits.masked_fill(drop, float("-inf"))
        return logits

    def choose(self, logits: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """One token per row of `logits` [n, V]; row r predicts the token at absolute index indices[r]."""
        if self.params.greedy:
            return logits.argmax(dim=-1)
        return (self.warp(logits) + self.noise_rows(indices)).argmax(dim=-1)

    def distribution(self, logits: torch.Tensor) -> torch.Tensor:
        """The exact distribution `choose` samples from (for tests and analysis)."""
        if self.params.greedy:
            return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
        return torch.softmax(self.warp(logits), dim=-1)
