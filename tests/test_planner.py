"""The planner and what it plans with: the lookup indexes, the acceptance statistics and the cost model.

Pure Python, no model: the planner's choices are checked on synthetic cost models (its decisions follow from
costs and probabilities, whatever machine measured them)."""
import random

import pytest

from gsd_serve.core.costs import ForwardCosts
from gsd_serve.core.lookup import MAX_MATCH, AcceptanceStats, Continuation, SharedSuffixIndex, SuffixLookup
from gsd_serve.core.planner import DRAFT, LOOKUP, PLAIN, PROBE_MIN, Planner, RoundPlan


# ---------------------------------------------------------------- the lookup indexes

def _longest_earlier_match(seq):
    """Brute force: the longest match length of seq's suffix at an earlier position, and the set of tokens that
    follow the matches of that length."""
    end = len(seq)
    best, follow = 0, set()
    for p in range(1, end):          # an occurrence ending before position p, followed by seq[p]
        n = 0
        while n < MAX_MATCH and p - 1 - n >= 0 and seq[p - 1 - n] == seq[end - 1 - n]:
            n += 1
        if n > best:
            best, follow = n, {seq[p]}
        elif n == best and n:
            follow.add(seq[p])
    return best, follow


def test_suffix_lookup_finds_the_longest_earlier_match_as_the_sequence_grows():
    rng = random.Random(0)
    seq = [rng.randrange(30) for _ in range(20)]
    lookup = SuffixLookup()
    checked = 0
    for _ in range(400):
        cont = lookup.match(seq, 8)
        best, follow = _longest_earlier_match(seq)
        if best >= 3:                 # matches of 3+ tokens are always found (rarer keys: all candidates seen)
            assert cont.match_len == best
            assert cont.tokens[0] in follow
            checked += 1
        elif best == 0:
            assert not cont
        # grow by a fresh token, or by copying what followed an earlier position (long matches happen)
        if rng.random() < 0.5:
            seq.append(rng.randrange(30))
        else:
            p = rng.randrange(len(seq) - 3)
            seq.extend(seq[p:p + rng.randrange(1, 6)])
    assert checked > 100


def test_lookup_proposes_dozens_of_tokens_of_a_long_copy():
    code = list(range(100, 160))
    seq = [1, 2] + code + [3, 4] + code[:10]          # the answer is copying the code from the prompt
    cont = SuffixLookup().match(seq, 40)
    assert cont.match_len == 10 and cont.tokens == code[10:50] and cont.shares == [1.0] * 40


def test_lookup_follows_the_most_frequent_continuation():
    seq = [5, 6, 7, 1] + [5, 6, 7, 2] + [5, 6, 7, 2] + [9, 5, 6, 7]
    cont = SuffixLookup().match(seq, 1)
    assert cont.tokens == [2] and cont.shares == [pytest.approx(2 / 3)] and cont.support == 3


def test_lookup_never_matches_the_newest_token_with_itself():
    assert not SuffixLookup().match([1, 2, 3, 4], 4)
    assert SuffixLookup().match([7, 7, 7], 4).tokens == [7]


def test_shared_index_proposes_an_earlier_requests_answer():
    index = SharedSuffixIndex(max_tokens=1000)
    prompt, answer = [1, 2, 3, 4, 5, 6], list(range(50, 80))
    index.add(prompt + answer)
    cont = index.match([9, 9] + prompt, 16)
    assert cont.tokens == answer[:16] and cont.source == "shared" and cont.match_len == len(prompt)
    assert not index.match([9, 9, 1, 2], 16)       # a match under KEY_LONG tokens across requests says little


def test_shared_index_stays_within_its_bound_and_drops_the_least_recently_used():
    index = SharedSuffixIndex(max_tokens=500)
    docs = [[1000 + 10 * i + j for j in range(50)] for i in range(40)]   # 40 x 50 tokens, 4x the bound
    for i, doc in enumerate(docs):
        index.add(doc)
        if i >= 3:      # keep using the first document: it must stay
            assert index.match(docs[0][:5], 4).tokens == docs[0][5:9]
        assert index.tokens <= 500
        assert index._index.entries <= 2 * 500 + 1024 + 50
    assert len(index) == 10
    assert index.match(docs[0][:5], 4)              # used recently: kept
    assert not index.match(docs[5][:5], 4)          # old and unused: gone
    assert index.match(docs[-1][:5], 4)


