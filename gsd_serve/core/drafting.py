"""The proposer: drafts one round's TokenGraph level by level, one batched draft forward per level."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

import time

from .config import SpecConfig
from .graph import TokenGraph
from .lookup import MAX_MATCH, SuffixLookup, prior_acceptance
from .runner import Cache, Runner
from .sampling import TokenChooser

def add_proposal(graph: TokenGraph, slots: list[int], tokens, probs) -> int:
    """Add a chain of tokens proposed under the root by something other than the draft model (a lookup), each
    with its acceptance probability given the ones before it.

    `graph.add` places each token (following an existing child with that token, or merging). New nodes
    get draft slot -1 (never fed to the draft: if accepted, they are fed with the next round's first
    forward). Returns the last node.
    """
    parent = 0
    for token, prob in zip(tokens, probs):
        parent, new = graph.add(parent, token, prob)
        if new:
            slots.append(-1)
    return parent


@dataclass
class DraftSession:
    """The draft's state for one sequence.

    The cache holds committed tokens in order (position = sequence index). `pending` are committed tokens
    that are not in the cache yet: they are fed together with the next root, in the round's first
    forward, so catching up after a merged path costs no extra forward.

    A feature draft (a runner with `needs_features`, models/feature_draft.py) feeds each committed token
    with the target's features of the position before it (`add_features` hands them over as the target
    computes them) and each drafted node with the draft's own output state at its parent. Its cache keeps
    only entries fed with target features: drafted nodes on the accepted path are fed again, with the
    target's features, in the next round's first forward (which costs no extra forward). A committed
    token whose feature never arrived (a rebuilt session) is fed with zeros: drafts get worse, the output
    does not change.
    """

    runner: Runner
    cache: Cache | None = None
    pending: list[int] = field(default_factory=list)
    forwards: int = 0
    tokens_fed: int = 0
    proposal_fed: int = 0
    lookup: SuffixLookup = field(default_factory=SuffixLookup)
    on_forward: object = None         # called with (rows, seconds) after each forward `propose` runs
    features_missing: int = 0         # committed tokens fed with zeros for want of the target's features
    _feats: torch.Tensor | None = None   # target features of positions _feat_start, _feat_start + 1, ...
    _feat_start: int = 0

    def __post_init__(self) -> None:
        if self.cache is None:
            self.cache = self.runner.new_cache()
        self.uses_features = bool(getattr(self.runner, "needs_features", False))

    def add_features(self, start: int, feats: torch.Tensor | None) -> None:
        """The target's features of positions start, start + 1, ... (replacing any from `start` on)."""
        if not self.uses_features or feats is None or not len(feats):
            return
        if self._feats is not None and self._feat_start <= start <= self._feat_start + len(self._feats):
            self._feats = torch.cat([self._feats[: start - self._feat_start], feats])
        else:
            self._feats, self._feat_start = feats, start

    def _features_for(self, first: int, last: int) -> torch.Tensor:
        """Target features of positions first..last (position -1, before the first token, is zeros)."""
        width = self.runner.feature_width
        out = torch.zeros(last - first + 1, width, dtype=self._feats.dtype if self._feats is not None
                          else torch.float32)
        if self._feats is not None:
            lo, hi = max(first, self._feat_start), min(last, self._feat_start + len(self._feats) - 1)
            if lo <= hi:
                out[lo - first: hi - first + 1] = self._feats[lo - self._feat_start: hi - self._feat_start + 1]
            missing = (last - first + 1) - max(0, hi - lo + 1) - (1 if first < 0 else 0)
            self.features_missing += max(missing, 0)
        else:
            self.features_missing += (last - first + 1) - (1 if first < 0 else 0)
        return out

    def _forward(self, tokens: torch.Tensor, positions=None, mask=None, last_only=False, features=None):
        """Logits (and, for a feature draft, the rows' output states too)."""
        self.forwards += 1
        self.tokens_fed += tokens.numel()
        if self.uses_features:
            return self.runner.forward_states(self.cache, tokens, features, positions, mask, last_only=last_only)
        return self.runner.forward(self.cache, tokens, positions, mask, last_only=last_only), None

    def propose(self, root: int, root_index: int, context: tuple[int, ...], config: SpecConfig,
                chooser: TokenChooser, max_depth: int | None = None, history: list[int] | None = None,
                chain=None, chain_probs=None) -> tuple[TokenGraph, list[int]]:
        """Draft the graph under `root` (the token at sequence index `root_index`).

        `chain` / `chain_probs`: a lookup proposal to put in first (the planner's). Without one, and with
        `config.lookup`, the session looks up `history` (the committed sequence ending with the root) itself.
        Returns the graph and each node's draft-cache slot (-1 for nodes never fed to the draft).
        """
        steps = self.propose_steps(root, root_index, context, config, chooser, max_depth, history, chain, chain_probs)
        answer = None
        while True:   # this session alone: each forward the drafting asks for runs at once
            try:
                feed = steps.send(answer)
            except StopIteration as done:
                return done.value
            t0 = time.perf_counter()
            answer = self._forward(feed.tokens, feed.positions, feed.mask, last_only=feed.last_only,
                                   features=feed.features)
            if self.on_forward is not None:
                self.on_forward(feed.tokens.numel(), time.perf_counter() - t0)

    def own_chain(self, history, max_tokens: int) -> tuple[list[int], list[float]]:
        """The lookup chain for `history` when no planner proposed one, scored with the prior acceptance rates."""
        cont = self.lookup.match(history, max_tokens)
        return cont.tokens, [prior_acceptance(min(cont.match_len + i, MAX_MATCH)) * share
                             for i, share in enumerate(cont.shares)]

    def propose_steps(self, root: int, root_index: int, context: tuple[int, ...], config: SpecConfig,
                      chooser: TokenChooser, max_depth: int | None = None, history: list[int] | None = None,
                      chain=None, chain_probs=None):
        """`propose` as a generator: yields each draft forward it needs (a `DraftFeed`), is sent that forward's
        (logits, states), and returns (graph, slots). `propose` answers each feed at once; `propose_many`
        answers the feeds of several sessions with one fused forward. One drafting procedure, two drivers."""
        depth_cap = config.max_depth if max_depth is None else min(config.max_depth, max_depth)
        graph = TokenGraph(root, config.merge_context, context)
        slots = [-1]
        if chain is None:
            chain, chain_probs = self.own_chain(history, min(config.lookup, depth_cap)) \
                if config.lookup and history and depth_cap > 0 else ([], [])
        # the lookup chain goes in first: a draft candidate naming the same token in the same context is
        # merged into it instead of becoming a new node, so the draft never spends forwards extending a
        # path the lookup already spelled out (the same saving as any GSD merge)
        add_proposal(graph, slots, chain, chain_probs)
        yield from self._draft_steps(graph, slots, root_index, config, chooser, depth_cap)
        return graph, slots

    def _draft_steps(self, graph: TokenGraph, slots: list[int], root_index: int, config: SpecConfig,
                     chooser: TokenChooser, depth_cap: int):
        root = graph.tokens[0]
        if depth_cap <= 0:
            return
        feed = torch.tensor(self.pending + [root], dtype=torch.long)
        if self.cache.length + len(feed) != root_index + 1:
            raise RuntimeError("draft cache out of step with the sequence")
        first = self.cache.length
        self.pending = []
        feats = self._features_for(first - 1, root_index - 1) if self.uses_features else None
        logits, states = yield DraftFeed(feed, None, None, True, feats)
        if self.uses_features:
            # features of positions before the cache's last entry are no longer needed
            self._drop_features_before(root_index)
            node_state = {0: states[-1]}
        slots[0] = root_index
        shared = root_index  # cache entries every drafted node sees: the committed prefix before the root
        fed_nodes = [0]
        anc = torch.ones(1, 1, dtype=torch.bool)  # ancestry among fed graph nodes, in cache order
        frontier = [0]
        output_ids = self.runner.output_ids
        k = config.k
        for level in range(depth_cap):
            if chooser.params.greedy:
                scores = logits
                probs = torch.softmax(logits, dim=-1)
            else:
                scores = chooser.warp(logits)
                probs = torch.softmax(scores, dim=-1)
                noise = chooser.noise(root_index + 1 + level)
                scores = scores + (noise if output_ids is None else noise[output_ids])
            top_scores, top_ids = torch.topk(scores, min(k, scores.shape[-1]), dim=-1)
            top_q = probs.gather(1, top_ids)
            keep = (top_q >= config.sibling_threshold * top_q.max(dim=1, keepdim=True).values) \
                & torch.isfinite(top_scores)
            top_tokens = self.runner.to_full_ids(top_ids).tolist()
            top_q_list = top_q.tolist()
            keep_list = keep.tolist()
            created: list[int] = []
            for row, parent in enumerate(frontier):
                for j in range(top_ids.shape[1]):
                    if not keep_list[row][j]:
                        continue
                    node, new = graph.add(parent, top_tokens[row][j], top_q_list[row][j],
                                          config.confidence_threshold)
                    if new:
                        created.append(node)
                        slots.append(-1)
            if not created or level == depth_cap - 1:
                break
            if not any(graph.confident[v] for v in created):
                break
            created.sort(key=lambda v: -graph.logprob[v])
            frontier = created[: config.max_width]
            # one forward over the whole level: each node sees the prefix and its own ancestor chain
            fed_index = {v: i for i, v in enumerate(fed_nodes)}
            parent_rows = anc[[fed_index[graph.parent[v]] for v in frontier]]
            n, n_fed = len(frontier), len(fed_nodes)
            mask = torch.ones(n, shared + n_fed + n, dtype=torch.bool)
            mask[:, shared:shared + n_fed] = parent_rows
            mask[:, shared + n_fed:] = torch.eye(n, dtype=torch.bool)
            grown = torch.zeros(n_fed + n, n_fed + n, dtype=torch.bool)
            grown[:n_fed, :n_fed] = anc
            grown[n_fed:, :n_fed] = parent_rows
            grown[n_fed:, n_fed:] = torch.eye(n, dtype=torch.bool)
            anc = grown
            for i, v in enumerate(frontier):
                slots[v] = shared + n_fed + i
            fed_nodes.extend(frontier)
            tokens = torch.tensor([graph.tokens[v] for v in frontier], dtype=torch.long)
            positions = torch.tensor([root_index + graph.depth[v] for v in frontier], dtype=torch.long)
            feats = torch.stack([node_state[graph.parent[v]] for v in frontier]) if self.uses_features else None
            logits, states = yield DraftFeed(tokens, positions, mask[None, None], False, feats)
            if self.uses_features:
                node_state.update(zip(frontier, states))
            self.proposal_fed += len(frontier)

    def commit(self, graph: TokenGraph, slots: list[int], path_nodes: list[int]) -> None:
        """Keep the accepted path's draft K/V where it was computed in its own context.

        `path_nodes` are the graph nodes of the accepted path, root first (the bonus token is not among
        them). Nodes reached through a merge edge were drafted under another parent, and nodes never fed
        have no K/V: from the first such node on, the tokens go to `pending`.
        """
        keep: list[int] = []
        for i, v in enumerate(path_nodes):
            if slots[v] < 0 or (i > 0 and graph.parent[v] != path_nodes[i - 1]):
                break
            if i > 0 and self.uses_features:
                break   # fed with the draft's own states: fed again with the target's features
            keep.append(slots[v])
        if keep:
            self.cache.keep(keep[0], keep)
        self.pending.extend(graph.tokens[v] for v in path_nodes[len(keep):])

    def rollback_to(self, length: int) -> None:
        self.cache.truncate(length)
        self.lookup.reset()   # the committed sequence diverged: its indexed positions are stale
        if self._feats is not None and length - 1 < self._feat_start + len(self._feats):
            # features from the divergence on describe other tokens
            keep = max(length - 1 - self._feat_start, 0)
            self._feats = self._feats[:keep] if keep else None

    def _drop_features_before(self, position: int) -> None:
        if self._feats is not None and position > self._feat_start:
            cut = min(position - self._feat_start, len(self._feats))
            self._feats = self._feats[cut:] if cut < len(self._feats) else None
            self._feat_start = position if self._feats is not None else 0


