"""Phase 2 of an independent draft: a draft made of a few of the target's own layers (copied as the starting
point), with the target's embedding, final norm and output layer, learns the target's distributions (soft
cross entropy = KL up to a constant) over a reduced output vocabulary: the tokens the target actually emits,
most frequent first. Checkpoints (`ckpt.pt`) every few steps; a rerun resumes.

The result (`--out/model`) is a standard transformers checkpoint, plus `draft_vocab.json` (the reduced output
vocabulary the engine uses to make the draft cheap); `pack_for_repo` writes the form the repository ships.
"""
from __future__ import annotations

import json
import random
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from .config import DistillConfig
from .data import choose_vocab, held_out, load_data, split_held_out, teacher_rows
from .loop import learning_rate, make_batches, progress, resume_checkpoint, save_checkpoint


def build_draft(target, layers: list[int]):
    """A copy of the target with only `layers` (in that order) between its embedding and its head."""
    import copy

    config = copy.deepcopy(target.config)
    config.num_hidden_layers = len(layers)
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in layers]
    config.tie_word_embeddings = True
    draft = type(target)(config)
    state = {}
    for name, tensor in target.state_dict().items():
        if name.startswith("model.layers."):
            idx = int(name.split(".")[2])
            if idx in layers:
                new = layers.index(idx)
                state[name.replace(f"model.layers.{idx}.", f"model.layers.{new}.", 1)] = tensor.clone()
        elif name != "lm_head.weight":
            state[name] = tensor.clone()
    missing, unexpected = draft.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    draft.tie_weights()
    return draft


def load_init(draft, init_dir: str) -> None:
    """Start from an earlier draft (e.g. the shipped one) instead of copies of the target's layers: a
    warm start, so that more target text improves a trained draft without paying its first steps again.
    The embedding and output layer are the target's either way."""
    from safetensors.torch import load_file

    tensors = load_file(Path(init_dir) / "model.safetensors")
    own = {k: v.float() for k, v in tensors.items() if "embed_tokens" not in k and k != "lm_head.weight"}
    expected = {k for k in draft.state_dict() if "embed_tokens" not in k and k != "lm_head.weight"}
    if set(own) != expected:
        raise ValueError(f"--init: '{init_dir}' is not a draft of this shape "
                         f"(missing {sorted(expected - set(own))[:3]}, unexpected {sorted(set(own) - expected)[:3]})")
    draft.load_state_dict(own, strict=False)


def check_layers(layers: list[int], target) -> None:
    n_layers = target.config.num_hidden_layers
    if any(not 0 <= i < n_layers for i in layers):
        raise ValueError(f"--layers: the target has layers 0..{n_layers - 1}, got {layers}")


def collate(batch: list[dict], full_to_small: torch.Tensor, pad: int):
    import torch
    seqs = [it["prompt"] + it["cont"] for it in batch]
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        attn[i, : len(s)] = 1
    return (ids, attn) + teacher_rows(batch, full_to_small)


def distill_loss(draft, head_weight, batch_tensors, output_ids):
    import torch
    import torch.nn.functional as F
    ids, attn, rows, cols, small, probs, teacher_top1 = batch_tensors
    hidden = draft.model(input_ids=ids, attention_mask=attn).last_hidden_state[rows, cols]
    logits = F.linear(hidden, head_weight)
    logp = torch.log_softmax(logits.float(), dim=-1)
    loss = -(probs * logp.gather(1, small)).sum(-1).mean()
    agree = (output_ids[logits.argmax(-1)] == teacher_top1).float().mean()
    return loss, agree


