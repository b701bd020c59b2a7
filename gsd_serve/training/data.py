"""Phase 1 of distillation: the target answers the prompt set (greedy, and optionally sampled), keeping its
top-K next-token distribution for every token it writes (`data/shard-*.pt`); and what training takes from that
data: the held-out split and the draft's reduced output vocabulary."""
from __future__ import annotations

import json
import random
import sys
import time
import zlib
from pathlib import Path

import torch

from ..core.prompts import encode, load_prompts
from .config import DistillConfig
from .loop import progress

MAGPIE_MAX_TOKENS = 96


def magpie_prompts(cfg: DistillConfig, target, tokenizer) -> Path:
    """User prompts written by the target itself (Magpie, arXiv 2406.08464): the chat template up to the
    user's turn, sampled at temperature 1 until the turn ends. An instruction-tuned model writes the kind
    of requests it was trained on, so the draft learns on varied, natural prompts rather than only on a
    templated set. Kept: finished turns of 4+ words, each once. Resumable; deterministic for a seed."""
    import torch
    path = Path(cfg.out) / "magpie_prompts.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    have = path.read_text().splitlines() if path.exists() else []
    if len(have) >= cfg.magpie:
        return path
    text = tokenizer.apply_chat_template([{"role": "user", "content": "\x00"}], tokenize=False)
    pre = text[: text.index("\x00")]
    end = tokenizer.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tokenizer.get_vocab() else tokenizer.eos_token_id
    ids = torch.tensor([tokenizer(pre, add_special_tokens=False)["input_ids"]])
    seen = {json.loads(line)["prompt"] for line in have}
    start, b = time.time(), 0
    print(f"distill: the target writes {cfg.magpie} prompts -> {path}", file=sys.stderr)
    from ..models.gguf_blocks import uses_gguf_blocks
    from ..models.runner import ModelRunner

    # on the target's GGUF blocks every row decodes in one fused forward per token: ~3x the prompts per second
    # of transformers' generate on a 2-core Zen 4 (that path keeps top-p 0.95; this one samples the full T=1)
    runner = ModelRunner(target) if uses_gguf_blocks(target) else None
    with open(path, "a", encoding="utf-8") as f, torch.inference_mode():
        while len(seen) < cfg.magpie:
            seed = cfg.seed * 7919 + len(have) + b
            torch.manual_seed(seed)
            b += 1
            if runner is not None:
                rows = [it["cont"] for it in runner_answers(runner, [ids[0].tolist()] * cfg.gen_batch,
                                                            MAGPIE_MAX_TOKENS, end, 1, 1.0, seed)]
            else:
                batch = ids.repeat(cfg.gen_batch, 1)
                gen = target.generate(batch, attention_mask=torch.ones_like(batch), max_new_tokens=MAGPIE_MAX_TOKENS,
                                      do_sample=True, temperature=1.0, top_p=0.95, top_k=0, eos_token_id=end,
                                      pad_token_id=end)
                rows = gen[:, ids.shape[1]:].tolist()
            for row in rows:
                if end not in row:
                    continue                      # an unfinished turn
                prompt = tokenizer.decode(row[: row.index(end)], skip_special_tokens=True).strip()
                if len(prompt.split()) >= 4 and prompt not in seen and len(seen) < cfg.magpie:
                    seen.add(prompt)
                    f.write(json.dumps({"prompt": prompt, "kind": "magpie"}) + "\n")
            f.flush()
            progress(len(seen), cfg.magpie, start, "prompts")
    print(file=sys.stderr)
    return path


