"""Distill a small draft model from a target: `gsd-serve distill`.

Two resumable phases under --out:
1. data: the target answers the prompt set (greedy, and optionally sampled); for every generated token
   the target's top-K next-token distribution is kept (`data/shard-*.pt`).
2. train: a draft made of a few of the target's own layers (copied as the starting point), with the
   target's embedding, final norm and output layer, learns the target's distributions (soft cross
   entropy = KL up to a constant) over a reduced output vocabulary: the tokens the target actually
   emits, most frequent first. Checkpoints (`ckpt.pt`) every few steps; a rerun resumes.
The result (`--out/model`) is a standard transformers checkpoint, plus `draft_vocab.json` (the reduced
output vocabulary the engine uses to make the draft cheap).
"""
from __future__ import annotations

import json
import math
import random
import sys
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

from ..core.prompts import TRAIN_PROMPTS, encode, load_prompts
from .args import CliError, positive_int


@dataclass
class DistillConfig:
    target: str = "smollm2-135m-instruct"
    out: str = "runs/draft"
    prompts: str = str(TRAIN_PROMPTS)
    layers: str = "0,29"            # target layers copied into the draft, in order
    vocab: int = 8192               # reduced output vocabulary (0: full)
    max_new_tokens: int = 128
    gen_batch: int = 32
    sampled_passes: int = 0         # extra passes over the prompts at temperature 0.8
    max_prompts: int = 0            # 0: all
    tokens: int = 0                 # stop generating data after the target wrote this many tokens (0: no limit)
    topk: int = 64                  # teacher distribution entries kept per token
    steps: int = 1000
    batch: int = 8
    lr: float = 5e-4
    warmup: int = 30
    seed: int = 0
    ckpt_every: int = 25
    time_limit_s: float = 0.0       # stop training (with a checkpoint) after this long; 0: no limit
    follow_data: bool = False       # pick up new data shards while a generation process still writes them
    init: str = ""                  # start the draft's own layers from this draft checkpoint, not the target's
    phase: str = "all"              # "data", "train" or "all"
    dtype: str = "auto"             # the teacher's dtype while it writes data (training is always fp32)
    target_weights: str = "auto"    # the teacher's weights while it writes data: auto|dense|gguf (models/loading.py)
    kind: str = "independent"       # "independent" (target layers as a small model) or "features" (EAGLE-3)
    feature_layers: str = "2,15,29"  # --kind features: target layers whose outputs the draft reads
    ttt_steps: int = 3              # --kind features: drafting steps unrolled in training-time test
    magpie: int = 0                 # the target writes this many user prompts itself (instead of --prompts)
    extra_data: str = ""            # train also on the data shards of these earlier --out folders (comma-separated)

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch < 1 or self.gen_batch < 1:
            raise ValueError("steps, batch and gen_batch must be >= 1")
        if self.target_weights not in ("auto", "dense", "gguf"):
            raise ValueError(f"target_weights must be auto, dense or gguf, got '{self.target_weights}'")
        if not 1 <= self.topk <= 1024:
            raise ValueError("topk must be in [1, 1024]")
        if self.vocab < 0:
            raise ValueError("vocab must be >= 0")
        if self.lr <= 0:
            raise ValueError("lr must be > 0")
        if self.kind not in ("independent", "features"):
            raise ValueError(f"kind must be 'independent' or 'features', got '{self.kind}'")
        phases = ("all", "data", "features", "train") if self.kind == "features" else ("all", "data", "train")
        if self.phase not in phases:
            raise ValueError(f"phase must be one of {', '.join(phases)} for --kind {self.kind}, got '{self.phase}'")
        if not 1 <= self.ttt_steps <= 8:
            raise ValueError(f"ttt_steps must be in [1, 8], got {self.ttt_steps}")
        if self.init and not (Path(self.init) / "model.safetensors").exists():
            raise ValueError(f"--init: no model.safetensors in '{self.init}'")
        self.layer_list()

    def layer_list(self) -> list[int]:
        try:
            layers = [int(x) for x in self.layers.split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"--layers must be comma-separated layer indices, got '{self.layers}'") from None
        if not layers:
            raise ValueError("--layers names no layer")
        return layers


