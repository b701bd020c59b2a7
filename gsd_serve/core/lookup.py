"""Proposals that cost no model forward: what followed earlier occurrences of the context's suffix.

Text often repeats what the context already holds: code edits return most of the code they were given,
answers quote their sources, a retried or templated request repeats an earlier answer. `SuffixLookup`
finds the longest earlier occurrences of the sequence's current suffix (its match length L, up to
MAX_MATCH tokens) and proposes what followed them, as one chain of up to dozens of tokens. When several
occurrences match equally long, their continuations are counted and the chain follows the most frequent
token at each step (SuffixDecoding's frequency scoring), with that token's share as part of its score.

Two indexes answer the same query:
- the sequence's own prompt and output (`SuffixLookup.for_sequence`), indexed as it grows;
- earlier requests of the same engine or application (`SharedSuffixIndex`): whole token sequences,
  bounded in tokens, least recently used first out.

How likely a proposed token is to be accepted is learned, not assumed: `AcceptanceStats` counts, by match
length, how often the target accepted a lookup token whose preceding chain was accepted. A chain token i
places after a match of length L is itself a match of length L + i once the tokens before it are accepted,
so one curve q(L) scores every token of every chain. Nothing here decides the output: every proposed token
is verified by the target.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field

MAX_MATCH = 64        # match lengths are counted up to this (longer matches score alike)
KEY_LONG = 3          # candidates come from the latest occurrences of the last 3 tokens ...
KEY_SHORT = 1         # ... else of the last token (which finds the matches of 1 and 2 tokens)
CANDIDATES = 24       # latest occurrences examined per key


@dataclass
class Continuation:
    """A proposed chain: tokens, the share of the matching occurrences that continue with each token, the
    match length L of the suffix the chain continues, and how many occurrences matched that long."""

    tokens: list[int]
    shares: list[float]
    match_len: int
    support: int
    source: str

    def __bool__(self) -> bool:
        return bool(self.tokens)


def _match_length(doc, p: int, ctx, limit: int) -> int:
    """How many tokens before doc[p] equal the last tokens of ctx (at most `limit`)."""
    n = 0
    end = len(ctx)
    while n < limit and p - 1 - n >= 0 and doc[p - 1 - n] == ctx[end - 1 - n]:
        n += 1
    return n


def _follow(conts: list[list[int]], max_tokens: int) -> tuple[list[int], list[float]]:
    """The chain through the most frequent next token of the continuations that still agree, and each token's share."""
    tokens: list[int] = []
    shares: list[float] = []
    alive = [c for c in conts if c]
    depth = 0
    while alive and depth < max_tokens:
        counts: dict[int, int] = {}
        for c in alive:
            if depth < len(c):
                counts[c[depth]] = counts.get(c[depth], 0) + 1
        if not counts:
            break
        token, count = max(counts.items(), key=lambda kv: kv[1])
        tokens.append(token)
        shares.append(count / len(alive))
        alive = [c for c in alive if depth < len(c) and c[depth] == token]
        depth += 1
    return tokens, shares


class _GramIndex:
    """The position after each occurrence of every n-gram (n in `sizes`), over documents."""

    def __init__(self, sizes: tuple[int, ...] = (KEY_LONG, KEY_SHORT)) -> None:
        self.sizes = sizes
        self.grams: dict[tuple, list[tuple[int, int]]] = {}
        self.entries = 0

    def add(self, doc_id: int, doc, start: int, stop: int) -> None:
        """Index the grams ending at positions start..stop-1 of doc (the position after each is its value)."""
        grams = self.grams
        for end in range(max(start, 1), stop + 1):
            for n in self.sizes:
                if end >= n:
                    key = tuple(doc[end - n:end])
                    grams.setdefault(key, []).append((doc_id, end))
                    self.entries += 1

    def candidates(self, ctx, n: int) -> list[tuple[int, int]]:
        if len(ctx) < n:
            return []
        found = self.grams.get(tuple(ctx[len(ctx) - n:]))
        return found[-CANDIDATES:] if found else []


def _best_continuation(index: _GramIndex, docs, ctx, max_tokens: int, source: str,
                       skip=None) -> tuple[Continuation, list[int]]:
    """The continuation of the longest earlier matches of ctx's suffix among `docs` (doc_id -> tokens), and the
    documents it came from."""
    best_len = 0
    best: list[tuple[int, int]] = []
    for n in index.sizes:
        for doc_id, p in reversed(index.candidates(ctx, n)):
            doc = docs.get(doc_id)
            if doc is None or (skip is not None and skip(doc_id, p)) or p >= len(doc):
                continue
            length = _match_length(doc, p, ctx, MAX_MATCH)
            if length > best_len:
                best_len, best = length, [(doc_id, p)]
            elif length == best_len and length:
                best.append((doc_id, p))
        if best_len >= KEY_LONG:
            break
    if not best:
        return Continuation([], [], 0, 0, source), []
    conts = [list(docs[d][p: p + max_tokens]) for d, p in best]
    tokens, shares = _follow(conts, max_tokens)
    return Continuation(tokens, shares, best_len, len(best), source), [d for d, _ in best]


