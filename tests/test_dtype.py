"""--dtype: resolution (auto measured per CPU), and the exactness rule of non-fp32 modes on the real pair.

fp32 is the exact reference (tests/test_lossless_greedy.py). In bf16 a one-token step and a tree forward
round differently, so a near-tie can flip: every speculative output must equal bf16 plain decoding, or
leave it first at a token where the target's top-2 gap is a near-tie (below bench.NEAR_TIE_EPS).
"""
import json

import pytest
import torch

from gsd_serve.tools.bench import NEAR_TIE_EPS, divergence
from gsd_serve.core.config import SpecConfig
from gsd_serve.core.engine import Engine
from gsd_serve.core.prompts import encode, stop_token_ids
from gsd_serve.core.sampling import SamplingParams
from gsd_serve.models import ModelRunner, draft_output_ids, load_default_pair
from gsd_serve.models.dtypes import resolve_dtype


def test_dtype_names_and_errors():
    assert resolve_dtype("float32") is torch.float32 and resolve_dtype("bf16") is torch.bfloat16
    assert resolve_dtype(torch.float16) is torch.float16
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        resolve_dtype("float8")


def test_auto_on_cpu_is_measured_once_and_can_be_forced(monkeypatch, tmp_path):
    monkeypatch.setenv("GSD_SERVE_CACHE", str(tmp_path))
    monkeypatch.delenv("GSD_SERVE_CPU_BF16", raising=False)
    got = resolve_dtype("auto", "cpu")
    assert got in (torch.float32, torch.bfloat16)
    known = json.loads((tmp_path / "cpu-dtype.json").read_text())
    (entry,) = known.values()
    assert entry["prefers_bf16"] == (got is torch.bfloat16) and entry["bf16_gain"] > 0
    # remembered: a forged entry is what auto answers next time (no second measurement)
    (key,) = known
    known[key]["prefers_bf16"] = not entry["prefers_bf16"]
    known[key].pop("measured_busy", None)      # a final entry (one taken on a busy machine is taken again)
    (tmp_path / "cpu-dtype.json").write_text(json.dumps(known))
    assert resolve_dtype("auto", "cpu") is (torch.float32 if got is torch.bfloat16 else torch.bfloat16)
    monkeypatch.setenv("GSD_SERVE_CPU_BF16", "0")
    assert resolve_dtype("auto", "cpu") is torch.float32
    monkeypatch.setenv("GSD_SERVE_CPU_BF16", "1")
    assert resolve_dtype("auto", "cpu") is torch.bfloat16


def test_a_measurement_taken_on_a_busy_machine_is_taken_again_once_it_is_quiet(monkeypatch, tmp_path):
    """remembered()'s policy, for given load readings: a measurement taken while the machine is busy is kept as
    provisional, used while the machine stays busy (or its load is unknown), and taken again by the first call
    that finds it quiet; a final entry is used as it is, without reading the load."""
    from gsd_serve.models.hardware import BUSY_LIMIT, remembered

    monkeypatch.setenv("GSD_SERVE_CACHE", str(tmp_path))
    calls, reading = [], {"share": 0.9}

    def measure():
        calls.append(1)
        return {"value": len(calls)}

    def busy():
        return reading["share"]

    assert remembered("probe.json", "k", measure, busy) == {"value": 1, "measured_busy": 0.9}
    assert remembered("probe.json", "k", measure, busy)["value"] == 1 and len(calls) == 1     # still busy: kept
    reading["share"] = None
    assert remembered("probe.json", "k", measure, busy)["value"] == 1 and len(calls) == 1     # unknown: kept
    reading["share"] = BUSY_LIMIT / 2
    assert remembered("probe.json", "k", measure, busy) == {"value": 2} and len(calls) == 2   # quiet: again, final
    reading["share"] = 0.9

    def unread():
        raise AssertionError("a final entry needs no load reading")

    assert remembered("probe.json", "k", measure, unread) == {"value": 2} and len(calls) == 2
    assert json.loads((tmp_path / "probe.json").read_text()) == {"k": {"value": 2}}
    # a first measurement on a quiet machine is final at once
    assert remembered("probe.json", "q", measure, lambda: 0.0) == {"value": 3}
    assert remembered("probe.json", "q", measure, unread) == {"value": 3} and len(calls) == 3


