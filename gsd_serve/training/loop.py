"""What the independent and the feature draft's training share: progress lines, shuffled batches, the
learning-rate schedule, seeding, and resumable checkpoints."""
from __future__ import annotations

import math
import random
import sys
import time
from pathlib import Path


def progress(done: int, total: int, start: float, extra: str, first: int = 0) -> None:
    elapsed = time.time() - start
    eta = elapsed / max(done - first, 1e-9) * (total - done) if done > first else float("nan")
    print(f"\r  {done}/{total} [{elapsed:6.0f}s, ETA {eta:6.0f}s] {extra}   ", end="", file=sys.stderr, flush=True)


def make_batches(items: list[dict], batch: int, rng: random.Random):
    order = list(range(len(items)))
    while True:
        rng.shuffle(order)
        for i in range(0, len(order) - batch + 1, batch):
            yield [items[j] for j in order[i: i + batch]]


def learning_rate(cfg, step: int) -> float:
    """The rate of step `step`: a linear warm-up over cfg.warmup steps, then a cosine decay to 0 at cfg.steps."""
    return cfg.lr * min(1.0, (step + 1) / cfg.warmup) * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    torch.manual_seed(seed)


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