def test_acceptance_stats_learn_the_rate_by_match_length():
    stats = AcceptanceStats()
    before = stats.rate(20)
    for _ in range(100):
        stats.record(20, proposed=10, accepted=10)      # long matches: always accepted
        stats.record(2, proposed=4, accepted=0)         # short ones: never
    assert stats.rate(20) > max(before, 0.95)
    assert stats.rate(2) < 0.1
    # a chain continuing a match of 20 places its later tokens at match lengths 21, 22, ...
    assert stats.rate(25) > 0.95


# ---------------------------------------------------------------- the cost model

def test_costs_follow_the_measured_forwards_not_a_stale_seed():
    stale = ForwardCosts(([1, 2, 4, 8, 16, 32], [0.015, 0.016, 0.018, 0.021, 0.028, 0.042]))
    for _ in range(10):       # the machine is faster than the table says, and extra rows dearer
        stale.observe(1, 0.010)
        stale.observe(8, 0.030)
    assert stale.seconds(1) == pytest.approx(0.010)
    assert stale.seconds(8) == pytest.approx(0.030)
    assert 0.010 < stale.seconds(4) < 0.030
    assert stale.seconds(32) > stale.seconds(16) > stale.seconds(8)


def test_costs_without_a_seed_scale_a_default_shape_by_what_is_seen():
    costs = ForwardCosts(first=0.001)
    costs.observe(1, 0.02)
    assert costs.seconds(1) == pytest.approx(0.02)
    assert costs.seconds(11) > costs.seconds(2) > 0.02


def test_costs_learn_each_context_length_on_its_own():
    # a row of a long context reads the whole context: its forwards cost more per row than a short one's
    costs = ForwardCosts(([1, 2, 4], [0.010, 0.012, 0.016]))
    for _ in range(10):
        costs.observe(1, 0.009, keys=100)
        costs.observe(3, 0.0126, keys=100)
        costs.observe(1, 0.013, keys=1400)
        costs.observe(3, 0.021, keys=1400)
    assert costs.seconds(3, 100) == pytest.approx(0.0126)
    assert costs.seconds(3, 1400) == pytest.approx(0.021)
    assert costs.seconds(3, 1400) - costs.seconds(1, 1400) > 2 * (costs.seconds(3, 100) - costs.seconds(1, 100))
    # a context range never measured borrows the nearest measured one's curve
    assert costs.seconds(3, 3000) == pytest.approx(0.021)
    assert costs.seconds(3, 300) == pytest.approx(0.0126)


def test_planner_prices_rows_at_the_sequence_context_length():
    # at 100 tokens an extra row costs 10% of a step; at 1,400, 60%: a chain right half the time pays at the first
    # length and not at the second
    planner = _planner()
    costs = planner.target_costs = ForwardCosts(([1, 2, 4, 8], [0.010, 0.011, 0.013, 0.017]))
    for _ in range(10):
        for n in (1, 2, 4, 8):
            costs.observe(n, 0.010 + 0.001 * (n - 1), keys=100)
            costs.observe(n, 0.013 + 0.008 * (n - 1), keys=1400)
    random.seed(0)
    _teach_lookup(planner, 0.5)
    text = list(range(100, 140))
    short = [1, 2] + text + [3] + text[:6]
    long = list(range(1000, 2400)) + short
    assert planner.sequence().plan(short, room=100, method="gsd", lookup=32, max_depth=0).kind == LOOKUP
    assert planner.sequence().plan(long, room=100, method="gsd", lookup=32, max_depth=0).kind == PLAIN


# ---------------------------------------------------------------- the planner's choices

