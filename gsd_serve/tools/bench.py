"""The in-process benchmark (`gsd-serve bench`): methods side by side in one process.

It runs every method on the same prompts, interleaved prompt by prompt (so drift of the machine hits all
alike), after a warm-up; checks each output against plain decoding (`divergence`: where an output leaves it,
and whether that is a near-tie); writes results.json, results.md and PNG plots (matplotlib: the [bench]
extra).
"""
from __future__ import annotations

import json
import platform
import sys
import time
from collections import defaultdict
from pathlib import Path


# A divergence from ar in a non-fp32 mode is a near-tie when the target's top-2 choice scores at the first
# differing token lie within this many logits (bf16 keeps 8 significant bits: logits of ~20 round to 0.125)
NEAR_TIE_EPS = 0.25
# gsd-full: gsd without the planner (every round drafts and verifies its whole budget)
SPEC_METHODS = ("ar", "chain", "tree", "gsd", "gsd-full")
# plain decoding with the dense fp32 target: the exact reference, for runs in a faster numeric mode (GGUF block
# weights, bf16): its row says whether the run's ar left it, and where, at what top-2 gap
REFERENCE_METHOD = "ar-fp32"
# what users would run instead, on the same prompts: transformers' assisted generation with the same pair,
# llama.cpp's plain decoding of the default target's own GGUF, and llama.cpp with its prompt-lookup draft (n-gram
# speculation: the anchor where text repeats) (both optional: pip install llama-cpp-python)
EXTERNAL_METHODS = ("hf-assisted", "llama.cpp", "llama.cpp-pld")
LLAMA_PLD_TOKENS = 10      # llama-cpp-python's default draft length for prompt lookup
ALL_METHODS = SPEC_METHODS + (REFERENCE_METHOD,) + EXTERNAL_METHODS


def _hf_assisted(target, draft, ids: list[int], max_new: int, stop_ids: set[int], sampling) -> dict:
    """transformers' own assisted generation with the same target and draft."""
    import torch
    kwargs = dict(max_new_tokens=max_new, assistant_model=draft, eos_token_id=sorted(stop_ids) or None,
                  pad_token_id=sorted(stop_ids)[0] if stop_ids else None)
    if sampling.greedy:
        kwargs["do_sample"] = False
    else:
        torch.manual_seed(sampling.seed or 0)
        kwargs.update(do_sample=True, temperature=sampling.temperature, top_k=sampling.top_k or None,
                      top_p=sampling.top_p)
    x = torch.tensor([ids])
    start = time.perf_counter()
    with torch.inference_mode():
        out = target.generate(x, attention_mask=torch.ones_like(x), **kwargs)
    seconds = time.perf_counter() - start
    tokens = out[0, len(ids):].tolist()
    return {"token_ids": tokens, "seconds": seconds, "new_tokens": len(tokens)}


class LlamaCpp:
    """llama.cpp (llama-cpp-python) decoding the default target's GGUF with this process's threads: plainly, or
    with `lookup` > 0 speculating with llama-cpp-python's prompt-lookup draft (n-gram matches in the context,
    up to `lookup` tokens a round).

    Its arithmetic is its own (Q4_1 weights times 8-bit activations), so its tokens are not compared with
    ar's. Greedy only (sampling draws other random numbers)."""

    def __init__(self, threads: int, lookup: int = 0):
        try:
            from llama_cpp import Llama
            from llama_cpp.llama_speculative import LlamaPromptLookupDecoding
        except ImportError:
            raise ValueError("method llama.cpp needs llama-cpp-python (pip install llama-cpp-python; on a CPU "
                             "with AMX and gcc 12 build it with CFLAGS/CXXFLAGS='-mno-amx-tile -mno-amx-int8 "
                             "-mno-amx-bf16')") from None
        from ..models.checkpoints import gguf_path

        self.path = str(gguf_path())
        self.llm = Llama(model_path=self.path, n_ctx=4096, n_threads=threads, n_threads_batch=threads,
                         n_batch=512, verbose=False, logits_all=lookup > 0,   # its speculation reads every row's logits
                         draft_model=LlamaPromptLookupDecoding(num_pred_tokens=lookup) if lookup > 0 else None)

    def generate(self, ids: list[int], max_new: int, stop_ids: set[int], sampling) -> dict:
        if not sampling.greedy:
            raise ValueError("the llama.cpp methods are benchmarked greedy only (--temperatures 0)")
        self.llm.reset()
        start = time.perf_counter()
        out, ttft = [], None
        for tok in self.llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0,
                                     reset=True):
            if ttft is None:
                ttft = time.perf_counter() - start
            out.append(int(tok))
            if tok in stop_ids or len(out) >= max_new:
                break
        return {"token_ids": out, "seconds": time.perf_counter() - start, "new_tokens": len(out), "ttft": ttft}