class SuffixLookup:
    """The earlier occurrences of one sequence's suffix in the sequence itself (prompt and output).

    `match(tokens, max_tokens)` takes the committed tokens (a list that grows by appends; a shorter list
    than last time, a rollback, reindexes from scratch) and returns the continuation of the longest
    earlier matches of their suffix. The newest token's own position never matches itself."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget what was indexed (the sequence was rewritten, not just extended)."""
        self._index = _GramIndex()
        self._indexed = 0

    def match(self, tokens, max_tokens: int) -> Continuation:
        if max_tokens <= 0 or len(tokens) < 2:
            return Continuation([], [], 0, 0, "context")
        if len(tokens) < self._indexed:
            self.reset()
        end = len(tokens)
        # index every gram that ends before the final token: an occurrence must be followed by something
        if self._indexed < end - 1:
            self._index.add(0, tokens, self._indexed + 1 if self._indexed else 1, end - 1)
            self._indexed = end - 1
        return _best_continuation(self._index, {0: tokens}, tokens, max_tokens, "context")[0]


class SharedSuffixIndex:
    """Earlier requests' token sequences (prompt and output), for the cross-request proposer.

    Bounded by `max_tokens` in all (about 150 bytes of index per token): the least recently used sequence
    (added, or matched by a query) leaves first.
    Identical sequences added twice count twice, so frequent continuations win ties. Safe to share between
    threads (a server's decode loop matches while another thread adds what other replicas published)."""

    def __init__(self, max_tokens: int = 100_000, min_tokens: int = 8):
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        self.max_tokens = max_tokens
        self.min_tokens = min_tokens
        self._docs: OrderedDict[int, list[int]] = OrderedDict()
        self._index = _GramIndex((KEY_LONG,))   # matches shorter than KEY_LONG are not proposed across requests
        self._next_id = 0
        self.tokens = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._docs)

    def add(self, tokens) -> None:
        """Remember one finished sequence (too short ones teach nothing and are skipped)."""
        tokens = list(tokens[-self.max_tokens:])
        if len(tokens) < self.min_tokens:
            return
        with self._lock:
            self._add(tokens)

    def _add(self, tokens: list[int]) -> None:
        doc_id = self._next_id
        self._next_id += 1
        self._docs[doc_id] = tokens
        self.tokens += len(tokens)
        self._index.add(doc_id, tokens, 1, len(tokens) - 1)
        while self.tokens > self.max_tokens and self._docs:
            _, old = self._docs.popitem(last=False)
            self.tokens -= len(old)
        if self._index.entries > 2 * self.tokens + 1024:   # mostly entries of evicted sequences: rebuild
            self._rebuild()

    def _rebuild(self) -> None:
        self._index = _GramIndex(self._index.sizes)
        for doc_id, doc in self._docs.items():
            self._index.add(doc_id, doc, 1, len(doc) - 1)

    def match(self, tokens, max_tokens: int) -> Continuation:
        if max_tokens <= 0 or not self._docs or len(tokens) < KEY_SHORT:
            return Continuation([], [], 0, 0, "shared")
        with self._lock:
            return self._match(tokens, max_tokens)

    def _match(self, tokens, max_tokens: int) -> Continuation:
        found, origins = _best_continuation(self._index, self._docs, tokens, max_tokens, "shared")
        if found.match_len < KEY_LONG:      # a token or two in common with another request says little
            return Continuation([], [], 0, 0, "shared")
        for doc_id in origins:              # recently used: evicted last
            self._docs.move_to_end(doc_id)
        return found


# ---------------------------------------------------------------- how often lookup tokens are accepted

_EDGES = (1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 24, 32, 48, MAX_MATCH)


def match_bucket(length: int) -> int:
    """The bucket of a match length: one per length up to 8, then wider."""
    for i, edge in enumerate(_EDGES):
        if length <= edge:
            return i
    return len(_EDGES) - 1


def prior_acceptance(length: int) -> float:
    """The acceptance rate assumed for a lookup token after a match of `length` before anything is measured
    (engines learn their own quickly): on held-out chat answers, greedy, the next token after a 1-token match
    was accepted 7 times in 34, after 2 tokens 12 in 21, after 3-7 tokens 23 in 30."""
    return 0.25 if length <= 1 else 0.5 if length == 2 else 0.65 if length <= 8 else 0.8 if length <= 16 else 0.9


@dataclass
class AcceptanceStats:
    """How often a lookup token was accepted, by the match length it continued (counts, halved when large so
    the rate follows the text)."""

    accepted: list[float] = field(default_factory=lambda: [0.0] * len(_EDGES))
    seen: list[float] = field(default_factory=lambda: [0.0] * len(_EDGES))
    window: float = 256.0

    def rate(self, length: int, prior: float | None = None, strength: float = 4.0) -> float:
        b = match_bucket(length)
        p = prior_acceptance(length) if prior is None else prior
        return (self.accepted[b] + strength * p) / (self.seen[b] + strength)

    def record(self, match_len: int, proposed: int, accepted: int) -> None:
        """A chain continuing a match of `match_len`: its first `proposed` tokens were verified, the first
        `accepted` of them accepted (the token after them, if verified, was not)."""
        for i in range(min(accepted + 1, proposed)):
            b = match_bucket(min(match_len + i, MAX_MATCH))
            self.seen[b] += 1
            self.accepted[b] += i < accepted
            if self.seen[b] > self.window:
                self.seen[b] /= 2
                self.accepted[b] /= 2