def generate_data(cfg: DistillConfig, target, tokenizer) -> list[Path]:
    import torch
    out = Path(cfg.out) / "data"
    out.mkdir(parents=True, exist_ok=True)
    records = load_prompts(magpie_prompts(cfg, target, tokenizer) if cfg.magpie else cfg.prompts)
    rng = random.Random(cfg.seed)
    rng.shuffle(records)
    if cfg.max_prompts:
        records = records[: cfg.max_prompts]
    jobs = [(p, r) for p in range(1 + cfg.sampled_passes) for r in records]
    shards = []
    batches = [jobs[i: i + cfg.gen_batch] for i in range(0, len(jobs), cfg.gen_batch)]
    start = time.time()
    produced = 0
    print(f"distill: target writes answers to {len(jobs)} prompts -> {out}", file=sys.stderr)
    from ..models.gguf_blocks import uses_gguf_blocks

    runner = None
    if uses_gguf_blocks(target):
        # the target's own GGUF blocks: all of a batch's sequences decode in one fused forward per token
        from ..models.runner import ModelRunner

        runner = ModelRunner(target)
    else:
        from ..models.cpu_linear import pack_linears
        pack_linears(target)   # inference only from here on in this process: oneDNN-packed linears on CPU
    counts_file = out / "tokens.json"
    counts = json.loads(counts_file.read_text()) if counts_file.exists() else {}
    for b, batch in enumerate(batches):
        if cfg.tokens and sum(counts.values()) >= cfg.tokens:
            break
        shard = out / f"shard-{b:05d}.pt"
        if shard.exists():
            shards.append(shard)
            if shard.name not in counts:
                counts[shard.name] = sum(len(it["cont"]) for it in torch.load(shard, weights_only=True))
            continue
        sampled = batch[0][0] > 0
        prompts = [encode(tokenizer, r) for _, r in batch]
        if runner is not None:
            items = runner_answers(runner, prompts, cfg.max_new_tokens, tokenizer.eos_token_id, cfg.topk,
                                   0.8 if sampled else 0.0, cfg.seed * 100003 + b)
        else:
            items = hf_answers(target, tokenizer, prompts, cfg.max_new_tokens, cfg.topk, sampled,
                               cfg.seed * 100003 + b)
        produced += sum(len(it["cont"]) for it in items)
        torch.save(items, shard)
        shards.append(shard)
        counts[shard.name] = sum(len(it["cont"]) for it in items)
        counts_file.write_text(json.dumps(counts))
        progress(b + 1, len(batches), start, f"{produced} tokens ({produced / (time.time() - start):.0f}/s)")
    print(file=sys.stderr)
    return shards


def hf_answers(target, tokenizer, prompts: list[list[int]], max_new: int, topk: int, sampled: bool,
               seed: int) -> list[dict]:
    """The target's answers to `prompts` by transformers' generate (left-padded batch), in the item format of
    runner_answers."""
    import torch
    width = max(map(len, prompts))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        attn[i, width - len(p):] = 1
    torch.manual_seed(seed)
    dev = next(target.parameters()).device
    ids, attn = ids.to(dev), attn.to(dev)
    with torch.inference_mode():
        gen = target.generate(
            input_ids=ids, attention_mask=attn, max_new_tokens=max_new,
            do_sample=sampled, temperature=0.8 if sampled else None, top_k=0 if sampled else None,
            top_p=None, output_logits=True, return_dict_in_generate=True, pad_token_id=pad)
    logits = torch.stack(gen.logits, dim=1)  # [B, steps, V], on the target's device
    seqs = gen.sequences[:, width:].cpu()
    items = []
    for i, p in enumerate(prompts):
        cont = seqs[i].tolist()
        n = len(cont)
        for j, t in enumerate(cont):
            if t == tokenizer.eos_token_id:
                n = j + 1
                break
        top = torch.topk(logits[i, :n].float(), topk, dim=-1)
        items.append({"prompt": p, "cont": cont[:n], "top_ids": top.indices.to(torch.int32).cpu(),
                      "top_logits": top.values.to(torch.float16).cpu()})
    return items


def runner_answers(runner, prompts: list[list[int]], max_new: int, eos: int | None, topk: int,
                   temperature: float, seed: int) -> list[dict]:
    """The target's answers to `prompts`, decoded together (one fused forward of every unfinished sequence
    per token): greedy, or sampled at `temperature` (seeded), with the top-k raw logits of every choice
    (the data item format of generate_data)."""
    import torch
    with torch.inference_mode():   # no autograd state for the whole decode
        n = len(prompts)
        caches = [runner.new_cache() for _ in range(n)]
        logits = runner.forward_many(caches, [torch.tensor(p, dtype=torch.long) for p in prompts],
                                     [torch.arange(len(p)) for p in prompts], [None] * n, last_only=True)
        gen = torch.Generator().manual_seed(seed)
        conts: list[list[int]] = [[] for _ in range(n)]
        tops: list[list[tuple]] = [[] for _ in range(n)]
        alive = list(range(n))
        last = {i: logits[i][-1] for i in range(n)}
        while alive:
            rows = torch.stack([last[i] for i in alive])                    # [alive, V]: one top-k and draw for all
            top = torch.topk(rows, topk, dim=-1)
            ids, vals = top.indices.to(torch.int32), top.values.to(torch.float16)
            if temperature > 0:
                toks = torch.multinomial(torch.softmax(rows / temperature, -1), 1, generator=gen)[:, 0].tolist()
            else:
                toks = top.indices[:, 0].tolist()
            nxt = []
            for k, (i, tok) in enumerate(zip(alive, toks)):
                tops[i].append((ids[k], vals[k]))
                conts[i].append(tok)
                if tok != eos and len(conts[i]) < max_new:
                    nxt.append(i)
            alive = nxt
            if not alive:
                break
            out = runner.forward_many([caches[i] for i in alive], [torch.tensor(conts[i][-1:]) for i in alive],
                                      [torch.tensor([len(prompts[i]) + len(conts[i]) - 1]) for i in alive],
                                      [None] * len(alive), last_only=True)
            last = {i: o[-1] for i, o in zip(alive, out)}
        return [{"prompt": prompts[i], "cont": conts[i], "top_ids": torch.stack([t[0] for t in tops[i]]),
                 "top_logits": torch.stack([t[1] for t in tops[i]])} for i in range(n)]


