"""A draft that reads the target's features (models/feature_draft.py): `gsd-serve distill --kind features`.

Phases under --out, each resumable (rerun the same command):
1. data      the target answers the prompt set (shared with the independent draft: data.py).
2. features  a teacher-forced target pass over every prompt + answer keeps the target's hidden states
             after the feature layers (bf16, `features/feat-*.pt`, one file per data shard).
3. train     training-time test (EAGLE-3): the draft is unrolled `ttt_steps` drafting steps deep on the
             data. Step 1 reads the target's features of the previous position (a root in drafting);
             step k reads the draft's own state from step k-1 at the previous position and attends to
             the step-1 cache up to its root plus its own chain of drafted positions, exactly the context
             a node k-1 levels deep has when drafting. Every step learns the target's distribution of
             the next token (soft cross entropy over the reduced vocabulary), weighted 0.8^(k-1).
The result (`--out/model`) is a feature-draft checkpoint (config.json, model.safetensors, draft_vocab.json).
"""
from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..models.feature_draft import FeatureDraft, load_feature_draft, new_feature_draft, save_feature_draft
from .data import choose_vocab, split_held_out, teacher_rows
from .loop import learning_rate, make_batches, progress, resume_checkpoint, save_checkpoint

TTT_DECAY = 0.8


def parse_layers(text: str) -> tuple[int, ...]:
    try:
        layers = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"--feature-layers must be comma-separated layer indices, got '{text}'") from None
    if not layers:
        raise ValueError("--feature-layers names no layer")
    return layers


# ---------------------------------------------------------------- phase 2: target features
def feature_file(out: Path, shard: Path) -> Path:
    return out / "features" / shard.name.replace("shard-", "feat-")


@torch.inference_mode()
def extract_features(out: Path, shards: list[Path], target, layers: tuple[int, ...], batch_tokens: int = 4096) -> None:
    """For every data shard, the target's features of every position of every prompt + answer."""
    from ..models.runner import ModelRunner

    runner = ModelRunner(target)
    dev = next(target.parameters()).device
    (out / "features").mkdir(parents=True, exist_ok=True)
    todo = [s for s in shards if not feature_file(out, s).exists()]
    print(f"distill: target features (layers {list(layers)}) of {len(todo)} of {len(shards)} shards -> "
          f"{out / 'features'}", file=sys.stderr)
    start, done_tokens = time.time(), 0
    for n, shard in enumerate(todo):
        items = torch.load(shard, weights_only=True)
        seqs = [it["prompt"] + it["cont"] for it in items]
        feats: list[torch.Tensor | None] = [None] * len(seqs)
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        group: list[int] = []

        def flush() -> None:
            caches = [runner.new_cache() for _ in group]
            toks = [torch.tensor(seqs[i], dtype=torch.long, device=dev) for i in group]
            pos = [torch.arange(len(seqs[i]), device=dev) for i in group]
            outs = runner._lean.forward_many(caches, toks, pos, [None] * len(group), collect=layers)
            for i, (_, f) in zip(group, outs):
                feats[i] = f.to(torch.bfloat16).cpu().clone()

        for i in order:
            if group and sum(len(seqs[j]) for j in group) + len(seqs[i]) > batch_tokens:
                flush()
                group = []
            group.append(i)
        if group:
            flush()
        done_tokens += sum(map(len, seqs))
        tmp = feature_file(out, shard).with_suffix(".tmp")
        torch.save(feats, tmp)
        tmp.replace(feature_file(out, shard))
        progress(n + 1, len(todo), start, f"{done_tokens} positions ({done_tokens / (time.time() - start):.0f}/s)")
    print(file=sys.stderr)


def load_items(out: Path, shards: list[Path]) -> list[dict]:
    """Data items with their features (`feats`: [len(prompt) + len(cont), feature_width] bf16)."""
    items = []
    for s in shards:
        f = feature_file(out, s)
        if not f.exists():
            continue
        data, feats = torch.load(s, weights_only=True), torch.load(f, weights_only=True)
        for it, ft in zip(data, feats):
            if len(it["cont"]):
                it["feats"] = ft
                items.append(it)
    return items


# ---------------------------------------------------------------- phase 3: training-time test
def collate(batch: list[dict], full_to_small: torch.Tensor, pad: int):
    """Padded tokens [B, T], previous-position features [B, T, W] (row j holds position j-1's), and the
    distilled rows (b, j: predicting token j+1) with the teacher's distribution over the draft vocabulary."""
    seqs = [it["prompt"] + it["cont"] for it in batch]
    width = max(map(len, seqs))
    w = batch[0]["feats"].shape[-1]
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    prev = torch.zeros(len(seqs), width, w, dtype=torch.bfloat16)
    for i, (it, s) in enumerate(zip(batch, seqs)):
        ids[i, : len(s)] = torch.tensor(s)
        prev[i, 1: len(s)] = it["feats"][: len(s) - 1]
    return (ids, prev) + teacher_rows(batch, full_to_small)


