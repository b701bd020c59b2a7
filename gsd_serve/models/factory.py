"""The factory: what a target and its draft run in, and the runners that run them.

Everything that decides how a model runs is chosen here, from the user's choices, the environment switches
(switches.py) and measurements on this CPU (remembered in the cache directory):

    dtype            --dtype: dtypes.resolve_dtype (auto: bf16 on GPUs and where the CPU measures it faster)
    target weights   --target-weights: resolve_target_weights (dense, or the default target's own GGUF blocks
                     where they measure faster: gguf_blocks_faster), applied by apply_target_weights
    draft weights    --draft-weights: apply_draft_weights (dense, or Q8_0 blocks where the target runs GGUF blocks)
    compilation      --compile: compile_wanted
    the runner       make_runner / load_engine: a ModelRunner, DeviceModelRunner, CompiledRunner,
                     FeatureDraftRunner or tensor-parallel runner

A choice is applied to the model itself (its projections and output layer swapped for block weights), so
a runner reads what it runs from the model it is given; nothing else decides it.
"""
from __future__ import annotations

import sys

import torch

from .checkpoints import (DEFAULT_DRAFT, DEFAULT_TARGET, SHIPPED_DRAFT_DIR, ModelLoadError, default_draft_spec,
                          draft_output_ids, load_model, load_tokenizer, resolve, same_tokenizer, truncated_copy)
from .dtypes import dtype_name, resolve_dtype
from .feature_draft import (FeatureDraft, FeatureDraftRunner, is_feature_draft, is_feature_draft_model,
                            load_feature_draft)
from .gguf_blocks import use_gguf_blocks, use_q8_blocks, uses_gguf_blocks
from .gguf_kernels import KernelBuildError
from .hardware import cpu_key, remembered
from .runner import DeviceModelRunner, ModelRunner
from .switches import forced


# ---------------------------------------------------------------- the choices

def resolve_target_weights(target, target_spec: str, choice: str = "auto", device: str | None = None) -> str:
    """"dense" or "gguf" for a --target-weights choice: "gguf" runs the default target's projections and output
    layer on its own GGUF blocks (gguf_blocks.py), "auto" does so for the default target on a CPU where
    that measures faster."""
    if choice not in ("auto", "dense", "gguf"):
        raise ValueError(f"target weights must be 'auto', 'dense' or 'gguf', got '{choice}'")
    on_cpu = (device or "cpu") == "cpu" and next(target.parameters()).device.type == "cpu"
    if choice == "gguf" and (target_spec != DEFAULT_TARGET or not on_cpu):
        raise ValueError("--target-weights gguf runs the default target's own GGUF blocks, on a CPU")
    if choice == "auto":
        return "gguf" if target_spec == DEFAULT_TARGET and on_cpu and gguf_blocks_faster(target) else "dense"
    return choice


def gguf_blocks_faster(dense_model: torch.nn.Module) -> bool:
    """Whether the default target runs faster on its GGUF blocks than as `dense_model` (its dense form in the
    chosen dtype) on this CPU: measured once per CPU, thread count and dtype (a step plus a 16-token tree,
    each way), then remembered in the cache directory. GSD_SERVE_GGUF_BLOCKS=1/0 forces the answer."""
    force = forced("GSD_SERVE_GGUF_BLOCKS")
    if force is not None:
        return force

    def measure() -> dict:
        blocks = load_model(DEFAULT_TARGET, torch.float32)
        use_gguf_blocks(blocks)
        # a decoding step plus a 16-token tree each way, from the runners' measured forward times
        dense, gguf = ModelRunner(dense_model), ModelRunner(blocks)
        dense_s = dense.forward_seconds(1) + dense.forward_seconds(16)
        gguf_s = gguf.forward_seconds(1) + gguf.forward_seconds(16)
        return {"dense_ms": round(dense_s * 1e3, 2), "gguf_ms": round(gguf_s * 1e3, 2), "gguf": gguf_s < dense_s}

    key = f"{cpu_key()}|{dtype_name(next(dense_model.parameters()).dtype)}"
    try:
        return bool(remembered("cpu-target-weights.json", key, measure)["gguf"])
    except KernelBuildError as e:
        print(f"gsd-serve: GGUF block weights unavailable here ({e}); using dense weights", file=sys.stderr)
        return False


def compile_wanted(mode: str | None, device: torch.device) -> bool:
    """Whether `--compile` mode (on, off, auto) compiles on `device`."""
    if forced("GSD_SERVE_COMPILE") is False:
        return False
    mode = (mode or "off").lower()
    if mode not in ("on", "off", "auto"):
        raise ValueError(f"--compile must be on, off or auto, got '{mode}'")
    return mode == "on" or (mode == "auto" and device.type == "cuda")


def apply_target_weights(target, target_spec: str, choice: str = "auto", device: str | None = None):
    """The target with the weights `choice` resolves to (block weights run with fp32 activations: a target
    loaded in another dtype is reloaded in fp32)."""
    if resolve_target_weights(target, target_spec, choice, device) == "gguf":
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
    use_q8_blocks(draft.float())
    return draft