def data_teacher(cfg: DistillConfig):
    """The target that writes the data: in cfg.dtype, or on its own GGUF blocks where cfg.target_weights
    resolves to them (the default target on a CPU where they measure faster: several times the dense
    fp32 speed on 2-core CPUs)."""
    from ..models.checkpoints import load_model
    from ..models.dtypes import resolve_dtype
    from ..models.factory import apply_target_weights

    dev = cfg.torch_device()
    target = load_model(cfg.target, resolve_dtype(cfg.dtype, dev))
    return apply_target_weights(target, cfg.target, cfg.target_weights, dev.type).to(dev)


def load_data(shards: list[Path]) -> list[dict]:
    import torch
    items = []
    for s in shards:
        items.extend(torch.load(s, weights_only=True))
    return [it for it in items if len(it["cont"]) > 0]


def held_out(item: dict) -> bool:
    """One prompt in 50, chosen by a hash of its tokens, is never trained on: all its answers (greedy and
    sampled) stay out, and the choice does not depend on the data's order, so held-out numbers compare
    across runs and warm starts (the first answers of the data would hold out other prompts whenever the prompt
    set changed, and leave their sampled answers in training)."""
    return zlib.crc32(",".join(map(str, item["prompt"])).encode()) % 50 == 0


def split_held_out(items: list[dict], cap: int) -> tuple[list[dict], list[dict]]:
    """(held-out, training) items; at most `cap` held out. A run too small for the 1-in-50 split measures on
    (some of) its training answers."""
    held, train_items = [], []
    for it in items:
        (held if held_out(it) else train_items).append(it)
    held = held[:cap] or items[: max(1, len(items) // 50)]
    if not train_items:
        raise ValueError("no training data: the target produced no tokens")
    return held, train_items


def choose_vocab(items: list[dict], size: int, vocab_size: int, always: set[int]) -> torch.Tensor:
    """The `size` tokens the target emits most often (counting its top-4 alternatives too)."""
    import torch
    counts = torch.zeros(vocab_size, dtype=torch.float64)
    for it in items:
        counts.index_add_(0, torch.tensor(it["cont"], dtype=torch.long), torch.ones(len(it["cont"]), dtype=torch.float64))
        counts.index_add_(0, it["top_ids"][:, :4].reshape(-1).long(), torch.full((it["top_ids"][:, :4].numel(),), 0.25, dtype=torch.float64))
    for t in always:
        counts[t] += 1e9
    if size == 0 or size >= vocab_size:
        return torch.arange(vocab_size)
    return torch.sort(torch.topk(counts, size).indices).values


def teacher_rows(batch: list[dict], full_to_small: torch.Tensor):
    """The distilled rows of a batch of data items padded side by side, and what the teacher says at each:
    (rows, cols) (position cols of sequence rows predicts the answer's next token), the teacher's top-k ids in
    the draft vocabulary [N, K] (0 where outside it), their probabilities renormalised over the draft
    vocabulary [N, K], and the teacher's top-1 token (a full-vocabulary id)."""
    rows, cols, tids, tlog = [], [], [], []
    for i, it in enumerate(batch):
        p, n = len(it["prompt"]), len(it["cont"])
        rows.append(torch.full((n,), i))
        cols.append(torch.arange(p - 1, p - 1 + n))
        tids.append(it["top_ids"].long())
        tlog.append(it["top_logits"].float())
    rows, cols = torch.cat(rows), torch.cat(cols)
    tids, tlog = torch.cat(tids), torch.cat(tlog)
    small = full_to_small[tids]                       # [N, K], -1 where outside the draft vocabulary
    probs = torch.softmax(tlog, dim=-1) * (small >= 0)
    probs = probs / probs.sum(-1, keepdim=True).clamp(min=1e-9)
    return rows, cols, small.clamp(min=0), probs, tids[:, 0]
