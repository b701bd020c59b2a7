"""Issue 13: serving under load, without Ray. Real tiny Llama weights, real gRPC over loopback.

- the load policy's decisions (serving/load_policy.py): full spec until measured, the full tree for one stream
  when a tree costs about a step, smaller trees as the target's forwards fill, plain decoding at saturation,
  the margin, the probes, and `spec_for_budget` never asking for more than the configured spec;
- bounded-load routing (router.bounded_pick / RouterCore.pick): a hot prompt prefix spreads over the replicas
  within ceil((1 + slack) x share), a key keeps its replica while that one is under the bound;
- BatchGate: calls that overlap run as one batch, each call gets its own answer or its own error;
- batched drafting: core.drafting.propose_many drafts the same graphs as DraftSession.propose one by one
  (independent and feature drafts, several rounds, greedy and sampled), with one fused forward per level;
- the defects of the issue, each with a test that fails on the code before 9b8da75: (a) one invalid Verify
  item failed its whole batch; (b) an SSE response dropped before its first chunk held its admission slot
  forever; (c) RouterCore.batch_sizes grew by one entry per Verify call; (d) sessions were bounded by count,
  not by the bytes their caches hold;
- (e, issue 15) the served feature hand-off: a feature-conditioned draft behind draft + target workers gives
  exactly the target's greedy output, and Target Prefill / Verify return the target's features when asked.
"""
from __future__ import annotations

import asyncio
import json
import math
import threading
import time

import pytest
import torch

from gsd_serve.core.config import SpecConfig
from gsd_serve.core.sampling import SamplingParams
from gsd_serve.serving import rpc
from gsd_serve.serving.load_policy import CostModel, LoadPolicy, LoadPolicyConfig, budget_ladder, spec_for_budget

pytestmark = pytest.mark.timeout(300)
pb = rpc.pb
SPEC = SpecConfig.for_method("gsd", max_depth=4, budget=12)


@pytest.fixture(scope="module")
def tokenizer():
    from gsd_serve.models import DEFAULT_TARGET, load_tokenizer

    return load_tokenizer(DEFAULT_TARGET)


@pytest.fixture(scope="module")
def workers(tiny_pair):
    """Two draft and two target workers (tiny pair) on loopback gRPC, no secret."""
    from conftest import start_workers

    servers = start_workers(tiny_pair, None, names=("d1", "d2", "t1", "t2"))
    yield servers
    for _, server, _ in servers.values():
        server.stop(0)


def _core(servers, tokenizer, **cfg):
    from conftest import router_core

    return router_core(servers, tokenizer, None, **cfg)[0]


def _engine(tiny_pair, tokenizer):
    from gsd_serve.core.engine import Engine
    from gsd_serve.models import ModelRunner

    target, draft = tiny_pair
    return Engine(ModelRunner(target), ModelRunner(draft), stop_token_ids={tokenizer.eos_token_id})


async def _generate(core, ids, n, sampling=None, seen=None):
    """Run one request to its end; `seen` collects the (draft, target) replica ids it used."""
    from gsd_serve.serving.router import GenerateParams

    run = core.start(GenerateParams(ids, n, sampling or SamplingParams()))
    out = []
    async for chunk in run.chunks():
        out += chunk
        if seen is not None:
            seen.add(("draft", run.draft.replica_id if run.draft else None))
            seen.add(("target", run.target.replica_id if run.target else None))
    return out, run


def _wait(cond, what: str, timeout_s: float = 60.0, step_s: float = 0.005) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(step_s)


# ---------------------------------------------------------------- the load policy

def _feed(policy: LoadPolicy, *, n: int, cost, path, tree_size: int, rows=(1, 4, 16, 64, 256, 1024),
          draft_s: float = 0.002, overhead_s: float = 0.001, times: int = 8) -> None:
    """Report to `policy` what a router reports: Verify calls at n sessions per fused forward whose forwards of
    `rows` rows took cost(rows) seconds, verified trees of the full budget with `path` accepted, Propose times."""
    for _ in range(times):
        for r in rows:
            policy.observe_verify(r, n, cost(r), cost(r) + overhead_s)
        policy.observe_tree(policy.full, tree_size, path)
        policy.observe_propose(policy.full, draft_s)


# a tree of 12: the deeper the tree, the more it accepts (path indices below b are what a tree of b accepts)
DEEP_PATH = [0, 1, 5, 8, 11]


def test_load_policy_full_spec_until_measured_and_when_off():
    p = LoadPolicy(12, LoadPolicyConfig(warmup_calls=4))
    assert p.ladder == budget_ladder(12) and p.ladder[-1] == 12 and p.ladder[0] == 2
    d = p.decide()
    assert d.budget == 12 and d.reason == "full spec until measured"
    saturated = lambda r: 0.002 * r   # noqa: E731 (a forward costs in proportion to its rows)
    for _ in range(3):     # fewer Verify calls than warmup_calls: still the full tree
        p.observe_verify(1024, 64, saturated(1024), saturated(1024) + 0.001)
        p.observe_tree(12, 12, [0])
        p.observe_propose(12, 0.002)
    assert p.decide(sessions_here=64).budget == 12
    # measured and saturated: plain decoding; the same measurements with the policy off: always the spec
    p.observe_verify(1024, 64, saturated(1024), saturated(1024) + 0.001)
    _feed(p, n=64, cost=saturated, path=[0, 1], tree_size=12)
    assert p.decide(sessions_here=64).budget == 1
    off = LoadPolicy(12, LoadPolicyConfig(mode="off"))
    _feed(off, n=64, cost=saturated, path=[0, 1], tree_size=12)
    assert {off.decide(sessions_here=64).budget for _ in range(20)} == {12}
    assert LoadPolicyConfig.from_value("off").mode == "off" and LoadPolicyConfig.from_value(None).mode == "auto"
    with pytest.raises(ValueError):
        LoadPolicyConfig.from_value({"mode": "sometimes"})
    with pytest.raises(ValueError):
        LoadPolicyConfig.from_value({"no_such_field": 1})


def test_load_policy_full_tree_for_one_stream_plain_at_saturation_and_shrinks_between():
    cost = lambda r: 0.02 + 0.001 * r   # noqa: E731 (a fixed part, then linear in the rows)
    budgets = {}
    for n in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512):
        p = LoadPolicy(12)
        _feed(p, n=n, cost=cost, path=DEEP_PATH, tree_size=12)
        d = p.decide(sessions_here=1)           # the replica's measured batch, not this router's share, says n
        assert d.reason == "measured" and set(d.rates) == {1, *p.ladder}
        assert d.rates[d.budget] == max(d.rates.values()) or d.budget == 1
        budgets[n] = d.budget
    assert budgets[1] == 12                     # one stream: a tree of 12 costs about a step
    assert budgets[512] == 1                    # saturated: every extra row costs its share, plain decoding wins
    seq = [budgets[n] for n in sorted(budgets)]
    assert seq == sorted(seq, reverse=True), budgets       # never more speculation under more load
    assert any(1 < b < 12 for b in seq), budgets            # ... and smaller trees in between
    # the router's own sessions on the replica count when they are more than the replica measured
    p = LoadPolicy(12)
    _feed(p, n=1, cost=cost, path=DEEP_PATH, tree_size=12)
    assert p.decide(sessions_here=1).budget == 12 and p.decide(sessions_here=512).budget == 1


def test_load_policy_plain_when_forward_cost_is_linear_in_rows():
    p = LoadPolicy(16)
    _feed(p, n=16, cost=lambda r: 0.002 * r, path=[0, 1, 2], tree_size=16)
    d = p.decide(sessions_here=16)
    assert d.budget == 1 and d.reason == "measured"
    # even trees that accept every token of their first levels do not pay for their rows and the draft
    assert all(d.rates[b] < (1 + p.config.margin) * d.rates[1] for b in p.ladder), d.rates


def test_load_policy_predicts_small_forwards_from_their_own_measurements_not_a_line():
    """A CPU forward's cost is convex in its rows (default target, Zen 5: 1 / 3 / 6 rows 3.5 / 5.5 / 9.3 ms,
    then steeper). A line fitted to all sizes overstated a 4-row plain forward ~2x once trees of 14 rows
    dominated the measurements, and kept 4 served streams speculating at half of plain throughput."""
    convex = lambda r: 0.0025 + 0.0008 * r + 0.00012 * r * r   # noqa: E731
    costs = CostModel(0.1, 0.05)
    for _ in range(20):
        for r in (1, 2, 4, 14, 28, 56):
            costs.add(r, convex(r))
    for r in (1, 2, 3, 4, 14, 40):      # measured sizes and sizes between them: interpolated
        assert costs.predict(r) == pytest.approx(convex(r), rel=0.25), r
    assert costs.predict(4) < 0.5 * (costs.predict(14))
    # at 4 sessions, trees of 14 that accept ~1.2 tokens do not pay for a forward over 56 rows: plain decoding
    p = LoadPolicy(14)
    _feed(p, n=4, cost=convex, path=[0, 1, 3], tree_size=14, rows=(1, 2, 4, 14, 28, 56))
    d = p.decide(sessions_here=4)
    assert d.budget == 1 and d.reason == "measured", d.rates


