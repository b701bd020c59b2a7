"""What only a GPU can show (`pytest -m gpu`; bench/device_check.sh runs them on a lent GPU machine): the default
target and its shipped draft in CUDA bf16 give ar's tokens with every method (a difference only at a reported
near-tie), the compiled static step on CUDA agrees with the eager forward and captures into a CUDA graph, and a
tensor-parallel target of one rank runs on the GPU with an NCCL communicator. Skipped without CUDA."""
import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is false)")]

PROMPTS = ["Write a short poem about the sea.", "Explain what a hash table is, in three sentences.",
           "List five prime numbers and say why each is prime."]


@pytest.fixture(scope="module")
def cuda_engine():
    from gsd_serve.models import load_engine

    engine, tokenizer = load_engine(dtype="bfloat16", device="cuda", compile="off", target_weights="dense",
                                    draft_weights="dense", draft_kind="independent")
    return engine, tokenizer


def check_same_or_near_tie(runner, prompt, ref, got):
    """got == ref, or got leaves ref at a token where the target's top-2 gap is a near-tie (never hidden)."""
    from gsd_serve.core.sampling import SamplingParams
    from gsd_serve.tools.bench import NEAR_TIE_EPS, divergence

    if got == ref:
        return None
    d = divergence(runner, prompt, ref, got, SamplingParams())
    assert d["top2_gap"] is None or d["top2_gap"] < NEAR_TIE_EPS, f"not a near-tie: {d}"
    return d


def test_cuda_bf16_methods_match_ar(cuda_engine):
    from gsd_serve.core.config import SpecConfig
    from gsd_serve.core.prompts import encode
    from gsd_serve.models.runner import DeviceModelRunner

    engine, tokenizer = cuda_engine
    assert isinstance(engine.target, DeviceModelRunner) and engine.target.device.type == "cuda"
    assert engine.target.dtype == torch.bfloat16
    assert next(engine.draft.model.parameters()).device.type == "cuda"
    drafted = 0
    for text in PROMPTS:
        ids = encode(tokenizer, text)
        ref = engine.generate(ids, 48, SpecConfig.for_method("ar")).token_ids
        assert len(ref) > 0
        for method in ("chain", "gsd"):
            # planner off: every round drafts and verifies a tree, the path a GPU makes cheap
            res = engine.generate(ids, 48, SpecConfig.for_method(method, planner=False))
            check_same_or_near_tie(engine.target, ids, ref, res.token_ids)
            drafted += res.stats.target_forwards < len(res.token_ids)
    assert drafted > 0     # speculation accepted more than one token per target forward somewhere


def test_compiled_step_on_cuda_matches_eager():
    from gsd_serve.models.checkpoints import DEFAULT_TARGET, load_model
    from gsd_serve.models.compiled import CompiledRunner
    from gsd_serve.models.runner import DeviceModelRunner

    model = load_model(DEFAULT_TARGET, torch.bfloat16)
    eager = DeviceModelRunner(model, None, "cuda")
    compiled = CompiledRunner(model)            # the same weights, already on the GPU
    prompt = torch.arange(100, 140)
    ce, cc = eager.new_cache(), compiled.new_cache()
    le, lc = eager.forward(ce, prompt, last_only=True), compiled.forward(cc, prompt, last_only=True)
    assert lc.device.type == "cpu" and torch.allclose(le, lc, atol=0.05, rtol=0)     # prefill: the same eager path
    for n in (1, 4, 9):                          # a step and two trees, padded to buckets 1, 4 and 16
        tokens = torch.arange(7, 7 + n)
        le, lc = eager.forward(ce, tokens), compiled.forward(cc, tokens)
        assert lc.shape == le.shape
        # the compiled kernels sum in other orders: the best logits (recomputed in fp32) equal up to bf16 rounding
        # of the hidden states, every logit within a few bf16 steps (a wrong position or mask is off by units),
        # and the same choice except at near-ties
        best = le.topk(8, dim=-1).indices
        assert (le.gather(1, best) - lc.gather(1, best)).abs().max().item() < 0.5
        assert (le - lc).abs().max().item() < 2.0
        top2 = le.topk(2, dim=-1).values
        clear = (top2[:, 0] - top2[:, 1]) > 0.25
        assert torch.equal(le.argmax(-1)[clear], lc.argmax(-1)[clear])
    assert compiled.compiled_shapes and not compiled.fallbacks


