"""Distillation: the shipped draft, and a tiny real `gsd-serve distill` run."""
import json
import shutil
import subprocess
import sys

import pytest
import torch

from gsd_serve.models import SHIPPED_DRAFT_DIR, default_draft_dir, draft_output_ids, load_model, same_tokenizer, load_tokenizer


@pytest.mark.skipif(not (SHIPPED_DRAFT_DIR / "config.json").exists(), reason="no shipped draft in this checkout")
def test_shipped_draft_loads_as_a_standard_checkpoint_and_shares_the_tokenizer(default_pair):
    from transformers import AutoModelForCausalLM

    target, draft, tokenizer = default_pair
    d = default_draft_dir()
    model = AutoModelForCausalLM.from_pretrained(d, local_files_only=True)
    assert model.config.vocab_size == target.config.vocab_size
    assert same_tokenizer(tokenizer, load_tokenizer(str(d)))
    ids = draft_output_ids(str(d))
    assert ids is not None and ids.numel() <= target.config.vocab_size
    assert model.config.num_hidden_layers < target.config.num_hidden_layers
    size = sum(f.stat().st_size for f in SHIPPED_DRAFT_DIR.iterdir())
    assert size <= 40 * 2**20
    assert type(draft).__name__ == type(target).__name__ and draft.config.num_hidden_layers == model.config.num_hidden_layers
    # usable by transformers' own assisted generation too
    x = torch.tensor([tokenizer("Hello, how are", add_special_tokens=False)["input_ids"]])
    plain = target.generate(x, max_new_tokens=6, do_sample=False)
    assisted = target.generate(x, max_new_tokens=6, do_sample=False, assistant_model=draft)
    assert torch.equal(plain, assisted)


@pytest.mark.slow
def test_tiny_distill_run_lowers_the_loss_and_writes_a_draft_that_drafts(tmp_path, tokenizer):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p}) for p in [
        "Name three colors.", "What is two plus two?", "Say hello to Bob.", "Describe a cat.",
        "Give me a word that rhymes with cat.", "What day comes after Monday?"]) + "\n")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "gsd_serve", "distill", "--out", str(out), "--prompts", str(prompts),
           "--max-new-tokens", "16", "--gen-batch", "6", "--steps", "12", "--batch", "2", "--vocab", "2048",
           "--layers", "0,29", "--lr", "1e-3", "--seed", "1"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    history = json.loads((out / "history.json").read_text())
    assert history[0]["step"] == 0 and history[-1]["step"] == 12
    assert history[-1]["heldout_loss"] < history[0]["heldout_loss"]
    model_dir = out / "model"
    assert (model_dir / "config.json").exists() and (model_dir / "model.safetensors").exists()
    draft = load_model(str(model_dir))
    assert draft.config.num_hidden_layers == 2
    assert draft_output_ids(str(model_dir)).numel() == 2048
    # resuming a finished run is a no-op that still writes the model
    r2 = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r2.returncode == 0 and "resuming at step 12" in r2.stderr

    from gsd_serve.core.config import SpecConfig
    from gsd_serve.core.engine import Engine
    from gsd_serve.models import ModelRunner
    from gsd_serve.core.prompts import encode, stop_token_ids

    target = load_model("smollm2-135m-instruct")
    engine = Engine(ModelRunner(target), ModelRunner(draft, draft_output_ids(str(model_dir))),
                    stop_token_ids=stop_token_ids(tokenizer, target), shared_lookup_tokens=0)
    ids = encode(tokenizer, "Name three colors.")
    ref = engine.generate(ids, 12, SpecConfig.for_method("ar"))
    got = engine.generate(ids, 12, SpecConfig.for_method("gsd", planner=False))
    assert got.token_ids == ref.token_ids and got.stats.draft_forwards > 0


@pytest.mark.slow
def test_distill_in_two_phases_warm_starts_from_the_shipped_draft(tmp_path):
    """--phase data then --phase train --init: the way the shipped draft is retrained on more target text.
    Starting from the shipped draft must begin far better than starting from copies of the target's layers."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p}) for p in [
        "Name three colors.", "What is two plus two?", "Say hello to Bob.", "Describe a cat."]) + "\n")
    base = [sys.executable, "-m", "gsd_serve", "distill", "--prompts", str(prompts), "--max-new-tokens", "16",
            "--gen-batch", "4", "--batch", "2", "--vocab", "2048", "--seed", "1"]
    warm, cold = tmp_path / "warm", tmp_path / "cold"
    r = subprocess.run(base + ["--out", str(warm), "--phase", "data"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert list((warm / "data").glob("shard-*.pt")) and not (warm / "ckpt.pt").exists()
    shutil.copytree(warm / "data", cold / "data")
    r = subprocess.run(base + ["--out", str(warm), "--phase", "train", "--steps", "2", "--init", str(SHIPPED_DRAFT_DIR)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "starting from the draft" in r.stderr, r.stderr[-2000:]
    r = subprocess.run(base + ["--out", str(cold), "--phase", "train", "--steps", "1"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    warm_start = json.loads((warm / "history.json").read_text())[0]
    cold_start = json.loads((cold / "history.json").read_text())[0]
    assert warm_start["heldout_loss"] < cold_start["heldout_loss"] - 1.0, (warm_start, cold_start)
    assert load_model(str(warm / "model")).config.num_hidden_layers == 2


def test_distill_refuses_bad_arguments(tmp_path):
    r = subprocess.run([sys.executable, "-m", "gsd_serve", "distill", "--out", str(tmp_path / "y"), "--phase", "train"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "no data shards" in r.stderr and "Traceback" not in r.stderr, r.stderr
    for args, msg in [(["--layers", "0,99"], "layers"), (["--layers", "a"], "layers"), (["--steps", "0"], "steps"),
                      (["--init", str(tmp_path)], "--init")]:
        r = subprocess.run([sys.executable, "-m", "gsd_serve", "distill", "--out", str(tmp_path / "x"), *args,
                            "--max-prompts", "1", "--max-new-tokens", "2"],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode != 0 and msg in r.stderr and "Traceback" not in r.stderr, r.stderr
