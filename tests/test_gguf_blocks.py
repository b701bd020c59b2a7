"""--target-weights gguf: the default target's own Q4_1/Q8_0 blocks in this project's C kernels.

The same model as the dense fp32 target (the blocks are checked against its weights element by element at
load), summed in another order; batch-invariant, so every speculative method equals plain decoding in this
mode token for token, and the mode itself is compared with dense fp32 plain decoding (identical, or leaving
it first at a near-tie).
"""
import platform

import pytest
import torch

from gsd_serve.tools.bench import NEAR_TIE_EPS, divergence
from gsd_serve.core.config import SpecConfig
from gsd_serve.core.engine import Engine
from gsd_serve.core.kv_cache import KVCache
from gsd_serve.core.prompts import encode, stop_token_ids
from gsd_serve.core.sampling import SamplingParams
from gsd_serve.models import ModelRunner, draft_output_ids, load_default_pair
from gsd_serve.models.gguf_blocks import BlockLinear, dequantize, repack, use_gguf_blocks
from gsd_serve.models.gguf_kernels import PORTABLE, block_matmul

PROMPTS = ["What is the capital of France?", "Write a short poem about the sea.",
           "Explain how a bicycle works to a child.", "List three tips for learning a new language."]


def _random_blocks(kind: str, rows: int, cols: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(rows * 7 + cols)
    nb = cols // 32
    d = (torch.rand(rows, nb, generator=g) * 0.01 + 1e-3).half().view(torch.uint8).view(rows, nb, 2)
    if kind == "Q8_0":
        q = torch.randint(0, 256, (rows, nb, 32), generator=g, dtype=torch.uint8)
        return torch.cat([d, q], -1).reshape(rows, -1)
    m = (-torch.rand(rows, nb, generator=g) * 0.05).half().view(torch.uint8).view(rows, nb, 2)
    q = torch.randint(0, 256, (rows, nb, 16), generator=g, dtype=torch.uint8)
    return torch.cat([d, m, q], -1).reshape(rows, -1)


X86 = platform.machine() in ("x86_64", "AMD64")
# this CPU's build (its vector path), the portable build (the C paths only, as built where there are no x86
# intrinsics), and on x86 the build for an older CPU (no AVX, no F16C: the same C paths, intrinsics available)
ARCHES = ["native", PORTABLE] + (["x86-64-v2"] if X86 else [])


@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.parametrize("kind", ["Q4_1", "Q8_0"])
def test_block_matmul_is_the_dequantized_product_and_batch_invariant(kind, arch):
    rows, cols = 203, 576     # 203: outputs left over after every tile width (8, 4, 3)
    blocks = _random_blocks(kind, rows, cols)
    w = dequantize(kind, blocks, cols)
    blocks = repack(kind, blocks)
    x = torch.randn(13, cols, generator=torch.Generator().manual_seed(1))
    y = block_matmul(kind.lower(), x, blocks, rows, arch)
    ref = x.double() @ w.double().T
    assert (y.double() - ref).abs().max() <= 1e-5 * ref.abs().max()
    # every row alone, and every split of the rows, gives bit-identical outputs
    alone = torch.cat([block_matmul(kind.lower(), x[i:i + 1].contiguous(), blocks, rows, arch) for i in range(13)])
    assert torch.equal(y, alone)
    for a, b in ((3, 11), (0, 8), (2, 9), (5, 7), (1, 7), (4, 13), (0, 3), (1, 5), (2, 7)):   # every tile shape
        assert torch.equal(y[a:b], block_matmul(kind.lower(), x[a:b].contiguous(), blocks, rows, arch))


def test_ctypes_signatures_are_read_from_the_c_declarations():
    import ctypes

    from gsd_serve.models.gguf_kernels import SOURCE, declarations, library

    found = declarations(SOURCE.read_text())
    assert set(found) == {"q4_1_matmul", "q8_0_matmul", "rms_norm", "layer_forward"}
    P, I, F = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
    assert found["rms_norm"] == (None, [P, P, F, I, I, P])
    restype, args = found["layer_forward"]
    assert restype is None and len(args) == 27 and args[:6] == [I, P, I, I, P, F] and args[-5:] == [I, I, I, F, P]
    lib = library()
    for name, (restype, argtypes) in found.items():
        assert getattr(lib, name).argtypes == argtypes and getattr(lib, name).restype is restype
    # what the parser reads: file-scope prototypes only (a definition or a macro body is no declaration)
    snippet = """/* void commented(int a); */
    long f(const float *x, int n, long m, double s, size_t k, float *const *pp);
    void g(void);
    static void h(int a) { }
    #define DEF(NAME) void NAME(int a) {
    """
    assert declarations(snippet) == {"f": (ctypes.c_long, [P, I, ctypes.c_long, ctypes.c_double, ctypes.c_size_t, P]),
                                     "g": (None, [])}
    with pytest.raises(ValueError, match="no ctypes type"):
        declarations("void k(struct thing t);")


def test_the_portable_build_needs_no_x86_intrinsics(tmp_path):
    """-DGSD_PORTABLE builds the C paths alone, as a machine without <immintrin.h> builds them: with an
    immintrin.h that fails any build including it first on the include path, the portable build still builds
    (and on x86 the native one, which includes it, does not: the check can fail)."""
    import subprocess

    from gsd_serve.models.gguf_kernels import SOURCE, compile_flags, compiler

    poison = tmp_path / "include"
    poison.mkdir()
    (poison / "immintrin.h").write_text('#error "x86 intrinsics included"\n')

    def build(arch):
        return subprocess.run([compiler(), *compile_flags(arch), "-I", str(poison), str(SOURCE), "-o",
                               str(tmp_path / f"{arch}.so")], capture_output=True, text=True)

    r = build(PORTABLE)
    assert r.returncode == 0, r.stderr
    if X86:
        r = build("native")
        assert r.returncode != 0 and "x86 intrinsics included" in r.stderr


@pytest.fixture(scope="module")
def gguf_pair():
    target, draft, tokenizer = load_default_pair(torch.float32)
    assert use_gguf_blocks(target) == 7 * target.config.num_hidden_layers + 1
    return target, draft, tokenizer


def test_the_blocks_replace_every_projection_and_the_output_layer(gguf_pair):
    target, _, _ = gguf_pair
    layer = target.model.layers[0]
    assert all(isinstance(getattr(layer.self_attn, n), BlockLinear) for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
    assert all(isinstance(getattr(layer.mlp, n), BlockLinear) for n in ("gate_proj", "up_proj", "down_proj"))
    assert isinstance(target.lm_head, BlockLinear) and target.lm_head.kind == "Q8_0"
    assert layer.self_attn.q_proj.kind == "Q4_1"


def test_a_model_whose_weights_are_not_the_blocks_is_refused():
    target, _, _ = load_default_pair(torch.float32)
    with torch.no_grad():
        target.model.layers[3].mlp.up_proj.weight[0, 0] += 1e-3
    with pytest.raises(ValueError, match="do not match the model's weights"):
        use_gguf_blocks(target)
    bf16, _, _ = load_default_pair(torch.bfloat16)
    with pytest.raises(ValueError, match="float32"):
        use_gguf_blocks(bf16)


def test_forward_is_close_to_dense_and_trees_equal_steps_bit_for_bit(gguf_pair, default_pair):
    dense, g = ModelRunner(default_pair[0]), ModelRunner(gguf_pair[0])
    prompt = torch.arange(1000, 1120)
    with torch.inference_mode():
        cd, cg = dense.new_cache(), g.new_cache()
        ld, lg = dense.forward(cd, prompt), g.forward(cg, prompt)
        assert (ld - lg).abs().max() < 1e-3 and torch.equal(ld.argmax(-1), lg.argmax(-1))
        # a tree: 0 -> 1 -> 2, 0 -> 3 -> 4, 1 -> 5, verified in one forward under its mask
        parents, toks = [-1, 0, 1, 0, 3, 1], torch.tensor([5, 17, 300, 42, 7, 999])
        n, L = len(parents), cg.length
        mask = torch.zeros(n, L + n, dtype=torch.bool)
        mask[:, :L] = True
        depth = []
        for i, p in enumerate(parents):
            j = i
            while j >= 0:
                mask[i, L + j] = True
                j = parents[j]
            depth.append(0 if p < 0 else depth[p] + 1)
        pos = torch.tensor([L + d for d in depth])
        tree = g.forward(cg, toks, pos, mask[None, None])
        cd.truncate(L)
        assert (dense.forward(cd, toks, pos, mask[None, None]) - tree).abs().max() < 1e-3
        cg.truncate(L)
        steps = [g.forward(cg, toks[i:i + 1])[0] for i in (0, 1, 2)]
        assert all(torch.equal(tree[i], steps[i]) for i in (0, 1, 2))
        cg.truncate(L)   # a path whose ancestors sit at other slots in the tree than as steps: 0 -> 3 -> 4
        assert all(torch.equal(tree[i], g.forward(cg, toks[i:i + 1])[0]) for i in (0, 3, 4))
        cg.truncate(L)
        chunk = g.forward(cg, toks[:3])
        assert all(torch.equal(chunk[i], steps[i]) for i in range(3))
        # two sequences fused in one pass equal each alone
        c1, c2 = g.new_cache(), g.new_cache()
        g.forward(c1, prompt[:50])
        g.forward(c2, prompt[:80])
        a1, a2 = g.forward(c1, toks[:2]), g.forward(c2, toks[:3])
        c1.truncate(50)
        c2.truncate(80)
        f1, f2 = g.forward_many([c1, c2], [toks[:2], toks[:3]], [torch.arange(50, 52), torch.arange(80, 83)],
                                [None, None])
        assert torch.equal(f1, a1) and torch.equal(f2, a2)


@pytest.mark.slow
def test_the_portable_build_runs_the_target_as_the_vector_build_does(gguf_pair):
    """The whole GGUF target forward on the portable build: close to this CPU's build (other sum orders), and
    batch-invariant on its own (a token's hidden state is the same bits alone or among others)."""
    from gsd_serve.models.gguf_blocks import GGUFDecoder

    target = gguf_pair[0]
    native, portable = GGUFDecoder(target), GGUFDecoder(target, PORTABLE)
    prompt, toks = torch.arange(1000, 1040), torch.tensor([5, 17, 300, 42])
    with torch.inference_mode():
        hidden = {}
        for name, dec in (("native", native), ("portable", portable)):
            cache = KVCache()
            dec(cache, prompt, torch.arange(40), None)
            hidden[name] = dec(cache, toks, torch.arange(40, 44), None)
        assert (hidden["native"] - hidden["portable"]).abs().max() < 1e-3 * hidden["native"].abs().max()
        cache = KVCache()
        portable(cache, prompt, torch.arange(40), None)
        steps = [portable(cache, toks[i:i + 1], torch.tensor([40 + i]), None)[0] for i in range(4)]
        assert all(torch.equal(hidden["portable"][i], steps[i]) for i in range(4))


def test_without_a_c_compiler_the_target_runs_its_dense_weights(monkeypatch, tmp_path, default_pair):
    """No C compiler (and no kernels built yet): --target-weights auto falls back to dense weights (and the draft
    stays dense), generating exactly as plain decoding on dense weights; an explicit gguf says why it cannot."""
    from gsd_serve.core.config import cache_dir
    from gsd_serve.models import gguf_kernels, load_engine
    from gsd_serve.models.gguf_blocks import uses_gguf_blocks

    (tmp_path / "models").symlink_to(cache_dir() / "models")     # the converted models, but no kernels
    monkeypatch.setenv("GSD_SERVE_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.delenv("GSD_SERVE_GGUF_BLOCKS", raising=False)
    monkeypatch.setattr(gguf_kernels, "_libs", {})
    with pytest.raises(gguf_kernels.KernelBuildError, match="no C compiler"):
        gguf_kernels.library()
    engine, tokenizer = load_engine(dtype="float32", target_weights="auto", draft_weights="auto")
    assert engine.target.weights == "dense" and not uses_gguf_blocks(engine.target.model)
    assert not uses_gguf_blocks(engine.draft.model)
    assert not (tmp_path / "kernels").exists() and not (tmp_path / "cpu-target-weights.json").exists()
    dense = Engine(ModelRunner(default_pair[0]), None, stop_token_ids=engine.stop_token_ids)
    for text in PROMPTS[:2]:
        ids = encode(tokenizer, text)
        ref = dense.generate(ids, 24, SpecConfig.for_method("ar")).token_ids
        assert engine.generate(ids, 24, SpecConfig.for_method("gsd")).token_ids == ref, text
    with pytest.raises(gguf_kernels.KernelBuildError):
        load_engine(draft_spec=None, dtype="float32", target_weights="gguf")


@pytest.mark.slow
def test_gguf_speculation_equals_gguf_plain_decoding_and_dense_up_to_near_ties(gguf_pair, default_pair):
    target, draft, tokenizer = gguf_pair
    stops = stop_token_ids(tokenizer, target)
    engine = Engine(ModelRunner(target), ModelRunner(draft, draft_output_ids("default-independent")),
                    stop_token_ids=stops)
    dense = Engine(ModelRunner(default_pair[0]), None, stop_token_ids=stops)
    greedy = SamplingParams(temperature=0.0)
    for text in PROMPTS:
        ids = encode(tokenizer, text)
        plain = engine.generate(ids, 48, SpecConfig.for_method("ar"), greedy).token_ids
        for method in ("chain", "tree", "gsd"):
            assert engine.generate(ids, 48, SpecConfig.for_method(method), greedy).token_ids == plain, (text, method)
        ref = dense.generate(ids, 48, SpecConfig.for_method("ar"), greedy).token_ids
        if plain != ref:
            d = divergence(dense.target, ids, ref, plain, greedy)
            assert d["top2_gap"] < NEAR_TIE_EPS, (text, d)


def test_auto_measures_once_per_cpu_and_can_be_forced(monkeypatch, tmp_path, default_pair):
    import json

    from gsd_serve.models.factory import gguf_blocks_faster
    from gsd_serve.models.gguf_blocks import uses_gguf_blocks
    from gsd_serve.core.config import cache_dir
    from gsd_serve.models.factory import apply_target_weights

    # a fresh cache for the measurement, sharing the built kernels and converted models (rebuilding them is
    # not what this test checks, and costs a minute of gcc on 2 cores)
    real = cache_dir()
    for shared in ("kernels", "models"):
        (real / shared).mkdir(parents=True, exist_ok=True)
        (tmp_path / shared).symlink_to(real / shared)
    monkeypatch.setenv("GSD_SERVE_CACHE", str(tmp_path))
    monkeypatch.delenv("GSD_SERVE_GGUF_BLOCKS", raising=False)
    got = gguf_blocks_faster(default_pair[0])
    (entry,) = json.loads((tmp_path / "cpu-target-weights.json").read_text()).values()
    assert entry["gguf"] == got and entry["dense_ms"] > 0 and entry["gguf_ms"] > 0
    assert entry["gguf"] == (entry["gguf_ms"] < entry["dense_ms"])
    monkeypatch.setenv("GSD_SERVE_GGUF_BLOCKS", "0")
    target, _, _ = load_default_pair(torch.float32)
    assert not uses_gguf_blocks(apply_target_weights(target, "smollm2-135m-instruct", "auto"))
    monkeypatch.setenv("GSD_SERVE_GGUF_BLOCKS", "1")
    assert uses_gguf_blocks(apply_target_weights(target, "smollm2-135m-instruct", "auto"))
    with pytest.raises(ValueError, match="default target's own GGUF"):
        apply_target_weights(target, "/some/other/model", "gguf")
    with pytest.raises(ValueError, match="target weights must be"):
        apply_target_weights(target, "smollm2-135m-instruct", "int4")


def test_a_q8_draft_is_close_to_its_dense_self_and_speculation_stays_exact(gguf_pair):
    from gsd_serve.models.gguf_blocks import quantize_q8_0, use_q8_blocks, uses_gguf_blocks
    from gsd_serve.models.factory import apply_draft_weights

    w = torch.randn(64, 576, generator=torch.Generator().manual_seed(3))
    x = torch.randn(5, 576, generator=torch.Generator().manual_seed(4))
    y = block_matmul("q8_0", x, quantize_q8_0(w), 64)
    ref = x @ w.T
    assert (y - ref).abs().max() < 0.02 * ref.abs().max()             # lossy (8-bit weights), but close
    with pytest.raises(ValueError, match="draft weights must be"):
        apply_draft_weights(None, "int4")
    target, _, tokenizer = gguf_pair
    _, draft, _ = load_default_pair(torch.float32)
    assert apply_draft_weights(draft, "auto", "dense") is draft and not uses_gguf_blocks(draft)
    apply_draft_weights(draft, "auto", "gguf")
    assert uses_gguf_blocks(draft) and draft.model.layers[0].mlp.down_proj.kind == "Q8_0"
    runner = ModelRunner(draft, draft_output_ids("default-independent"))
    assert runner.weights == "gguf" and runner._head.kind == "Q8_0"
    stops = stop_token_ids(tokenizer, target)
    engine = Engine(ModelRunner(target), runner, stop_token_ids=stops)
    greedy = SamplingParams(temperature=0.0)
    accepted = 0
    for text in PROMPTS[:2]:
        ids = encode(tokenizer, text)
        plain = engine.generate(ids, 48, SpecConfig.for_method("ar"), greedy).token_ids
        res = engine.generate(ids, 48, SpecConfig.for_method("gsd"), greedy)
        assert res.token_ids == plain, text
        accepted += res.stats.accepted_tokens
    assert accepted > 0                                                   # the quantized draft still drafts
    with pytest.raises(ValueError, match="cannot run as Q8_0"):
        from transformers import LlamaConfig, LlamaForCausalLM
        tiny = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=40, intermediate_size=64, num_hidden_layers=1,
                                            num_attention_heads=2, num_key_value_heads=1))
        use_q8_blocks(tiny)


def test_distill_data_decodes_a_batch_together_exactly_as_each_prompt_alone(gguf_pair):
    """distill's data phase on GGUF blocks decodes a batch's sequences in one fused forward per token: greedy,
    each answer equals plain decoding of its prompt alone, and the kept top-k are the logits of each choice."""
    from gsd_serve.training.data import runner_answers

    target, _, tokenizer = gguf_pair
    runner = ModelRunner(target)
    eos = tokenizer.eos_token_id
    engine = Engine(runner, None, stop_token_ids={eos})
    prompts = [encode(tokenizer, t) for t in PROMPTS]
    items = runner_answers(runner, prompts, 20, eos, 8, 0.0, seed=0)
    for p, it in zip(prompts, items):
        assert it["prompt"] == p
        assert it["cont"] == engine.generate(p, 20, SpecConfig.for_method("ar")).token_ids
        assert it["top_ids"].shape == (len(it["cont"]), 8) and it["top_logits"].dtype == torch.float16
        assert it["top_ids"][:, 0].tolist() == it["cont"]
    # sampled answers are reproducible for a seed and differ from greedy
    a = runner_answers(runner, prompts, 20, eos, 8, 0.8, seed=3)
    b = runner_answers(runner, prompts, 20, eos, 8, 0.8, seed=3)
    assert [x["cont"] for x in a] == [x["cont"] for x in b] != [x["cont"] for x in items]


def test_magpie_prompts_are_written_by_the_target_on_its_blocks_and_resume(gguf_pair, tmp_path):
    """--magpie on GGUF blocks: the target writes user turns itself (sampled, one fused forward per token for
    the whole batch); the file is deterministic for a seed, each prompt a finished turn of 4+ words, kept once,
    and a rerun asking for more appends to what is there."""
    import json

    from gsd_serve.training.config import DistillConfig
    from gsd_serve.training.data import magpie_prompts

    target, _, tokenizer = gguf_pair

    def prompts(out, n):
        cfg = DistillConfig(out=str(out), magpie=n, gen_batch=6, seed=1)
        return [json.loads(line)["prompt"] for line in magpie_prompts(cfg, target, tokenizer).read_text().splitlines()]

    first = prompts(tmp_path / "a", 3)
    assert len(first) == 3 == len(set(first)) and all(len(p.split()) >= 4 for p in first)
    assert prompts(tmp_path / "b", 3) == first                  # deterministic for a seed
    more = prompts(tmp_path / "a", 5)
    assert len(more) == 5 == len(set(more)) and more[:3] == first