def test_load_policy_margin():
    cost = lambda r: 0.02 + 0.001 * r   # noqa: E731
    n = None
    for n in (32, 64, 128, 256):     # a load where the best tree beats plain decoding by a little
        p = LoadPolicy(12, LoadPolicyConfig(margin=0.0))
        _feed(p, n=n, cost=cost, path=DEEP_PATH, tree_size=12)
        d = p.decide()
        if d.budget > 1 and d.rates[d.budget] / d.rates[1] < 1.5:
            break
    best, ratio = d.budget, d.rates[d.budget] / d.rates[1]
    assert best > 1 and 1.0 < ratio < 1.5, d.rates
    for margin, want in (((ratio - 1) / 2, best), ((ratio - 1) * 1.5, 1)):
        q = LoadPolicy(12, LoadPolicyConfig(margin=margin))
        _feed(q, n=n, cost=cost, path=DEEP_PATH, tree_size=12)
        assert q.decide().budget == want, (margin, ratio)


def test_load_policy_probes_the_setting_it_does_not_measure():
    # decoding plainly at saturation: probe_rounds rounds of the tree predicted best, every probe_every rounds of
    # each session: with n sessions per forward, every probe_every x n rounds of the replica
    p = LoadPolicy(12, LoadPolicyConfig(probe_every=10, probe_rounds=3))
    _feed(p, n=512, cost=lambda r: 0.02 + 0.001 * r, path=DEEP_PATH, tree_size=12)
    period = 10 * round(p.batch.value)
    assert period == 5120
    got = [(d.budget, d.reason) for d in (p.decide() for _ in range(10 + period + 4))]
    rates = p.last.rates
    tree = max((b for b in rates if b > 1), key=rates.get)
    assert tree > 1 and rates[tree] < (1 + p.config.margin) * rates[1]   # plain was chosen
    assert [b for b, _ in got] == [1] * 10 + [tree] * 3 + [1] * (period - 3) + [tree] * 3 + [1], got[:40]
    assert {r for b, r in got if b == tree} == {"probe"}
    # speculating at a batch size whose plain forward was never measured: a few plain rounds now and then
    q = LoadPolicy(12, LoadPolicyConfig(probe_every=10, probe_rounds=3))
    _feed(q, n=1, cost=lambda r: 0.02 + 0.0001 * r, path=DEEP_PATH, tree_size=12, rows=(8, 12, 24))
    assert not q.cost.known(1)
    got = [q.decide().budget for _ in range(14)]
    assert got == [12] * 10 + [1] * 3 + [12], got
    q.observe_verify(1, 1, 0.02, 0.021)      # the probe measured it: no more probes at this load
    assert q.cost.known(1)
    assert {q.decide().budget for _ in range(30)} == {12}
    # no probes when probe_every is 0
    r = LoadPolicy(12, LoadPolicyConfig(probe_every=0))
    _feed(r, n=512, cost=lambda x: 0.02 + 0.001 * x, path=DEEP_PATH, tree_size=12)
    assert {r.decide().budget for _ in range(50)} == {1}


def test_load_policy_gives_a_probes_rounds_to_one_session():
    # 4 sessions decoding plainly at saturation: the probe's rounds go to one session in a row (one catch-up, then
    # steady Proposes the draft cost can count), not one round to each; an owner that stops asking (its request
    # ended) hands the rest of the probe to another session, and the probe is judged once it is over
    p = LoadPolicy(12, LoadPolicyConfig(probe_every=10, probe_rounds=4))
    _feed(p, n=4, cost=lambda r: 0.002 * r, path=[0, 1], tree_size=12)
    rounds = []
    for i in range(120):
        sid = "abcd"[i % 4]
        rounds.append((sid, p.decide(sessions_here=4, session=sid)))
    probes = [(sid, d.budget) for sid, d in rounds if d.reason == "probe"]
    assert probes and len(probes) % 4 == 0, probes
    first = probes[:4]
    assert len({sid for sid, _ in first}) == 1 and all(b > 1 for _, b in first), first
    assert all(d.budget == 1 for sid, d in rounds if d.reason != "probe")
    # the owner's request ends mid-probe: another session finishes it
    q = LoadPolicy(12, LoadPolicyConfig(probe_every=10, probe_rounds=4))
    _feed(q, n=4, cost=lambda r: 0.002 * r, path=[0, 1], tree_size=12)
    owner, got = None, []
    for i in range(400):
        sid = "abcd"[i % 4]
        if sid == owner:
            continue                          # gone
        d = q.decide(sessions_here=4, session=sid)
        if d.reason == "probe":
            got.append(sid)
            if owner is None and len(got) == 2:
                owner = sid
        if len(got) >= 4:
            break
    assert len(got) == 4 and len(set(got)) == 2 and got[0] == got[1] == owner and got[2] == got[3] != owner, got
    # callers that do not name sessions: every round takes the probe, as before
    r = LoadPolicy(12, LoadPolicyConfig(probe_every=10, probe_rounds=4))
    _feed(r, n=4, cost=lambda x: 0.002 * x, path=[0, 1], tree_size=12)
    reasons = [r.decide(sessions_here=4).reason for _ in range(60)]
    start = reasons.index("probe")
    assert reasons[start:start + 5] == ["probe"] * 4 + ["measured"]


def test_load_policy_backs_off_probes_that_confirm_plain_decoding():
    # 16 sessions per forward that costs in proportion to its rows: plain decoding wins; each probe that leaves it
    # chosen doubles the wait for the next (10 x 16 rounds, then 20 x 16, ..., at most 2**probe_backoff x 10 x 16)
    p = LoadPolicy(16, LoadPolicyConfig(probe_every=10, probe_rounds=2, probe_backoff=3))
    _feed(p, n=16, cost=lambda r: 0.002 * r, path=[0, 1, 2], tree_size=16)
    assert p.decide().budget == 1
    reasons = [p.decide().reason for _ in range(5000)]
    starts = [i for i, r in enumerate(reasons) if r == "probe" and (i == 0 or reasons[i - 1] != "probe")]
    assert all(reasons[i + 1] == "probe" and reasons[i + 2] == "measured" for i in starts)
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    assert gaps[:5] == [160, 320, 640, 1280, 1280], gaps
    assert p.snapshot()["probe_streak"] >= 3
    # a load where speculation wins: a decision to speculate resets the wait
    _feed(p, n=1, cost=lambda r: 0.02 + 0.0001 * r, path=DEEP_PATH, tree_size=16, times=200)
    assert p.decide().budget > 1 and p.snapshot()["probe_streak"] == 0


def test_load_policy_overhead_ignores_calls_that_waited_behind_a_prefill():
    # 4 streams on a 2-core Zen 4 (served_round_check): forwards of 1 / 4 / 12 rows ~9.5 / 18.5 / 42.5 ms, trees of
    # 3 that accept 0.5 tokens, an 8 ms Propose; most Verify calls spend ~3 ms outside the forward, but every fifth
    # waited ~300 ms behind a new request's Prefill on the model thread. A moving average put O at ~60 ms, so
    # a tree's extra rows looked cheap and trees of 3 were chosen over plain decoding (1.5 / 53.7 ms against
    # 1 / 21.5 ms per round at O = 3 ms).
    p = LoadPolicy(3)
    linear = lambda r: 0.0065 + 0.003 * r   # noqa: E731
    calls = 0
    for _ in range(60):
        for r in (1, 2, 4, 8, 12):
            calls += 1
            wait = 0.3 if calls % 5 == 0 else 0.0
            p.observe_verify(r, 4, linear(r), linear(r) + 0.003 + wait)
        p.observe_tree(3, 3, [0, 1])
        p.observe_propose(3, 0.0082)
    assert p.overhead.value == pytest.approx(0.003)
    d = p.decide(sessions_here=4)
    assert d.budget == 1 and d.reason == "measured", d.rates


