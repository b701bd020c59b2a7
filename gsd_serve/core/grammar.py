"""JSON mode: a grammar that constrains every token the target decides (OpenAI's `response_format`).

The grammar (llguidance, imported lazily: the rest of the core works without it) gives, after the tokens
consumed so far, the set of tokens allowed next. The target decides each token from its logits with the
forbidden tokens masked out (greedy: the argmax of the masked logits; sampling: a sample of the masked,
renormalised distribution), so the output is the target's own distribution under the constraint, whatever
the method. Under speculation:
- drafted nodes the grammar forbids are dropped from the verification tree before the target's forward
  (`prune`): they could never be accepted, and their rows would be wasted;
- acceptance walks the accepted path one node at a time: the mask at each node comes from the grammar after
  the accepted prefix, the target's choice there decides whether the walk goes on, and each chosen token
  (the bonus token included) is consumed into the grammar.
When the grammar is complete it allows only the stop tokens, so the output ends with finish_reason "stop".
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import torch

from .graph import VerifyTree

RESPONSE_TYPES = ("text", "json_object", "json_schema")
# json_object: any JSON object (OpenAI's JSON mode); whitespace between tokens is allowed, as JSON allows it
JSON_OBJECT_SCHEMA = {"type": "object"}


class GrammarError(ValueError):
    """A response format that cannot be served (the message names what is wrong)."""


@dataclass(frozen=True)
class ResponseFormat:
    """What the output must be: `kind` json_object (any JSON object) or json_schema (`schema`, a JSON Schema as
    JSON text)."""

    kind: str
    schema: str = ""

    @property
    def schema_text(self) -> str:
        return self.schema if self.kind == "json_schema" else json.dumps(JSON_OBJECT_SCHEMA)


def parse_response_format(value) -> ResponseFormat | None:
    """OpenAI's `response_format` ({"type": "text" | "json_object" | "json_schema", "json_schema": {"schema": {...},
    "name": ..., "strict": ...}}) as a ResponseFormat; None for text (or nothing). Raises GrammarError naming
    what is wrong; the schema itself is checked when it is compiled (GrammarCompiler.check)."""
    if value is None or value == {}:
        return None
    if not isinstance(value, dict):
        raise GrammarError("'response_format' must be an object with a 'type'")
    kind = value.get("type")
    if kind not in RESPONSE_TYPES:
        raise GrammarError(f"'response_format.type' must be one of {', '.join(RESPONSE_TYPES)}, got {kind!r}")
    if kind == "text":
        return None
    if kind == "json_object":
        return ResponseFormat("json_object")
    spec = value.get("json_schema")
    if not isinstance(spec, dict):
        raise GrammarError("'response_format.json_schema' must be an object with a 'schema'")
    schema = spec.get("schema")
    if not isinstance(schema, dict):
        raise GrammarError("'response_format.json_schema.schema' must be a JSON Schema object")
    return ResponseFormat("json_schema", json.dumps(schema))


class GrammarCompiler:
    """Builds GrammarConstraints over one tokenizer (its llguidance view is built once: about a second).

    `stop_token_ids` (the default of `constraint`) end the output: the grammar allows them (all alike) once it is
    complete, and only then. `vocab_size` is the width of the target's logits (it may exceed the tokenizer's:
    those ids are never allowed)."""

    def __init__(self, tokenizer, stop_token_ids, vocab_size: int):
        import llguidance
        import llguidance.hf

        self.stop_ids = sorted(int(t) for t in stop_token_ids)
        self.vocab_size = int(vocab_size)
        self.lib = llguidance
        # the end token llguidance knows: the constraint reads "may end here" from the matcher, whatever the stop
        # tokens of a request are
        self.eos = int(tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0)
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=max(len(tokenizer), self.vocab_size),
                                                      eos_token=self.eos)

    def _grammar(self, fmt: ResponseFormat) -> str:
        try:
            return self.lib.LLMatcher.grammar_from_json_schema(fmt.schema_text)
        except ValueError as exc:
            raise GrammarError(f"'response_format' schema is not valid JSON: {exc}") from None

    def check(self, fmt: ResponseFormat) -> None:
        """Raise GrammarError when the format's schema cannot be compiled."""
        error = self.lib.LLMatcher.validate_grammar(self._grammar(fmt), self.tokenizer)
        if error:
            raise GrammarError(f"'response_format' schema is not supported: {error}")

    def constraint(self, fmt: ResponseFormat, stop_token_ids=None) -> "GrammarConstraint":
        """A fresh grammar state for one output, ended by `stop_token_ids` (default: the compiler's)."""
        stops = self.stop_ids if stop_token_ids is None else sorted(int(t) for t in stop_token_ids)
        if not stops:
            raise GrammarError("JSON mode needs a stop token to end the output")
        matcher = self.lib.LLMatcher(self.tokenizer, self._grammar(fmt), log_level=0)
        if matcher.is_error():
            raise GrammarError(f"'response_format' schema is not supported: {matcher.get_error()}")
        return GrammarConstraint(matcher, self.vocab_size, stops, self.eos)