def ttt_mask(width: int, step: int) -> torch.Tensor:
    """[width, step * width] keys visible to step `step`'s query j (True = attend): step 1's keys up to
    j - step + 1 (the root's cache) and, for m = 2..step, step m's key at position j - step + m (the chain
    of drafted positions from the root's child to the query itself)."""
    j = torch.arange(width)[:, None]
    key = torch.arange(width)[None, :]
    blocks = [key <= j - step + 1]
    for m in range(2, step + 1):
        blocks.append(key == j - step + m)
    return torch.cat(blocks, dim=1)


def ttt_forward(draft: FeatureDraft, ids: torch.Tensor, prev: torch.Tensor, steps: int, rows, cols):
    """Per step, the draft's logits at the distilled rows (step k: the rows as nodes k-1 levels deep)."""
    b, width = ids.shape
    pos = torch.arange(width, device=ids.device).expand(b, width)
    feat = draft.fused(prev)
    keys, values, out = [], [], []
    for k in range(1, steps + 1):
        x, q, kk, vv = draft.qkv(ids, feat, pos)
        keys.append(kk)
        values.append(vv)
        kcat, vcat = torch.cat(keys, dim=-2), torch.cat(values, dim=-2)
        mask = ttt_mask(width, k).to(ids.device)
        attn = F.scaled_dot_product_attention(q, kcat, vcat, attn_mask=mask,
                                              enable_gqa=kcat.shape[1] != q.shape[1])
        states = draft.finish(x, attn)
        out.append(draft.logits(states[rows, cols]))
        # the next step's row j reads this step's state at j - 1 (its parent's), row 0 reads zeros
        feat = torch.cat([torch.zeros_like(states[:, :1]), states[:, :-1]], dim=1)
    return out


def ttt_loss(draft, tensors, steps: int):
    dev = draft.embed.weight.device
    ids, prev, rows, cols, small, probs, teacher_top1 = (t.to(dev) for t in tensors)   # collate builds them on the CPU
    if dev.type == "cuda":
        autocast = torch.autocast("cuda", dtype=torch.bfloat16)
    else:
        # bf16 autocast only where the CPU multiplies bf16 natively (AMX, avx512_bf16): elsewhere it is emulated
        # and slower than fp32
        from ..models.dtypes import cpu_prefers_bf16

        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=cpu_prefers_bf16())
    with autocast:
        per_step = ttt_forward(draft, ids, prev, steps, rows, cols)
    loss, agree = 0.0, []
    norm = sum(TTT_DECAY ** k for k in range(steps))
    for k, logits in enumerate(per_step):
        logp = torch.log_softmax(logits.float(), dim=-1)
        loss = loss + TTT_DECAY ** k / norm * -(probs * logp.gather(1, small)).sum(-1).mean()
        agree.append((draft.output_ids[logits.argmax(-1)] == teacher_top1).float().mean().item())
    return loss, agree


def _held_out_eval(draft, held: list[dict], full_to_small, pad: int, steps: int, batch: int):
    draft.eval()
    tot_loss, agree, n = 0.0, [0.0] * steps, 0
    with torch.no_grad():
        for i in range(0, len(held), batch):
            part = held[i: i + batch]
            loss, a = ttt_loss(draft, collate(part, full_to_small, pad), steps)
            tot_loss += loss.item() * len(part)
            agree = [x + y * len(part) for x, y in zip(agree, a)]
            n += len(part)
    draft.train()
    return tot_loss / n, [a / n for a in agree]