def train(cfg: DistillConfig, target, tokenizer, items: list[dict], shards_loaded: list[Path] | None = None) -> Path:
    import torch
    from ..models.checkpoints import DRAFT_VOCAB_FILE
    out = Path(cfg.out)
    shards_loaded = list(shards_loaded or [])
    torch.manual_seed(cfg.seed)
    layers = cfg.layer_list()
    check_layers(layers, target)
    always = {t for t in (tokenizer.eos_token_id, tokenizer.bos_token_id) if t is not None}
    output_ids = choose_vocab(items, cfg.vocab, target.config.vocab_size, always)
    full_to_small = torch.full((target.config.vocab_size,), -1, dtype=torch.long)
    full_to_small[output_ids] = torch.arange(output_ids.numel())
    draft = build_draft(target, layers)
    if cfg.init and not (out / "ckpt.pt").exists():
        load_init(draft, cfg.init)
        print(f"distill: starting from the draft in {cfg.init}", file=sys.stderr)
    for p in draft.model.embed_tokens.parameters():
        p.requires_grad_(False)
    head_weight = draft.get_output_embeddings().weight.detach()[output_ids]
    params = [p for p in draft.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0, betas=(0.9, 0.98))
    rng = random.Random(cfg.seed)
    held, train_items = [], []
    held, train_items = split_held_out(items, 128)
    ckpt = out / "ckpt.pt"
    step, history = resume_checkpoint(ckpt, draft, opt, rng)
    batches = make_batches(train_items, cfg.batch, rng)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    n_tokens = sum(len(it["cont"]) for it in train_items)
    print(f"distill: {len(train_items)} answers, {n_tokens} target tokens; draft layers {layers}, "
          f"output vocabulary {output_ids.numel()}; {cfg.steps} steps", file=sys.stderr)
    start = time.time()
    first_step = step
    seen = history[-1]["tokens"] if history else 0
    seen_at_start = seen

    def save() -> None:
        save_checkpoint(ckpt, draft, opt, rng, step, history, skip=("embed_tokens", "lm_head"))

    if not history:  # the starting point of the learning curve
        with torch.no_grad():
            h_loss, h_agree = distill_loss(draft.eval(), head_weight, collate(held, full_to_small, pad), output_ids)
        history.append({"step": 0, "tokens": 0, "train_loss": None, "train_top1": None,
                        "heldout_loss": h_loss.item(), "heldout_top1": h_agree.item(), "seconds": 0.0})
    draft.train()
    ema_loss = ema_agree = None
    while step < cfg.steps:
        batch = next(batches)
        tensors = collate(batch, full_to_small, pad)
        lr = learning_rate(cfg, step)
        for g in opt.param_groups:
            g["lr"] = lr
        loss, agree = distill_loss(draft, head_weight, tensors, output_ids)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        if cfg.follow_data and step % 50 == 0:
            new_shards = [p for p in sorted((out / "data").glob("shard-*.pt")) if p not in shards_loaded]
            if new_shards:
                fresh = [it for it in load_data(new_shards) if not held_out(it)]
                shards_loaded.extend(new_shards)
                train_items.extend(fresh)
                batches = make_batches(train_items, cfg.batch, rng)
                print(f"\ndistill: +{len(fresh)} answers ({len(train_items)} in all)", file=sys.stderr)
        seen += int(tensors[2].numel())  # distilled positions
        ema_loss = loss.item() if ema_loss is None else 0.95 * ema_loss + 0.05 * loss.item()
        ema_agree = agree.item() if ema_agree is None else 0.95 * ema_agree + 0.05 * agree.item()
        elapsed = time.time() - start
        progress(step, cfg.steps, start, f"loss {ema_loss:.3f} top1 {ema_agree:.3f} "
                  f"{(seen - seen_at_start) / max(elapsed, 1e-9):.0f} tok/s", first_step)
        if step % cfg.ckpt_every == 0 or step == cfg.steps:
            draft.eval()
            with torch.no_grad():
                h_loss, h_agree = distill_loss(draft, head_weight, collate(held, full_to_small, pad), output_ids)
            draft.train()
            history.append({"step": step, "tokens": seen, "train_loss": ema_loss, "train_top1": ema_agree,
                            "heldout_loss": h_loss.item(), "heldout_top1": h_agree.item(), "seconds": elapsed})
            save()
            if cfg.time_limit_s and elapsed > cfg.time_limit_s:
                print(f"\ndistill: time limit reached at step {step}", file=sys.stderr)
                break
    print(file=sys.stderr)
    draft.eval()
    model_dir = out / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    draft.config.gsd_distill = {**asdict(cfg), "steps_done": step}
    draft.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    (model_dir / DRAFT_VOCAB_FILE).write_text(json.dumps({"token_ids": output_ids.tolist()}))
    (out / "history.json").write_text(json.dumps(history, indent=1))
    return model_dir


def pack_for_repo(model_dir: Path, dest: Path) -> None:
    """Write the draft without the tensors it shares with the default target, in bfloat16."""
    import torch
    from ..models.checkpoints import DRAFT_VOCAB_FILE
    from safetensors.torch import load_file, save_file

    dest.mkdir(parents=True, exist_ok=True)
    tensors = load_file(model_dir / "model.safetensors")
    shared = [k for k in tensors if "embed_tokens" in k or k == "lm_head.weight"]
    own = {k: v.to(torch.bfloat16).contiguous() for k, v in tensors.items() if k not in shared}
    save_file(own, dest / "model.safetensors", metadata={"format": "pt"})
    (dest / "shared_with_target.json").write_text(json.dumps({"tensors": ["model.embed_tokens.weight"]}))
    for f in ("config.json", "generation_config.json", DRAFT_VOCAB_FILE):
        if (model_dir / f).exists():
            (dest / f).write_bytes((model_dir / f).read_bytes())
