"""The feature-conditioned draft (EAGLE-3 style) under GSD's graph, in process: the target hands its
features to the draft, every method stays exactly the target's output, and distill --kind features trains
one with training-time test."""
import json
import subprocess
import sys

import pytest
import torch

from gsd_serve.training.features import ttt_mask
from gsd_serve.core.config import SpecConfig
from gsd_serve.core.drafting import DraftSession
from gsd_serve.core.engine import Engine
from gsd_serve.core.prompts import encode, stop_token_ids
from gsd_serve.core.sampling import SamplingParams
from gsd_serve.models import ModelRunner, draft_output_ids, load_engine
from gsd_serve.models.feature_draft import (FeatureDraftRunner, is_feature_draft, load_feature_draft,
                                            new_feature_draft, save_feature_draft)

PROMPTS = ["Write a short poem about the sea.", "What is 12 times 7? Explain."]


@pytest.fixture(scope="module")
def feature_engine(default_pair, tmp_path_factory):
    target, _, tokenizer = default_pair
    # an untrained draft: exactness must not depend on how good the draft is
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("fd") / "draft"
    save_feature_draft(new_feature_draft(target, draft_output_ids("default-independent")), path)
    assert is_feature_draft(path)
    draft = load_feature_draft(path, target)
    return Engine(ModelRunner(target), FeatureDraftRunner(draft), stop_token_ids=stop_token_ids(tokenizer, target),
                  shared_lookup_tokens=0)


@pytest.mark.parametrize("method", [pytest.param("chain", marks=pytest.mark.slow),
                                    pytest.param("tree", marks=pytest.mark.slow), "gsd"])
def test_feature_draft_methods_emit_exactly_plain_greedy_decoding(feature_engine, tokenizer, method):
    for p in PROMPTS:
        ids = encode(tokenizer, p)
        ref = feature_engine.generate(ids, 32, SpecConfig.for_method("ar"))
        # planner off: every round drafts, so the draft's mechanics are what is checked
        got = feature_engine.generate(ids, 32, SpecConfig.for_method(method, planner=False))
        assert got.token_ids == ref.token_ids, (method, p)
        s = got.stats
        assert s.draft_forwards > 0 and s.draft_prefill_tokens == len(ids)
        # every committed token reached the draft with the target's features (handed over, not zeros)
        assert s.draft_features_missing == 0


def test_q8_feature_draft_runs_on_blocks_and_stays_exact(default_pair, tokenizer, tmp_path):
    """--draft-weights q8 on a feature draft: every projection and the output layer become Q8_0 blocks (a
    quarter of fp32's bytes per forward) and the output is still exactly the target's."""
    from gsd_serve.models.gguf_blocks import BlockLinear
    from gsd_serve.models.factory import apply_draft_weights

    target, _, _ = default_pair
    torch.manual_seed(1)
    dense = new_feature_draft(target, draft_output_ids("default-independent"))
    save_feature_draft(dense, tmp_path / "fd")
    draft = apply_draft_weights(load_feature_draft(tmp_path / "fd", target), "q8")
    swapped = [n for n, m in draft.named_modules() if isinstance(m, BlockLinear)]
    assert sorted(swapped) == sorted(["fuse", "inp", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                      "up_proj", "down_proj", "head"])
    # the quantized draft computes nearly what the dense one does (Q8_0: ~0.4% relative error per weight)
    runner_q8, runner_fp = FeatureDraftRunner(draft), FeatureDraftRunner(load_feature_draft(tmp_path / "fd", target))
    toks, feats = torch.tensor([1, 2, 3, 4]), torch.randn(4, runner_fp.feature_width)
    lq, _ = runner_q8.forward_states(runner_q8.new_cache(), toks, feats)
    lf, _ = runner_fp.forward_states(runner_fp.new_cache(), toks, feats)
    assert not torch.equal(lq, lf) and torch.allclose(lq, lf, rtol=0.05, atol=0.05 * lf.abs().max().item())
    engine = Engine(ModelRunner(target), runner_q8, stop_token_ids=stop_token_ids(tokenizer, target), shared_lookup_tokens=0)
    for p in PROMPTS:
        ids = encode(tokenizer, p)
        ref = engine.generate(ids, 32, SpecConfig.for_method("ar"))
        got = engine.generate(ids, 32, SpecConfig.for_method("gsd", planner=False))
        assert got.token_ids == ref.token_ids and got.stats.draft_forwards > 0, p


def test_feature_draft_sampling_is_seed_identical_to_plain_sampling(feature_engine, tokenizer):
    for i, p in enumerate(PROMPTS):
        ids = encode(tokenizer, p)
        sp = SamplingParams(temperature=0.8, top_p=0.95, seed=100 + i)
        ref = feature_engine.generate(ids, 24, SpecConfig.for_method("ar"), sp)
        got = feature_engine.generate(ids, 24, SpecConfig.for_method("gsd"), sp)
        assert got.token_ids == ref.token_ids


