"""Lossless sampling: exact distributions on a small real model, and seed-for-seed identity with plain sampling."""
import math
from collections import Counter

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from gsd_serve.core.config import SpecConfig
from gsd_serve.core.engine import Engine
from gsd_serve.core.prompts import encode
from gsd_serve.models.runner import ModelRunner
from gsd_serve.core.sampling import SamplingParams, TokenChooser

VOCAB = 10
PREFIX = [1, 2, 3]
SPECS = {
    "chain": SpecConfig.for_method("chain", max_depth=3),
    "tree": SpecConfig.for_method("tree", k=3, max_depth=3, sibling_threshold=0.0, confidence_threshold=0.0),
    "gsd": SpecConfig.for_method("gsd", k=3, merge_context=0, max_depth=3, sibling_threshold=0.0,
                                 confidence_threshold=0.0),
}


def tiny_llama(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      bos_token_id=None, eos_token_id=None, pad_token_id=None)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # sharpen the output so the distributions are neither flat nor one-hot
        model.lm_head.weight.mul_(8.0)
    return model


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama(1), tiny_llama(2)


def exact_joint(target, params: SamplingParams, n: int = 2) -> dict[tuple, float]:
    """P(first n tokens) under ancestral sampling from the warped target distribution."""
    chooser = TokenChooser(params, VOCAB)
    runner = ModelRunner(target)
    out = {(): 1.0}
    for _ in range(n):
        nxt = {}
        for seq, p in out.items():
            logits = runner.forward(runner.new_cache(), torch.tensor(PREFIX + list(seq)), last_only=True)
            dist = chooser.distribution(logits)[0]
            for t in range(VOCAB):
                if dist[t] > 0:
                    nxt[seq + (t,)] = p * float(dist[t])
        out = nxt
    return out