def test_load_policy_leaves_plain_decoding_only_when_the_catch_up_pays():
    # a session that decoded plainly must first feed its draft every token since its last Propose; on a busy
    # 2-core replica that cost 30-100 ms, more than a short tail of speculation saves
    p = LoadPolicy(12)
    _feed(p, n=1, cost=lambda r: 0.02 + 0.0001 * r, path=DEEP_PATH, tree_size=12)
    d = p.decide()
    assert d.budget > 1 and d.reason == "measured"
    assert p.catch_up_pays(d, lag=10**6, remaining=1)            # no catch-up measured yet: measure one
    p.observe_catch_up(200, 0.2)                                  # 1 ms per token
    saved_per_token = 1 / d.rates[1] - 1 / d.rates[d.budget]
    assert saved_per_token > 0
    breakeven = 200 * 0.001 / saved_per_token                     # remaining tokens that pay for 200 tokens' catch-up
    assert p.catch_up_pays(d, lag=200, remaining=math.ceil(breakeven) + 1)
    assert not p.catch_up_pays(d, lag=200, remaining=math.floor(breakeven) - 1)
    assert p.catch_up_pays(d, lag=20, remaining=math.floor(breakeven) - 1)     # a tenth of the lag: it pays
    snap = p.snapshot()
    assert snap["switches_declined"] == 1 and snap["catch_up_ms_per_token"] == pytest.approx(1.0)


@pytest.mark.parametrize("per_token_s,drafts", [(10.0, False), (1e-9, True)])
def test_router_declines_speculation_whose_catch_up_does_not_pay(workers, tiny_pair, tokenizer, per_token_s, drafts):
    # every target replica's policy measured trees that win (a tree of 12 costs about a step); what decides is
    # the draft's catch-up: at 10 s per token the prompt's feed never pays, and no Propose is sent at all
    core = _core(workers, tokenizer)
    ids = tokenizer.encode("List the planets of the solar system in order from the sun, one per line.")
    assert len(ids) > core.config.spec.max_depth + 1

    async def scenario():
        await core.refresh(force=True)
        for ep in core.live("target"):
            _feed(ep.policy, n=1, cost=lambda r: 0.02 + 0.0001 * r, path=DEEP_PATH, tree_size=12)
            ep.policy.observe_catch_up(1, per_token_s)
        return await _generate(core, ids, 24)

    out, run = asyncio.run(scenario())
    assert out == _engine(tiny_pair, tokenizer).generate(ids, 24).token_ids       # exact either way
    assert (run.stats.draft_forwards > 0) is drafts, run.stats
    declined = sum(ep.policy.declined for ep in core.live("target"))
    assert (declined == 0) is drafts, declined


def test_router_counts_only_steady_proposes_in_the_draft_cost(workers, tiny_pair, tokenizer, monkeypatch):
    # a Propose that catches the draft up on the tokens of plain rounds (or feeds it the prompt) is not what a
    # speculating round costs: the policy's D(b) must not see it
    core = _core(workers, tokenizer)
    full, depth = core.config.spec.budget, core.config.spec.max_depth
    pattern = iter(([full] + [1] * (depth + 2)) * 100)    # one speculating round, then enough plain ones to lag
    monkeypatch.setattr(core, "round_budget", lambda run: next(pattern))
    sent, counted = [], []
    real_propose = core.propose

    async def propose(run, d):
        sent.append((run.d_synced, len(run.committed) - run.d_synced))
        return await real_propose(run, d)

    monkeypatch.setattr(core, "propose", propose)
    real_observe = LoadPolicy.observe_propose
    monkeypatch.setattr(LoadPolicy, "observe_propose",
                        lambda self, b, sec: (counted.append(b), real_observe(self, b, sec)))
    ids = tokenizer.encode("Count: one two three four five")
    out, _ = asyncio.run(_generate(core, ids, 40))
    assert out == _engine(tiny_pair, tokenizer).generate(ids, 40).token_ids       # still exact
    catch_ups = [d for start, d in sent if start > 0 and d > depth + 1]
    steady = [d for start, d in sent if start > 0 and d <= depth + 1]
    assert sent[0][0] == 0 and catch_ups, sent          # the prompt's feed, then catch-ups after plain rounds
    assert len(counted) == len(steady), (sent, counted)


@pytest.mark.parametrize("spec", [SpecConfig.for_method("gsd"), SPEC, SpecConfig.for_method("tree", budget=7),
                                  SpecConfig.for_method("chain", max_depth=5, budget=6),
                                  SpecConfig.for_method("gsd", k=8, max_width=16, max_depth=10, budget=64)])
def test_spec_for_budget_never_exceeds_the_spec(spec):
    for budget in range(0, spec.budget + 6):
        s = spec_for_budget(spec, budget)
        if budget >= spec.budget:
            assert s is spec
            continue
        assert s.budget == max(2, budget) <= spec.budget
        assert 1 <= s.max_depth <= min(spec.max_depth, s.budget - 1)
        assert 1 <= s.max_width <= min(spec.max_width, s.budget)
        assert 0 <= s.lookup <= min(spec.lookup, s.budget - 1)
        assert (s.method, s.k, s.merge_context, s.sibling_threshold, s.confidence_threshold) == \
            (spec.method, spec.k, spec.merge_context, spec.sibling_threshold, spec.confidence_threshold)
        rpc.check_spec_size(s)                     # what the draft replicas accept
        back = rpc.spec_from_proto(rpc.spec_to_proto(s))
        assert (back.budget, back.max_depth, back.max_width, back.lookup) == (s.budget, s.max_depth, s.max_width,
                                                                              s.lookup)


def test_spec_for_budget_trees_stay_within_the_budget(tiny_pair):
    """The router sends spec_for_budget(b) to the draft; the tree the target then verifies has at most b nodes."""
    from gsd_serve.core.drafting import DraftSession
    from gsd_serve.core.graph import flatten_to_tree
    from gsd_serve.core.sampling import TokenChooser
    from gsd_serve.models import ModelRunner

    _, draft = tiny_pair
    runner = ModelRunner(draft)
    wide = SpecConfig.for_method("gsd", k=4, max_depth=6, max_width=8, budget=16, confidence_threshold=0.0,
                                 sibling_threshold=0.0)
    prompt = list(range(300, 320))
    for b in (2, 3, 5, 9, 16):
        spec = spec_for_budget(wide, b)
        s = DraftSession(runner)
        s.pending = prompt[:-1]
        graph, _ = s.propose(prompt[-1], len(prompt) - 1, (), spec, TokenChooser(SamplingParams(), runner.vocab_size),
                             history=prompt)
        assert max(graph.depth) <= spec.max_depth
        assert len(flatten_to_tree(graph, spec.budget).tokens) <= b or b < 2


# ---------------------------------------------------------------- bounded-load routing

def _fake_core(tokenizer, n: int, slack: float = 0.25):
    """A RouterCore that discovers n target replicas (channels are lazy: nothing is called here)."""
    from gsd_serve.serving.router import RouterConfig, RouterCore

    async def discover():
        return [("target", f"t{i}", f"127.0.0.1:{10000 + i}") for i in range(n)]

    return RouterCore(RouterConfig(spec=SPEC, affinity_slack=slack), discover, tokenizer=tokenizer,
                      stop_ids={tokenizer.eos_token_id})


@pytest.mark.parametrize("n,slack", [(2, 0.25), (4, 0.25), (5, 0.0), (3, 1.0)])
def test_bounded_pick_spreads_a_hot_prefix(tokenizer, n, slack):
    from gsd_serve.serving.router import GenerateParams, _rendezvous

    hot = list(range(1000, 1040))        # one shared system prompt: the same affinity key for every request

    async def main():
        core = _fake_core(tokenizer, n, slack)
        runs = []
        for i in range(6 * n + 1):
            run = core.start(GenerateParams(hot + [2000 + i], 4, SamplingParams()))
            ep = await core.pick("target", run.key)
            if i == 0:
                assert ep is _rendezvous(run.key, core.live("target"))[0]     # an idle fleet: its own replica
            run.assign("target", ep)
            runs.append(run)
            total = i + 1
            bound = math.ceil((1 + slack) * total / n)
            loads = [e.load for e in core.live("target")]
            assert sum(loads) == total and max(loads) <= bound, (total, loads)
        # so every replica carries at least what the others' bound leaves (the old pick: all on one replica)
        assert min(loads) >= total - (n - 1) * bound, loads
        assert sum(1 for x in loads if x) >= math.ceil(total / bound) >= 2, loads
        order = _rendezvous(runs[0].key, core.live("target"))
        # requests leave: the loads follow (Run.release gives the replica back)
        for run in runs:
            run.release()
        assert [e.load for e in order] == [0] * n and core.inflight == 0
        await core.close()
    asyncio.run(main())