# ---------------------------------------------------------------- several sessions at once (serving)

@dataclass
class ProposeJob:
    """One session's `DraftSession.propose` call, for `propose_many`."""

    session: DraftSession
    root: int
    root_index: int
    context: tuple[int, ...]
    config: SpecConfig
    chooser: TokenChooser
    max_depth: int | None = None
    history: list[int] | None = None
    chain: list[int] | None = None          # the caller's lookup chain (None: the session looks up `history`)
    chain_probs: list[float] | None = None


@dataclass
class DraftFeed:
    """One session's rows of a draft forward (what DraftSession._forward is called with)."""

    tokens: torch.Tensor
    positions: torch.Tensor | None
    mask: torch.Tensor | None
    last_only: bool
    features: torch.Tensor | None


def propose_many(jobs: list[ProposeJob]) -> list[tuple[TokenGraph, list[int]]]:
    """`DraftSession.propose` for several sessions, with each drafting level of all of them in one draft
    forward (the runner's fused `forward_many` / `forward_states_many`: their rows share every GEMM, each
    session attends only to its own cache under its own mask), the way a target replica fuses verification.

    Each session's graph and slots are what `propose` returns for it alone, up to the rounding of batched
    GEMMs (identical token for token where the runner's arithmetic does not depend on the batch, e.g.
    float64). Sessions whose drafting ends early drop out of later levels. A runner without a fused
    multi-sequence forward runs the sessions' forwards one after another (same results as propose)."""
    steps = [j.session.propose_steps(j.root, j.root_index, j.context, j.config, j.chooser, j.max_depth, j.history,
                                     j.chain, j.chain_probs) for j in jobs]
    results: list = [None] * len(jobs)
    feeds: dict[int, DraftFeed] = {}
    for i, gen in enumerate(steps):
        _advance(i, gen, None, feeds, results)
    while feeds:
        order = list(feeds)
        outs = _forward_feeds([jobs[i].session for i in order], [feeds[i] for i in order])
        feeds = {}
        for i, out in zip(order, outs):
            _advance(i, steps[i], out, feeds, results)
    return results