def test_features_are_handed_over_by_position(feature_engine, tokenizer):
    runner = feature_engine.draft
    session = DraftSession(runner)
    w = runner.feature_width
    session.add_features(0, torch.arange(5 * w, dtype=torch.float32).view(5, w))
    session.add_features(3, torch.full((4, w), -1.0))            # a later verdict replaces from position 3 on
    got = session._features_for(-1, 6)
    assert torch.equal(got[0], torch.zeros(w))                   # before the first token: zeros
    assert torch.equal(got[1:4], torch.arange(3 * w, dtype=torch.float32).view(3, w))
    assert torch.equal(got[4:8], torch.full((4, w), -1.0)) and session.features_missing == 0
    session._features_for(5, 8)                                   # positions 7 and 8 never arrived
    assert session.features_missing == 2


def test_ttt_mask_gives_each_step_the_context_of_its_drafting_depth():
    m = ttt_mask(6, 3)                      # step 3: nodes two levels below their root
    j = 4                                   # root at j - 2 = 2: cache keys 0..2, then step 2 at 3, step 3 at 4
    assert m[j, :6].nonzero().flatten().tolist() == [0, 1, 2]
    assert m[j, 6:12].nonzero().flatten().tolist() == [3]
    assert m[j, 12:18].nonzero().flatten().tolist() == [4]
    assert ttt_mask(5, 1).equal(torch.ones(5, 5, dtype=torch.bool).tril())
    assert bool(m.any(dim=1).all())         # no query without keys


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_distill_features_phases_train_a_draft_that_loads_and_stays_exact(tmp_path, tokenizer):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p}) for p in [
        "Name three colors.", "What is two plus two?", "Say hello to Bob.", "Describe a cat.",
        "Give me a word that rhymes with cat.", "What day comes after Monday?"]) + "\n")
    out = tmp_path / "run"
    base = [sys.executable, "-m", "gsd_serve", "distill", "--kind", "features", "--out", str(out), "--prompts",
            str(prompts), "--max-new-tokens", "16", "--gen-batch", "6", "--vocab", "2048", "--dtype", "float32"]
    for phase, extra in (("data", []), ("features", []),
                         ("train", ["--steps", "8", "--batch", "2", "--lr", "1e-3", "--ttt-steps", "2"])):
        r = subprocess.run(base + ["--phase", phase] + extra, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, (phase, r.stderr[-2000:])
    assert sorted(p.name for p in (out / "features").iterdir()) == ["feat-00000.pt"]
    history = json.loads((out / "history.json").read_text())
    assert history[0]["step"] == 0 and history[-1]["step"] == 8
    assert history[-1]["heldout_loss"] < history[0]["heldout_loss"]
    assert len(history[-1]["heldout_top1_by_depth"]) == 2
    # the draft is a loadable feature draft, and generation with it is the target's own
    engine, tok = load_engine(draft_spec=str(out / "model"), dtype="float32")
    assert isinstance(engine.draft, FeatureDraftRunner) and engine.draft.output_ids.numel() == 2048
    ids = encode(tok, "Name a color.")
    ref = engine.generate(ids, 12, SpecConfig.for_method("ar"))
    assert engine.generate(ids, 12, SpecConfig.for_method("gsd")).token_ids == ref.token_ids
    # a phase that needs an earlier one says so
    r = subprocess.run([sys.executable, "-m", "gsd_serve", "distill", "--kind", "features", "--out",
                        str(tmp_path / "empty"), "--phase", "train"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "run --phase data first" in r.stderr


def test_router_asks_for_the_features_of_the_draft_the_draft_deployment_loads(default_pair, tmp_path):
    """The Router deployment must request exactly the layers the Draft deployment's draft reads: an explicit
    feature draft's, the shipped feature draft's when no draft is named (the default), none for an independent
    draft. Asking for none while the draft reads features would feed it zeros: exact, but poor drafts."""
    from gsd_serve.models.checkpoints import SHIPPED_FEATURE_DRAFT_DIR, default_draft_spec

    from gsd_serve.services.router import draft_feature_layers

    target, _, _ = default_pair
    save_feature_draft(new_feature_draft(target, draft_output_ids("default-independent"), (1, 7, 20)), tmp_path / "fd")
    assert draft_feature_layers(str(tmp_path / "fd")) == [1, 7, 20]
    assert draft_feature_layers("default-independent") == []
    shipped = json.loads((SHIPPED_FEATURE_DRAFT_DIR / "config.json").read_text())["feature_layers"]
    assert draft_feature_layers("default-features") == shipped == [2, 15, 29]
    # no draft named: the default, whichever kind --draft-kind auto picks
    want = shipped if default_draft_spec("auto") == "default-features" else []
    assert draft_feature_layers(None) == draft_feature_layers("default") == want