def test_bounded_pick_keeps_affinity_under_the_bound(tokenizer):
    from gsd_serve.serving.router import _rendezvous, bounded_pick

    async def main():
        core = _fake_core(tokenizer, 4)
        await core.refresh(force=True)
        eps = core.live("target")
        assert len(eps) == 4
        for e in eps:
            e.load = 2                          # balanced: every key's first choice is under the bound
        firsts = set()
        for i in range(40):
            key = bytes(str([i, i + 1, i + 2]), "ascii")
            order = _rendezvous(key, eps)
            assert bounded_pick(key, eps, 0.25) is order[0]
            firsts.add(order[0].replica_id)
            # the key's first choice over the bound: it spills to its second choice, the same one every time
            order[0].load = 10
            assert bounded_pick(key, eps, 0.25) is order[1] is bounded_pick(key, eps, 0.25)
            order[0].load = 2
        assert len(firsts) == 4                 # different prefixes land on different replicas
        await core.close()
    asyncio.run(main())


def test_hot_prefix_is_served_by_every_replica_exactly(workers, tiny_pair, tokenizer):
    """Requests sharing their first affinity_block tokens (one system prompt) over 2 drafts and 2 targets:
    both targets and both drafts serve them (the code before 9b8da75 sent all of them to one of each), and
    every answer is the engine's."""
    engine = _engine(tiny_pair, tokenizer)
    system = tokenizer("You are a helpful assistant. Answer briefly and kindly, in plain words, and never "
                       "make things up. When you do not know, say so. Keep to the point; use short sentences "
                       "and simple words. Questions follow.")["input_ids"]
    assert len(system) > 32
    prompts = [system + tokenizer(q)["input_ids"] for q in
               ("Hi", "What is two and two?", "Name a color.", "Tell a joke.", "Count to five.", "Why is the sky blue?",
                "Say hello.", "Where is Paris?")]

    async def main():
        core = _core(workers, tokenizer, affinity_block=32)
        seen = [set() for _ in prompts]
        got = await asyncio.gather(*[_generate(core, p, 24, seen=s) for p, s in zip(prompts, seen)])
        for p, (out, _) in zip(prompts, got):
            assert out == engine.generate(p, 24, spec=SPEC).token_ids
        for kind, names in (("target", {"t1", "t2"}), ("draft", {"d1", "d2"})):
            used = [{rid for k, rid in s if k == kind and rid} for s in seen]
            assert all(len(u) == 1 for u in used), used          # each request stays on its replica
            per = {name: sum(1 for u in used if name in u) for name in names}
            assert all(c > 0 for c in per.values()), (kind, per)
            if kind == "target":    # all placed at once (their prefills start together): within the bound
                assert max(per.values()) <= math.ceil(1.25 * len(prompts) / 2), per
        await core.close()
    asyncio.run(main())


# ---------------------------------------------------------------- BatchGate

def _submitter(gate):
    """(results, call): call(x) submits x to the gate and records its result or error under x."""
    results: dict = {}

    def call(x):
        try:
            results[x] = gate.submit(x)
        except Exception as exc:  # noqa: BLE001
            results[x] = exc
    return results, call


def test_batch_gate_fuses_overlapping_calls_and_answers_each():
    from gsd_serve.serving.batching import BatchGate

    first_in, release = threading.Event(), threading.Event()
    batches: list[list] = []

    def run_batch(jobs):
        batches.append([j.payload for j in jobs])
        if len(batches) == 1:           # the model is busy with the first call while the others arrive
            first_in.set()
            assert release.wait(60)
        for j in jobs:
            if j.payload == "bad":
                j.error = ValueError("this call alone is refused")
            elif j.payload != "forgotten":
                j.result = j.payload * 10

    gate = BatchGate(run_batch, max_batch=4)
    results, call = _submitter(gate)

    threads = [threading.Thread(target=call, args=(1,))]
    threads[0].start()
    assert first_in.wait(60)
    others = [2, 3, "bad", 4, 5, "forgotten"]
    for x in others:
        threads.append(threading.Thread(target=call, args=(x,)))
        threads[-1].start()
    _wait(lambda: gate.queued == len(others), "the calls to queue")
    release.set()
    for t in threads:
        t.join(60)
        assert not t.is_alive()
    assert batches[0] == [1]
    assert [len(b) for b in batches] == [1, 4, 2], batches     # the queue leaves together, max_batch at a time
    assert sorted(map(str, batches[1] + batches[2])) == sorted(map(str, others))
    assert gate.batches == 3 and gate.largest == 4 and gate.queued == 0
    assert {k: v for k, v in results.items() if isinstance(k, int)} == {1: 10, 2: 20, 3: 30, 4: 40, 5: 50}
    assert isinstance(results["bad"], ValueError) and "alone" in str(results["bad"])
    assert isinstance(results["forgotten"], RuntimeError)        # a batch that forgot a call still answers it
    assert gate.submit(7) == 70                                  # a lone call runs at once


def test_batch_gate_batch_failure_reaches_only_unanswered_calls():
    from gsd_serve.serving.batching import BatchGate

    gate_in, release = threading.Event(), threading.Event()
    calls = []

    def run_batch(jobs):
        calls.append(len(jobs))
        if len(calls) == 1:
            gate_in.set()
            assert release.wait(60)
            jobs[0].result = "ok"
            return
        jobs[0].result = "answered before the failure"
        raise RuntimeError("the fused forward failed")

    gate = BatchGate(run_batch)
    results, call = _submitter(gate)

    t0 = threading.Thread(target=call, args=(0,))
    t0.start()
    assert gate_in.wait(60)
    ts = [threading.Thread(target=call, args=(i,)) for i in (1, 2, 3)]
    for t in ts:
        t.start()
    _wait(lambda: gate.queued == 3, "the calls to queue")
    release.set()
    for t in [t0] + ts:
        t.join(60)
    assert calls == [1, 3] and results[0] == "ok"
    answered = [v for v in results.values() if v == "answered before the failure"]
    failed = [v for v in results.values() if isinstance(v, RuntimeError) and "fused forward" in str(v)]
    assert len(answered) == 1 and len(failed) == 2
    # the gate is free again after a failed batch
    gate2 = BatchGate(lambda jobs: [setattr(j, "result", j.payload + 1) for j in jobs])
    assert gate2.submit(1) == 2


# ---------------------------------------------------------------- batched drafting: exact against propose

def _tiny_llama(dtype, seed: int = 0, layers: int = 3):
    from transformers import LlamaConfig, LlamaForCausalLM

    from gsd_serve.models import DEFAULT_TARGET, load_tokenizer

    vocab = len(load_tokenizer(DEFAULT_TARGET))
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval().to(dtype)


# deep and wide graphs from a random draft: no confidence cut, every sibling kept
DEEP = SpecConfig.for_method("gsd", k=3, max_depth=4, max_width=4, budget=16, confidence_threshold=0.0,
                             sibling_threshold=0.0, lookup=3)


def _graph_key(graph, slots):
    return (list(graph.tokens), list(graph.parent), list(graph.depth), list(slots),
            [[c for c, _ in e] for e in graph.edges])


def _assert_same_graph(a, b):
    (ga, sa), (gb, sb) = a, b
    assert _graph_key(ga, sa) == _graph_key(gb, sb)
    pa = [p for e in ga.edges for _, p in e]
    pb_ = [p for e in gb.edges for _, p in e]
    assert torch.allclose(torch.tensor(pa, dtype=torch.float64), torch.tensor(pb_, dtype=torch.float64),
                          rtol=1e-9, atol=1e-12)


def _rounds_exact(runner, prompts, samplings, depths, rounds=3, features=None):
    """Draft `rounds` rounds for each prompt twice: every session alone (DraftSession.propose) and all together
    (propose_many); after each round both commit the same path and take the same next root. Returns the runner's
    forwards per round for (alone, together)."""
    from gsd_serve.core.drafting import DraftSession

    def sessions():
        out = []
        for p in prompts:
            s = DraftSession(runner)
            s.pending = list(p[:-1])
            out.append(s)
        return out

    with torch.inference_mode():      # as in the draft worker
        return _rounds(runner, prompts, samplings, depths, rounds, features, sessions)