def _progress(done: int, total: int, start: float, extra: str, first: int = 0) -> None:
    elapsed = time.time() - start
    eta = elapsed / max(done - first, 1e-9) * (total - done) if done > first else float("nan")
    print(f"\r  {done}/{total} [{elapsed:6.0f}s, ETA {eta:6.0f}s] {extra}   ", end="", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- phase 1: target data
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
            _progress(len(seen), cfg.magpie, start, "prompts")
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
        _progress(b + 1, len(batches), start, f"{produced} tokens ({produced / (time.time() - start):.0f}/s)")
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
    with torch.inference_mode():
        gen = target.generate(
            input_ids=ids, attention_mask=attn, max_new_tokens=max_new,
            do_sample=sampled, temperature=0.8 if sampled else None, top_k=0 if sampled else None,
            top_p=None, output_logits=True, return_dict_in_generate=True, pad_token_id=pad)
    logits = torch.stack(gen.logits, dim=1)  # [B, steps, V]
    seqs = gen.sequences[:, width:]
    items = []
    for i, p in enumerate(prompts):
        cont = seqs[i].tolist()
        n = len(cont)
        for j, t in enumerate(cont):
            if t == tokenizer.eos_token_id:
                n = j + 1
                break
        top = torch.topk(logits[i, :n].float(), topk, dim=-1)
        items.append({"prompt": p, "cont": cont[:n], "top_ids": top.indices.to(torch.int32),
                      "top_logits": top.values.to(torch.float16)})
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
    from ..models.loading import apply_target_weights, load_model

    return apply_target_weights(load_model(cfg.target, cfg.dtype), cfg.target, cfg.target_weights)


def load_data(shards: list[Path]) -> list[dict]:
    import torch
    items = []
    for s in shards:
        items.extend(torch.load(s, weights_only=True))
    return [it for it in items if len(it["cont"]) > 0]


def held_out(item: dict) -> bool:
    """One prompt in 50, chosen by a hash of its tokens, is never trained on: all its answers (greedy and
    sampled) stay out, and the choice does not depend on the data's order, so held-out numbers compare
    across runs and warm starts. (Taking the first answers of the data, as before, held out different
    prompts when the prompt set changed, and left their sampled answers in training.)"""
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


def resume_checkpoint(ckpt: Path, draft, opt, rng: random.Random) -> tuple[int, list]:
    """(step, learning-curve history) of the checkpoint at `ckpt`, restored into draft, optimiser and RNGs;
    (0, []) when there is none."""
    import torch
    if not ckpt.exists():
        return 0, []
    state = torch.load(ckpt, weights_only=True)
    draft.load_state_dict(state["model"], strict=False)
    opt.load_state_dict(state["opt"])
    rng.setstate(state["rng"])
    torch.set_rng_state(state["torch_rng"])
    print(f"distill: resuming at step {state['step']}", file=sys.stderr)
    return state["step"], state["history"]


def save_checkpoint(ckpt: Path, draft, opt, rng: random.Random, step: int, history: list, skip: tuple[str, ...]) -> None:
    """Atomically write the training state; parameters whose names contain any of `skip` (the target's own
    embedding and head, which the draft shares) are left out."""
    import torch
    tmp = ckpt.with_suffix(".tmp")
    torch.save({"model": {k: v for k, v in draft.state_dict().items() if not any(x in k for x in skip)},
                "opt": opt.state_dict(), "step": step, "history": history,
                "rng": rng.getstate(), "torch_rng": torch.get_rng_state()}, tmp)
    tmp.replace(ckpt)


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


# ---------------------------------------------------------------- phase 2: the draft
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


def make_batches(items: list[dict], batch: int, rng: random.Random):
    order = list(range(len(items)))
    while True:
        rng.shuffle(order)
        for i in range(0, len(order) - batch + 1, batch):
            yield [items[j] for j in order[i: i + batch]]


def collate(batch: list[dict], full_to_small: torch.Tensor, pad: int):
    import torch
    seqs = [it["prompt"] + it["cont"] for it in batch]
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    attn = torch.zeros_like(ids)
    rows, cols, tids, tlog = [], [], [], []
    for i, (it, s) in enumerate(zip(batch, seqs)):
        ids[i, : len(s)] = torch.tensor(s)
        attn[i, : len(s)] = 1
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
    return ids, attn, rows, cols, small.clamp(min=0), probs, tids[:, 0]


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
    from ..models.loading import DRAFT_VOCAB_FILE
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
        lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup) * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
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
        _progress(step, cfg.steps, start, f"loss {ema_loss:.3f} top1 {ema_agree:.3f} "
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
    from ..models.loading import DRAFT_VOCAB_FILE
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


def run(cfg: DistillConfig) -> Path:
    import torch
    from ..models.loading import load_model, load_tokenizer
    tokenizer = load_tokenizer(cfg.target)
    tokenizer.padding_side = "left"
    if cfg.kind == "features" and cfg.phase != "data":
        from . import distill_features

        if cfg.phase == "all":
            generate_data(cfg, data_teacher(cfg), tokenizer)
        return distill_features.run(cfg, lambda dtype: load_model(cfg.target, dtype), tokenizer)
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
        shards = generate_data(cfg, target if cfg.target_weights == "dense" and cfg.dtype in ("auto", "float32")
                               else data_teacher(cfg), tokenizer)
    items = load_data(shards)
    for p in target.parameters():
        p.requires_grad_(False)
    return train(cfg, target, tokenizer, items, shards)


# ---------------------------------------------------------------- command line
def cmd_distill(args) -> int:
    try:
        cfg = DistillConfig(target=args.target, out=args.out, prompts=args.prompts, layers=args.layers,
                            vocab=args.vocab, max_new_tokens=args.max_new_tokens, gen_batch=args.gen_batch,
                            sampled_passes=args.sampled_passes, max_prompts=args.max_prompts, tokens=args.tokens, steps=args.steps,
                            batch=args.batch, lr=args.lr, seed=args.seed, time_limit_s=args.time_limit,
                            init=args.init or "", phase=args.phase, follow_data=args.follow_data,
                            dtype=args.dtype, target_weights=args.target_weights, kind=args.kind, feature_layers=args.feature_layers,
                            ttt_steps=args.ttt_steps, ckpt_every=args.ckpt_every, magpie=args.magpie,
                            extra_data=args.extra_data or "")
    except ValueError as exc:
        raise CliError(str(exc)) from None
    torch_seed(args.seed)
    model_dir = run(cfg)
    if args.pack and cfg.phase != "data":
        pack_for_repo(model_dir, Path(args.pack))
        print(f"packed the draft into {args.pack}", file=sys.stderr)
    print(model_dir)
    return 0


def torch_seed(seed: int) -> None:
    import random

    import torch

    random.seed(seed)
    torch.manual_seed(seed)


def register(sub) -> None:
    d = sub.add_parser("distill", help="distill a small draft model from a target",
                       description="Train a draft that shares the target's tokenizer by distillation from the "
                                   "target's own answers. Resumable: rerun the same command to continue.")
    d.add_argument("--target", default="smollm2-135m-instruct")
    d.add_argument("--out", required=True, help="working directory (data, checkpoints, model/)")
    d.add_argument("--prompts", default=str(TRAIN_PROMPTS), help="JSONL prompt set the target answers")
    d.add_argument("--layers", default="0,29", help="target layers copied into the draft (default 0,29)")
    d.add_argument("--vocab", type=int, default=8192, help="reduced output vocabulary size (0 = full)")
    d.add_argument("--max-new-tokens", type=positive_int("--max-new-tokens"), default=128)
    d.add_argument("--gen-batch", type=positive_int("--gen-batch"), default=32)
    d.add_argument("--sampled-passes", type=int, default=0, help="extra answer passes at temperature 0.8")
    d.add_argument("--max-prompts", type=int, default=0, help="use only the first N prompts (0 = all)")
    d.add_argument("--tokens", type=int, default=0,
                   help="stop generating training text once the target has written this many tokens (0 = no limit)")
    d.add_argument("--steps", type=positive_int("--steps"), default=1000)
    d.add_argument("--batch", type=positive_int("--batch"), default=8)
    d.add_argument("--lr", type=float, default=5e-4)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--time-limit", type=float, default=0.0, help="stop training after this many seconds")
    d.add_argument("--init", help="start from this draft checkpoint directory (e.g. gsd_serve/data/draft, the "
                                  "shipped draft) instead of copies of the target's layers")
    d.add_argument("--kind", choices=("independent", "features"), default="independent",
                   help="independent: a few of the target's layers trained as a small model; features: a one-layer "
                        "draft that reads the target's hidden states (EAGLE-3 style, trained with training-time test)")
    d.add_argument("--phase", choices=("all", "data", "features", "train"), default="all",
                   help="run only answer generation (data), the target's features (features, --kind features) or "
                        "training (train) on what the earlier phases wrote")
    d.add_argument("--feature-layers", default="2,15,29",
                   help="--kind features: target layers whose outputs the draft reads (low, middle, top)")
    d.add_argument("--magpie", type=int, default=0, metavar="N",
                   help="answer N user prompts the target writes itself (Magpie) instead of --prompts: varied, "
                        "natural requests (kept in --out/magpie_prompts.jsonl)")
    d.add_argument("--extra-data", metavar="DIRS",
                   help="--phase train: also train on the data (and features) of these earlier --out folders")
    d.add_argument("--ckpt-every", type=positive_int("--ckpt-every"), default=25,
                   help="steps between checkpoints and held-out measurements (default 25)")
    d.add_argument("--ttt-steps", type=int, default=3,
                   help="--kind features: drafting steps unrolled per position in training (default 3)")
    d.add_argument("--follow-data", action="store_true",
                   help="with --phase train: pick up shards a concurrent '--phase data' process is still writing")
    d.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="the target's dtype while it writes answers (--phase data; auto: bf16 on CPUs with fast "
                        "bf16 units); training is always fp32")
    d.add_argument("--target-weights", default="auto", choices=("auto", "dense", "gguf"),
                   help="the target's weights while it writes answers: its own GGUF blocks in this project's C "
                        "kernels, decoding the batch's sequences in one fused forward per token (gguf; auto: the "
                        "default target on a CPU where that measures faster), or dense in --dtype")
    d.add_argument("--pack", help="also write the repository form of the draft (without the shared embedding) here")
    d.set_defaults(func=cmd_distill)
