"""Tensor-parallel target on CPU: SmolLM2-135M at TP=3 (gloo; pipe transport: rank 0 here, ranks 1-2 spawned processes).

One TP=3 runner is shared by the module (start-up costs ~20 s here). The file takes ~2 minutes on an idle
2-core machine, several times that on a starved one: the timeouts (pytest-timeout) leave room for that; the test that kills one of its ranks
runs last. Other runners (a tiny Qwen2 at TP=2) live alongside it: each runner has its own process group.
"""
import multiprocessing
import os
import signal

import pytest
import torch

from gsd_serve.core.config import SpecConfig
from gsd_serve.core.prompts import encode
from gsd_serve.models.runner import ModelRunner
from gsd_serve.models.tensor_parallel import (PipeTransport, TensorParallelError, TensorParallelRunner,
                                              TensorParallelSizeError, check_tp_size, make_target_runner,
                                              valid_tp_sizes)

TARGET = "smollm2-135m-instruct"
PROMPTS = ["What is the capital of France?", "Write a short poem about the sea."]
NEW_TOKENS = 24


def _tp_children():
    return [p for p in multiprocessing.active_children() if p.name.startswith("gsd-tp-rank")]


@pytest.fixture(scope="module")
def tp_runner():
    runner = TensorParallelRunner(PipeTransport(TARGET, 3))
    yield runner
    runner.close()
    assert not _tp_children()


@pytest.fixture(scope="module")
def tp_engine(tp_runner, engine):
    from gsd_serve.core.engine import Engine

    # the draft and stop tokens of the shared TP=1 engine; only the target differs
    return Engine(tp_runner, engine.draft, stop_token_ids=engine.stop_token_ids)


@pytest.mark.timeout(180)
def test_sizes_that_do_not_divide_the_heads_are_refused_at_start_up(default_pair):
    config = default_pair[0].config
    assert valid_tp_sizes(config) == [1, 3]
    check_tp_size(config, 3)
    for bad in (2, 4, 9):
        with pytest.raises(TensorParallelSizeError, match=r"9 attention heads and 3 KV heads.*: 1, 3$"):
            check_tp_size(config, bad)
    with pytest.raises(TensorParallelSizeError, match="1, 3"):
        PipeTransport(TARGET, 2)
    with pytest.raises(ValueError, match="1, 3"):
        make_target_runner(TARGET, 2)
    assert not _tp_children(), "a refused size must not start any rank"


@pytest.mark.timeout(180)
def test_cli_refuses_tp2_before_loading(capsys):
    from gsd_serve.cli import EXIT_USAGE, main

    rc = main(["generate", "--method", "ar", "--prompt", "hi", "--max-new-tokens", "2",
               "--tensor-parallel-size", "2"])
    assert rc == EXIT_USAGE
    assert "sizes that work for this model: 1, 3" in capsys.readouterr().err


@pytest.mark.timeout(300)
def test_tree_masked_forward_with_cache_matches_unsharded(tp_runner, default_pair):
    ref = ModelRunner(default_pair[0])
    prompt = torch.tensor([1, 504, 3458, 282, 4649, 314, 5248, 30, 2])
    c_ref, c_tp = ref.new_cache(), tp_runner.new_cache()
    with torch.inference_mode():
        a = ref.forward(c_ref, prompt)
    b = tp_runner.forward(c_tp, prompt)
    assert b.shape == a.shape and b.dtype == torch.float32
    torch.testing.assert_close(b, a, atol=1e-3, rtol=0)
    # each rank holds its own heads: 3 KV heads over 3 ranks, one per rank
    assert tp_runner.transport.local.caches[c_tp.id].layers[0].keys.shape[1] == 1 and c_tp.length == 9
    # a tree: 0 -> {1, 2}, 2 -> 3, with explicit positions by depth
    tree = torch.tensor([5, 6, 7, 8])
    pos = torch.tensor([9, 10, 10, 11])
    mask = torch.ones(1, 1, 4, 13, dtype=torch.bool)
    mask[0, 0, :, 9:] = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 1, 1]], dtype=torch.bool)
    with torch.inference_mode():
        a = ref.forward(c_ref, tree, pos, mask)
    b = tp_runner.forward(c_tp, tree, pos, mask)
    torch.testing.assert_close(b, a, atol=1e-3, rtol=0)
    assert torch.equal(a.argmax(-1), b.argmax(-1))
    last = tp_runner.forward(c_tp, torch.tensor([3]), last_only=True)
    assert last.shape == (1, tp_runner.vocab_size)