def chi2_quantile(df: int, p_upper: float) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile with upper tail p_upper."""
    z = math.sqrt(2) * _erfcinv(2 * p_upper)
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def _erfcinv(y: float) -> float:
    lo, hi = -10.0, 10.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if math.erfc(mid) > y:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def assert_matches(counts: Counter, exact: dict, n: int, alpha: float = 1e-7):
    """Chi-square goodness of fit, cells with expected count < 5 pooled; false failure rate alpha."""
    stat, df, pool_obs, pool_exp = 0.0, -1, 0, 0.0
    for cell, p in exact.items():
        e = p * n
        if e < 5:
            pool_obs += counts.get(cell, 0)
            pool_exp += e
            continue
        stat += (counts.get(cell, 0) - e) ** 2 / e
        df += 1
    if pool_exp > 0:
        stat += (pool_obs - pool_exp) ** 2 / max(pool_exp, 1e-9)
        df += 1
    assert all(cell in exact for cell in counts), "a sequence with probability 0 was sampled"
    limit = chi2_quantile(max(df, 1), alpha)
    assert stat < limit, f"chi2 {stat:.1f} >= {limit:.1f} (df {df})"


@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0),
                                    pytest.param(SamplingParams(temperature=0.7, top_k=5, top_p=0.9),
                                                 marks=pytest.mark.slow)])
def test_joint_distribution_of_first_tokens_is_exactly_the_targets(tiny, params):
    target, draft = tiny
    engine = Engine(ModelRunner(target), ModelRunner(draft))
    exact = exact_joint(target, params, n=3)
    n = 600
    for method in ["ar", *SPECS]:
        spec = SPECS.get(method, SpecConfig.for_method("ar"))
        counts = Counter()
        for seed in range(n):
            sp = SamplingParams(params.temperature, params.top_k, params.top_p, seed=seed)
            counts[tuple(engine.generate(PREFIX, 3, spec, sp).token_ids)] += 1
        assert_matches(counts, exact, n)


def test_same_seed_gives_the_same_tokens_for_every_method(tiny):
    target, draft = tiny
    engine = Engine(ModelRunner(target), ModelRunner(draft))
    for seed in range(25):
        sp = SamplingParams(temperature=0.9, top_p=0.95, seed=seed)
        ref = engine.generate(PREFIX, 12, SpecConfig.for_method("ar"), sp).token_ids
        for spec in SPECS.values():
            assert engine.generate(PREFIX, 12, spec, sp).token_ids == ref


def test_top_p_leaving_fewer_candidates_than_k(tiny):
    target, draft = tiny
    engine = Engine(ModelRunner(target), ModelRunner(draft))
    sp = SamplingParams(temperature=1.0, top_p=0.05, seed=3)  # one candidate survives top-p
    ref = engine.generate(PREFIX, 10, SpecConfig.for_method("ar"), sp).token_ids
    got = engine.generate(PREFIX, 10, SpecConfig.for_method("gsd", k=8, merge_context=0), sp).token_ids
    assert got == ref
    greedy = engine.generate(PREFIX, 10, SpecConfig.for_method("ar")).token_ids
    assert ref == greedy  # top_p this small keeps only the most likely token


def test_tiny_temperature_equals_greedy(tiny):
    target, draft = tiny
    engine = Engine(ModelRunner(target), ModelRunner(draft))
    greedy = engine.generate(PREFIX, 16, SpecConfig.for_method("ar")).token_ids
    for method, spec in SPECS.items():
        got = engine.generate(PREFIX, 16, spec, SamplingParams(temperature=1e-4, seed=5)).token_ids
        assert got == greedy, method


def test_eos_drawn_by_sampling_stops_every_method(tiny):
    target, draft = tiny
    sp = SamplingParams(temperature=1.0, seed=0)
    ar = Engine(ModelRunner(target), ModelRunner(draft)).generate(PREFIX, 20, SpecConfig.for_method("ar"), sp).token_ids
    eos = ar[4]  # declare the 5th sampled token a stop token: it was drawn by sampling
    engine = Engine(ModelRunner(target), ModelRunner(draft), stop_token_ids={eos})
    ref = engine.generate(PREFIX, 20, SpecConfig.for_method("ar"), sp)
    assert ref.finish_reason == "stop" and ref.token_ids[-1] == eos and len(ref.token_ids) <= 5
    for spec in SPECS.values():
        r = engine.generate(PREFIX, 20, spec, sp)
        assert r.token_ids == ref.token_ids and r.finish_reason == "stop"


def test_sampling_params_are_validated():
    for bad in [dict(temperature=-0.1), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-1), dict(seed=-1)]:
        with pytest.raises(ValueError):
            SamplingParams(**bad)


# ------------------------------------------------------------------ the real default pair

@pytest.mark.slow
def test_real_pair_sampled_output_matches_plain_sampling(engine, tokenizer):
    """Seed for seed, gsd emits plain sampling's tokens; the first two tokens follow the exact distribution."""
    ids = encode(tokenizer, "Tell me something about cats.")
    params = dict(temperature=1.0, top_k=20)
    for seed in range(2):
        sp = SamplingParams(**params, seed=seed)
        ref = engine.generate(ids, 20, SpecConfig.for_method("ar"), sp).token_ids
        assert engine.generate(ids, 20, SpecConfig.for_method("gsd"), sp).token_ids == ref
        assert engine.generate(ids, 20, SpecConfig.for_method("chain"), sp).token_ids == ref
        assert engine.generate(ids, 20, SpecConfig.for_method("gsd", planner=False), sp).token_ids == ref
    n = 120
    counts = Counter()
    for seed in range(n):
        sp = SamplingParams(**params, seed=1000 + seed)
        counts[tuple(engine.generate(ids, 2, SpecConfig.for_method("gsd"), sp).token_ids)] += 1
    chooser = TokenChooser(SamplingParams(**params), engine.target.vocab_size)
    first = chooser.distribution(engine.target.forward(engine.target.new_cache(), torch.tensor(ids),
                                                       last_only=True))[0]
    exact = {}
    for t1 in torch.nonzero(first).flatten().tolist():
        second = chooser.distribution(engine.target.forward(
            engine.target.new_cache(), torch.tensor(ids + [t1]), last_only=True))[0]
        for t2 in torch.nonzero(second).flatten().tolist():
            exact[(t1, t2)] = float(first[t1] * second[t2])
    assert_matches(counts, exact, n)