def test_the_load_reading_sees_a_machine_whose_every_core_is_kept_busy(monkeypatch, tmp_path):
    """machine_busy() and remembered()'s default reading, on a real load: a busy loop on every core of the
    machine makes it read busy, whatever else runs."""
    import os
    import subprocess
    import sys
    import time

    from gsd_serve.models.hardware import BUSY_LIMIT, machine_busy, remembered

    monkeypatch.setenv("GSD_SERVE_CACHE", str(tmp_path))
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 1)]
    try:
        time.sleep(0.5)
        share = machine_busy(0.5)
        assert share is not None and share > BUSY_LIMIT, share
        entry = remembered("probe.json", "k", lambda: {"value": 1})
        assert entry["value"] == 1 and entry["measured_busy"] > BUSY_LIMIT
    finally:
        for h in hogs:
            h.kill()
            h.wait()


PROMPTS = ["What is the capital of France?", "Write a short poem about the sea.",
           "Explain how a bicycle works to a child.", "List three tips for learning a new language.",
           "Give me a recipe for pancakes.", "Why is the sky blue?"]


@pytest.fixture(scope="module")
def bf16_engine():
    target, draft, tokenizer = load_default_pair(torch.bfloat16)
    assert next(target.parameters()).dtype is torch.bfloat16
    engine = Engine(ModelRunner(target), ModelRunner(draft, draft_output_ids("default-independent")),
                    stop_token_ids=stop_token_ids(tokenizer, target))
    return engine, tokenizer


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_bf16_speculation_equals_bf16_plain_decoding_up_to_near_ties(bf16_engine):
    engine, tokenizer = bf16_engine
    identical, checked = 0, 0
    for p in PROMPTS:
        ids = encode(tokenizer, p)
        ref = engine.generate(ids, 48, SpecConfig.for_method("ar")).token_ids
        got = engine.generate(ids, 48, SpecConfig.for_method("gsd")).token_ids
        checked += 1
        if got == ref:
            identical += 1
            continue
        d = divergence(engine.target, ids, ref, got, SamplingParams())
        assert d["top2_gap"] is not None and d["top2_gap"] < NEAR_TIE_EPS, (p, d)
    assert identical >= checked - 1, f"only {identical}/{checked} identical"


def test_bf16_logits_are_sharpened_to_fp32_sums_among_the_top_candidates(bf16_engine):
    engine, _ = bf16_engine
    runner = engine.target
    with torch.inference_mode():
        hidden = runner.hidden(runner.new_cache(), torch.tensor([1, 504, 3458, 282]))
        got = runner.logits(hidden)
        exact = hidden.float() @ runner.head_weight.float().T
    top = exact.topk(8, dim=-1).indices
    # the best candidates carry fp32 sums of the bf16 weights (not values rounded to 8 significant bits)
    torch.testing.assert_close(got.gather(1, top), exact.gather(1, top), atol=1e-3, rtol=0)
    assert torch.equal(got.argmax(-1), exact.argmax(-1))


def test_bf16_tree_rows_equal_decoding_steps_bit_for_bit(bf16_engine):
    """The mechanism behind bf16 identity: a token's hidden state is the same bits whether it is decoded alone or
    verified among others (one GEMM kernel for 1..32 rows, float64 attention). On an AMD EPYC with avx512_bf16,
    oneDNN's single-row path summed K=1536 in another order: rows 2..11 of this check differed before a step
    was padded to two rows, and 5 of 12 bench prompts left bf16 ar within 128 tokens."""
    from gsd_serve.models.cpu_linear import packing_available

    engine, tokenizer = bf16_engine
    runner = engine.target
    ids = torch.tensor(encode(tokenizer, "Translate to French: the weather is nice and we are going to the park."))
    new = torch.randint(100, 20000, (16,), generator=torch.Generator().manual_seed(0))
    native = packing_available(torch.zeros(1, dtype=torch.bfloat16))
    with torch.inference_mode():
        stepped = runner.new_cache()
        runner.hidden(stepped, ids)
        steps = torch.cat([runner.hidden(stepped, new[i:i + 1]) for i in range(len(new))])
        tree = runner.new_cache()
        runner.hidden(tree, ids)
        together = runner.hidden(tree, new)
    differ = [i for i in range(len(new)) if not torch.equal(steps[i], together[i])]
    if native:
        assert differ == [], f"rows {differ} of a 16-token forward differ from the same tokens decoded one by one"
    else:   # bf16 emulated (no oneDNN bf16 kernels): only the near-tie rule of the test above is claimed
        torch.testing.assert_close(steps.float(), together.float(), atol=0.1, rtol=0.02)