@pytest.mark.timeout(300)
def test_keep_and_truncate_apply_on_every_rank(tp_runner, default_pair):
    ref = ModelRunner(default_pair[0])
    prompt = torch.tensor([1, 504, 3458, 282, 4649, 314, 5248, 30, 2])
    tree = torch.tensor([5, 6, 7, 8])
    pos = torch.tensor([9, 10, 10, 11])
    mask = torch.ones(1, 1, 4, 13, dtype=torch.bool)
    mask[0, 0, :, 9:] = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 1, 1]], dtype=torch.bool)
    c_ref, c_tp = ref.new_cache(), tp_runner.new_cache()
    with torch.inference_mode():
        ref.forward(c_ref, prompt)
        ref.forward(c_ref, tree, pos, mask)
        c_ref.keep(9, [9, 11, 12])                       # accept the path 0 -> 2 -> 3
    tp_runner.forward(c_tp, prompt)
    tp_runner.forward(c_tp, tree, pos, mask)
    c_tp.keep(9, [9, 11, 12])
    assert c_tp.length == c_ref.length == 12
    with torch.inference_mode():
        a = ref.forward(c_ref, torch.tensor([42, 43]))
    b = tp_runner.forward(c_tp, torch.tensor([42, 43]))
    torch.testing.assert_close(b, a, atol=1e-3, rtol=0)
    # the same cache compaction as the unsharded path, on the workers too: a wrong worker cache shows here
    with torch.inference_mode():
        c_ref.truncate(10)
        a = ref.forward(c_ref, torch.tensor([11]))
    c_tp.truncate(10)
    assert c_tp.length == 10
    b = tp_runner.forward(c_tp, torch.tensor([11]))
    torch.testing.assert_close(b, a, atol=1e-3, rtol=0)
    # a fresh cache is independent of the others, and dropping handles frees them on the ranks
    c2 = tp_runner.new_cache()
    assert c2.length == 0
    del c_tp, c2
    with pytest.raises(TypeError):
        tp_runner.forward(ref.new_cache(), torch.tensor([1]))


@pytest.fixture(scope="module")
def tp1_greedy(engine, tokenizer):
    """TP=1 greedy output (plain decoding; every TP=1 method emits exactly it: test_lossless_greedy.py)."""
    out = []
    for p in PROMPTS:
        ids = encode(tokenizer, p)
        out.append((ids, engine.generate(ids, NEW_TOKENS, SpecConfig.for_method("ar"))))
    return out


@pytest.mark.timeout(400)
@pytest.mark.parametrize("method", ["ar", "gsd"])
def test_tp3_greedy_output_is_token_identical_to_tp1(tp_engine, tp1_greedy, method):
    spec = SpecConfig.for_method(method)
    for ids, ref in tp1_greedy:
        got = tp_engine.generate(ids, NEW_TOKENS, spec)
        assert got.token_ids == ref.token_ids, f"TP=3 {method} differs from TP=1 on {ids!r}"
        assert got.finish_reason == ref.finish_reason
        if method == "gsd":
            assert got.stats.rounds < NEW_TOKENS and got.stats.verified_tokens > got.stats.rounds


