"""Unit tests of the pure algorithm: merge rule, cycles, flattening, budget, masks, acceptance."""
import math

import pytest
import torch

from gsd_serve.core.acceptance import accept_greedy, accept_path
from gsd_serve.core.graph import TokenGraph, ancestor_matrix, flatten_to_tree, tree_attention_mask

R, X, Y, THE, CAT, A, DOG = 100, 1, 2, 3, 4, 5, 6


def worked_example(n: int) -> TokenGraph:
    """DESIGN.md's example: root R has children x and y; x -> the -> cat; y then proposes 'the'."""
    g = TokenGraph(R, merge_context=n)
    x, _ = g.add(0, X, 0.6)
    y, _ = g.add(0, Y, 0.4)
    the, _ = g.add(x, THE, 0.9)
    g.add(the, CAT, 0.8)
    g.add(y, THE, 0.7)
    return g


def test_worked_example_merges_with_n0_and_duplicates_subtree_when_flattened():
    g = worked_example(0)
    assert len(g) == 5  # R, x, y, the, cat: y's 'the' merged into x's
    assert g.merge_edges == 1
    tree = flatten_to_tree(g, budget=100)
    tokens = tree.tokens.tolist()
    assert sorted(tokens) == sorted([R, X, Y, THE, THE, CAT, CAT])
    # each copy of 'the' and 'cat' sits at its own depth under its own parent
    by_path = {}
    for i in range(len(tree)):
        path, j = [], i
        while j >= 0:
            path.append(tokens[j])
            j = int(tree.parents[j])
        by_path[tuple(reversed(path))] = int(tree.depths[i])
    assert by_path[(R, X, THE, CAT)] == 3
    assert by_path[(R, Y, THE, CAT)] == 3
    assert by_path[(R, Y, THE)] == 2


def test_never_merge_makes_a_tree():
    g = worked_example(-1)
    assert len(g) == 6 and g.merge_edges == 0
    assert len(flatten_to_tree(g, 100)) == 6


def test_bigram_rule_needs_same_previous_token():
    g = worked_example(1)  # 'the' after x vs after y: different bigrams, no merge
    assert g.merge_edges == 0 and len(g) == 6
    g = TokenGraph(R, merge_context=1)
    a, _ = g.add(0, A, 0.5)
    b, _ = g.add(0, DOG, 0.5)
    t1, _ = g.add(a, THE, 0.9)
    c1, _ = g.add(t1, CAT, 0.9)
    t2, _ = g.add(b, THE, 0.9)      # (DOG, THE) is new
    c2, created = g.add(t2, CAT, 0.9)  # (THE, CAT) exists under t1: merged
    assert not created and c2 == c1
    assert g.merge_edges == 1


def test_context_before_the_root_counts():
    g = TokenGraph(R, merge_context=2, context=(7,))
    a, _ = g.add(0, A, 0.5)
    assert g._tail[0] == (7, R)
    assert g._tail[a] == (R, A)


def test_several_merge_edges_on_one_node():
    g = TokenGraph(R, merge_context=0)
    x, _ = g.add(0, X, 0.5)
    y, _ = g.add(0, Y, 0.5)
    cat, _ = g.add(x, CAT, 0.5)
    dog, _ = g.add(x, DOG, 0.5)
    assert g.add(y, CAT, 0.4) == (cat, False)
    assert g.add(y, DOG, 0.4) == (dog, False)  # a second merge from the same parent is kept
    assert [c for c, _ in g.edges[y]] == [cat, dog]
    assert g.merge_edges == 2


def test_merge_that_would_close_a_cycle_is_refused():
    g = TokenGraph(R, merge_context=0)
    a, _ = g.add(0, A, 0.9)
    b, _ = g.add(a, X, 0.9)
    node, created = g.add(b, A, 0.9)  # A under b would merge into a, b's own ancestor: a cycle
    assert created and node != a
    assert g.refused_cycles == 1
    # and through a merge edge: c -> (merge) b's X ... then X's child proposes c's token
    g = TokenGraph(R, merge_context=0)
    a, _ = g.add(0, A, 0.9)
    c, _ = g.add(0, CAT, 0.9)
    x, _ = g.add(a, X, 0.9)
    assert g.add(c, X, 0.5) == (x, False)   # c -> x by merge
    node, created = g.add(x, CAT, 0.5)      # would be x -> c, and c reaches x: refused
    assert created and node != c
    assert not g.reaches(x, 0)


def test_root_is_never_a_merge_target():
    g = TokenGraph(R, merge_context=0)
    a, _ = g.add(0, A, 0.9)
    node, created = g.add(a, R, 0.9)
    assert created and node != 0


def test_budget_keeps_the_most_probable_nodes_and_is_closed_under_ancestors():
    g = TokenGraph(R, merge_context=-1)
    hi, _ = g.add(0, A, 0.9)
    lo, _ = g.add(0, DOG, 0.1)
    deep = hi
    for t in range(10, 15):
        deep, _ = g.add(deep, t, 0.95)
    g.add(lo, 50, 0.99)
    tree = flatten_to_tree(g, budget=5)
    assert len(tree) == 5
    assert tree.tokens.tolist() == [R, A, 10, 11, 12]  # 0.9^1*0.95^3 = 0.77 > 0.1
    for i in range(1, len(tree)):
        assert int(tree.parents[i]) < i
    tree = flatten_to_tree(g, budget=100)
    assert len(tree) == len(g)


