"""`gsd-serve distill`: distill a small draft model from a target (gsd_serve.training does the work).

Resumable phases under --out: data (the target answers the prompt set, keeping its top-K next-token
distributions), for --kind features the target's features, then training. The result (`--out/model`) is a
draft checkpoint the engine loads with --draft.
"""
from __future__ import annotations

import sys
from pathlib import Path

from ..core.prompts import TRAIN_PROMPTS
from .args import CliError, positive_int


def cmd_distill(args) -> int:
    from ..training.config import DistillConfig
    from ..training.distill import run
    from ..training.independent import pack_for_repo
    from ..training.loop import seed_everything

    try:
        cfg = DistillConfig(target=args.target, out=args.out, prompts=args.prompts, layers=args.layers,
                            vocab=args.vocab, max_new_tokens=args.max_new_tokens, gen_batch=args.gen_batch,
                            sampled_passes=args.sampled_passes, max_prompts=args.max_prompts, tokens=args.tokens, steps=args.steps,
                            batch=args.batch, lr=args.lr, seed=args.seed, time_limit_s=args.time_limit,
                            init=args.init or "", phase=args.phase, follow_data=args.follow_data,
                            dtype=args.dtype, target_weights=args.target_weights, kind=args.kind, feature_layers=args.feature_layers,
                            ttt_steps=args.ttt_steps, ckpt_every=args.ckpt_every, magpie=args.magpie,
                            extra_data=args.extra_data or "", device=args.device)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    seed_everything(args.seed)
    model_dir = run(cfg)
    if args.pack and cfg.phase != "data":
        pack_for_repo(model_dir, Path(args.pack))
        print(f"packed the draft into {args.pack}", file=sys.stderr)
    print(model_dir)
    return 0


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
    d.add_argument("--device", default="cpu",
                   help="where the target writes answers and features and a --kind features draft trains: cpu "
                        "(default), cuda, cuda:N or auto (CUDA when present); --dtype auto is bf16 on a GPU, "
                        "training runs under bf16 autocast there (docs/gpu.md)")
    d.add_argument("--pack", help="also write the repository form of the draft (without the shared embedding) here")
    d.set_defaults(func=cmd_distill)
