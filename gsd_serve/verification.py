"""The verifier: one target forward over the flattened tree, acceptance, and target cache compaction."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .acceptance import accept_path
from .graph import TokenGraph, VerifyTree, ancestor_matrix, flatten_to_tree
from .kv_cache import KVCache
from .runner import ModelRunner
from .sampling import TokenChooser


@dataclass
class Verdict:
    """What one verification accepted."""

    tree_path: list[int]      # tree indices of the accepted path, root first
    graph_path: list[int]     # the same as graph nodes
    emitted: list[int]        # the target's tokens along the path: accepted draft tokens + bonus
    verified_tokens: int      # tokens in the verification tree


@dataclass
class TargetSession:
    """The target's state for one sequence: its cache covers every committed token but the last."""

    runner: ModelRunner
    cache: KVCache | None = None
    forwards: int = 0

    def __post_init__(self) -> None:
        if self.cache is None:
            self.cache = self.runner.new_cache()

    def prefill(self, tokens: list[int], chooser: TokenChooser) -> int:
        """Feed the prompt; returns the first generated token."""
        t = torch.tensor(tokens, dtype=torch.long)
        logits = self.runner.forward(self.cache, t, last_only=True)
        self.forwards += 1
        return int(chooser.choose(logits, torch.tensor([len(tokens)]))[0])

    def extend(self, tokens: list[int]) -> None:
        """Feed committed tokens whose K/V is missing (after a rebuild elsewhere); no output."""
        if tokens:
            self.runner.forward(self.cache, torch.tensor(tokens, dtype=torch.long), last_only=True)
            self.forwards += 1

    def verify_tree(self, tree: VerifyTree, root_index: int, chooser: TokenChooser) -> Verdict:
        cached = self.cache.length
        if cached != root_index:
            raise RuntimeError("target cache out of step with the sequence")
        anc = ancestor_matrix(tree.parents)
        mask = torch.ones(len(tree), cached + len(tree), dtype=torch.bool)
        mask[:, cached:] = anc
        logits = self.runner.forward(self.cache, tree.tokens, cached + tree.depths, mask[None, None])
        self.forwards += 1
        choices = chooser.choose(logits, root_index + 1 + tree.depths)
        path = accept_path(tree.tokens, tree.parents, choices, anc)
        self.cache.keep(cached, [cached + i for i in path])
        return Verdict(path, [tree.nodes[i] for i in path], choices[path].tolist(), len(tree))

    def verify(self, graph: TokenGraph, budget: int, root_index: int, chooser: TokenChooser) -> Verdict:
        return self.verify_tree(flatten_to_tree(graph, budget), root_index, chooser)

    def step(self, root: int, root_index: int, chooser: TokenChooser) -> int:
        """Plain decoding: one forward on the root, one token out."""
        logits = self.runner.forward(self.cache, torch.tensor([root], dtype=torch.long))
        self.forwards += 1
        return int(chooser.choose(logits, torch.tensor([root_index + 1]))[0])
