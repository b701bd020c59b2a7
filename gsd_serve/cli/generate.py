"""`gsd-serve generate`: generate in process with any method."""
from __future__ import annotations

import json
import sys
import time

from .args import (CliError, add_model_args, add_sampling_args, add_spec_args, build_engine, positive_int,
                   sampling_from_args, spec_from_args)


def cmd_generate(args) -> int:
    from ..core.prompts import encode, load_prompts
    from ..core.stops import StopStrings, check_stops, held_back

    if args.max_new_tokens < 1:
        raise CliError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.prompt is not None:
        if not args.prompt.strip():
            raise CliError("--prompt is empty")
        records = [{"prompt": args.prompt}]
    else:
        records = load_prompts(args.prompts)
    try:
        stops = check_stops(args.stop)
    except ValueError as exc:
        raise CliError(str(exc).replace("'stop'", "--stop")) from None
    spec = spec_from_args(args, args.method)
    sampling = sampling_from_args(args)
    fmt = response_format_from_args(args)
    engine, tokenizer = build_engine(args, args.method)
    grammars = grammar_compiler(engine, tokenizer, fmt)
    multi = len(records) > 1
    start = time.time()
    for i, rec in enumerate(records):
        ids = encode(tokenizer, rec, raw=args.raw)
        stop = StopStrings(tokenizer, stops)
        grammar = grammars.constraint(fmt) if grammars is not None else None
        if args.json or multi:
            result = engine.generate(ids, args.max_new_tokens, spec, sampling, stop, grammar=grammar)
        else:
            gen = engine.stream(ids, args.max_new_tokens, spec, sampling, stop, grammar=grammar)
            text_so_far = ""
            all_ids: list[int] = []
            for chunk in gen:
                all_ids.extend(chunk)
                text = tokenizer.decode(all_ids, skip_special_tokens=True)
                if stop.end is not None:
                    text = text[: stop.end]
                else:    # what could still become a stop string waits for the next tokens
                    text = text[: len(text) - held_back(text, stops)]
                sys.stdout.write(text[len(text_so_far):])
                sys.stdout.flush()
                text_so_far = text
            result = gen.result
            text = tokenizer.decode(result.token_ids, skip_special_tokens=True)[: result.text_end]
            sys.stdout.write(text[len(text_so_far):] + "\n")
        text = tokenizer.decode(result.token_ids, skip_special_tokens=True)[: result.text_end]
        if args.json:
            row = {k: v for k, v in rec.items() if k not in ("prompt",)}
            row.update(prompt=rec.get("prompt", rec.get("messages")), text=text, token_ids=result.token_ids,
                       finish_reason=result.finish_reason, stats=result.stats.to_dict())
            print(json.dumps(row, ensure_ascii=False), flush=True)
        elif multi:
            print(text, flush=True)
        s = result.stats
        weights = ", GGUF blocks" if getattr(engine.target, "weights", "dense") == "gguf" else ""
        line = (f"[{args.method}, {engine.dtype_name}{weights}] {s.new_tokens} tokens in {s.seconds:.2f}s ({s.tokens_per_s:.1f} tok/s), "
                f"mean acceptance length {s.mean_accept_len:.2f}, draft tokens/round {s.draft_tokens_per_round:.1f}")
        if multi:
            elapsed = time.time() - start
            eta = elapsed / (i + 1) * (len(records) - i - 1)
            print(f"[{i + 1}/{len(records)}, ETA {eta:.0f}s] {line}", file=sys.stderr, flush=True)
        elif not args.json:
            print(line, file=sys.stderr)
    return 0

def response_format_from_args(args):
    """--json-object / --json-schema FILE as a core.grammar.ResponseFormat (None: free text)."""
    from ..core.grammar import GrammarError, parse_response_format

    if args.json_schema is None:
        return parse_response_format({"type": "json_object"}) if args.json_object else None
    try:
        schema = json.loads(open(args.json_schema, encoding="utf-8").read())
    except OSError as exc:
        raise CliError(f"--json-schema: cannot read {args.json_schema}: {exc.strerror}") from None
    except ValueError as exc:
        raise CliError(f"--json-schema: {args.json_schema} is not JSON: {exc}") from None
    try:
        return parse_response_format({"type": "json_schema", "json_schema": {"schema": schema}})
    except GrammarError as exc:
        raise CliError(f"--json-schema: {exc}") from None


def grammar_compiler(engine, tokenizer, fmt):
    """The compiler of JSON mode's grammars over the engine's stop tokens (None without a format); refuses a
    schema it cannot compile."""
    from ..core.grammar import GrammarCompiler, GrammarError

    if fmt is None:
        return None
    try:
        compiler = GrammarCompiler(tokenizer, engine.stop_token_ids, engine.target.vocab_size)
        compiler.check(fmt)
    except GrammarError as exc:
        raise CliError(f"--json-schema: {exc}" if fmt.kind == "json_schema" else str(exc)) from None
    return compiler


def register(sub) -> None:
    from ..core.config import METHODS

    g = sub.add_parser("generate", help="generate text in process (CPU is fine)",
                       description="Generate with plain decoding (ar) or speculation (chain, tree, gsd). "
                                   "Every method emits exactly the target's own tokens.")
    g.add_argument("--method", choices=METHODS, default="gsd")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one prompt")
    src.add_argument("--prompts", help="JSONL file: one object per line with a 'prompt' (or 'messages') field")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--raw", action="store_true", help="do not apply the chat template")
    g.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="end the output before the first occurrence of TEXT (repeatable, at most 4)")
    g.add_argument("--json", action="store_true", help="one JSON object per prompt on stdout")
    fmt = g.add_mutually_exclusive_group()
    fmt.add_argument("--json-object", action="store_true",
                     help="JSON mode: the output is a JSON object (each token the target's choice among those the "
                          "grammar allows)")
    fmt.add_argument("--json-schema", metavar="FILE", help="JSON mode: the output follows the JSON Schema in FILE")
    g.add_argument("--tensor-parallel-size", type=positive_int("--tensor-parallel-size"), default=1,
                   help="run the target as N tensor-parallel ranks (processes; gloo on CPU, NCCL on GPUs); "
                        "N must divide the target's attention and KV heads (default target: 1 or 3)")
    add_model_args(g)
    add_spec_args(g)
    add_sampling_args(g)
    g.set_defaults(func=cmd_generate)