def _rounds(runner, prompts, samplings, depths, rounds, features, sessions):
    from gsd_serve.core.drafting import ProposeJob, propose_many
    from gsd_serve.core.sampling import TokenChooser

    alone, together = sessions(), sessions()
    seqs = [list(p) for p in prompts]
    choosers = [TokenChooser(sp, runner.vocab_size) for sp in samplings]
    forwards = []
    gen = torch.Generator().manual_seed(1)
    for rnd in range(rounds):
        if features is not None:            # the target's features of the newly committed positions
            for i, seq in enumerate(seqs):
                start = 0 if rnd == 0 else len(seq) - 3
                f = torch.randn(len(seq) - start, features, generator=gen, dtype=torch.float64)
                alone[i].add_features(start, f.clone())
                together[i].add_features(start, f.clone())
        jobs = lambda ss: [ProposeJob(s, seq[-1], len(seq) - 1, (), DEEP, ch, d, seq)   # noqa: E731
                           for s, seq, ch, d in zip(ss, seqs, choosers, depths)]
        f0 = runner.forwards
        a = [s.propose(j.root, j.root_index, j.context, j.config, j.chooser, j.max_depth, j.history)
             for s, j in zip(alone, jobs(alone))]
        f1 = runner.forwards
        b = propose_many(jobs(together))
        f2 = runner.forwards
        forwards.append((f1 - f0, f2 - f1))
        for x, y in zip(a, b):
            _assert_same_graph(x, y)
        for i, ((graph, slots), s_a, s_b) in enumerate(zip(a, alone, together)):
            assert s_a.cache.length == s_b.cache.length
            # accept the first child chain (two levels where there are), then a bonus token
            path = [0]
            while len(path) < 3 and graph.edges[path[-1]]:
                path.append(graph.edges[path[-1]][0][0])
            new = [graph.tokens[v] for v in path[1:]] + [4000 + 7 * rnd + i]
            seqs[i] = seqs[i] + new
            for s in (s_a, s_b):
                s.commit(graph, slots, path)
                s.pending = seqs[i][s.cache.length:-1]
    for s_a, s_b in zip(alone, together):
        assert s_a.cache.length == s_b.cache.length and s_a.pending == s_b.pending
        assert s_a.forwards == s_b.forwards and s_a.tokens_fed == s_b.tokens_fed
    return forwards


PROMPTS = [list(range(100, 117)), list(range(500, 505)), [7, 8, 9, 7, 8, 9, 7, 8], list(range(2000, 2030))]
SAMPLINGS = [SamplingParams(), SamplingParams(temperature=0.8, top_p=0.9, seed=3), SamplingParams(),
             SamplingParams(temperature=1.1, top_k=50, seed=9)]


def test_propose_many_drafts_exactly_what_propose_drafts_independent_draft():
    from gsd_serve.models import ModelRunner

    runner = ModelRunner(_tiny_llama(torch.float64, seed=1, layers=1))
    assert runner.fuses_many
    forwards = _rounds_exact(runner, PROMPTS, SAMPLINGS, depths=[4, 2, 0, 3])
    for alone, together in forwards:
        # one fused forward per drafting level for all sessions: as many as the deepest session needs
        assert together == 4 and alone == 4 + 2 + 3, forwards


def test_propose_many_drafts_exactly_what_propose_drafts_with_a_reduced_vocabulary():
    from gsd_serve.models import ModelRunner

    ids = torch.arange(0, 49152, 5)
    model = _tiny_llama(torch.float64, seed=2, layers=1)
    runner = ModelRunner(model, ids[ids < model.config.vocab_size])
    forwards = _rounds_exact(runner, PROMPTS[:3], SAMPLINGS[:3], depths=[3, 3, 1], rounds=2)
    assert all(together < alone for alone, together in forwards)


def test_propose_many_drafts_exactly_what_propose_drafts_feature_draft():
    from gsd_serve.models.feature_draft import FeatureDraftRunner, new_feature_draft

    target = _tiny_llama(torch.float64, seed=3)
    vocab = target.config.vocab_size
    fd = new_feature_draft(target.float(), torch.arange(0, vocab, 3), feature_layers=(0, 1, 2)).double().eval()
    runner = FeatureDraftRunner(fd)
    assert runner.fuses_many and runner.feature_width == 3 * 64
    forwards = _rounds_exact(runner, PROMPTS, SAMPLINGS, depths=[4, 1, 3, 2], features=runner.feature_width)
    assert all(together == 4 and alone == 4 + 1 + 3 + 2 for alone, together in forwards), forwards


def test_draft_worker_batches_concurrent_proposes_exactly(tiny_pair):
    """Concurrent Propose calls on a real draft worker over gRPC, while its model is busy, are drafted in one
    batch; each answer is the graph the worker drafts for that session alone."""
    import grpc

    from gsd_serve.serving.draft_worker import DraftWorker
    from gsd_serve.serving.grpc_server import serve_grpc

    _, draft = tiny_pair
    batched, alone = DraftWorker(draft, replica_id="db"), DraftWorker(draft, replica_id="da")
    servers = [serve_grpc(w) for w in (batched, alone)]
    try:
        stubs = [rpc.pb_grpc.DraftStub(grpc.insecure_channel(f"127.0.0.1:{port}")) for _, port in servers]
        spec = rpc.spec_to_proto(DEEP)
        reqs = [pb.ProposeRequest(session_id=f"s{i}", delta_start=0, delta=p, root_index=len(p) - 1, spec=spec,
                                  sampling=rpc.sampling_to_proto(sp))
                for i, (p, sp) in enumerate(zip(PROMPTS, SAMPLINGS))]
        want = [stubs[1].Propose(r, timeout=60) for r in reqs]
        got: dict = {}
        batched.lock.acquire()        # the model is busy: the calls queue and leave as one batch
        try:
            threads = [threading.Thread(target=lambda r=r: got.__setitem__(r.session_id, stubs[0].Propose(
                r, timeout=60))) for r in reqs]
            for t in threads:
                t.start()
            # one call holds the gate waiting for the lock, the others queue behind it
            _wait(lambda: batched.gate.queued == len(reqs) - 1, "the Propose calls to queue")
        finally:
            batched.lock.release()
        for t in threads:
            t.join(60)
        assert batched.gate.largest == len(reqs) - 1
        for r, w in zip(reqs, want):
            g = got[r.session_id]
            assert g.status == rpc.OK == w.status
            assert list(g.graph.tokens) == list(w.graph.tokens) and list(g.graph.parents) == list(w.graph.parents)
            assert list(g.graph.edge_dst) == list(w.graph.edge_dst)
            assert torch.allclose(torch.tensor(list(g.graph.edge_prob)), torch.tensor(list(w.graph.edge_prob)),
                                  atol=1e-5)
    finally:
        for server, _ in servers:
            server.stop(0)


# ---------------------------------------------------------------- (a) one invalid Verify item fails only itself

def test_invalid_verify_item_fails_only_its_own_request(workers, tiny_pair):
    import grpc

    t1 = workers["t1"]
    stub = rpc.pb_grpc.TargetStub(grpc.insecure_channel(f"127.0.0.1:{t1[2]}"))
    prompt = list(range(200, 215))
    firsts = {}
    for sid in ("good", "twin", "bad-token", "bad-graph", "bad-root"):
        firsts[sid] = stub.Prefill(pb.PrefillRequest(session_id=sid, tokens=prompt), timeout=60).first_token
    f = firsts["good"]
    assert set(firsts.values()) == {f}
    n = len(prompt)

    def item(sid, **kw):
        d = dict(session_id=sid, delta_start=n, delta=[f], graph=rpc.root_graph_proto(f), root_index=n)
        d.update(kw)
        return pb.VerifyItem(**d)

    vocab = t1[0].vocab_size
    items = [item("bad-token", delta=[vocab + 5], graph=rpc.root_graph_proto(vocab + 5)),
             item("good"),
             item("bad-graph", graph=pb.TokenGraph(tokens=[f, 3], parents=[-1, 7], depths=[0, 1])),
             item("bad-root", root_index=n + 3)]
    resp = stub.Verify(pb.VerifyRequest(items=items), timeout=60)      # the call itself succeeds
    by = {r.session_id: r for r in resp.results}
    assert [r.session_id for r in resp.results] == [i.session_id for i in items]
    for sid in ("bad-token", "bad-graph", "bad-root"):
        assert by[sid].status == rpc.ERROR and by[sid].error, sid
        assert by[sid].error_code == grpc.StatusCode.INVALID_ARGUMENT.value[0], (sid, by[sid].error)
    assert by["good"].status == rpc.OK and resp.sessions == 1
    alone = stub.Verify(pb.VerifyRequest(items=[item("twin")]), timeout=60).results[0]
    assert alone.status == rpc.OK
    assert list(by["good"].emitted) == list(alone.emitted) and len(alone.emitted) == 1
    # the refused sessions were left as they were: their next valid round is verified, with the same answer
    again = stub.Verify(pb.VerifyRequest(items=[item("bad-token"), item("bad-graph")]), timeout=60)
    assert [r.status for r in again.results] == [rpc.OK, rpc.OK]
    assert [list(r.emitted) for r in again.results] == [list(alone.emitted)] * 2
    stub.Release(pb.ReleaseRequest(session_ids=list(firsts)), timeout=60)


