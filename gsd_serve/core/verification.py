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
        return int(chooser.choose(logits, torch.tensor([len(tokens)]))[0])

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
        return int(chooser.choose(logits, torch.tensor([root_index + 1]))[0])


def _tree_inputs(session: TargetSession, tree: VerifyTree, root_index: int):
    cached = session.cache.length
    if cached != root_index:
        raise RuntimeError("target cache out of step with the sequence")
    anc = ancestor_matrix(tree.parents)
    mask = torch.ones(len(tree), cached + len(tree), dtype=torch.bool)
    mask[:, cached:] = anc
    return anc, cached + tree.depths, mask[None, None]


@torch.inference_mode()
def verify_batch(jobs: list[tuple[TargetSession, VerifyTree, int, TokenChooser]]) -> list[Verdict]:
    """Verify the trees of several sequences; sequences sharing one runner go through one fused forward.

    Each job is (session, tree, root_index, chooser). The acceptance of each sequence depends only on its
    own logits, so the verdicts are the ones each session would get alone.
    """
    verdicts: list[Verdict | None] = [None] * len(jobs)
    by_runner: dict[int, list[int]] = {}
    for j, (session, _, _, _) in enumerate(jobs):
        by_runner.setdefault(id(session.runner), []).append(j)
    for group in by_runner.values():
        runner = jobs[group[0]][0].runner
        inputs = [_tree_inputs(jobs[j][0], jobs[j][1], jobs[j][2]) for j in group]
        caches = [jobs[j][0].cache for j in group]
        tokens = [jobs[j][1].tokens for j in group]
        layers = jobs[group[0]][0].feature_layers
        if layers and any(jobs[j][0].feature_layers != layers for j in group):
            raise ValueError("sessions sharing a target runner must ask for the same feature layers")
        if layers:   # feature drafts: the target's hidden states come with the logits
            outs = runner.forward_many(caches, tokens, [p for _, p, _ in inputs], [m for _, _, m in inputs],
                                       features=layers)
        elif len(group) > 1 and hasattr(runner, "forward_many"):
            outs = runner.forward_many(caches, tokens, [p for _, p, _ in inputs], [m for _, _, m in inputs])
        else:
            outs = [runner.forward(c, t, p, m) for c, t, (_, p, m) in zip(caches, tokens, inputs)]
        for j, (anc, _, _), out in zip(group, inputs, outs):
            session, tree, root_index, chooser = jobs[j]
            lg, feats = out if layers else (out, None)
            session.forwards += 1
            choices = chooser.choose(lg, root_index + 1 + tree.depths)
            path = accept_path(tree.tokens, tree.parents, choices, anc)
            cached = root_index
            session.cache.keep(cached, [cached + i for i in path])
            verdicts[j] = Verdict(path, [tree.nodes[i] for i in path], choices[path].tolist(), len(tree),
                                  None if feats is None else feats[path])
    return verdicts
