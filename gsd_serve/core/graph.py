"""The token graph of one drafting round and its flattening into the tree the target verifies.

Pure Python and torch tensor code, no model: everything here is unit-tested on hand-made graphs.
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field

import torch

NEVER_MERGE = -1


@dataclass
class TokenGraph:
    """A DAG of drafted tokens. Node 0 is the root: the last committed token.

    Every node has one *real* parent (the node it was drafted under; its draft K/V was computed in that
    context) and may be reached through extra *merge* edges from other parents. An out-edge carries the
    draft probability of its token under that parent, so a merged subtree is ranked, under each parent,
    by the probability that parent gave it.

    `merge_context` is n in the merge rule: a candidate token t under parent a is merged into an
    existing node m when m carries t and the n tokens ending at a equal the n tokens ending at m's real
    parent (n=0: same token anywhere; n=1: same bigram; n=-1: never merge). Tokens before the root come
    from `context` (the committed text), so the rule has a context at every depth.
    """

    root_token: int
    merge_context: int = NEVER_MERGE
    context: tuple[int, ...] = ()
    tokens: list[int] = field(default_factory=list)
    parent: list[int] = field(default_factory=list)
    depth: list[int] = field(default_factory=list)
    logprob: list[float] = field(default_factory=list)
    confident: list[bool] = field(default_factory=list)
    edges: list[list[tuple[int, float]]] = field(default_factory=list)
    merge_edges: int = 0
    refused_cycles: int = 0
    _tail: list[tuple[int, ...]] = field(default_factory=list, repr=False)
    _index: dict[tuple, list[int]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        n = max(self.merge_context, 0)
        tail = (tuple(self.context) + (self.root_token,))[-n:] if n else ()
        self._append(self.root_token, -1, 0, 0.0, True, tail)

    def __len__(self) -> int:
        return len(self.tokens)

    def _append(self, token: int, parent: int, depth: int, logprob: float, confident: bool,
                tail: tuple[int, ...]) -> int:
        self.tokens.append(token)
        self.parent.append(parent)
        self.depth.append(depth)
        self.logprob.append(logprob)
        self.confident.append(confident)
        self.edges.append([])
        self._tail.append(tail)
        return len(self.tokens) - 1

    def _key(self, parent: int, token: int) -> tuple:
        return (token, self._tail[parent])

    def reaches(self, src: int, dst: int) -> bool:
        """Whether dst can be reached from src along real and merge edges."""
        stack, seen = [src], {src}
        while stack:
            v = stack.pop()
            if v == dst:
                return True
            for c, _ in self.edges[v]:
                if c not in seen:
                    seen.add(c)
                    stack.append(c)
        return False

    def add(self, parent: int, token: int, prob: float, confidence_threshold: float = 0.0) -> tuple[int, bool]:
        """Propose `token` under `parent` with draft probability `prob`.

        Returns (node, created): the new node, or the existing node it was merged into (created=False).
        A merge that would close a cycle is refused and a new node is created instead.
        """
        for i, (c, q) in enumerate(self.edges[parent]):
            if self.tokens[c] == token:   # proposed here before (by another proposer): one edge, the higher probability
                self.edges[parent][i] = (c, max(q, prob))
                return c, False
        if self.merge_context >= 0:
            key = self._key(parent, token)
            for m in self._index.get(key, ()):
                if m == parent or self.reaches(m, parent):
                    self.refused_cycles += 1
                    continue
                self.edges[parent].append((m, prob))
                self.merge_edges += 1
                return m, False
        n = self.merge_context
        tail = (self._tail[parent] + (token,))[-n:] if n > 0 else ()
        node = self._append(
            token, parent, self.depth[parent] + 1, self.logprob[parent] + math.log(max(prob, 1e-30)),
            self.confident[parent] and prob >= confidence_threshold, tail,
        )
        self.edges[parent].append((node, prob))
        if self.merge_context >= 0:
            self._index.setdefault(self._key(parent, token), []).append(node)
        return node, True


@dataclass
class VerifyTree:
    """A trie of distinct root paths of a TokenGraph, in an order where parents come before children."""

    tokens: torch.Tensor      # [T] long
    parents: torch.Tensor     # [T] long, -1 for the root
    depths: torch.Tensor      # [T] long
    nodes: list[int]          # graph node of each tree position
    path_probs: list[float] = field(default_factory=list)   # draft probability of each node's path (root 1)

    def __len__(self) -> int:
        return len(self.nodes)

    def prefix(self, n: int) -> "VerifyTree":
        """The first n positions: the n most probable nodes when the tree came from flatten_to_tree (its order
        puts parents first, so any prefix is a tree)."""
        if n >= len(self):
            return self
        return VerifyTree(self.tokens[:n], self.parents[:n], self.depths[:n], self.nodes[:n], self.path_probs[:n])


def flatten_to_tree(graph: TokenGraph, budget: int) -> VerifyTree:
    """Unroll the DAG into the trie of its root paths, keeping the `budget` most probable nodes.

    A node reached through several parents has several prefixes, so each copy is a separate tree node
    with its own depth. Nodes are taken best-first by path probability (the product of edge
    probabilities from the root); a child is never more probable than its parent, so the kept set is
    closed under ancestors.
    """
    if budget < 1:
        raise ValueError("budget must be at least 1")
    tokens: list[int] = []
    parents: list[int] = []
    depths: list[int] = []
    nodes: list[int] = []
    probs: list[float] = []
    heap: list[tuple[float, int, int, int, int]] = [(0.0, 0, -1, 0, 0)]
    order = 1
    while heap and len(nodes) < budget:
        cost, _, tree_parent, node, depth = heapq.heappop(heap)
        index = len(nodes)
        probs.append(math.exp(-cost))
        tokens.append(graph.tokens[node])
        parents.append(tree_parent)
        depths.append(depth)
        nodes.append(node)
        for child, prob in graph.edges[node]:
            heapq.heappush(heap, (cost - math.log(max(prob, 1e-30)), order, index, child, depth + 1))
            order += 1
    return VerifyTree(
        tokens=torch.tensor(tokens, dtype=torch.long),
        parents=torch.tensor(parents, dtype=torch.long),
        depths=torch.tensor(depths, dtype=torch.long),
        nodes=nodes,
        path_probs=probs,
    )


def ancestor_matrix(parents: torch.Tensor) -> torch.Tensor:
    """anc[i, j] is True when j is i or an ancestor of i (parents[i] < i, -1 for a root).

    Pointer jumping: one tensor step per level of depth, no per-token Python.
    """
    n = parents.numel()
    anc = torch.eye(n, dtype=torch.bool)
    rows = torch.arange(n)
    cur = parents.clone()
    while True:
        live = cur >= 0
        if not bool(live.any()):
            return anc
        anc[rows[live], cur[live]] = True
        cur = torch.where(live, parents[cur.clamp(min=0)], cur)


def tree_attention_mask(parents: torch.Tensor, cached: int) -> torch.Tensor:
    """The [1, 1, T, cached + T] boolean mask (True = attend) of a tree fed after `cached` tokens."""
    anc = ancestor_matrix(parents)
    full = torch.ones(anc.shape[0], cached + anc.shape[0], dtype=torch.bool)
    full[:, cached:] = anc
    return full[None, None]