def test_target_replica_sizes_trees_by_its_forward_costs_and_stays_exact(workers):
    """Items with size_by_cost are cut to the nodes that pay for their rows under the replica's measured forward
    times (here set: each row costs ten steps, then rows are free); items without it stay whole. The verdict
    agrees with the full tree's on every token the cut tree verifies."""
    import grpc

    from gsd_serve.core.graph import TokenGraph

    worker, _, port = workers["t2"]
    stub = rpc.pb_grpc.TargetStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
    prompt = list(range(300, 318))
    n = len(prompt)
    sids = ("full", "cut", "free")
    firsts = {sid: stub.Prefill(pb.PrefillRequest(session_id=sid, tokens=prompt), timeout=60).first_token
              for sid in sids}
    f = firsts["full"]
    g = TokenGraph(f, merge_context=-1)
    a, _ = g.add(0, 11, 0.9)
    g.add(a, 12, 0.8)
    g.add(0, 13, 0.05)

    def item(sid, **kw):
        return pb.VerifyItem(session_id=sid, delta_start=n, delta=[f], graph=rpc.graph_to_proto(g), root_index=n,
                             budget=16, **kw)

    saved = worker.runner._costs
    try:
        worker.runner._costs = ([1, 2], [1.0, 11.0])
        full = stub.Verify(pb.VerifyRequest(items=[item("full")]), timeout=60).results[0]
        resp = stub.Verify(pb.VerifyRequest(items=[item("cut", size_by_cost=True, round_overhead_s=0.5)]), timeout=60)
        cut = resp.results[0]
        assert full.verified_tokens == 4 and cut.verified_tokens == 1 and resp.rows == 1
        assert list(cut.emitted) == list(full.emitted)[:1]
        worker.runner._costs = ([1, 2], [1.0, 1.0])
        free = stub.Verify(pb.VerifyRequest(items=[item("free", size_by_cost=True)]), timeout=60).results[0]
        assert free.verified_tokens == 4 and list(free.emitted) == list(full.emitted)
    finally:
        worker.runner._costs = saved
        stub.Release(pb.ReleaseRequest(session_ids=list(sids)), timeout=60)


# ---------------------------------------------------------------- (b) SSE dropped before its first chunk

def _asgi_post(path: str, body: bytes, spec_version: str) -> dict:
    return {"type": "http", "asgi": {"version": "3.0", "spec_version": spec_version}, "http_version": "1.1",
            "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
            "root_path": "", "headers": [(b"content-type", b"application/json"),
                                         (b"content-length", str(len(body)).encode())],
            "client": ("127.0.0.1", 40000), "server": ("127.0.0.1", 8000)}


@pytest.mark.parametrize("spec_version", ["2.3", "2.4"])
def test_sse_dropped_before_its_first_chunk_releases_its_slot(workers, tokenizer, spec_version):
    """The client goes away while the response starts: the server cancels the streaming task (ASGI < 2.4) or
    the send fails (ASGI 2.4) before the body was ever iterated. The request's admission slot must come back
    (before 9b8da75 an unstarted SSE generator was never closed: enough of these and every request got 429)."""
    from gsd_serve.serving.http_app import HttpApi, create_app
    from gsd_serve.serving.openai_api import OpenAIFrontend

    async def main():
        core = _core(workers, tokenizer, max_inflight=1, admit_timeout_s=3600.0)   # no reaping in this test
        front = OpenAIFrontend(core)
        app = create_app(HttpApi(front))
        body = json.dumps({"model": core.config.model_name, "prompt": "Hello", "max_tokens": 4,
                           "stream": True}).encode()
        for attempt in range(3):        # more drops than the limit: each must give its slot back
            sent, delivered = [], []

            async def receive():
                if not delivered:
                    delivered.append(True)
                    return {"type": "http.request", "body": body, "more_body": False}
                return {"type": "http.disconnect"}

            async def send(message):
                sent.append(message["type"])
                if message["type"] == "http.response.start":
                    if spec_version == "2.4":
                        raise OSError("the client is gone")
                    await asyncio.Event().wait()        # never delivered: the disconnect cancels the stream

            try:
                await asyncio.wait_for(app(_asgi_post("/v1/completions", body, spec_version), receive, send), 60)
            except (OSError, asyncio.CancelledError):
                pass
            except Exception as exc:  # noqa: BLE001 (starlette's ClientDisconnect)
                assert type(exc).__name__ == "ClientDisconnect", exc
            assert sent == ["http.response.start"], sent          # no chunk went out: the body never started
            assert core.inflight == 0 and not core.runs, attempt
        # the slot is usable: a request is admitted and served
        kind, status, payload = await front.handle(json.dumps({"model": core.config.model_name, "prompt": "Hi",
                                                               "max_tokens": 3}).encode(), chat=False)
        assert (kind, status) == ("json", 200) and payload["usage"]["completion_tokens"] >= 1
        assert core.inflight == 0
        await core.close()
    asyncio.run(main())


def test_sse_stream_closed_unread_releases_and_read_stream_is_exact(workers, tiny_pair, tokenizer):
    from gsd_serve.serving.openai_api import OpenAIFrontend

    engine = _engine(tiny_pair, tokenizer)

    async def main():
        core = _core(workers, tokenizer, max_inflight=1, admit_timeout_s=3600.0)
        front = OpenAIFrontend(core)
        body = json.dumps({"model": core.config.model_name, "prompt": [5, 6, 7, 8], "max_tokens": 6,
                           "temperature": 0, "stream": True}).encode()
        kind, _, stream = await front.handle(body, chat=False)
        assert kind == "sse" and core.inflight == 1
        await stream.aclose()                 # what the HTTP layer does with a response that ends unread
        assert core.inflight == 0
        kind, _, stream = await front.handle(body, chat=False)
        events = [e async for e in stream]
        assert events[-1] == "data: [DONE]\n\n" and core.inflight == 0
        text = "".join(json.loads(e[6:])["choices"][0]["text"] for e in events[:-1] if json.loads(e[6:])["choices"])
        want = engine.generate([5, 6, 7, 8], 6, spec=SPEC).token_ids
        assert text == tokenizer.decode(want, skip_special_tokens=True) and len(want) == 6
        assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] == "length"
        await core.close()
    asyncio.run(main())


def test_decode_loop_runs_ahead_of_a_slow_reader_and_stays_exact(workers, tiny_pair, tokenizer):
    """A request decodes while its reader is busy (formatting, sending): the next Verify does not wait for the
    previous chunk to be read. What piled up meanwhile comes as one chunk; the tokens are the engine's."""
    from gsd_serve.serving.router import GenerateParams

    engine = _engine(tiny_pair, tokenizer)
    prompt = [5, 6, 7, 8]
    want = engine.generate(prompt, 16, spec=SPEC).token_ids

    async def main():
        core = _core(workers, tokenizer, spec=SPEC)
        run = core.start(GenerateParams(prompt, 16, SamplingParams()))
        gen = run.chunks()
        first = await gen.__anext__()
        for _ in range(600):             # the reader does not read; the request must finish anyway
            if run.finish is not None:
                break
            await asyncio.sleep(0.05)
        assert run.finish == "length", "the decode loop waited for its reader"
        rest = [c async for c in gen]
        assert len(rest) == 1            # everything decoded while the reader was away, as one chunk
        assert first + rest[0] == want and len(want) == 16
        assert core.inflight == 0
        await core.close()
    asyncio.run(main())


def test_reader_leaving_early_stops_the_decode_loop_and_releases(workers, tokenizer):
    from gsd_serve.serving.router import GenerateParams

    async def main():
        core = _core(workers, tokenizer, spec=SPEC, max_inflight=1)
        run = core.start(GenerateParams([5, 6, 7, 8], 400, SamplingParams()))
        gen = run.chunks()
        await gen.__anext__()
        await gen.aclose()               # what the HTTP layer does when the client goes away
        assert core.inflight == 0 and not core.runs
        decoded = len(run.out)
        await asyncio.sleep(0.3)
        assert len(run.out) == decoded and run.finish is None     # no round ran after the reader left
        await core.close()
    asyncio.run(main())


