"""The compiled static step (--compile): same tokens as the eager runner on a tiny Llama, shapes bucketed,
compile time reported, and the off switch."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from gsd_serve.core.config import SpecConfig
from gsd_serve.core.engine import Engine
from gsd_serve.models import ModelRunner
from gsd_serve.models.compiled import CompiledRunner, StaticKVCache
from gsd_serve.models.factory import compile_wanted


def tiny_pair():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    target = LlamaForCausalLM(cfg).eval()
    torch.manual_seed(1)
    draft = LlamaForCausalLM(LlamaConfig(**{**cfg.to_dict(), "num_hidden_layers": 1})).eval()
    return target, draft


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_compiled_steps_give_the_eager_tokens_and_reuse_their_shapes():
    target, draft = tiny_pair()
    compiled = CompiledRunner(target)
    secs = compiled.warmup(buckets=(1, 8))
    assert secs > 0 and compiled.compiled_shapes == {(1, 256), (8, 256)} and not compiled.fallbacks
    assert compiled.compile_seconds > 0
    eager = Engine(ModelRunner(target), ModelRunner(draft))
    fast = Engine(compiled, ModelRunner(draft))
    prompt = list(range(3, 40))
    ref = eager.generate(prompt, 24, SpecConfig.for_method("ar"))
    assert fast.generate(prompt, 24, SpecConfig.for_method("ar")).token_ids == ref.token_ids
    got = fast.generate(prompt, 24, SpecConfig.for_method("gsd", budget=8, max_depth=3, lookup=0))
    assert got.token_ids == ref.token_ids
    # trees of up to 8 tokens and steps reuse the two warmed-up shapes (one more for 2 or 4 rows at most)
    assert {(1, 256), (8, 256)} <= compiled.compiled_shapes and all(c == 256 for _, c in compiled.compiled_shapes)


def test_static_cache_keeps_and_truncates_like_the_dynamic_one():
    c = StaticKVCache(layers=2, kv_heads=1, head_dim=4, dtype=torch.float32, device="cpu")
    for layer in range(2):
        k = torch.arange(6.).view(1, 1, 6, 1).expand(1, 1, 6, 4)
        c.update(k, k, layer)
    assert c.length == 6 and c.capacity == 256
    c.keep(2, [3, 5])
    assert c.length == 4 and c.k[0, 0, 0, :4, 0].tolist() == [0, 1, 3, 5]
    c.truncate(3)
    assert c.length == 3


def test_compile_switches(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not compile_wanted("auto", cpu) and compile_wanted("auto", cuda) and compile_wanted("on", cpu)
    assert not compile_wanted("off", cuda)
    monkeypatch.setenv("GSD_SERVE_COMPILE", "0")
    assert not compile_wanted("on", cpu)
    with pytest.raises(ValueError, match="on, off or auto"):
        monkeypatch.delenv("GSD_SERVE_COMPILE")
        compile_wanted("sometimes", cpu)


def test_compiled_kernels_cache_in_the_project_cache_unless_the_user_chose_a_place(monkeypatch, tmp_path):
    import os

    from torch._inductor.runtime.cache_dir_utils import cache_dir as inductor_cache_dir

    from gsd_serve.core.config import cache_dir

    target, _ = tiny_pair()
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    inductor_cache_dir()      # what model loading does first: inductor writes its /tmp default into the environment
    CompiledRunner(target)
    assert inductor_cache_dir() == os.path.abspath(cache_dir() / "inductor")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))     # the user's choice stays
    CompiledRunner(target)
    assert inductor_cache_dir() == str(tmp_path)