def make_tiny_qwen2():
    """A tiny random Qwen2 (biased q/k/v, GQA): the sharding is generic over Llama-like models."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2)).eval()


@pytest.mark.timeout(240)
def test_other_llama_like_model_and_a_rank_failing_mid_forward():
    ref = ModelRunner(make_tiny_qwen2())
    runner = TensorParallelRunner(PipeTransport(make_tiny_qwen2, 2, timeout_s=30))
    try:
        c_ref, c_tp = ref.new_cache(), runner.new_cache()
        with torch.inference_mode():
            a = ref.forward(c_ref, torch.arange(10))
        torch.testing.assert_close(runner.forward(c_tp, torch.arange(10)), a, atol=1e-4, rtol=0)
        # rank 1 fails on a command (a cache it does not have) while rank 0 goes into the next forward:
        # the all-reduce sees the closed connection at once (no timeout wait) and the rank's error is reported
        runner.transport.conns[0].send(("truncate", 10 ** 6, 0))
        with pytest.raises(TensorParallelError, match="rank 1: KeyError"):
            runner.forward(c_tp, torch.tensor([4]))
        with pytest.raises(TensorParallelError):
            runner.forward(c_tp, torch.tensor([4]))
    finally:
        runner.close()
    assert not any(p.is_alive() for p in runner.transport.procs)


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_ray_actor_ranks_in_a_strict_pack_placement_group(tmp_path):
    import ray   # a dependency: its absence fails, never skips

    from gsd_serve.models.tensor_parallel.ray_actors import RayTransport

    model = make_tiny_qwen2()
    model.save_pretrained(tmp_path / "tiny")
    ref = ModelRunner(model)
    started = not ray.is_initialized()
    if started:
        for attempt in range(3):  # a fresh local cluster, never one another process started
            try:
                ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
                break
            except Exception:  # Ray gives its raylet 30 s to register: a starved machine can miss that once
                ray.shutdown()
                if attempt == 2:
                    raise
    try:
        with pytest.raises(TensorParallelSizeError, match="1, 2"):
            RayTransport(str(tmp_path / "tiny"), 3)
        runner = TensorParallelRunner(RayTransport(str(tmp_path / "tiny"), 2, timeout_s=30))
        try:
            from ray.util.placement_group import placement_group_table
            table = placement_group_table(runner.transport.placement_group)
            assert table["strategy"] == "STRICT_PACK" and len(table["bundles"]) == 2
            c_ref, c_tp = ref.new_cache(), runner.new_cache()
            tree, pos = torch.tensor([5, 6, 7, 8]), torch.tensor([10, 11, 11, 12])
            mask = torch.ones(1, 1, 4, 14, dtype=torch.bool)
            mask[0, 0, :, 10:] = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 1, 1]],
                                              dtype=torch.bool)
            with torch.inference_mode():
                ref.forward(c_ref, torch.arange(10))
                a = ref.forward(c_ref, tree, pos, mask)
                c_ref.keep(10, [10, 12, 13])
                b_next = ref.forward(c_ref, torch.tensor([9]))
            runner.forward(c_tp, torch.arange(10))
            torch.testing.assert_close(runner.forward(c_tp, tree, pos, mask), a, atol=1e-4, rtol=0)
            c_tp.keep(10, [10, 12, 13])
            assert c_tp.length == 13
            torch.testing.assert_close(runner.forward(c_tp, torch.tensor([9])), b_next, atol=1e-4, rtol=0)
            runner.check_health()
            ray.kill(runner.transport.actors[1], no_restart=True)
            with pytest.raises(TensorParallelError):
                runner.forward(c_tp, torch.tensor([4]))
            with pytest.raises(TensorParallelError):
                runner.new_cache()
        finally:
            runner.close()
        assert placement_group_table(runner.transport.placement_group)["state"] == "REMOVED"
    finally:
        if started:
            ray.shutdown()


@pytest.mark.timeout(300)
def test_a_killed_rank_makes_the_next_call_raise_not_hang(tp_runner):
    # runs last: it breaks the shared runner
    cache = tp_runner.new_cache()
    tp_runner.forward(cache, torch.tensor([1, 2, 3]))
    pid = tp_runner.transport.rank_pids[1]
    os.kill(pid, signal.SIGKILL)
    tp_runner.transport.procs[1].join(timeout=10)
    with pytest.raises(TensorParallelError, match=r"rank 2 \(pid \d+\) died"):
        tp_runner.forward(cache, torch.tensor([4]))
    with pytest.raises(TensorParallelError):
        tp_runner.check_health()
    with pytest.raises(TensorParallelError, match="rank 2"):
        cache.truncate(1)
    with pytest.raises(TensorParallelError):
        tp_runner.new_cache()
    assert not tp_runner.alive
    tp_runner.close()
    assert not _tp_children()
