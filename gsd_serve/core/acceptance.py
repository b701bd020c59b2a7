"""The acceptance rule: follow the target's own choices down the verification tree.

y(v) is the target's token at tree node v (argmax, or a warped-distribution sample). From the root,
move to the child whose token is y(current) until no child matches; emit y(v) for every node on that
path (the accepted draft tokens plus one bonus token). The emitted tokens are the target's choices on
their own prefixes, so the output is exactly plain decoding's, greedy or sampled.
"""
from __future__ import annotations

import torch

from .graph import ancestor_matrix


def accept_path(tokens: torch.Tensor, parents: torch.Tensor, choices: torch.Tensor,
                ancestors: torch.Tensor | None = None) -> list[int]:
    """Tree indices of the accepted path, root first.

    A node is on an accepted path when every edge above it matches (its token equals its parent's
    choice). Siblings carry distinct tokens, so at most one node per depth qualifies and the deepest
    qualifying node ends the path.
    """
    if ancestors is None:
        ancestors = ancestor_matrix(parents)
    match = torch.ones_like(tokens, dtype=torch.bool)
    match[1:] = tokens[1:] == choices[parents[1:]]
    ok = ~(ancestors & ~match[None, :]).any(dim=1)
    depth = ancestors.sum(dim=1)
    end = int(torch.where(ok, depth, -1).argmax())
    return torch.nonzero(ancestors[end], as_tuple=False).flatten().tolist()


def accept_greedy(tokens: torch.Tensor, parents: torch.Tensor, logits: torch.Tensor) -> tuple[list[int], list[int]]:
    """Greedy acceptance: returns (path, emitted tokens)."""
    choices = logits.argmax(dim=-1)
    path = accept_path(tokens, parents, choices)
    return path, choices[path].tolist()