def test_static_step_captures_into_a_cuda_graph():
    """The static step has fixed shapes and no host synchronisation: it records into a CUDA graph, and a replay
    with new inputs copied into the captured buffers gives what an eager call gives."""
    from gsd_serve.models.checkpoints import DEFAULT_TARGET, load_model
    from gsd_serve.models.compiled import CompiledRunner

    runner = CompiledRunner(load_model(DEFAULT_TARGET, torch.bfloat16).to("cuda"))
    cache = runner.new_cache()
    runner.forward(cache, torch.arange(10, 30))         # a 20-token prefill fills slots 0..19
    cap, b, dev = cache.capacity, 4, torch.device("cuda")

    def inputs(first: int):
        tokens = torch.arange(first, first + b, device=dev)
        positions = torch.arange(20, 20 + b, device=dev)
        mask = torch.zeros(1, 1, b, cap, dtype=torch.bool, device=dev)
        mask[0, 0, :, :20] = True
        mask[0, 0, :, 20:20 + b] = torch.ones(b, b, dtype=torch.bool, device=dev).tril()
        return tokens, positions, mask, torch.arange(20, 20 + b, device=dev)

    static = list(inputs(50))
    with torch.inference_mode():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                runner._static_step(*static, cache.k, cache.v)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = runner._static_step(*static, cache.k, cache.v)
        replays = []
        for first in (60, 70):
            new = inputs(first)
            for buf, x in zip(static, new):
                buf.copy_(x)
            graph.replay()
            torch.cuda.synchronize()
            replays.append(captured.clone())
            expected = runner._static_step(*new, cache.k, cache.v)
            assert torch.allclose(replays[-1].float(), expected.float(), rtol=1e-2, atol=1e-2)
        assert not torch.allclose(replays[0].float(), replays[1].float(), rtol=1e-2, atol=1e-2)   # new inputs: new states


def test_tensor_parallel_one_rank_on_cuda_with_nccl():
    from gsd_serve.models.checkpoints import DEFAULT_TARGET, load_model
    from gsd_serve.models.runner import DeviceModelRunner
    from gsd_serve.models.tensor_parallel import PipeTransport, TensorParallelRunner, TPGroup

    # the communicator: one NCCL rank, an all-reduce over it leaves the tensor as it was
    group = TPGroup()
    store = TPGroup.host_store(1, 30.0)
    group.connect("nccl", "127.0.0.1", store.port, 0, 1, 30.0, torch.device("cuda", 0), store=store)
    x = torch.arange(8, dtype=torch.float32, device="cuda")
    group.all_reduce(x)
    torch.cuda.synchronize()
    assert x.tolist() == list(range(8))
    group.shutdown()

    # the runner: rank 0 on the GPU (the NCCL backend's device), the same logits as the unsharded model there
    runner = TensorParallelRunner(PipeTransport(DEFAULT_TARGET, 1, backend="nccl", dtype=torch.bfloat16))
    try:
        assert runner.transport.local.device.type == "cuda"
        ref = DeviceModelRunner(load_model(DEFAULT_TARGET, torch.bfloat16), None, "cuda")
        tokens = torch.arange(200, 232)
        got, want = runner.forward(runner.new_cache(), tokens), ref.forward(ref.new_cache(), tokens)
        assert got.shape == want.shape and torch.allclose(got.float(), want.float(), atol=1e-2, rtol=0)
    finally:
        runner.close()