def divergence(runner, prompt: list[int], ref: list[int], got: list[int], sampling) -> dict:
    """Where `got` first leaves the reference `ref`, and the target's top-2 gap there: the difference of the
    two best choice scores (logits for greedy; warped logits plus the token's sampling noise otherwise) of a
    plain forward over the prompt and ref's tokens before that point."""
    import torch
    from ..core.sampling import TokenChooser

    i = next((j for j, (a, b) in enumerate(zip(ref, got)) if a != b), min(len(ref), len(got)))
    out = {"index": i, "ar_token": ref[i] if i < len(ref) else None, "token": got[i] if i < len(got) else None}
    if out["ar_token"] is None or out["token"] is None:
        out["top2_gap"] = None     # one stopped early at the same text: a length difference, not a choice
        return out
    with torch.inference_mode():
        logits = runner.forward(runner.new_cache(), torch.tensor(prompt + ref[:i]), last_only=True)[0]
    chooser = TokenChooser(sampling, logits.shape[-1])
    scores = logits if sampling.greedy else chooser.warp(logits[None])[0] + chooser.noise(len(prompt) + i)
    top = torch.topk(scores, 2).values
    out["top2_gap"] = round(float(top[0] - top[1]), 5)
    return out


def run_bench(args, build_engine, spec_from_args) -> dict:
    """The benchmark `args` (the command's flags) describe; `build_engine(args, method)` loads the models and
    `spec_from_args(args, method)` makes a method's SpecConfig from the flags (cli/args.py)."""
    import torch
    from ..core.prompts import BENCH_PROMPTS, encode, load_prompts, spread
    from ..core.sampling import SamplingParams
    from ..models.hardware import cpu_description

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in ALL_METHODS]
    if unknown or not methods:
        raise ValueError(f"unknown method(s) {unknown}; choose from {', '.join(ALL_METHODS)}")
    if "ar" not in methods:
        methods.insert(0, "ar")  # the reference every output is checked against
    temps = [float(t) for t in str(args.temperatures).split(",")]
    if any(t < 0 for t in temps):
        raise ValueError("temperatures must be >= 0")
    records = load_prompts(args.prompts or BENCH_PROMPTS)
    if args.limit:
        records = spread(records, args.limit)
    tp = args.tensor_parallel_size
    if tp > 1:
        from ..models.tensor_parallel import check_spec_tp_size
        check_spec_tp_size(args.target, tp)
    args.tensor_parallel_size = 1
    engine, tokenizer = build_engine(args, "gsd")
    specs = {m: _bench_spec(args, m, spec_from_args) for m in methods if m in SPEC_METHODS}
    target_model, draft_model = engine.target.model, engine.draft.model if engine.draft else None
    from ..core.engine import Engine
    # one engine per method over the same runners: each method's planner learns, and its cross-request index
    # remembers, only its own requests (as a user running that method alone would see)
    engines = {m: engine if m == "ar" else Engine(engine.target, engine.draft, stop_token_ids=engine.stop_token_ids)
               for m in methods}
    if REFERENCE_METHOD in methods:
        from ..core.engine import Engine
        from ..models.checkpoints import load_model
        from ..models.runner import ModelRunner
        engines[REFERENCE_METHOD] = Engine(ModelRunner(load_model(args.target, torch.float32)), None,
                                           stop_token_ids=engine.stop_token_ids)
        specs[REFERENCE_METHOD] = _bench_spec(args, "ar", spec_from_args)
    if tp > 1:
        # the same methods with the target as tp ranks (TP=1 above is the reference)
        from ..core.engine import Engine
        from ..models.tensor_parallel import make_target_runner
        tp_engine = Engine(make_target_runner(args.target, tp, dtype=engine.target.dtype), engine.draft,
                           stop_token_ids=engine.stop_token_ids)
        for m in [m for m in methods if m in SPEC_METHODS]:
            name = f"{m}@tp{tp}"
            specs[name], engines[name] = specs[m], tp_engine
            methods.append(name)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    encoded = [encode(tokenizer, r) for r in records]

    external = {}
    if "hf-assisted" in methods:
        external["hf-assisted"] = lambda ids, n, sp: _hf_assisted(target_model, draft_model, ids, n,
                                                                  engine.stop_token_ids, sp)
    if "llama.cpp" in methods:
        external["llama.cpp"] = LlamaCpp(torch.get_num_threads()).generate
    if "llama.cpp-pld" in methods:
        external["llama.cpp-pld"] = LlamaCpp(torch.get_num_threads(), LLAMA_PLD_TOKENS).generate

    def run_external(m, ids, n, sp):
        return external[m](ids, n, sp) if m == "hf-assisted" else external[m](ids, n, engine.stop_token_ids, sp)

    # warm-up: compile every shape the run will meet (a compiled target), then every method once briefly
    if hasattr(engine.target, "warmup"):
        from ..models.compiled import MIN_CAPACITY
        longest = max(map(len, encoded)) + args.max_new_tokens + 64
        cap = MIN_CAPACITY
        while True:
            engine.target.warmup(buckets=(1, 2, 4, 8, 16, 32), capacity=cap)
            if cap >= longest:
                break
            cap *= 2
        print(f"bench: compiled {len(engine.target.compiled_shapes)} shapes in {engine.target.compile_seconds:.0f}s "
              "(not timed)", file=sys.stderr)
    for m in methods:
        for t in temps[:1]:
            sp = SamplingParams(temperature=t, seed=0)
            if m in external:
                run_external(m, encoded[0], 8, sp)
            else:
                engines[m].generate(encoded[0], 8, specs[m], sp)
    for e in engines.values():
        e.forget_requests()

    from .results import LoadMeter, write_manifest

    load = LoadMeter().start()
    rows = []
    start = time.time()
    total = len(records) * len(temps)
    done = 0
    for t in temps:
        for i, (rec, ids) in enumerate(zip(records, encoded)):
            sp = SamplingParams(temperature=t, top_p=args.top_p, seed=args.seed + i)
            # methods in A-B-B-A order across prompts: a machine that drifts slower or faster within minutes
            # (these VMs do, by 15-25%) favours none of them
            order = methods if i % 2 == 0 else list(reversed(methods))
            got = {}
            prime = rec.get("prime")
            if prime is not None:     # a repeated request: its earlier occurrence goes first, untimed, to each engine
                prime = encode(tokenizer, {"messages": prime} if isinstance(prime, list) else prime)
            for m in order:
                if prime is not None:
                    if m in external:
                        run_external(m, prime, args.max_new_tokens, sp)
                    else:
                        engines[m].generate(prime, args.max_new_tokens, specs[m], sp)
                if m in external:
                    r = run_external(m, ids, args.max_new_tokens, sp)
                    stats = {"new_tokens": r["new_tokens"], "seconds": r["seconds"], "ttft": r.get("ttft"),
                             "target_forwards": None,
                             "mean_accept_len": None, "draft_tokens_per_round": None, "accept_lengths": {}}
                    got[m] = (stats, r["token_ids"])
                else:
                    res = engines[m].generate(ids, args.max_new_tokens, specs[m], sp)
                    got[m] = (res.stats.to_dict(), res.token_ids)
            ref = got["ar"][1]
            for m in methods:
                stats, tokens = got[m]
                # sampled hf-assisted draws other random numbers, and llama.cpp computes with its own
                # arithmetic: their texts are not comparable token by token
                identical = None if (m == "hf-assisted" and t > 0) or m.startswith("llama.cpp") else tokens == ref
                row = {"temperature": t, "prompt": rec.get("id", i), "category": rec.get("category", "all"),
                       "method": m, "identical": identical, "stats": stats, "token_ids": tokens}
                if identical is False and m == REFERENCE_METHOD:
                    # where the run's plain decoding left the exact reference, judged by the reference target
                    row["divergence"] = divergence(engines[m].target, ids, tokens, ref, sp)
                elif identical is False and m not in external:
                    row["divergence"] = divergence(engine.target, ids, ref, tokens, sp)
                rows.append(row)
            done += 1
            el = time.time() - start
            print(f"\r  [{done}/{total}] T={t} {rec.get('id', i)}  ETA {el / done * (total - done):.0f}s   ",
                  end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    results = summarize(rows, methods, temps)
    results["setup"] = {
        "prompts": str(args.prompts or BENCH_PROMPTS), "n_prompts": len(records),
        "max_new_tokens": args.max_new_tokens, "methods": methods, "temperatures": temps,
        "specs": {m: s.to_dict() for m, s in specs.items()}, "target": args.target, "draft": args.draft,
        "dtype": engine.dtype_name, "target_weights": getattr(engine.target, "weights", "dense"),
        "compile_seconds": round(getattr(engine.target, "compile_seconds", 0.0), 1),   # spent in warm-up, not timed
        "machine": {"platform": platform.platform(), "cpu": cpu_description(),
                    "threads": torch.get_num_threads(), "device": _device_name(engine.target)},
        "command": "gsd-serve " + " ".join(sys.argv[1:]),
    }
    (out_dir / "results.json").write_text(json.dumps({"summary": results, "rows": rows}, indent=1))
    write_manifest(out_dir, load.stop(), experiment="bench", methods=methods, prompts=str(args.prompts or BENCH_PROMPTS))
    md = to_markdown(results)
    (out_dir / "results.md").write_text(md)
    plot(results, rows, out_dir)
    print(md)
    for e in {id(e): e for e in engines.values()}.values():
        close = getattr(e.target, "close", None)
        if close is not None:
            close()
    return results


def _device_name(runner) -> str:
    """The device the target's weights are on, with the GPU's name (e.g. "cuda:0 (NVIDIA H100 80GB HBM3)")."""
    import torch

    model = getattr(runner, "model", None)
    if model is None:
        return "cpu"
    dev = next(model.parameters()).device
    if dev.type == "cuda":
        return f"{dev} ({torch.cuda.get_device_name(dev)})"
    return str(dev)


def _aggregate(rows: list[dict]) -> dict:
    tokens = sum(r["stats"]["new_tokens"] for r in rows)
    seconds = sum(r["stats"]["seconds"] for r in rows)
    agg = {"prompts": len(rows), "tokens": tokens, "seconds": round(seconds, 3),
           "tokens_per_s": tokens / seconds if seconds else 0.0}
    # decoding alone (after the first token): what speculation changes; prefill is the same work for every method
    ttfts = [r["stats"].get("ttft") for r in rows]
    if all(x is not None for x in ttfts):
        dec_s = seconds - sum(ttfts)
        agg["decode_tokens_per_s"] = (tokens - len(rows)) / dec_s if dec_s > 0 else 0.0
    tf = [r["stats"]["target_forwards"] for r in rows]
    if all(x is not None for x in tf):
        def total(key: str) -> float:
            return sum(r["stats"].get(key, 0) for r in rows)

        def ratio(num: float, den: float) -> float:
            return num / den if den else 0.0

        rounds = total("rounds")
        agg.update(
            target_forwards=sum(tf),
            mean_accept_len=ratio(tokens, sum(tf)),
            draft_tokens_per_round=ratio(total("draft_tokens"), rounds),
            draft_forwards_per_round=ratio(total("draft_forwards"), rounds),
            # per generated token, so methods that commit more per round compare on the same work: the
            # draft's proposal work (drafted nodes fed to draft their children) and all it was fed after
            # the prompt (that plus catch-up of committed tokens, which every method feeds once each)
            drafted_per_token=ratio(total("draft_proposal_tokens"), tokens),
            draft_tokens_per_token=ratio(total("draft_tokens"), tokens),
            verified_tokens_per_round=ratio(total("verified_tokens"), rounds),
            plain_step_share=ratio(total("plain_steps"), rounds),   # the planner's plain steps
            lookup_round_share=ratio(total("lookup_rounds"), rounds),   # ... its lookup chains verified alone
            drafted_round_share=ratio(total("drafted_rounds"), rounds),
            draft_seconds=round(total("draft_seconds"), 3),
            verify_seconds=round(total("verify_seconds"), 3),
        )
        agg["overhead_seconds"] = round(seconds - agg["draft_seconds"] - agg["verify_seconds"], 3) \
            if agg["draft_seconds"] else None
    ident = [r["identical"] for r in rows if r["identical"] is not None]
    agg["identical"] = f"{sum(ident)}/{len(ident)}" if ident else "n/a"
    agg["mismatches"] = [r["prompt"] for r in rows if r["identical"] is False]
    agg["divergences"] = [dict(prompt=r["prompt"], **r["divergence"]) for r in rows if "divergence" in r]
    return agg


def summarize(rows: list[dict], methods: list[str], temps: list[float]) -> dict:
    out = {}
    for t in temps:
        tr = [r for r in rows if r["temperature"] == t]
        cats = sorted({r["category"] for r in tr})
        per = {}
        for m in methods:
            mr = [r for r in tr if r["method"] == m]
            per[m] = {"overall": _aggregate(mr),
                      "by_category": {c: _aggregate([r for r in mr if r["category"] == c]) for c in cats}}
        def ratio_to_ar(mine: dict, ar: dict, key: str):
            return mine[key] / ar[key] if mine.get(key) and ar.get(key) else None

        for m in methods:
            o, a = per[m]["overall"], per["ar"]["overall"]
            o["speedup"] = ratio_to_ar(o, a, "tokens_per_s") or 0.0
            o["decode_speedup"] = ratio_to_ar(o, a, "decode_tokens_per_s")
            for c in cats:
                mine, ar = per[m]["by_category"][c], per["ar"]["by_category"][c]
                mine["speedup"] = ratio_to_ar(mine, ar, "tokens_per_s") or 0.0
                mine["decode_speedup"] = ratio_to_ar(mine, ar, "decode_tokens_per_s")
            hist = defaultdict(int)
            for r in tr:
                if r["method"] == m:
                    for k, v in r["stats"].get("accept_lengths", {}).items():
                        hist[int(k)] += v
            per[m]["accept_length_histogram"] = dict(sorted(hist.items()))
        out[f"T={t}"] = per
    return out


def to_markdown(results: dict) -> str:
    lines = []
    for temp, per in results.items():
        if not temp.startswith("T="):
            continue
        lines += [f"### {temp}", "",
                  "| method | tokens/s | speedup vs ar | mean acceptance length | draft forwards/round | "
                  "draft tokens/round | draft tokens/output token | drafted tokens/output token | "
                  "verified tokens/round | identical to ar |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for m, d in per.items():
            o = d["overall"]
            f = lambda k, p=2: (f"{o[k]:.{p}f}" if o.get(k) is not None else "-")  # noqa: E731
            lines.append(f"| {m} | {o['tokens_per_s']:.2f} | {o['speedup']:.2f}x | {f('mean_accept_len')} | "
                         f"{f('draft_forwards_per_round')} | {f('draft_tokens_per_round')} | "
                         f"{f('draft_tokens_per_token')} | {f('drafted_per_token', 3)} | "
                         f"{f('verified_tokens_per_round', 1)} | {o['identical']} |")
        lines += ["", "Draft tokens: fed to the draft after the prompt (catch-up of committed tokens and drafted "
                  "nodes); drafted: the drafted nodes fed to draft their children, the proposal work merging saves."]
        if "tree" in per:
            t = per["tree"]["overall"]
            for m in [m for m in per if m.startswith("gsd")]:
                o = per[m]["overall"]
                if t.get("drafted_per_token") and t.get("draft_tokens_per_token"):
                    lines.append(f"{m} against tree (same k): {1 - o['drafted_per_token'] / t['drafted_per_token']:.0%} "
                                 f"fewer drafted tokens, {1 - o['draft_tokens_per_token'] / t['draft_tokens_per_token']:.0%} "
                                 "fewer draft tokens, per output token.")
        divs = [(m, d) for m in per for d in per[m]["overall"].get("divergences", [])]
        if divs:
            lines += ["", f"Divergences from ar (the first differing token; a near-tie when the target's top-2 "
                          f"gap there is below {NEAR_TIE_EPS}):", "",
                      "| method | prompt | token index | ar token | its token | top-2 gap | near-tie |", "|---|---|---|---|---|---|---|"]
            for m, d in divs:
                gap = d["top2_gap"]
                tie = "length only" if gap is None else ("yes" if gap < NEAR_TIE_EPS else "**NO**")
                lines.append(f"| {m} | {d['prompt']} | {d['index']} | {d['ar_token']} | {d['token']} | "
                             f"{'-' if gap is None else f'{gap:.4f}'} | {tie} |")
        cats = list(next(iter(per.values()))["by_category"])
        lines += ["", "By category: decode tokens/s (after the first token) over ar's, tokens per target forward "
                      "(tau), and the planner's rounds (plain / lookup chain alone / drafted):", "",
                  "| method | category | decode tok/s | over ar | tau | plain / lookup / draft rounds |",
                  "|---|---|---|---|---|---|"]
        for m, d in per.items():
            for c in cats + ["overall"]:
                o = d["overall"] if c == "overall" else d["by_category"][c]
                dec = o.get("decode_tokens_per_s")
                sp = o.get("decode_speedup")
                tau = o.get("mean_accept_len")
                shares = "-" if o.get("plain_step_share") is None or m == "ar" else \
                    f"{o['plain_step_share']:.0%} / {o.get('lookup_round_share', 0):.0%} / {o.get('drafted_round_share', 0):.0%}"
                lines.append(f"| {m} | {c} | {'-' if dec is None else f'{dec:.1f}'} | "
                             f"{'-' if sp is None else f'{sp:.2f}x'} | {'-' if tau is None else f'{tau:.2f}'} | {shares} |")
        split = [(m, d["overall"]) for m, d in per.items() if d["overall"].get("draft_seconds")]
        if split:
            lines += ["", "Where the time goes (seconds, all prompts):", "",
                      "| method | draft | verify | other (bookkeeping, prefill, sampling) |", "|---|---|---|---|"]
            for m, o in split:
                lines.append(f"| {m} | {o['draft_seconds']:.1f} | {o['verify_seconds']:.1f} | {o['overhead_seconds']:.1f} |")
        lines.append("")
    return "\n".join(lines)


def plot(results: dict, rows: list[dict], out_dir: Path) -> None:
    try:
        import matplotlib
    except ImportError:       # the [bench] extra is not installed (a bare GPU machine): results without plots
        print("bench: no matplotlib, no plots", file=sys.stderr)
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for temp, per in results.items():
        if not temp.startswith("T="):
            continue
        methods = [m for m in per if m != "ar"]
        cats = list(per["ar"]["by_category"]) + ["overall"]
        fig, ax = plt.subplots(figsize=(max(6, len(cats) * 1.4), 4))
        width = 0.8 / max(len(methods), 1)
        for j, m in enumerate(methods):
            vals = [per[m]["by_category"][c]["speedup"] for c in cats[:-1]] + [per[m]["overall"]["speedup"]]
            ax.bar([i + j * width for i in range(len(cats))], vals, width, label=m)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks([i + width * (len(methods) - 1) / 2 for i in range(len(cats))])
        ax.set_xticklabels(cats, rotation=20)
        ax.set_ylabel("speedup over plain decoding (ar)")
        ax.set_title(f"gsd-serve bench, {temp}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / f"speedup_{temp.replace('=', '')}.png", dpi=110)
        plt.close(fig)

        fig, ax = plt.subplots(figsize=(6, 4))
        for m in [m for m in per if m != "ar" and m not in EXTERNAL_METHODS]:
            hist = per[m]["accept_length_histogram"]
            if not hist:
                continue
            total = sum(hist.values())
            xs = sorted(hist)
            ax.plot(xs, [hist[x] / total for x in xs], marker="o", label=m)
        ax.set_xlabel("tokens emitted per target forward")
        ax.set_ylabel("fraction of rounds")
        ax.set_title(f"accepted lengths, {temp}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / f"accept_lengths_{temp.replace('=', '')}.png", dpi=110)
        plt.close(fig)


def _bench_spec(args, method: str, spec_from_args):
    """The method's config with the command's flags, leaving out the flags that do not apply to it (a
    gsd-only --merge-context or --lookup, a --k or --max-width for chain), so one bench command can set them."""
    import copy

    a = copy.copy(args)
    if method in ("chain", "tree"):
        a.merge_context = None
        a.lookup = None
    if method == "chain":
        a.k = None
        a.max_width = None
    if method == "gsd-full":
        a.planner = False
        return spec_from_args(a, "gsd")
    return spec_from_args(a, method)