def test_direct_http_port_serves_the_api_exactly_with_its_checks(workers, tiny_pair, tokenizer):
    """The router's app on its own port (what a Router replica serves with `direct_http_port`): streamed
    completions are the engine's tokens, the API key is enforced, and a second server cannot take the same
    port (two servers on one port would answer each other's clients)."""
    import httpx

    from gsd_serve.serving.direct_http import DirectHttpServer
    from gsd_serve.serving.http_app import HttpApi, create_app
    from gsd_serve.serving.openai_api import OpenAIFrontend

    engine = _engine(tiny_pair, tokenizer)
    want = engine.generate([5, 6, 7, 8], 10, spec=SPEC).token_ids

    async def main():
        core = _core(workers, tokenizer, spec=SPEC)
        server = DirectHttpServer(create_app(HttpApi(OpenAIFrontend(core), api_key="k3y")), "127.0.0.1", 0).start()
        with pytest.raises(OSError):
            DirectHttpServer(create_app(HttpApi(OpenAIFrontend(core))), "127.0.0.1", server.port)
        body = {"model": core.config.model_name, "prompt": [5, 6, 7, 8], "max_tokens": 10, "temperature": 0,
                "stream": True}
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            for _ in range(100):         # the servers start as tasks of this loop
                try:
                    if (await client.get("/health")).status_code in (200, 503):
                        break
                except httpx.TransportError:
                    await asyncio.sleep(0.05)
            denied = await client.post("/v1/completions", json=body)
            assert denied.status_code == 401
            text = ""
            async with client.stream("POST", "/v1/completions", json=body,
                                     headers={"Authorization": "Bearer k3y"}) as r:
                assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        choices = json.loads(line[6:])["choices"]
                        text += choices[0]["text"] if choices else ""
            assert text == tokenizer.decode(want, skip_special_tokens=True) and len(want) == 10
        assert core.inflight == 0
        await server.stop()
        await core.close()
    asyncio.run(main())


def test_admitted_request_that_never_starts_is_reaped(workers, tokenizer):
    from gsd_serve.serving.router import GenerateParams, Overloaded

    async def main():
        core = _core(workers, tokenizer, max_inflight=1, admit_timeout_s=3600.0)
        core.start(GenerateParams([1, 2, 3], 2, SamplingParams()))
        with pytest.raises(Overloaded):            # within admit_timeout_s the slot is held
            core.start(GenerateParams([1, 2, 3], 2, SamplingParams()))
        core.config.admit_timeout_s = 0.0           # now it is past: the never-started request is released
        stale = next(iter(core.runs.values()))
        run = core.start(GenerateParams([1, 2, 3], 2, SamplingParams()))
        assert stale.released and core.inflight == 1 and list(core.runs) == [run.id]
        out = [t async for chunk in run.chunks() for t in chunk]
        assert len(out) == 2 and core.inflight == 0
        await core.close()
    asyncio.run(main())


# ---------------------------------------------------------------- (c) batch_sizes bounded

@pytest.mark.slow
def test_router_batch_sizes_stay_bounded(workers, tiny_pair, tokenizer):
    """Plain decoding: every token after the first is one Verify call. More calls than the bound, and the
    router keeps only the latest (before 9b8da75: one list entry per call, forever)."""
    engine = _engine(tiny_pair, tokenizer)
    ar = SpecConfig.for_method("ar")
    prompts = [[11, 12, 13, 14], [21, 22, 23], [31, 32, 33, 34, 35]]

    async def main():
        core = _core(workers, tokenizer, spec=ar)
        calls = 0
        for p in prompts:
            out, run = await _generate(core, p, 420)
            assert out == engine.generate(p, 420, spec=ar).token_ids
            calls += len(out) - 1                 # the first token comes with the prefill
        assert calls > 1024
        assert len(core.batch_sizes) <= 1024 and set(core.batch_sizes) == {1}, len(core.batch_sizes)
        await core.close()
    asyncio.run(main())


def test_concurrent_streams_share_each_verify_call(workers, tiny_pair, tokenizer):
    """Four streams on one target replica: each Verify call carries all four (one fused forward per round). Before,
    while one call was in flight the others queued and left alone when it returned, so the streams fell out of
    phase for good (batches of 1 and 3 in turn: two forwards per round)."""
    engine = _engine(tiny_pair, tokenizer)
    ar = SpecConfig.for_method("ar")
    prompts = [[11, 12, 13, 14], [21, 22, 23], [31, 32, 33, 34, 35], [41, 42]]
    one_target = {k: v for k, v in workers.items() if k in ("d1", "t1")}

    async def main():
        core = _core(one_target, tokenizer, spec=ar)
        # stagger the starts, as arriving requests are: the first stream runs alone for a few rounds
        async def late(p, delay):
            await asyncio.sleep(delay)
            return await _generate(core, p, 64)

        got = await asyncio.gather(*(late(p, 0.02 * i) for i, p in enumerate(prompts)))
        for p, (out, _) in zip(prompts, got):
            assert out == engine.generate(p, 64, spec=ar).token_ids
        sizes = list(core.batch_sizes)
        await core.close()
        return sizes, [out for out, _ in got]

    sizes, outs = asyncio.run(main())
    assert sum(sizes) == sum(len(o) - 1 for o in outs) > 0   # each token after the first: one item in a call
    assert sizes.count(4) >= 0.6 * len(sizes), {k: sizes.count(k) for k in set(sizes)}


# ---------------------------------------------------------------- (d) sessions bounded by bytes

def test_session_table_bounded_by_bytes():
    from gsd_serve.serving.sessions import SessionTable

    now = [0.0]
    t = SessionTable(max_sessions=100, ttl_s=10.0, clock=lambda: now[0], max_bytes=100, size_of=lambda v: v)
    t.put("a", 40)
    t.put("b", 40)
    assert t.ids() == ["a", "b"] and t.bytes == 80
    t.put("c", 40)                          # 120 > 100: the least recently used goes
    assert t.ids() == ["b", "c"] and t.bytes == 80 and t.evicted == 1
    assert t.get("b") == 40                 # b is now the most recently used
    t.put("c", 70)                          # c grew (a longer cache): the bytes follow, b goes
    assert t.ids() == ["c"] and t.bytes == 70 and t.evicted == 2
    t.put("huge", 150)                      # alone over the bound: kept (it is the one in use), the rest goes
    assert t.ids() == ["huge"] and t.bytes == 150
    t.put("d", 10)                          # ... and it goes first once it is the oldest
    assert t.ids() == ["d"] and t.bytes == 10
    assert t.pop("d") == 10 and t.bytes == 0 and len(t) == 0
    t.put("e", 30)
    now[0] += 11                            # expired
    t.sweep()
    assert len(t) == 0 and t.bytes == 0
    # the count bound still holds on its own
    c = SessionTable(max_sessions=2, max_bytes=10 ** 9, size_of=lambda v: 1)
    for s in "xyz":
        c.put(s, 0)
    assert c.ids() == ["y", "z"] and c.bytes == 2


def test_target_worker_holds_sessions_within_its_byte_bound(tiny_pair):
    """A real target worker over gRPC: its sessions' caches stay within max_session_bytes, whatever the count
    bound allows; an evicted session resyncs (before 9b8da75 only the count bounded them)."""
    import grpc

    from gsd_serve.serving.grpc_server import serve_grpc
    from gsd_serve.serving.target_worker import TargetWorker

    target, _ = tiny_pair
    prompt = list(range(400, 460))
    probe = TargetWorker(target, replica_id="probe", max_session_bytes=10 ** 9)
    server, port = serve_grpc(probe)
    try:
        stub = rpc.pb_grpc.TargetStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        stub.Prefill(pb.PrefillRequest(session_id="one", tokens=prompt), timeout=60)
        one = stub.Info(pb.InfoRequest(), timeout=60).session_bytes
    finally:
        server.stop(0)
    # 3 layers x (K + V) x 2 heads x 16 dims x 4 bytes per position, at least the prompt's positions
    assert one >= len(prompt) * 3 * 2 * 2 * 16 * 4
    bound = 2 * one + one // 2
    worker = TargetWorker(target, replica_id="bounded", max_sessions=64, max_session_bytes=bound)
    server, port = serve_grpc(worker)
    try:
        stub = rpc.pb_grpc.TargetStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        firsts = [stub.Prefill(pb.PrefillRequest(session_id=f"s{i}", tokens=prompt), timeout=60).first_token
                  for i in range(5)]
        info = stub.Info(pb.InfoRequest(), timeout=60)
        assert list(info.session_ids) == ["s3", "s4"], list(info.session_ids)
        assert info.session_bytes == 2 * one <= info.max_session_bytes == bound
        n = len(prompt)
        res = stub.Verify(pb.VerifyRequest(items=[
            pb.VerifyItem(session_id="s0", delta_start=n, delta=[firsts[0]], graph=rpc.root_graph_proto(firsts[0]),
                          root_index=n),
            pb.VerifyItem(session_id="s4", delta_start=n, delta=[firsts[4]], graph=rpc.root_graph_proto(firsts[4]),
                          root_index=n)]), timeout=60)
        assert [r.status for r in res.results] == [rpc.RESYNC, rpc.OK]     # s0 was evicted, s4 was not
        assert stub.Info(pb.InfoRequest(), timeout=60).session_bytes <= bound
    finally:
        server.stop(0)