def _planner(step=0.010, per_row=0.003, draft_step=0.001, shared=None) -> Planner:
    """A planner whose target forward costs step + per_row x (rows - 1) and whose draft forward costs draft_step."""
    sizes = [1, 2, 4, 8, 16, 32, 64]
    return Planner(ForwardCosts((sizes, [step + per_row * (n - 1) for n in sizes])),
                   ForwardCosts(([1, 64], [draft_step, draft_step * 2])), shared)


def _teach_lookup(planner: Planner, rate: float) -> None:
    for stats in planner.lookup_stats.values():
        for length in range(1, MAX_MATCH + 1):
            for _ in range(50):
                stats.record(length, 1, 1 if random.random() < rate else 0)


def test_planner_verifies_a_long_chain_alone_when_the_match_is_long():
    planner = _planner()
    random.seed(0)
    _teach_lookup(planner, 0.97)
    code = list(range(100, 160))
    seq = planner.sequence()
    plan = seq.plan([1, 2] + code + [3] + code[:12], room=100, method="gsd", lookup=32, max_depth=6)
    assert plan.kind == LOOKUP and plan.chain_len >= 16 and plan.chain[:plan.chain_len] == code[12:12 + plan.chain_len]


def test_planner_decodes_plainly_when_verification_is_dear():
    # every extra row costs a whole step, the draft is slow, and lookups are right 30% of the time
    planner = _planner(step=0.010, per_row=0.010, draft_step=0.008)
    random.seed(0)
    _teach_lookup(planner, 0.3)
    seq = planner.sequence()
    tokens = [1, 2, 3, 4, 5, 1, 2, 3]
    kinds = [seq.plan(tokens, room=50, method="gsd", lookup=32, max_depth=6).kind for _ in range(PROBE_MIN)]
    assert kinds == [PLAIN] * PROBE_MIN
    assert seq.tree_size([1.0, 0.8, 0.6, 0.3]) == 1


def test_a_declined_chain_is_judged_by_the_plain_round_and_teaches_the_planner_for_free():
    # the engine's rates (learned on edits) trust a chain; this sequence's text does not repeat: each plain round
    # it decodes judges the chain it declined by the target's token, and the sequence stops proposing chains
    # without ever verifying one
    planner = _planner(step=0.010, per_row=0.004, draft_step=0.008)
    random.seed(0)
    _teach_lookup(planner, 0.6)
    seq = planner.sequence()
    tokens = [1, 2, 3, 4, 5, 6, 1, 2, 3]
    plan = seq.plan(tokens, room=100, method="gsd", lookup=8, max_depth=0)
    assert plan.kind == LOOKUP
    before = seq.lookup_factor("context")
    shadow = RoundPlan(PLAIN, plan.chain, plan.chain_probs, 0, plan.match_len, plan.source)
    for _ in range(12):
        seq.record_round(shadow, [99], 0.010)
    assert seq.lookup_factor("context") < before / 2
    declined = seq.plan(tokens, room=100, method="gsd", lookup=8, max_depth=0)
    assert declined.kind == PLAIN and declined.chain == plan.chain    # the next round's chain rides along
    # a right guess counts too
    for _ in range(30):
        seq.record_round(shadow, [plan.chain[0]], 0.010)
    assert seq.lookup_factor("context") > before


def test_planner_drafts_when_the_draft_pays_and_sizes_the_tree_by_cost():
    planner = _planner(step=0.010, per_row=0.001, draft_step=0.0005)
    seq = planner.sequence()
    for _ in range(20):      # the draft's nodes have been accepted: 2 tokens per round on 3 rows
        seq.draft.tokens.add(2.0)
        seq.draft.rows.add(3.0)
    plan = seq.plan([5, 6, 7, 8, 9], room=50, method="gsd", lookup=32, max_depth=6)
    assert plan.kind == DRAFT and plan.max_depth == 6
    # cheap rows: every node worth more than rate x its row's cost stays, the improbable tail goes
    probs = [1.0, 0.95, 0.9, 0.8, 0.5, 0.3, 0.05, 0.01]
    n = seq.tree_size(probs)
    assert 5 <= n < len(probs)
    assert _planner(per_row=0.0).sequence().tree_size(probs) == len(probs)


