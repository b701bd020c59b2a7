"""Greedy losslessness on the real default pair: every speculative method emits exactly plain decoding."""
import pytest

from gsd_serve.core.config import SpecConfig
from gsd_serve.core.prompts import encode

PROMPTS = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain how a bicycle works to a child.",
    "List three tips for learning a new language.",
    "Translate into French: The weather is nice today.",
    "Tom has 3 apples and buys 5 more. How many apples does he have? Think step by step.",
    "Summarize: The city council met on Monday to discuss a new park. Residents asked for more trees "
    "and a playground, and the council agreed to publish a plan next month.",
    "def fibonacci(n):",
]
NEW_TOKENS = 40


@pytest.fixture(scope="module")
def reference(engine, tokenizer):
    out = {}
    for i, p in enumerate(PROMPTS):
        raw = p.startswith("def ")
        ids = encode(tokenizer, p, raw=raw)
        out[i] = (ids, engine.generate(ids, NEW_TOKENS, SpecConfig.for_method("ar")))
    return out


@pytest.mark.parametrize("method", [pytest.param("chain", marks=pytest.mark.slow),
                                    pytest.param("tree", marks=pytest.mark.slow), "gsd"])
def test_speculative_methods_emit_exactly_plain_greedy_decoding(engine, reference, method):
    spec = SpecConfig.for_method(method)
    for i, (ids, ref) in reference.items():
        got = engine.generate(ids, NEW_TOKENS, spec)
        assert got.token_ids == ref.token_ids, f"{method} differs from ar on prompt {i}: {PROMPTS[i]!r}"
        assert got.finish_reason == ref.finish_reason
        s = got.stats
        assert s.new_tokens == len(got.token_ids)
        assert s.target_forwards == s.rounds + 1
        assert sum(n * c for n, c in s.accept_lengths.items()) + 1 == s.new_tokens
        assert s.accepted_tokens == s.new_tokens - s.target_forwards


def test_streaming_yields_the_same_tokens(engine, reference):
    ids, ref = reference[1]
    gen = engine.stream(ids, NEW_TOKENS, SpecConfig.for_method("gsd"))
    chunks = list(gen)
    assert [t for c in chunks for t in c] == ref.token_ids
    assert gen.result.token_ids == ref.token_ids
    assert all(chunks)


def test_other_settings_are_lossless_too(engine, reference):
    ids, ref = reference[2]
    for spec in [SpecConfig.for_method("gsd", merge_context=0, k=3, budget=8, max_depth=3),
                 SpecConfig.for_method("gsd", merge_context=2, sibling_threshold=0.0, confidence_threshold=0.0,
                                       budget=40, max_width=16),
                 SpecConfig.for_method("tree", k=2, budget=4, max_depth=8)]:
        assert engine.generate(ids, NEW_TOKENS, spec).token_ids == ref.token_ids, spec


def test_every_kind_of_round_is_lossless(engine, reference, monkeypatch):
    """Plain steps, lookup chains verified alone and drafted graphs mix within one request; the tokens must not
    depend on the mix (each round's draft and target caches are left where the next kind expects them)."""
    planner = engine.planner
    real = planner.sequence
    from conftest import RotatingPlanner

    monkeypatch.setattr(planner, "sequence", lambda *a, **k: RotatingPlanner(real(*a, **k)))
    spec = SpecConfig.for_method("gsd")
    kinds = {"plain": 0, "lookup": 0, "draft": 0}
    for i in (0, 5, 6, 7):
        ids, ref = reference[i]
        got = engine.generate(ids, NEW_TOKENS, spec)
        assert got.token_ids == ref.token_ids, f"gsd with every kind of round differs from ar on prompt {i}"
        s = got.stats
        kinds["plain"] += s.plain_steps
        kinds["lookup"] += s.lookup_rounds
        kinds["draft"] += s.drafted_rounds
        assert s.plain_steps + s.lookup_rounds + s.drafted_rounds == s.rounds
        assert s.target_forwards == s.rounds + 1
        assert sum(n * c for n, c in s.accept_lengths.items()) + 1 == s.new_tokens
    assert all(kinds.values()), kinds