# ---------------------------------------------------------------- (e) the served feature hand-off (issue 15)

FEATURE_LAYERS = (0, 1, 2)


@pytest.fixture(scope="module")
def feature_stack(tiny_pair):
    """A draft worker serving an untrained feature draft of the tiny target, and a target worker."""
    from gsd_serve.models.feature_draft import new_feature_draft
    from gsd_serve.serving.draft_worker import DraftWorker
    from gsd_serve.serving.grpc_server import serve_grpc
    from gsd_serve.serving.target_worker import TargetWorker

    target, _ = tiny_pair
    torch.manual_seed(0)
    fd = new_feature_draft(target, torch.arange(0, target.config.vocab_size, 2), feature_layers=FEATURE_LAYERS)
    servers = {}
    for name, worker in (("dfeat", DraftWorker(fd, replica_id="dfeat")), ("tfeat", TargetWorker(target, replica_id="tfeat"))):
        servers[name] = (worker,) + serve_grpc(worker)
    yield servers, fd
    for _, server, _ in servers.values():
        server.stop(0)


def test_served_feature_draft_is_exactly_target_greedy(feature_stack, tiny_pair, tokenizer):
    from gsd_serve.core.engine import Engine
    from gsd_serve.models import ModelRunner
    from gsd_serve.models.feature_draft import FeatureDraftRunner

    servers, fd = feature_stack
    target, _ = tiny_pair
    assert servers["dfeat"][0].feature_layers == FEATURE_LAYERS
    engine = Engine(ModelRunner(target), FeatureDraftRunner(fd), stop_token_ids={tokenizer.eos_token_id})
    prompts = [tokenizer(t)["input_ids"] for t in ("The sea is", "One, two, three, four", "Hello there, friend")]

    async def main():
        core = _core(servers, tokenizer, feature_layers=list(FEATURE_LAYERS))
        assert core.feature_layers == list(FEATURE_LAYERS)
        got = await asyncio.gather(*[_generate(core, p, 24) for p in prompts])
        for p, (out, run) in zip(prompts, got):
            assert out == engine.generate(p, 24, spec=SpecConfig.for_method("ar")).token_ids
            assert out == engine.generate(p, 24, spec=SPEC).token_ids
            assert run.stats.drafted_rounds > 0 and run.stats.feature_bytes > 0
            # every committed token reached the draft with the target's features (none fed as zeros)
            assert run.stats.draft_features_missing == 0, run.stats
        await core.close()
    asyncio.run(main())


def test_target_returns_features_when_asked(feature_stack, tiny_pair):
    import grpc

    from gsd_serve.models import ModelRunner

    servers, _ = feature_stack
    target, _ = tiny_pair
    stub = rpc.pb_grpc.TargetStub(grpc.insecure_channel(f"127.0.0.1:{servers['tfeat'][2]}"))
    prompt = list(range(600, 620))
    n, width = len(prompt), 3 * target.config.hidden_size
    layers = list(FEATURE_LAYERS)
    pre = stub.Prefill(pb.PrefillRequest(session_id="f", tokens=prompt, feature_layers=layers), timeout=60)
    plain = stub.Prefill(pb.PrefillRequest(session_id="p", tokens=prompt), timeout=60)
    assert pre.first_token == plain.first_token
    assert not plain.HasField("features")
    assert (pre.features.start, pre.features.rows, pre.features.width) == (0, n, width)
    f = pre.first_token
    item = lambda sid: pb.VerifyItem(session_id=sid, delta_start=n, delta=[f], graph=rpc.root_graph_proto(f),  # noqa
                                     root_index=n)
    asked = stub.Verify(pb.VerifyRequest(items=[item("f")], feature_layers=layers), timeout=60).results[0]
    unasked = stub.Verify(pb.VerifyRequest(items=[item("p")]), timeout=60).results[0]
    assert asked.status == rpc.OK == unasked.status and list(asked.emitted) == list(unasked.emitted)
    assert not unasked.HasField("features")
    assert (asked.features.start, asked.features.rows, asked.features.width) == (n, 1, width)
    # the values are the target's hidden states after those layers (bf16 on the wire)
    runner = ModelRunner(target)
    with torch.inference_mode():
        _, ref = runner.forward_features(runner.new_cache(), torch.tensor(prompt + [f]), layers=FEATURE_LAYERS)
    for msg, rows in ((pre.features, slice(0, n)), (asked.features, slice(n, n + 1))):
        start, got = rpc.features_from_proto(msg)
        assert got.shape == ref[rows].shape
        assert torch.allclose(got, ref[rows].float(), rtol=2e-2, atol=2e-2)
        assert not torch.allclose(got, torch.zeros_like(got))
    # layers the target does not have are refused
    with pytest.raises(grpc.RpcError) as err:
        stub.Prefill(pb.PrefillRequest(session_id="x", tokens=prompt, feature_layers=[0, 99]), timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    stub.Release(pb.ReleaseRequest(session_ids=["f", "p"]), timeout=60)


def test_replica_threads_follow_what_the_replica_is_given():
    from gsd_serve.serving.threads import choose_threads

    assert choose_threads(3, "5", 2.0, cores=8) == (3, "app args")
    assert choose_threads(None, "5", 2.0, cores=8)[0] == 5
    assert choose_threads(None, None, 1.5, cores=8)[0] == 2          # Ray's CPUs, rounded up
    assert choose_threads(None, None, 16.0, cores=8)[0] == 8         # never more than the cores
    # sharing the machine (num_cpus 0): a target takes every core, a draft one thread (its idle threads would
    # spin on the cores the target computes on)
    assert choose_threads(None, None, 0.0, cores=8, kind="target")[0] == 8
    assert choose_threads(None, None, 0.0, cores=8, kind="draft")[0] == 1
    with pytest.raises(ValueError):
        choose_threads(0.5 - 1, None, None, cores=8)


def test_feature_draft_failover_to_a_replica_without_the_features_stays_exact(tiny_pair, tokenizer):
    """The draft replica in use dies mid-request: the session moves to a replica that never received the
    target's features of the committed tokens. It drafts with zeros in their place (counted), and the output
    is still exactly the target's."""
    from gsd_serve.core.engine import Engine
    from gsd_serve.models import ModelRunner
    from gsd_serve.models.feature_draft import FeatureDraftRunner, new_feature_draft
    from gsd_serve.serving.draft_worker import DraftWorker
    from gsd_serve.serving.grpc_server import serve_grpc
    from gsd_serve.serving.router import GenerateParams
    from gsd_serve.serving.target_worker import TargetWorker

    target, _ = tiny_pair
    torch.manual_seed(0)
    fd = new_feature_draft(target, torch.arange(0, target.config.vocab_size, 2), feature_layers=FEATURE_LAYERS)
    servers = {}
    for name, worker in (("dA", DraftWorker(fd, replica_id="dA")), ("dB", DraftWorker(fd, replica_id="dB")),
                         ("tfo", TargetWorker(target, replica_id="tfo"))):
        servers[name] = (worker,) + serve_grpc(worker)
    engine = Engine(ModelRunner(target), FeatureDraftRunner(fd), stop_token_ids={tokenizer.eos_token_id})
    ids = tokenizer("Once upon a time there was")["input_ids"]
    want = engine.generate(ids, 28, spec=SpecConfig.for_method("ar")).token_ids

    async def main():
        from conftest import router_core

        core, live = router_core(servers, tokenizer, feature_layers=list(FEATURE_LAYERS))
        run = core.start(GenerateParams(ids, 28, SamplingParams()))
        out, victim = [], None
        async for chunk in run.chunks():
            out += chunk
            if len(out) >= 4 and victim is None and run.draft is not None:
                victim = run.draft.replica_id
                worker, server, _ = live.pop(victim)
                server.stop(0)
                worker.sessions = type(worker.sessions)()
        assert out == want
        assert victim is not None and run.stats.failovers >= 1
        # the new replica drafted for committed tokens whose features it never got (fed as zeros)
        assert run.stats.draft_features_missing > 0 and run.stats.draft_forwards > 0
        await core.close()
    try:
        asyncio.run(main())
    finally:
        for _, server, _ in servers.values():
            server.stop(0)