class GrammarConstraint:
    """One output's grammar state: the tokens consumed so far (the committed output) and what may come next.

    `pruned` counts the drafted tree nodes `prune` dropped; `masks` the masks computed."""

    def __init__(self, matcher, vocab_size: int, stop_ids, eos: int):
        self.matcher = matcher
        self.vocab_size = vocab_size
        self.stop_ids = list(stop_ids)
        self.eos = eos      # llguidance's end token: never allowed as such (the stop tokens stand for it)
        self.pruned = 0
        self.masks = 0
        self.ended = False    # a stop token was consumed: nothing may follow
        self.consumed = 0     # tokens fed to the matcher (stop tokens are not)

    def _allows_stop(self) -> bool:
        """Whether a stop token may come next: the grammar is complete. Stop tokens are never fed to the matcher
        (the output ends with them, and llguidance does not roll an end token back symmetrically)."""
        return not self.ended and bool(self.matcher.is_accepting())

    def _try(self, token: int) -> bool:
        """Consume one token (not a stop token) when the grammar allows it next."""
        if self.ended or self.matcher.try_consume_tokens([token]) != 1:
            return False
        self.consumed += 1
        return True

    def state(self) -> tuple[int, bool]:
        """Where the grammar stands, for `restore`."""
        return self.consumed, self.ended

    def restore(self, state: tuple[int, bool]) -> None:
        """Go back to an earlier `state()` (a verification that is done again after a failure)."""
        consumed, ended = state
        self.rollback(self.consumed - consumed)
        self.ended = ended

    def allowed_mask(self) -> np.ndarray:
        """The tokens allowed next, one bool per logit (every stop token when the grammar may end here). None
        allowed (a grammar in an error state) reads as only the stop tokens: the output ends."""
        self.masks += 1
        bias = np.frombuffer(self.matcher.compute_logit_bias(), dtype=np.uint8)
        allowed = np.zeros(self.vocab_size, dtype=bool)
        n = min(len(bias), self.vocab_size)
        allowed[:n] = bias[:n] != 0
        allowed[self.eos] = False
        if self.ended:
            allowed[:] = False
        allowed[self.stop_ids] = self._allows_stop() or not allowed.any()
        return allowed

    def mask_logits(self, row: torch.Tensor) -> torch.Tensor:
        """One row of logits with the forbidden tokens at -inf (float32). Numpy on CPU: a 50k-wide torch op on
        a busy machine waits for its thread team, numpy's does not."""
        allowed = self.allowed_mask()
        if row.is_cpu:
            return torch.from_numpy(np.where(allowed, row.float().numpy(), np.float32(-np.inf)))
        return torch.where(torch.from_numpy(allowed).to(row.device), row.float(), float("-inf"))

    def consume(self, tokens) -> bool:
        """Advance past committed tokens (a stop token ends them); False, and nothing consumed, when the grammar
        forbids one of them."""
        done, ended = 0, self.ended
        for t in (int(t) for t in tokens):
            if t in self.stop_ids and self._allows_stop():
                self.ended = True
                continue
            if t in self.stop_ids or not self._try(t):
                self.rollback(done)
                self.ended = ended
                return False
            done += 1
        return True

    def rollback(self, n: int) -> None:
        """Forget the last `n` tokens consumed (stop tokens aside)."""
        if n > 0:
            self.matcher.rollback(n)
            self.consumed -= n

    def is_finished(self) -> bool:
        """The grammar is complete and allows nothing but the end of the output."""
        return self.ended or bool(self.matcher.is_stopped())

    def prune(self, tree: VerifyTree) -> VerifyTree:
        """The tree without the nodes whose token the grammar forbids after their path (and their descendants).
        The order is kept (parents first, best first), so any prefix of the result is still a tree of the most
        probable allowed nodes."""
        n = len(tree)
        tokens = tree.tokens.tolist()
        parents = tree.parents.tolist()
        children: list[list[int]] = [[] for _ in range(n)]
        for i in range(1, n):
            children[parents[i]].append(i)
        keep = [False] * n
        keep[0] = True

        def visit(node: int) -> None:     # the grammar holds the node's path; depth-first, as deep as the tree
            for c in children[node]:
                if tokens[c] in self.stop_ids:    # the output would end here: kept when it may, nothing after it
                    keep[c] = self._allows_stop()
                elif self._try(tokens[c]):
                    keep[c] = True
                    visit(c)
                    self.rollback(1)      # keeps `consumed` in step with the matcher (state/restore read it)

        visit(0)
        kept = [i for i in range(n) if keep[i]]
        self.pruned += n - len(kept)
        if len(kept) == n:
            return tree
        new = {old: i for i, old in enumerate(kept)}
        return VerifyTree(tree.tokens[kept], torch.tensor([new.get(parents[i], -1) for i in kept], dtype=torch.long),
                          tree.depths[kept], [tree.nodes[i] for i in kept],
                          [tree.path_probs[i] for i in kept] if tree.path_probs else [])