def _measured_draft(seq, tokens: float, rows: float, rounds: int) -> None:
    """As if the draft had been measured over `rounds` drafted rounds: `tokens` accepted on `rows` rows each."""
    for _ in range(rounds):
        seq.draft.tokens.add(tokens)
        seq.draft.rows.add(rows)
        seq.draft.extra_seconds.add(0.003)


def test_planner_probes_a_draft_that_might_still_pay_and_stops_once_it_is_known_to_lose():
    planner = _planner(step=0.010, per_row=0.003, draft_step=0.001)
    seq = planner.sequence()
    _measured_draft(seq, 0.3, 1.0, 2)     # measured to lose, but on two rounds only
    kinds = [seq.plan([5, 6, 7, 8, 9], room=500, method="gsd", lookup=0, max_depth=6).kind for _ in range(40)]
    first = kinds.index(DRAFT)
    assert kinds[:first] == [PLAIN] * first and first == PROBE_MIN
    second = kinds.index(DRAFT, first + 1)
    assert second - first > PROBE_MIN          # each probe that loses waits longer for the next
    known = planner.sequence()
    _measured_draft(known, 0.3, 1.0, 400)   # the same, measured on many rounds: no more probes
    assert all(known.plan([5, 6, 7, 8, 9], room=500, method="gsd", lookup=0, max_depth=6).kind == PLAIN
               for _ in range(200))


def test_planner_leaves_a_long_catch_up_unpaid_near_the_end_of_a_request():
    planner = _planner(step=0.010, per_row=0.001, draft_step=0.0005)
    planner.draft_costs = ForwardCosts(([1, 1000], [0.0005, 0.2]))    # the draft reading 1000 tokens: 200 ms
    seq = planner.sequence()
    _measured_draft(seq, 1.5, 2.0, 50)     # a draft that pays once caught up
    assert seq.plan([5, 6, 7, 8, 9], room=400, method="gsd", lookup=0, max_depth=6, draft_lag=1).kind == DRAFT
    assert seq.plan([5, 6, 7, 8, 9], room=400, method="gsd", lookup=0, max_depth=6, draft_lag=999).kind == DRAFT
    assert seq.plan([5, 6, 7, 8, 9], room=10, method="gsd", lookup=0, max_depth=6, draft_lag=999).kind == PLAIN


def test_planner_without_planning_always_drafts_the_whole_budget():
    seq = _planner(per_row=0.010).sequence(enabled=False)
    plan = seq.plan([1, 2, 3, 1, 2], room=50, method="gsd", lookup=32, max_depth=6)
    assert plan.kind == DRAFT and plan.chain == [3, 1, 2]
    assert seq.tree_size([1.0, 0.1, 0.01]) == 3


def test_planner_uses_the_shared_index_for_a_repeated_request():
    planner = _planner(shared=SharedSuffixIndex())
    random.seed(0)
    _teach_lookup(planner, 0.97)
    prompt, answer = [1, 2, 3, 4, 5, 6, 7, 8], list(range(200, 260))
    planner.shared.add(prompt + answer)
    plan = planner.sequence().plan(prompt, room=60, method="gsd", lookup=32, max_depth=6)
    assert plan.kind == LOOKUP and plan.source == "shared" and plan.chain[:plan.chain_len] == answer[:plan.chain_len]
    assert planner.sequence(shared=False).plan(prompt, room=60, method="gsd", lookup=32, max_depth=6).source != "shared"


def test_planner_learns_from_the_rounds_it_records():
    planner = _planner()
    seq = planner.sequence()
    tokens = [1, 2, 3, 4, 1, 2, 3]
    plan = seq.plan(tokens, room=50, method="gsd", lookup=32, max_depth=6)
    assert plan.chain and plan.chain[0] == 4
    # the chain's first token was wrong, twenty times over: its match length's rate falls
    cont = Continuation(plan.chain, [1.0] * len(plan.chain), plan.match_len, 1, plan.source)
    before = seq.chain_probs(cont)[0]
    for _ in range(20):
        seq.record_round(plan, [99], 0.01, verified=2, verified_chain=1)
    assert seq.chain_probs(cont)[0] < before / 2
