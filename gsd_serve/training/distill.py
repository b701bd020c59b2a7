"""`gsd-serve distill`: the phases of a distillation run, each resumable under cfg.out (rerun to continue).

An independent draft: data (data.py), then training (independent.py). A feature draft: data, the target's
features, then training-time test (features.py). `--phase` runs one of them alone.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..models.checkpoints import load_model, load_tokenizer
from ..models.dtypes import resolve_dtype
from . import features
from .config import DistillConfig
from .data import data_teacher, generate_data, load_data
from .independent import check_layers, train


def run(cfg: DistillConfig) -> Path:
    """The phases `cfg` asks for; returns what the last one wrote (the model directory after training)."""
    tokenizer = load_tokenizer(cfg.target)
    tokenizer.padding_side = "left"
    if cfg.kind == "features" and cfg.phase != "data":
        if cfg.phase == "all":
            generate_data(cfg, data_teacher(cfg), tokenizer)
        dev = cfg.torch_device()
        # the target on cfg.device, in `dtype` (auto: bf16 on a GPU)
        return features.run(cfg, lambda dtype: load_model(cfg.target, resolve_dtype(dtype, dev)).to(dev),
                            tokenizer)
    # the teacher writes data in cfg.dtype (bf16 on a CPU with fast bf16 units: 1.7x faster on AMX) or on
    # the target's GGUF blocks; training reads the target's layers and output layer in fp32
    if cfg.phase == "data":
        generate_data(cfg, data_teacher(cfg), tokenizer)
        return Path(cfg.out) / "data"
    if cfg.phase == "train":
        # Train on the shards already written (and, with follow_data, those a data process still writes).
        shards = sorted((Path(cfg.out) / "data").glob("shard-*.pt"))
        if not shards:
            raise ValueError(f"--phase train: no data shards under {Path(cfg.out) / 'data'}; run --phase data first")
    target = load_model(cfg.target, torch.float32)
    check_layers(cfg.layer_list(), target)
    if cfg.phase != "train":
        plain = cfg.target_weights == "dense" and cfg.dtype in ("auto", "float32") and cfg.torch_device().type == "cpu"
        shards = generate_data(cfg, target if plain else data_teacher(cfg), tokenizer)
    items = load_data(shards)
    for p in target.parameters():
        p.requires_grad_(False)
    return train(cfg, target, tokenizer, items, shards)
