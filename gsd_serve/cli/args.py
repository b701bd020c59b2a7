"""What the subcommands share: exit codes, the user-facing error, and the model/speculation/sampling flags."""
from __future__ import annotations

import argparse

EXIT_USAGE = 2
EXIT_ERROR = 1


class CliError(Exception):
    """A user-facing error: printed as one line, exit code EXIT_USAGE."""


def positive_int(name: str):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got '{text}'") from None
        if v < 1:
            raise argparse.ArgumentTypeError(f"{name} must be >= 1, got {v}")
        return v
    return parse


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("models")
    g.add_argument("--target", default="smollm2-135m-instruct",
                   help="target model: 'smollm2-135m-instruct' (default, embedded), a local checkpoint directory, "
                        "or a model id already in the local Hugging Face cache")
    g.add_argument("--draft", default="default",
                   help="draft model sharing the target's tokenizer: 'default' (the shipped distilled draft of the "
                        "default target) or a local checkpoint directory")
    g.add_argument("--draft-kind", default="auto", choices=("auto", "features", "independent"),
                   help="which shipped draft --draft default means (auto: the independent draft, which measured faster), "
                        "and the kind an explicit --draft must be: features (reads the target's hidden states, "
                        "EAGLE-3 style) or independent (a small model of its own)")
    g.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="weights and activations of both models. auto: bfloat16 on GPUs, and on CPUs whose "
                        "bf16 matrix units measure faster than fp32 (AMX, AVX512_BF16), else float32. float32 "
                        "is the exact reference (every method token-identical to ar); in bf16 a near-tie can "
                        "flip between a one-token step and a tree (default: auto)")
    g.add_argument("--compile", default="auto", choices=("auto", "on", "off"),
                   help="run the target's decoding steps and verification trees as torch.compile'd static-shape "
                        "steps (tree sizes bucketed); auto: on CUDA only (on the CPUs measured, compiling was "
                        "slower and takes minutes per shape); a shape that fails to compile runs eagerly")
    g.add_argument("--target-weights", default="auto", choices=("auto", "dense", "gguf"),
                   help="auto: gguf for the default target on a CPU where it measures faster than dense weights "
                        "(measured once per CPU, remembered), else dense. gguf: run the default target's projections and output layer on its own GGUF blocks "
                        "(Q4_1 / Q8_0, this project's C kernels, fp32 activations; the same model with sums in "
                        "another order, ~6x fewer weight bytes per step than fp32; the target runs in fp32)")
    g.add_argument("--device", default=None,
                   help="where the target runs: cpu (default), cuda, cuda:N, or auto (CUDA when torch sees a GPU); "
                        "--dtype auto is bfloat16 there and --compile auto compiles its steps (docs/gpu.md)")
    g.add_argument("--draft-device", default=None,
                   help="where the draft runs (default: the target's --device)")
    g.add_argument("--draft-weights", default="auto", choices=("auto", "dense", "q8"),
                   help="q8: quantize the draft's projections and output layer to Q8_0 blocks run by the same C "
                        "kernels (lossy for the draft, exact output: verification decides); auto: q8 where the "
                        "target runs GGUF blocks, else dense")


def add_spec_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("speculation (defaults: the tuned configuration if `gsd-serve tune` saved one)")
    g.add_argument("--k", type=int, help="candidates per drafted node (tree, gsd; default 4)")
    g.add_argument("--merge-context", type=int,
                   help="gsd merge rule n: 0 merges equal tokens, 1 equal bigrams, ... (default 0)")
    g.add_argument("--sibling-threshold", type=float, help="drop candidates below s x best sibling (default 0.2)")
    g.add_argument("--confidence-threshold", type=float,
                   help="stop drafting at a level whose paths all fall below this draft probability (default 0.5)")
    g.add_argument("--max-depth", type=int, help="draft levels per round (default 6)")
    g.add_argument("--max-width", type=int, help="nodes expanded per level (default 8)")
    g.add_argument("--budget", type=int, help="draft nodes verified per round at most, root included (default 16)")
    g.add_argument("--lookup", type=int,
                   help="gsd: also propose up to N tokens that followed the longest earlier matches of the text's "
                        "end in the prompt, the output and earlier requests (0 = off; default 32)")
    g.add_argument("--no-shared-lookup", dest="shared_lookup", action="store_false", default=None,
                   help="gsd: do not propose continuations of earlier requests")
    g.add_argument("--no-planner", dest="planner", action="store_false", default=None,
                   help="draft and verify the whole budget every round (for experiments); by default the planner "
                        "picks each round's plain step, lookup chain or draft, and its size, from the costs it "
                        "measures; same output either way")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling (temperature 0 = greedy)")
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-k", type=int, default=0, help="0 = off")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, help="makes sampled output reproducible")


def spec_from_args(args, method: str):
    from ..core.config import SpecConfig, load_tuned_defaults

    return SpecConfig.for_method(
        method, load_tuned_defaults(),
        k=args.k, merge_context=args.merge_context, sibling_threshold=args.sibling_threshold,
        confidence_threshold=args.confidence_threshold, max_depth=args.max_depth, max_width=args.max_width,
        budget=args.budget, lookup=getattr(args, "lookup", None), planner=getattr(args, "planner", None),
        shared_lookup=getattr(args, "shared_lookup", None))


def sampling_from_args(args):
    from ..core.sampling import SamplingParams

    return SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)


def build_engine(args, method: str | None = None):
    """Load the models named by args; returns (engine, tokenizer)."""
    from ..models import load_engine

    return load_engine(args.target, args.draft if method != "ar" else None, dtype=getattr(args, "dtype", "auto"),
                       tensor_parallel_size=getattr(args, "tensor_parallel_size", 1) or 1,
                       target_weights=getattr(args, "target_weights", "auto"),
                       draft_weights=getattr(args, "draft_weights", "auto"),
                       compile=getattr(args, "compile", "auto"), draft_kind=getattr(args, "draft_kind", "auto"),
                       device=getattr(args, "device", None), draft_device=getattr(args, "draft_device", None))
