"""The command line: real models, real subprocesses, clear errors."""
import json
import os
import subprocess
import sys

import pytest

ENV = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1"}


def run(*args, timeout=300, **kw):
    return subprocess.run([sys.executable, "-m", "gsd_serve", *args], capture_output=True, text=True,
                          timeout=timeout, env=ENV, **kw)


def test_the_tests_use_their_own_cache_and_their_subprocesses_inherit_it():
    """Nothing a test builds or measures lands in the user's cache directory (conftest.TEST_CACHE)."""
    from conftest import TEST_CACHE, USER_CACHE

    from gsd_serve.core.config import cache_dir

    assert cache_dir() == TEST_CACHE and TEST_CACHE.resolve() != USER_CACHE.resolve()
    r = subprocess.run([sys.executable, "-c", "from gsd_serve.core.config import cache_dir; print(cache_dir())"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == str(TEST_CACHE), r.stderr


def test_help_lists_commands():
    r = run("--help")
    assert r.returncode == 0
    for cmd in ("generate", "distill"):
        assert cmd in r.stdout
    r = run("generate", "--help")
    assert r.returncode == 0 and "--merge-context" in r.stdout and "--budget" in r.stdout


@pytest.mark.parametrize("args, message", [
    (["generate", "--prompt", "  "], "empty"),
    (["generate", "--method", "magic", "--prompt", "hi"], "invalid choice"),
    (["generate", "--prompt", "hi", "--max-new-tokens", "0"], "max-new-tokens"),
    (["generate", "--prompt", "hi", "--k", "0"], "k must be"),
    (["generate", "--prompt", "hi", "--budget", "1"], "budget"),
    (["generate", "--prompt", "hi", "--sibling-threshold", "2"], "sibling_threshold"),
    (["generate", "--method", "chain", "--prompt", "hi", "--k", "3"], "chain"),
    (["generate", "--prompt", "hi", "--temperature", "-1"], "temperature"),
    (["generate", "--prompt", "hi", "--stop", ""], "--stop"),
    (["generate", "--prompts", "/nonexistent/prompts.jsonl"], "no such file"),
    (["generate", "--prompt", "hi", "--target", "/nonexistent/model"], "nonexistent"),
    (["generate", "--prompt", "hi", "--draft", "/tmp"], "not a model directory"),
])
def test_bad_input_exits_non_zero_with_one_clear_line(args, message):
    r = run(*args)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert lines and message in lines[-1], r.stderr


def test_bad_prompts_file_line(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "ok"}\n{"nope": 1}\n')
    r = run("generate", "--prompts", str(f))
    assert r.returncode == 2 and ":2:" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_generate_json_over_a_prompts_file_carries_fields(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "Say hello.", "id": "a"}\n{"prompt": "Name a color.", "id": "b", "x": 3}\n')
    r = run("generate", "--prompts", str(f), "--max-new-tokens", "8", "--json", "--method", "gsd")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.strip().splitlines()]
    assert [row["id"] for row in rows] == ["a", "b"] and rows[1]["x"] == 3
    for row in rows:
        assert row["prompt"] and isinstance(row["text"], str) and 1 <= len(row["token_ids"]) <= 8
        for key in ("target_forwards", "draft_forwards", "draft_tokens", "verified_tokens", "accepted_tokens",
                    "mean_accept_len", "seconds", "tokens_per_s"):
            assert key in row["stats"]
    assert "[2/2" in r.stderr  # progress on multi-prompt runs


def test_generate_streams_text_for_one_prompt():
    r = run("generate", "--prompt", "What is the capital of France?", "--max-new-tokens", "12", "--method", "ar")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    assert "tok/s" in r.stderr


def test_a_pair_with_different_tokenizers_is_refused(tmp_path, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    from gsd_serve.models import ModelLoadError, load_pair

    other = tmp_path / "other"
    cfg = LlamaConfig(vocab_size=len(tokenizer) + 1, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    LlamaForCausalLM(cfg).save_pretrained(other)
    tok = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    tok.add_tokens(["<definitely-not-in-smollm>"])
    tok.save_pretrained(other)
    with pytest.raises(ModelLoadError, match="different tokenizers"):
        load_pair("smollm2-135m-instruct", str(other))
    r = run("generate", "--prompt", "hi", "--draft", str(other), "--max-new-tokens", "2")
    assert r.returncode == 2 and "different tokenizers" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_tune_saves_a_valid_lossless_default(tmp_path):
    """A short tune (one prompt, a 20 s budget): it measures ar and the starting config, duels candidates
    and saves a configuration the engine accepts."""
    from gsd_serve.core.config import SpecConfig, load_tuned_defaults

    out = tmp_path / "tuned.json"
    r = run("tune", "--limit", "1", "--max-new-tokens", "8", "--sweeps", "1", "--time-limit", "20",
            "--save", str(out), timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "tune: ar" in r.stderr and "saved" in r.stderr
    data = json.loads(out.read_text())
    assert data["ar_tokens_per_s"] > 0 and data["tokens_per_s"] > 0
    assert load_tuned_defaults(out) == SpecConfig(**data["config"])
    assert data["config"]["method"] == "gsd"


@pytest.mark.slow
def test_draft_kind_chooses_the_shipped_draft_and_every_kind_is_exact():
    """--draft-kind: auto means the shipped independent draft (it measured faster), features the shipped feature
    draft; every kind gives exactly plain decoding's tokens, and an explicit draft of the other kind is refused
    with one clear line."""
    from gsd_serve.models.checkpoints import SHIPPED_FEATURE_DRAFT_DIR, default_draft_spec

    assert default_draft_spec("auto") == "default-independent"
    assert (SHIPPED_FEATURE_DRAFT_DIR / "model.safetensors").exists()        # both drafts ship
    prompt = ["--prompt", "Name three rivers in Europe.", "--max-new-tokens", "24", "--json"]
    ref = run("generate", "--method", "ar", *prompt)
    assert ref.returncode == 0, ref.stderr
    want = json.loads(ref.stdout)["token_ids"]
    for kind in ("auto", "features", "independent"):
        # without the planner every round drafts, whatever this machine's costs say: the draft of each kind runs
        r = run("generate", "--method", "gsd", "--no-planner", "--draft-kind", kind, *prompt)
        assert r.returncode == 0, r.stderr
        row = json.loads(r.stdout)
        assert row["token_ids"] == want, kind
        assert row["stats"]["draft_forwards"] > 0, kind
    r = run("generate", "--prompt", "hi", "--draft", str(SHIPPED_FEATURE_DRAFT_DIR), "--draft-kind", "independent")
    assert r.returncode != 0 and "Traceback" not in r.stderr and "its kind is features" in r.stderr


def test_help_and_argument_errors_answer_without_loading_torch():
    """`gsd-serve --help`, a command's --help and its argument errors answer at once (~0.1 s): no command
    module imports torch or transformers before it runs."""
    code = ("import sys\nfrom gsd_serve.cli import main\n"
            "for argv in (['--help'], ['distill', '--help'], ['bench', '--help'], ['tune', '--help']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "assert main(['generate', '--prompt', 'hi', '--k', '0']) == 2\n"
            "heavy = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
            "assert not heavy, heavy\nprint('light')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=ENV)
    assert r.returncode == 0 and r.stdout.strip().endswith("light"), r.stderr[-2000:]
    assert "k must be" in r.stderr