def train(cfg, target, tokenizer, items: list[dict], layers: tuple[int, ...]) -> Path:
    out = Path(cfg.out)
    torch.manual_seed(cfg.seed)
    always = {t for t in (tokenizer.eos_token_id, tokenizer.bos_token_id) if t is not None}
    init = load_feature_draft(cfg.init, target) if cfg.init else None
    # a warm start keeps its output vocabulary; a cold one takes the tokens the target emits most
    output_ids = init.output_ids if init is not None else choose_vocab(items, cfg.vocab, target.config.vocab_size,
                                                                        always)
    full_to_small = torch.full((target.config.vocab_size,), -1, dtype=torch.long)
    full_to_small[output_ids] = torch.arange(output_ids.numel())
    draft = new_feature_draft(target, output_ids, layers)
    if init is not None and not (out / "ckpt-features.pt").exists():
        if init.config != draft.config:
            raise ValueError(f"--init: '{cfg.init}' is not a feature draft of this shape")
        draft.load_state_dict(init.state_dict())
        print(f"distill: starting from the draft in {cfg.init}", file=sys.stderr)
    draft.to(next(target.parameters()).device)          # trains where the target runs (cfg.device)
    for p in (draft.embed.weight, draft.head.weight):
        p.requires_grad_(False)
    params = [p for p in draft.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0, betas=(0.9, 0.98))
    rng = random.Random(cfg.seed)
    held, train_items = split_held_out(items, 64)
    ckpt = out / "ckpt-features.pt"
    step, history = resume_checkpoint(ckpt, draft, opt, rng)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    n_tokens = sum(len(it["cont"]) for it in train_items)
    print(f"distill: feature draft on {len(train_items)} answers, {n_tokens} target tokens; feature layers "
          f"{list(layers)}, {cfg.ttt_steps} drafting steps per position, output vocabulary {output_ids.numel()}; "
          f"{cfg.steps} steps", file=sys.stderr)
    batches = make_batches(train_items, cfg.batch, rng)
    start, first_step = time.time(), step
    seen = history[-1]["tokens"] if history else 0
    seen_at_start = seen

    def save() -> None:
        save_checkpoint(ckpt, draft, opt, rng, step, history, skip=("embed.weight", "head.weight"))

    def record(train_loss=None, train_top1=None) -> None:
        h_loss, h_agree = _held_out_eval(draft, held, full_to_small, pad, cfg.ttt_steps, cfg.batch)
        history.append({"step": step, "tokens": seen, "train_loss": train_loss, "train_top1": train_top1,
                        "heldout_loss": h_loss, "heldout_top1": h_agree[0], "heldout_top1_by_depth": h_agree,
                        "seconds": time.time() - start})

    if not history:
        record()
    draft.train()
    ema_loss = ema_agree = None
    while step < cfg.steps:
        tensors = collate(next(batches), full_to_small, pad)
        lr = learning_rate(cfg, step)
        for g in opt.param_groups:
            g["lr"] = lr
        loss, agree = ttt_loss(draft, tensors, cfg.ttt_steps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        seen += int(tensors[2].numel())
        ema_loss = loss.item() if ema_loss is None else 0.95 * ema_loss + 0.05 * loss.item()
        ema_agree = agree[0] if ema_agree is None else 0.95 * ema_agree + 0.05 * agree[0]
        elapsed = time.time() - start
        progress(step, cfg.steps, start, f"loss {ema_loss:.3f} top1 {ema_agree:.3f} "
                  f"{(seen - seen_at_start) / max(elapsed, 1e-9):.0f} tok/s", first_step)
        if step % cfg.ckpt_every == 0 or step == cfg.steps:
            record(ema_loss, ema_agree)
            save()
            h = history[-1]
            print(f"\n  step {step}: held-out loss {h['heldout_loss']:.3f}, top-1 by depth "
                  f"{', '.join(f'{a:.3f}' for a in h['heldout_top1_by_depth'])}", file=sys.stderr)
            if cfg.time_limit_s and elapsed > cfg.time_limit_s:
                print(f"distill: time limit reached at step {step}", file=sys.stderr)
                break
    print(file=sys.stderr)
    model_dir = out / "model"
    save_feature_draft(draft.eval().cpu(), model_dir)
    (out / "history.json").write_text(json.dumps(history, indent=1))
    return model_dir


def run(cfg, target_loader, tokenizer) -> Path:
    """The features and train phases (the data phase is data.py's)."""
    out = Path(cfg.out)
    layers = parse_layers(cfg.feature_layers)
    shards = sorted((out / "data").glob("shard-*.pt"))
    if not shards:
        raise ValueError(f"no data shards under {out / 'data'}; run --phase data first")
    if cfg.phase in ("all", "features"):
        extract_features(out, shards, target_loader(cfg.dtype), layers)
        if cfg.phase == "features":
            return out / "features"
    items = load_items(out, shards)
    for extra in [Path(d) for d in cfg.extra_data.split(",") if d.strip()]:
        more = load_items(extra, sorted((extra / "data").glob("shard-*.pt")))
        if not more:
            raise ValueError(f"--extra-data {extra}: no data with target features there")
        items += more
        print(f"distill: + {len(more)} answers from {extra}", file=sys.stderr)
    if not items:
        raise ValueError(f"no target features under {out / 'features'}; run --phase features first")
    target = target_loader(torch.float32)
    for p in target.parameters():
        p.requires_grad_(False)
    return train(cfg, target, tokenizer, items, layers)