def test_the_planner_decodes_plainly_where_rows_are_dear_and_output_is_the_same(engine, reference, monkeypatch):
    """With a cost model where every verified row costs ten plain steps, no proposal pays: every round is a plain
    step but for the rare probe of the draft, which verifies its root alone. Without the planner every round
    drafts and verifies its whole budget. Both emit plain decoding."""
    from gsd_serve.core.costs import ForwardCosts
    from gsd_serve.core.planner import PROBE_MIN

    monkeypatch.setattr(engine.planner, "target_costs", ForwardCosts(([1, 2], [0.01, 0.11])))
    ids, ref = reference[4]
    got = engine.generate(ids, NEW_TOKENS, SpecConfig.for_method("gsd"))
    s = got.stats
    assert got.token_ids == ref.token_ids
    assert s.lookup_rounds == 0 and s.drafted_rounds <= s.rounds // PROBE_MIN
    assert s.verified_tokens == s.drafted_rounds and s.accepted_tokens == 0
    monkeypatch.undo()
    got = engine.generate(ids, NEW_TOKENS, SpecConfig.for_method("gsd", planner=False))
    assert got.token_ids == ref.token_ids and got.stats.drafted_rounds == got.stats.rounds
    assert got.stats.verified_tokens > got.stats.rounds


def test_a_repeated_request_is_answered_from_the_shared_index_exactly(default_pair, engine, reference):
    """An engine with the cross-request index: the second time a prompt comes, the first answer is proposed as
    long lookup chains; what comes out is still plain decoding's, and in far fewer target forwards."""
    from gsd_serve.core.engine import Engine

    shared = Engine(engine.target, engine.draft, stop_token_ids=engine.stop_token_ids)
    spec = SpecConfig.for_method("gsd")
    for i in (1, 3):
        ids, ref = reference[i]
        first = shared.generate(ids, NEW_TOKENS, spec)
        second = shared.generate(ids, NEW_TOKENS, spec)
        assert first.token_ids == second.token_ids == ref.token_ids
        assert second.stats.lookup_accepted >= NEW_TOKENS // 2
        assert second.stats.target_forwards < first.stats.target_forwards
    # a different request that shares only the chat template and a few words gets no wrong answers either
    ids, ref = reference[2]
    assert shared.generate(ids, NEW_TOKENS, spec).token_ids == ref.token_ids


def test_eos_ends_generation_for_every_method(engine, tokenizer):
    ids = encode(tokenizer, "What is the capital of France? Answer in one sentence.")
    eos = tokenizer.eos_token_id
    results = {m: engine.generate(ids, 100, SpecConfig.for_method(m)) for m in ["ar", "chain", "tree", "gsd"]}
    ref = results["ar"]
    assert ref.finish_reason == "stop" and ref.token_ids[-1] == eos and len(ref.token_ids) < 100
    assert eos not in ref.token_ids[:-1]
    for m, r in results.items():
        assert r.token_ids == ref.token_ids, m
        assert r.finish_reason == "stop"


def test_max_new_tokens_is_exact(engine, reference):
    ids, ref = reference[0]
    for n in (1, 2, 5):
        for m in ("ar", "gsd"):
            r = engine.generate(ids, n, SpecConfig.for_method(m))
            assert r.token_ids == ref.token_ids[:n]
            assert r.finish_reason == ("stop" if r.token_ids[-1] in engine.stop_token_ids else "length")


