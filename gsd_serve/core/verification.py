"""The verifier: one target forward over the flattened tree, acceptance, and target cache compaction."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .acceptance import accept_path
from .graph import TokenGraph, VerifyTree, ancestor_matrix, flatten_to_tree
from .runner import Cache, Runner
from .sampling import TokenChooser


@dataclass
class Verdict:
    """What one verification accepted."""

    tree_path: list[int]      # tree indices of the accepted path, root first
    graph_path: list[int]     # the same as graph nodes
    emitted: list[int]        # the target's tokens along the path: accepted draft tokens + bonus
    verified_tokens: int      # tokens in the verification tree
    features: torch.Tensor | None = None   # the target's features along the path (feature drafts)


@dataclass
class TargetSession:
    """The target's state for one sequence: its cache covers every committed token but the last.

    With `feature_layers` (for a feature draft) every forward also keeps the target's hidden states after
    those layers: `last_features` holds them for the tokens of the latest prefill, extend or step, and a
    verdict carries them for its accepted path.
    """

    runner: Runner
    cache: Cache | None = None
    forwards: int = 0
    feature_layers: tuple[int, ...] = ()
    last_features: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.cache is None:
            self.cache = self.runner.new_cache()

    def _forward(self, tokens: torch.Tensor, positions=None, mask=None, last_only: bool = False) -> torch.Tensor:
        self.forwards += 1
        if not self.feature_layers:
            return self.runner.forward(self.cache, tokens, positions, mask, last_only=last_only)
        logits, self.last_features = self.runner.forward_features(self.cache, tokens, positions, mask,
                                                                  layers=self.feature_layers, last_only=last_only)
        return logits

    def prefill(self, tokens: list[int], chooser: TokenChooser) -> int:
        """Feed the prompt; returns the first generated token."""
        logits = self._forward(torch.tensor(tokens, dtype=torch.long), last_only=True)
        return chooser.pick(logits[-1], len(tokens))

    def extend(self, tokens: list[int]) -> None:
        """Feed committed tokens whose K/V is missing (after a rebuild elsewhere); no output."""
        if tokens:
            self._forward(torch.tensor(tokens, dtype=torch.long), last_only=True)

    def verify_tree(self, tree: VerifyTree, root_index: int, chooser: TokenChooser) -> Verdict:
        return verify_batch([(self, tree, root_index, chooser)])[0]

    def verify(self, graph: TokenGraph, budget: int, root_index: int, chooser: TokenChooser) -> Verdict:
        """Verify the `budget` most probable nodes of the graph."""
        return self.verify_tree(flatten_to_tree(graph, budget), root_index, chooser)

    def step(self, root: int, root_index: int, chooser: TokenChooser) -> int:
        """Plain decoding: one forward on the root, one token out."""
        logits = self._forward(torch.tensor([root], dtype=torch.long))
        return chooser.pick(logits[-1], root_index + 1)


def _tree_inputs(session: TargetSession, tree: VerifyTree, root_index: int):
    cached = session.cache.length
    if cached != root_index:
        raise RuntimeError("target cache out of step with the sequence")
    anc = ancestor_matrix(tree.parents)
    mask = torch.ones(len(tree), cached + len(tree), dtype=torch.bool)
    mask[:, cached:] = anc
    return anc, cached + tree.depths, mask[None, None]


def accept_constrained(tree: VerifyTree, logits: torch.Tensor, root_index: int, chooser: TokenChooser
                       ) -> tuple[list[int], list[int]]:
    """Acceptance under the chooser's grammar: (tree path, emitted tokens). From the root, the target's choice
    at each node is made from its logits masked by the grammar after the path so far (`chooser.pick` consumes
    it into the grammar); the walk moves to the child carrying that token until none does, or the choice ends
    the output. Every emitted token is the target's constrained choice on its own prefix, as plain decoding's."""
    tokens, parents, depths = tree.tokens.tolist(), tree.parents.tolist(), tree.depths.tolist()
    child = {(parents[i], tokens[i]): i for i in range(1, len(tree))}   # siblings carry distinct tokens
    stops = set(chooser.grammar.stop_ids)
    path, emitted = [0], []
    while True:
        node = path[-1]
        token = chooser.pick(logits[node], root_index + 1 + depths[node])
        emitted.append(token)
        nxt = child.get((node, token))
        if nxt is None or token in stops:
            return path, emitted
        path.append(nxt)


@dataclass
class PrefillChunk:
    """Part of a prompt fed to a session's cache, to be fused with other sessions' rounds (chunked prefill).

    `tokens` continue the session's cache; on the prompt's last chunk (`last`) the first generated token is
    chosen from its last row, the token at sequence index `index`."""

    session: TargetSession
    tokens: list[int]
    last: bool
    chooser: TokenChooser | None = None
    index: int = 0


@dataclass
class PrefillResult:
    first: int | None                       # the first generated token (the last chunk only)
    features: torch.Tensor | None = None    # the chunk's target features (feature drafts)


@torch.inference_mode()
def verify_batch(jobs: list[tuple[TargetSession, VerifyTree, int, TokenChooser]],
                 prefills: list[PrefillChunk] = ()) -> list:
    """Verify the trees of several sequences, and feed prompt chunks of others; sequences sharing one runner go
    through one fused forward.

    Each job is (session, tree, root_index, chooser). The acceptance of each sequence depends only on its
    own logits, so the verdicts are the ones each session would get alone. Returns the verdicts, followed by
    one PrefillResult per prefill chunk."""
    items = [("tree", j) for j in jobs] + [("prefill", c) for c in prefills]
    out: list = [None] * len(items)
    by_runner: dict[int, list[int]] = {}
    for j, (_, item) in enumerate(items):
        session = item[0] if isinstance(item, tuple) else item.session
        by_runner.setdefault(id(session.runner), []).append(j)
    for group in by_runner.values():
        sessions, caches, tokens, positions, masks, last, inputs = [], [], [], [], [], [], []
        for j in group:
            kind, item = items[j]
            if kind == "tree":
                session, tree, root_index, _ = item
                anc, pos, mask = _tree_inputs(session, tree, root_index)
                tokens.append(tree.tokens)
                positions.append(pos)
                masks.append(mask)
                last.append(False)
                inputs.append(anc)
            else:
                session = item.session
                start = session.cache.length
                tokens.append(torch.tensor(item.tokens, dtype=torch.long))
                positions.append(torch.arange(start, start + len(item.tokens)))
                masks.append(None)      # causal among the chunk's tokens, the cache before them all visible
                last.append(True)
                inputs.append(None)
            sessions.append(session)
            caches.append(session.cache)
        runner = sessions[0].runner
        layers = sessions[0].feature_layers
        if layers and any(s.feature_layers != layers for s in sessions):
            raise ValueError("sessions sharing a target runner must ask for the same feature layers")
        if layers:   # feature drafts: the target's hidden states come with the logits
            outs = runner.forward_many(caches, tokens, positions, masks, features=layers, last_only=last)
        elif len(group) > 1 and hasattr(runner, "forward_many"):
            outs = runner.forward_many(caches, tokens, positions, masks, last_only=last)
        else:
            outs = [runner.forward(c, t, p, m, last_only=lo) for c, t, p, m, lo in
                    zip(caches, tokens, positions, masks, last)]
        for j, anc, o in zip(group, inputs, outs):
            kind, item = items[j]
            lg, feats = o if layers else (o, None)
            if kind == "prefill":
                item.session.forwards += 1
                first = None
                if item.last:
                    first = item.chooser.pick(lg[-1], item.index)
                out[j] = PrefillResult(first, feats)
                continue
            session, tree, root_index, chooser = item
            session.forwards += 1
            if chooser.grammar is None:
                choices = chooser.choose(lg, root_index + 1 + tree.depths)
                path = accept_path(tree.tokens, tree.parents, choices, anc)
                chooser.note(lg[path], choices[path], root_index + 1 + tree.depths[path])
                emitted = choices[path].tolist()
            else:
                path, emitted = accept_constrained(tree, lg, root_index, chooser)
            session.cache.keep(root_index, [root_index + i for i in path])
            out[j] = Verdict(path, [tree.nodes[i] for i in path], emitted, len(tree),
                             None if feats is None else feats[path])
    return out