# ---------------------------------------------------------------- loading and assembling

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
        draft = load_feature_draft(resolve(draft_spec), target, resolve_dtype(dtype))
        return target, draft, tokenizer, draft.output_ids
    draft = load_model(draft_spec, dtype)
    if draft.config.vocab_size != target.config.vocab_size:
        raise ModelLoadError(
            f"draft vocabulary ({draft.config.vocab_size}) differs from the target's ({target.config.vocab_size})")
    return target, draft, tokenizer, draft_output_ids(draft_spec)


def runner_device(device: str | torch.device | None) -> torch.device:
    """The device a runner for `device` runs on: None or "" is the CPU, "auto" is CUDA when torch sees a GPU
    (torch.cuda.is_available()), else the CPU; anything else is that torch device."""
    if device in (None, ""):
        return torch.device("cpu")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def make_runner(model, output_ids=None, device: str | torch.device | None = None):
    """A runner for `model` on `device` (runner_device: None or "cpu" here, "auto" CUDA when there is one): a
    FeatureDraftRunner for a feature draft, a ModelRunner on the CPU, else a DeviceModelRunner (inputs moved
    to the device, logits back to the CPU)."""
    dev = runner_device(device)
    if isinstance(model, FeatureDraft):
        if dev.type != "cpu":
            model = model.to(dev)
        return FeatureDraftRunner(model)
    if dev.type == "cpu":
        # a plain ModelRunner: it fuses sessions' forwards and packs linears, which DeviceModelRunner does not
        return ModelRunner(model, output_ids)
    return DeviceModelRunner(model, output_ids, dev)


def load_engine(target_spec: str = DEFAULT_TARGET, draft_spec: str | None = DEFAULT_DRAFT, *,
                dtype: torch.dtype | str = "auto", tensor_parallel_size: int = 1, spec=None,
                target_weights: str = "auto", compile: str = "auto", draft_kind: str = "auto",
                draft_weights: str = "auto", device: str | None = None, draft_device: str | None = None):
    """An in-process Engine over the named target and draft (draft_spec None: plain decoding only), and
    the tokenizer, both models in `dtype` ("auto": see dtypes.py). With tensor_parallel_size > 1 the
    target runs as that many ranks (processes). target_weights "gguf": the default target's projections and
    output layer run on its own GGUF blocks (gguf_blocks.py; fp32 activations, batch-invariant); "auto":
    that for the default target on a CPU where it measures faster than dense weights, else dense; draft_weights
    (apply_draft_weights) "q8" runs the draft on Q8_0 blocks, "auto" where the target runs GGUF blocks. compile: on, off or
    auto (CUDA only) runs the target's small forwards as compiled static-shape steps (compiled.py). device:
    where the target runs (runner_device: None the CPU, "auto" CUDA when present, "cuda", "cuda:1"...);
    draft_device: where the draft runs (None: the target's device)."""
    if target_weights not in ("auto", "dense", "gguf"):
        raise ValueError(f"target weights must be 'auto', 'dense' or 'gguf', got '{target_weights}'")
    if target_weights == "gguf" and (target_spec != DEFAULT_TARGET or tensor_parallel_size != 1):
        raise ValueError("--target-weights gguf runs the default target's own GGUF blocks, in one process")
    from ..core.engine import Engine
    from ..core.prompts import stop_token_ids

    dev = runner_device(device)
    draft_dev = runner_device(draft_device) if draft_device not in (None, "") else dev
    dtype = resolve_dtype(dtype, dev)

    if tensor_parallel_size != 1:
        if dev.type != "cpu":
            raise ValueError("in process, tensor parallelism runs its ranks on the CPU (gloo) or NCCL on "
                             "the GPUs it finds itself: leave --device out with --tensor-parallel-size")
        from .tensor_parallel import check_spec_tp_size
        check_spec_tp_size(target_spec, tensor_parallel_size)  # refuse a size that does not divide the heads first
    target, draft, tokenizer, output_ids = load_pair(target_spec, draft_spec, dtype, draft_kind)
    stops = stop_token_ids(tokenizer, target)
    if tensor_parallel_size != 1:
        from .tensor_parallel import make_target_runner
        target_runner = make_target_runner(target_spec, tensor_parallel_size, model=target,  # rank 0 shards it
                                           dtype=dtype)
    else:
        target_weights = resolve_target_weights(target, target_spec, target_weights, dev.type)
        target = apply_target_weights(target, target_spec, target_weights, dev.type)
        draft = apply_draft_weights(draft, draft_weights, target_weights)
        from .compiled import CompiledRunner

        wants_features = draft is not None and is_feature_draft_model(draft)
        if compile_wanted(compile, dev) and not wants_features \
                and not uses_gguf_blocks(target):    # block weights run their own kernels, uncompiled
            target_runner = CompiledRunner(target.to(dev))
        else:
            target_runner = make_runner(target, None, dev)
    draft_runner = make_runner(draft, output_ids, draft_dev) if draft is not None else None
    return Engine(target_runner, draft_runner, stop_token_ids=stops, spec=spec), tokenizer