def test_gsd_merges_and_feeds_the_draft_fewer_tokens_than_tree(engine, reference):
    common = dict(k=4, max_depth=4, max_width=64, budget=16, sibling_threshold=0.1, confidence_threshold=0.1,
                  planner=False)
    tree_tokens = gsd_tokens = merges = 0
    for i in (1, 2, 3):
        ids, ref = reference[i]
        t = engine.generate(ids, 32, SpecConfig.for_method("tree", **common))
        g = engine.generate(ids, 32, SpecConfig.for_method("gsd", merge_context=0, **common))
        assert g.token_ids == ref.token_ids[:32] == t.token_ids
        tree_tokens += t.stats.draft_proposal_tokens
        gsd_tokens += g.stats.draft_proposal_tokens
        merges += g.stats.merge_edges
        for r in (t, g):
            assert r.stats.draft_prefill_tokens == len(ids)
            assert r.stats.draft_proposal_tokens < r.stats.draft_tokens
    assert merges > 0
    assert gsd_tokens < tree_tokens


def test_the_draft_does_not_extend_what_the_context_lookup_proposed(engine, tokenizer):
    """The lookup chain is in the graph before the draft drafts: a draft candidate with the lookup's token
    joins the lookup node (one edge, with the higher of the two probabilities, never fed to the draft)
    instead of becoming a second node that the draft would go on extending."""
    from gsd_serve.core.drafting import DraftSession
    from gsd_serve.core.sampling import SamplingParams, TokenChooser

    ids = encode(tokenizer, "What is the capital of France?") + \
        tokenizer("The capital of France is", add_special_tokens=False)["input_ids"]
    chooser = TokenChooser(SamplingParams(), engine.target.vocab_size)

    def propose(history, lookup):
        # confidence 0: every candidate is expanded, so a candidate that stayed a node would be fed
        spec = SpecConfig.for_method("gsd", lookup=lookup, confidence_threshold=0.0, max_depth=3)
        ds = DraftSession(engine.draft)
        ds.pending = ids[:-1]
        graph, slots = ds.propose(ids[-1], len(ids) - 1, tuple(ids[:-1]), spec, chooser, history=history)
        return ds, graph, slots

    alone, g0, _ = propose(ids, 0)
    first, q = g0.edges[0][0]                     # the draft's favourite continuation and its probability
    x = g0.tokens[first]
    # a history whose last two tokens were earlier followed by x: the lookup proposes x, 11, 12, ...
    ds, graph, slots = propose([ids[-2], ids[-1], x, 11, 12, ids[-2], ids[-1]], 6)
    chain = [x, 11, 12]                           # max_depth 3 caps the lookup too
    node, lookup_nodes = 0, []
    for token in chain:
        node = next(c for c, _ in graph.edges[node] if graph.tokens[c] == token)
        lookup_nodes.append(node)
        assert slots[node] == -1
    for v in range(len(graph)):                   # no parent has two edges to one token
        tokens = [graph.tokens[c] for c, _ in graph.edges[v]]
        assert len(tokens) == len(set(tokens))
    # the lookup node's edge keeps the higher of the draft's probability and the lookup's prior score
    _, chain_probs = ds.own_chain([ids[-2], ids[-1], x, 11, 12, ids[-2], ids[-1]], 3)
    assert dict(graph.edges[0])[lookup_nodes[0]] == pytest.approx(max(q, chain_probs[0]))
    assert {graph.tokens[c] for c, _ in graph.edges[0]} == {g0.tokens[c] for c, _ in g0.edges[0]}
    assert not any(graph.parent[v] in lookup_nodes for v in range(1, len(graph)) if slots[v] >= 0)
    assert ds.proposal_fed < alone.proposal_fed   # x's subtree was drafted alone, not with the lookup


def test_bad_arguments_are_refused(engine, reference):
    ids, _ = reference[0]
    with pytest.raises(ValueError):
        engine.generate([], 8)
    with pytest.raises(ValueError):
        engine.generate(ids, 0)