def test_flatten_gives_path_probabilities_best_first_and_prefixes_are_trees():
    g = TokenGraph(R, merge_context=-1)
    a, _ = g.add(0, A, 0.6)
    b, _ = g.add(0, DOG, 0.3)
    g.add(a, 10, 0.9)
    g.add(b, 11, 0.5)
    tree = flatten_to_tree(g, budget=10)
    assert tree.tokens.tolist() == [R, A, 10, DOG, 11]
    assert tree.path_probs == pytest.approx([1.0, 0.6, 0.54, 0.3, 0.15])
    for n in range(1, len(tree) + 1):
        cut = tree.prefix(n)
        assert len(cut) == n and cut.tokens.tolist() == tree.tokens[:n].tolist()
        assert all(int(cut.parents[i]) < i for i in range(1, n))
        assert cut.path_probs == tree.path_probs[:n]


def test_flatten_ranks_a_merged_subtree_by_each_parents_edge():
    g = worked_example(0)
    tree = flatten_to_tree(g, budget=6)  # the last copy of 'cat' (under y) is the least probable
    probs = []
    for i in range(len(tree)):
        p, j = 0.0, i
        while int(tree.parents[j]) >= 0:
            parent = int(tree.parents[j])
            edge = dict(g.edges[tree.nodes[parent]])[tree.nodes[j]]
            p += math.log(edge)
            j = parent
        probs.append(p)
    assert len(tree) == 6
    # the six most probable paths: R, x, x-the, x-the-cat, y, y-the (y-the-cat, 0.4 * 0.7 * 0.8, is dropped)
    kept = [1.0, 0.6, 0.6 * 0.9, 0.6 * 0.9 * 0.8, 0.4, 0.4 * 0.7]
    assert sorted(probs) == pytest.approx(sorted(math.log(p) for p in kept))
    assert (R, Y, THE, CAT) not in {tuple(tree.tokens[k].item() for k in _path(tree, i)) for i in range(6)}


def _path(tree, i):
    out = []
    while i >= 0:
        out.append(i)
        i = int(tree.parents[i])
    return list(reversed(out))


def test_ancestor_matrix_and_mask():
    parents = torch.tensor([-1, 0, 0, 1, 3, 2])
    anc = ancestor_matrix(parents)
    expected = torch.zeros(6, 6, dtype=torch.bool)
    for i, chain in enumerate([[0], [0, 1], [0, 2], [0, 1, 3], [0, 1, 3, 4], [0, 2, 5]]):
        expected[i, chain] = True
    assert torch.equal(anc, expected)
    mask = tree_attention_mask(parents, cached=3)
    assert mask.shape == (1, 1, 6, 9)
    assert bool(mask[0, 0, :, :3].all())
    assert torch.equal(mask[0, 0, :, 3:], expected)


def test_positions_follow_depth_in_tree():
    g = worked_example(0)
    tree = flatten_to_tree(g, 100)
    depth_of = {}
    for i in range(len(tree)):
        depth_of[i] = 0 if i == 0 else depth_of[int(tree.parents[i])] + 1
    assert tree.depths.tolist() == [depth_of[i] for i in range(len(tree))]


def test_accept_follows_target_choices():
    # tree: 0(R) -> 1(A) -> 3(THE) ; 0 -> 2(DOG) -> 4(CAT)
    tokens = torch.tensor([R, A, DOG, THE, CAT])
    parents = torch.tensor([-1, 0, 0, 1, 2])
    # target picks DOG after R, CAT after DOG, then 9 after CAT
    choices = torch.tensor([DOG, 7, CAT, 8, 9])
    assert accept_path(tokens, parents, choices) == [0, 2, 4]
    # no match at the root: only the bonus token
    assert accept_path(tokens, parents, torch.tensor([55, 0, 0, 0, 0])) == [0]
    logits = torch.full((5, 200), -1.0)
    for i, c in enumerate(choices.tolist()):
        logits[i, c] = 1.0
    path, emitted = accept_greedy(tokens, parents, logits)
    assert path == [0, 2, 4] and emitted == [DOG, CAT, 9]


def test_lookup_proposal_joins_the_graph_without_duplicate_edges():
    """A lookup token the draft proposed too follows the draft's node; new ones hang below it."""
    g = TokenGraph(root_token=10, merge_context=1, context=(9,))
    a, _ = g.add(0, 11, 0.6)
    b, _ = g.add(a, 12, 0.5)
    from gsd_serve.core.drafting import add_proposal

    slots = [5, 6, 7]
    parent = add_proposal(g, slots, [11, 12, 13], [0.7] * 3)
    assert slots == [5, 6, 7, -1]
    assert len(g.edges[0]) == 1 and len(g.edges[a]) == 1 and g.tokens[parent] == 13 and g.parent[parent] == b
    tree = flatten_to_tree(g, 100)
    assert tree.tokens.tolist() == [10, 11, 12, 13]


def test_a_token_proposed_twice_under_one_parent_keeps_one_edge_with_the_higher_probability():
    """Two proposers (the lookup chain, then the draft) naming the same child share one node and one edge."""
    g = TokenGraph(root_token=10, merge_context=1, context=(9,))
    from gsd_serve.core.drafting import add_proposal

    slots = [0]
    lookup_last = add_proposal(g, slots, [11, 12], [0.7, 0.7])
    a = g.parent[lookup_last]
    node, created = g.add(0, 11, 0.9)
    assert (node, created) == (a, False)
    assert g.edges[0] == [(a, 0.9)]
    node, created = g.add(0, 11, 0.1)
    assert g.edges[0] == [(a, 0.9)]
    assert flatten_to_tree(g, 100).tokens.tolist() == [10, 11, 12]
