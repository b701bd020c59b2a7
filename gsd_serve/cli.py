"""The `gsd-serve` command line."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

EXIT_USAGE = 2
EXIT_ERROR = 1


class CliError(Exception):
    """A user-facing error: printed as one line, exit code EXIT_USAGE."""


def _positive(name: str):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got '{text}'") from None
        if v < 1:
            raise argparse.ArgumentTypeError(f"{name} must be >= 1, got {v}")
        return v
    return parse


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("models")
    g.add_argument("--target", default="smollm2-135m-instruct",
                   help="target model: 'smollm2-135m-instruct' (default, embedded), a local checkpoint directory, "
                        "or a model id already in the local Hugging Face cache")
    g.add_argument("--draft", default="default",
                   help="draft model sharing the target's tokenizer: 'default' (the shipped distilled draft of the "
                        "default target) or a local checkpoint directory")


def _add_spec_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("speculation (defaults: the tuned configuration if `gsd-serve tune` saved one)")
    g.add_argument("--k", type=int, help="candidates per drafted node (tree, gsd; default 4)")
    g.add_argument("--merge-context", type=int,
                   help="gsd merge rule n: 0 merges equal tokens, 1 equal bigrams, ... (default 0)")
    g.add_argument("--sibling-threshold", type=float, help="drop candidates below s x best sibling (default 0.2)")
    g.add_argument("--confidence-threshold", type=float,
                   help="stop drafting at a level whose paths all fall below this draft probability (default 0.5)")
    g.add_argument("--max-depth", type=int, help="draft levels per round (default 6)")
    g.add_argument("--max-width", type=int, help="nodes expanded per level (default 8)")
    g.add_argument("--budget", type=int, help="tokens verified per round, root included (default 16)")
    g.add_argument("--lookup", type=int,
                   help="gsd: also propose up to N tokens that followed the last earlier occurrence of the "
                        "last 4 (else 3, else 2) tokens in the prompt or output (0 = off; default 6)")
    g.add_argument("--adaptive", action="store_true", default=None,
                   help="decode plainly while speculation measures slower than plain steps for a sequence "
                        "(e.g. at high temperature on a CPU where verification is costly); same output")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling (temperature 0 = greedy)")
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-k", type=int, default=0, help="0 = off")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, help="makes sampled output reproducible")


def spec_from_args(args, method: str):
    from .config import SpecConfig, load_tuned_defaults

    return SpecConfig.for_method(
        method, load_tuned_defaults(),
        k=args.k, merge_context=args.merge_context, sibling_threshold=args.sibling_threshold,
        confidence_threshold=args.confidence_threshold, max_depth=args.max_depth, max_width=args.max_width,
        budget=args.budget, lookup=getattr(args, "lookup", None), adaptive=getattr(args, "adaptive", None))


def sampling_from_args(args):
    from .sampling import SamplingParams

    return SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)


def build_engine(args, method: str | None = None):
    """Load the models named by args; returns (engine, tokenizer)."""
    from .engine import Engine
    from .models import load_pair
    from .prompts import stop_token_ids

    need_draft = method != "ar"
    tp = getattr(args, "tensor_parallel_size", 1) or 1
    if tp != 1:
        from .tensor_parallel import check_spec_tp_size
        check_spec_tp_size(args.target, tp)  # refuse a size that does not divide the heads before loading
    target, draft, tokenizer, output_ids = load_pair(args.target, args.draft if need_draft else None)
    stops = stop_token_ids(tokenizer, target)
    if tp != 1:
        from .tensor_parallel import make_target_runner
        target = make_target_runner(args.target, tp, model=target)  # rank 0 shards the loaded target
    return Engine(target, draft, stop_token_ids=stops, draft_output_ids=output_ids), tokenizer


def cmd_generate(args) -> int:
    from .prompts import encode, load_prompts

    if args.max_new_tokens < 1:
        raise CliError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.prompt is not None:
        if not args.prompt.strip():
            raise CliError("--prompt is empty")
        records = [{"prompt": args.prompt}]
    else:
        records = load_prompts(args.prompts)
    spec = spec_from_args(args, args.method)
    sampling = sampling_from_args(args)
    engine, tokenizer = build_engine(args, args.method)
    multi = len(records) > 1
    start = time.time()
    for i, rec in enumerate(records):
        ids = encode(tokenizer, rec, raw=args.raw)
        if args.json or multi:
            result = engine.generate(ids, args.max_new_tokens, spec, sampling)
        else:
            gen = engine.stream(ids, args.max_new_tokens, spec, sampling)
            text_so_far = ""
            all_ids: list[int] = []
            for chunk in gen:
                all_ids.extend(chunk)
                text = tokenizer.decode(all_ids, skip_special_tokens=True)
                sys.stdout.write(text[len(text_so_far):])
                sys.stdout.flush()
                text_so_far = text
            sys.stdout.write("\n")
            result = gen.result
        text = tokenizer.decode(result.token_ids, skip_special_tokens=True)
        if args.json:
            row = {k: v for k, v in rec.items() if k not in ("prompt",)}
            row.update(prompt=rec.get("prompt", rec.get("messages")), text=text, token_ids=result.token_ids,
                       finish_reason=result.finish_reason, stats=result.stats.to_dict())
            print(json.dumps(row, ensure_ascii=False), flush=True)
        elif multi:
            print(text, flush=True)
        s = result.stats
        line = (f"[{args.method}] {s.new_tokens} tokens in {s.seconds:.2f}s ({s.tokens_per_s:.1f} tok/s), "
                f"mean acceptance length {s.mean_accept_len:.2f}, draft tokens/round {s.draft_tokens_per_round:.1f}")
        if multi:
            elapsed = time.time() - start
            eta = elapsed / (i + 1) * (len(records) - i - 1)
            print(f"[{i + 1}/{len(records)}, ETA {eta:.0f}s] {line}", file=sys.stderr, flush=True)
        elif not args.json:
            print(line, file=sys.stderr)
    return 0


def cmd_distill(args) -> int:
    from .distill import DistillConfig, pack_for_repo, run

    try:
        cfg = DistillConfig(target=args.target, out=args.out, prompts=args.prompts, layers=args.layers,
                            vocab=args.vocab, max_new_tokens=args.max_new_tokens, gen_batch=args.gen_batch,
                            sampled_passes=args.sampled_passes, max_prompts=args.max_prompts, tokens=args.tokens, steps=args.steps,
                            batch=args.batch, lr=args.lr, seed=args.seed, time_limit_s=args.time_limit,
                            init=args.init or "", phase=args.phase, follow_data=args.follow_data)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    torch_seed(args.seed)
    model_dir = run(cfg)
    if args.pack and cfg.phase != "data":
        pack_for_repo(model_dir, __import__("pathlib").Path(args.pack))
        print(f"packed the draft into {args.pack}", file=sys.stderr)
    print(model_dir)
    return 0


def torch_seed(seed: int) -> None:
    import random

    import torch

    random.seed(seed)
    torch.manual_seed(seed)


def make_parser() -> argparse.ArgumentParser:
    from .config import METHODS
    from .prompts import TRAIN_PROMPTS

    parser = argparse.ArgumentParser(
        prog="gsd-serve",
        description="Graph-structured speculative decoding: generate, benchmark, distill drafts, serve.")
    parser.add_argument("--version", action="version", version=f"gsd-serve {__import__('gsd_serve').__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    g = sub.add_parser("generate", help="generate text in process (CPU is fine)",
                       description="Generate with plain decoding (ar) or speculation (chain, tree, gsd). "
                                   "Every method emits exactly the target's own tokens.")
    g.add_argument("--method", choices=METHODS, default="gsd")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one prompt")
    src.add_argument("--prompts", help="JSONL file: one object per line with a 'prompt' (or 'messages') field")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--raw", action="store_true", help="do not apply the chat template")
    g.add_argument("--json", action="store_true", help="one JSON object per prompt on stdout")
    g.add_argument("--tensor-parallel-size", type=_positive("--tensor-parallel-size"), default=1,
                   help="run the target as N tensor-parallel ranks (processes; gloo on CPU, NCCL on GPUs); "
                        "N must divide the target's attention and KV heads (default target: 1 or 3)")
    _add_model_args(g)
    _add_spec_args(g)
    _add_sampling_args(g)
    g.set_defaults(func=cmd_generate)

    d = sub.add_parser("distill", help="distill a small draft model from a target",
                       description="Train a draft that shares the target's tokenizer by distillation from the "
                                   "target's own answers. Resumable: rerun the same command to continue.")
    d.add_argument("--target", default="smollm2-135m-instruct")
    d.add_argument("--out", required=True, help="working directory (data, checkpoints, model/)")
    d.add_argument("--prompts", default=str(TRAIN_PROMPTS), help="JSONL prompt set the target answers")
    d.add_argument("--layers", default="0,29", help="target layers copied into the draft (default 0,29)")
    d.add_argument("--vocab", type=int, default=8192, help="reduced output vocabulary size (0 = full)")
    d.add_argument("--max-new-tokens", type=_positive("--max-new-tokens"), default=128)
    d.add_argument("--gen-batch", type=_positive("--gen-batch"), default=32)
    d.add_argument("--sampled-passes", type=int, default=0, help="extra answer passes at temperature 0.8")
    d.add_argument("--max-prompts", type=int, default=0, help="use only the first N prompts (0 = all)")
    d.add_argument("--tokens", type=int, default=0,
                   help="stop generating training text once the target has written this many tokens (0 = no limit)")
    d.add_argument("--steps", type=_positive("--steps"), default=1000)
    d.add_argument("--batch", type=_positive("--batch"), default=8)
    d.add_argument("--lr", type=float, default=5e-4)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--time-limit", type=float, default=0.0, help="stop training after this many seconds")
    d.add_argument("--init", help="start from this draft checkpoint directory (e.g. gsd_serve/data/draft, the "
                                  "shipped draft) instead of copies of the target's layers")
    d.add_argument("--phase", choices=("all", "data", "train"), default="all",
                   help="run only answer generation (data) or only training (train) on the shards written so far")
    d.add_argument("--follow-data", action="store_true",
                   help="with --phase train: pick up shards a concurrent '--phase data' process is still writing")
    d.add_argument("--pack", help="also write the repository form of the draft (without the shared embedding) here")
    d.set_defaults(func=cmd_distill)

    from . import cli_extra
    cli_extra.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import warnings
    warnings.filterwarnings("ignore")
    parser = make_parser()
    args = parser.parse_args(argv)
    from .config import ConfigError
    from .models import ModelLoadError
    from .prompts import PromptError

    try:
        return args.func(args)
    except (CliError, ConfigError, ModelLoadError, PromptError, ValueError) as exc:
        print(f"gsd-serve {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"gsd-serve {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