def test_fused_verification_of_several_sequences_equals_one_by_one(engine, tokenizer):
    """verify_batch runs the trees of several sequences (different cache lengths) in one target forward;
    each sequence's logits, verdict and compacted cache are those it gets verified alone."""
    import torch

    from gsd_serve.core.drafting import DraftSession
    from gsd_serve.core.graph import flatten_to_tree
    from gsd_serve.core.sampling import SamplingParams, TokenChooser
    from gsd_serve.core.verification import TargetSession, verify_batch

    assert engine.target._lean is not None   # the fused path (Llama family); others fall back to a loop
    spec = SpecConfig.for_method("gsd")
    chooser = TokenChooser(SamplingParams(), engine.target.vocab_size)
    jobs_alone, jobs_fused = [], []
    # three budgets, so that the fused batch holds trees of different sizes as well as different cache lengths
    for p, budget in zip(PROMPTS[:3], (spec.budget, 9, 5)):
        ids = encode(tokenizer, p)
        pair = []
        for _ in range(2):
            ts = TargetSession(engine.target)
            root = ts.prefill(ids, chooser)
            ds = DraftSession(engine.draft)
            ds.pending = ids
            graph, _ = ds.propose(root, len(ids), tuple(ids), spec, chooser)
            pair.append((ts, flatten_to_tree(graph, budget), len(ids), chooser))
        jobs_alone.append(pair[0])
        jobs_fused.append(pair[1])
    alone = [verify_batch([job])[0] for job in jobs_alone]
    fused = verify_batch(jobs_fused)
    assert len({len(j[1]) for j in jobs_fused}) > 1 and len({j[2] for j in jobs_fused}) > 1
    for a, f, ja, jf in zip(alone, fused, jobs_alone, jobs_fused):
        assert a.emitted == f.emitted and a.tree_path == f.tree_path
        assert ja[0].cache.length == jf[0].cache.length
        with torch.inference_mode():
            nxt = torch.tensor([a.emitted[-1]])
            la = engine.target.forward(ja[0].cache, nxt)
            lf = engine.target.forward(jf[0].cache, nxt)
        assert int(la.argmax()) == int(lf.argmax())
        torch.testing.assert_close(la, lf, atol=1e-3, rtol=0)


@pytest.mark.parametrize("model", ["default-target", "tiny-qwen2"])
def test_lean_forward_is_bit_identical_to_transformers_forward(default_pair, monkeypatch, model):
    """The lean Llama-family path gives the exact logits of transformers' own forward, through a prefill, a
    tree-masked forward, a cache compaction and a causal continuation (SmolLM2, and a Qwen2 with biased
    q/k/v projections and grouped KV heads)."""
    import torch

    from gsd_serve.models.runner import ModelRunner

    if model == "tiny-qwen2":
        from transformers import Qwen2Config, Qwen2ForCausalLM

        torch.manual_seed(0)
        target = Qwen2ForCausalLM(Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=96,
                                              num_hidden_layers=2, num_attention_heads=4,
                                              num_key_value_heads=2)).eval()
    else:
        target = default_pair[0]
    lean = ModelRunner(target)
    monkeypatch.setenv("GSD_SERVE_LEAN_FORWARD", "0")
    stock = ModelRunner(target)
    assert lean._lean is not None and stock._lean is None
    ca, cb = lean.new_cache(), stock.new_cache()
    prompt = torch.arange(100, 140) % target.config.vocab_size
    tree, pos = torch.tensor([5, 6, 7, 8]), torch.tensor([40, 41, 41, 42])
    mask = torch.ones(1, 1, 4, 44, dtype=torch.bool)
    mask[0, 0, :, 40:] = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 1, 1]], dtype=torch.bool)
    with torch.inference_mode():
        assert torch.equal(lean.forward(ca, prompt), stock.forward(cb, prompt))
        assert torch.equal(lean.forward(ca, tree, pos, mask), stock.forward(cb, tree, pos, mask))
        ca.keep(40, [40, 42, 43])
        cb.keep(40, [40, 42, 43])
        more = torch.tensor([9, 10, 11])
        assert torch.equal(lean.forward(ca, more), stock.forward(cb, more))