def _advance(i: int, gen, answer, feeds: dict, results: list) -> None:
    try:
        feeds[i] = gen.send(answer)
    except StopIteration as done:
        results[i] = done.value


def _forward_feeds(sessions: list[DraftSession], feeds: list[DraftFeed]) -> list[tuple]:
    """(logits, states) of each session's feed: one fused forward where the runner has one, else one by one."""
    runner = sessions[0].runner
    fused = len(feeds) > 1 and all(s.runner is runner for s in sessions) and getattr(runner, "fuses_many", False)
    if not fused:
        return [s._forward(f.tokens, f.positions, f.mask, last_only=f.last_only, features=f.features)
                for s, f in zip(sessions, feeds)]
    caches = [s.cache for s in sessions]
    positions = [f.positions if f.positions is not None else
                 torch.arange(c.length, c.length + f.tokens.numel()) for c, f in zip(caches, feeds)]
    masks = [f.mask for f in feeds]
    last = [f.last_only for f in feeds]
    for s, f in zip(sessions, feeds):
        s.forwards += 1
        s.tokens_fed += f.tokens.numel()
    if sessions[0].uses_features:
        return runner.forward_states_many(caches, [f.tokens for f in feeds], [f.features for f in feeds],
                                          positions, masks, last_only=last)
    logits = runner.forward_many(caches, [f.tokens for f in feeds], positions, masks, last_only=last)
    return [(lg, None) for lg in logits]
