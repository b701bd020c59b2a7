"""The prepared device check (bench/device_check.sh runs it): gsd-serve's GPU paths, run once, in one go.

On a lent GPU machine (Python 3.12, torch with CUDA, transformers, grpcio, protobuf; no Ray, no redis, no
package index) it runs, each pass as a `gsd-serve bench` child process with its own time limit:

    eager     ar, chain and gsd in process, target and draft on the device in bf16 (DeviceModelRunner)
    compiled  the same with the target's compiled static-shape steps (CompiledRunner, --compile on)
    pytest    tests/test_gpu.py (the tests marked `gpu`)

and writes $OUT/device_check.json and $OUT/device_check.md: per pass and method, whether every output is
token-identical to ar, each divergence with the target's top-2 logit gap at the first differing token
(a near-tie when below tools.bench.NEAR_TIE_EPS, else a failure), tau (tokens per target forward), tokens/s
and gsd/ar. `--device cpu --smoke` runs the same code paths on 2 prompts of 16 tokens (the compiled pass
is left out there: inductor takes minutes per shape on a CPU).

Exit status: 0 when every pass ran and every output is identical to ar or leaves it at a reported near-tie,
1 otherwise.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# top-level packages the device path must not import: the GPU machine has none of them
FORBIDDEN = ("ray", "redis", "fastapi", "uvicorn", "openai", "schemathesis", "llama_cpp")
METHODS = "ar,chain,gsd"


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    p.add_argument("--smoke", action="store_true", help="2 prompts, 16 tokens, no compiled pass (minutes -> seconds)")
    p.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "device-out"))
    p.add_argument("--limit", type=int, help="bench prompts, spread over the categories (default 24; smoke 2)")
    p.add_argument("--max-new-tokens", type=int, help="default 128; smoke 16")
    p.add_argument("--dtype", help="default bfloat16 on a GPU; float32 on a CPU (the exact reference)")
    p.add_argument("--passes", help="comma-separated from eager,compiled (default both on a GPU, eager on a CPU)")
    p.add_argument("--compiled-limit", type=int, default=8,
                   help="the compiled pass's prompts: the shortest shipped ones (default 8; one cache capacity, so "
                        "one compile per row bucket)")
    p.add_argument("--compiled-max-new-tokens", type=int, default=64)
    p.add_argument("--timeouts", default="140,180,150",
                   help="seconds the eager pass, the compiled pass and pytest may take (default 140,180,150: with "
                        "the model's conversion, under 8 minutes)")
    p.add_argument("--no-pytest", action="store_true", help="leave out the `gpu`-marked tests")
    return p.parse_args(argv)


def bench_child(argv: list[str], imported_file: str) -> int:
    """`gsd-serve bench ARGV` in this process; then the forbidden packages it imported go to `imported_file`."""
    from gsd_serve.cli.main import main

    rc = main(["bench"] + argv)
    imported = sorted({m.split(".")[0] for m in sys.modules} & set(FORBIDDEN))
    Path(imported_file).write_text(json.dumps(imported))
    return rc


# bench's warm-up compiles every row bucket at each cache capacity from 256 slots up to the longest prompt + new
# tokens + 64: prompts this short, with 64 new tokens, need the one capacity
SHORT_PROMPT_TOKENS = 120


def shortest_prompts(path: Path, n: int) -> str:
    """n short shipped bench prompts (at most SHORT_PROMPT_TOKENS), of different categories as far as there
    are short ones (repeated requests left out: they run their earlier occurrence first), written to `path`:
    the smoke run's and the compiled pass's prompts."""
    from gsd_serve.core.prompts import BENCH_PROMPTS, encode, load_prompts
    from gsd_serve.models.checkpoints import DEFAULT_TARGET, load_tokenizer

    tokenizer = load_tokenizer(DEFAULT_TARGET)
    sized = sorted(((len(encode(tokenizer, r)), i, r) for i, r in enumerate(load_prompts(BENCH_PROMPTS))
                    if r.get("prime") is None), key=lambda x: x[:2])
    short = [r for size, _, r in sized if size <= SHORT_PROMPT_TOKENS] or [r for _, _, r in sized[:n]]
    chosen, cats = [], set()
    for r in short:
        if r.get("category") not in cats and len(chosen) < n:
            chosen.append(r)
            cats.add(r.get("category"))
    chosen += [r for r in short if r not in chosen][: n - len(chosen)]
    path.write_text("".join(json.dumps(r) + "\n" for r in chosen))
    return str(path)


def environment(device: str) -> dict:
    import torch

    env = {"python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
           "cuda_available": torch.cuda.is_available(), "device": device}
    try:
        import transformers
        env["transformers"] = transformers.__version__
    except ImportError:
        env["transformers"] = None
    if device.startswith("cuda") and torch.cuda.is_available():
        d = torch.device(device)
        env.update(gpu=torch.cuda.get_device_name(d), cuda=torch.version.cuda,
                   gpu_memory_gib=round(torch.cuda.get_device_properties(d).total_memory / 2**30, 1),
                   bf16_supported=torch.cuda.is_bf16_supported())
    else:
        from gsd_serve.models.hardware import cpu_description
        env["cpu"] = cpu_description()
    return env


def run_pass(name: str, opts, out: Path, log) -> dict:
    """One `gsd-serve bench` pass in a child process; its summary (the ar/chain/gsd figures, divergences)."""
    from gsd_serve.tools.bench import NEAR_TIE_EPS

    pass_dir = out / name
    pass_dir.mkdir(parents=True, exist_ok=True)
    imported_file = pass_dir / "imported.json"
    if name == "compiled":
        # short prompts: every compiled shape (row bucket x cache capacity) costs a compile, and one capacity
        # (256 slots) holds them all
        prompts = shortest_prompts(out / "compiled_prompts.jsonl", opts.compiled_limit)
        argv = ["--methods", METHODS, "--prompts", prompts, "--max-new-tokens", str(opts.compiled_max_new_tokens)]
    else:
        argv = ["--methods", METHODS] + (["--prompts", opts.prompts] if opts.prompts else ["--limit", str(opts.limit)])
        argv += ["--max-new-tokens", str(opts.max_new_tokens)]
    argv += ["--out", str(pass_dir), "--device", opts.device,
             "--dtype", opts.dtype, "--compile", "on" if name == "compiled" else "off",
             # the GPU path's weights: dense in --dtype (GGUF blocks are a CPU kernel), the independent draft
             # (a feature draft reads target features, which DeviceModelRunner does not hand out)
             "--target-weights", "dense", "--draft-weights", "dense", "--draft-kind", "independent"]
    # the child reports which forbidden packages its imports pulled in (a GPU machine has none of them)
    cmd = [sys.executable, "-c", "import sys; sys.argv[0] = 'device_check'; sys.path.insert(0, %r); "
           "import device_check as d; sys.exit(d.bench_child(%r, %r))" % (str(Path(__file__).parent), argv,
                                                                          str(imported_file))]
    t0 = time.time()
    print(f"device_check: pass {name}: gsd-serve bench {' '.join(argv)}", file=log, flush=True)
    result = {"pass": name, "argv": argv}
    env = dict(os.environ)
    if opts.smoke and not opts.device.startswith("cuda"):
        # a smoke run checks code paths, not speed: one thread, since on a shared 2-core machine two OpenMP
        # threads wait on each other at every barrier (a 1-token forward measured 8x slower that way, loaded)
        env.setdefault("OMP_NUM_THREADS", "1")
    try:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=log, timeout=opts.timeout[name], env=env)
        result["returncode"] = proc.returncode
    except subprocess.TimeoutExpired:
        result["returncode"] = None
        result["error"] = f"timed out after {opts.timeout[name]:.0f} s"
    result["seconds"] = round(time.time() - t0, 1)
    for f in list(pass_dir.glob("*.png")) + [pass_dir / "results.md"]:
        f.unlink(missing_ok=True)        # $OUT brings back 8 files at most: the JSON holds what they show
    try:
        data = json.loads((pass_dir / "results.json").read_text())
    except (OSError, ValueError):
        result.setdefault("error", "no results.json (see device_check.log)")
        return result
    result["imported_forbidden"] = json.loads(imported_file.read_text()) if imported_file.exists() else None
    imported_file.unlink(missing_ok=True)
    summary = data["summary"]
    per = summary["T=0.0"]
    setup = summary["setup"]
    result["setup"] = {k: setup.get(k) for k in ("n_prompts", "max_new_tokens", "dtype", "target_weights",
                                                 "compile_seconds", "machine")}
    ar_tps = per["ar"]["overall"]["tokens_per_s"]
    methods = {}
    for m, d in per.items():
        o = d["overall"]
        divs = []
        for dv in o.get("divergences", []):
            gap = dv.get("top2_gap")
            divs.append({**dv, "near_tie": gap is None or gap < NEAR_TIE_EPS})
        n_id, n_all = (int(x) for x in o["identical"].split("/")) if "/" in o["identical"] else (0, 0)
        methods[m] = {
            "identical": f"{n_id}/{n_all}", "identity": n_all > 0 and n_id == n_all,
            # acceptable: identical, or every difference starts at a near-tie the table names
            "identity_or_near_tie": n_all > 0 and all(d["near_tie"] for d in divs) and len(divs) == n_all - n_id,
            "divergences": divs,
            "tau": o.get("mean_accept_len"), "tokens_per_s": o["tokens_per_s"],
            "decode_tokens_per_s": o.get("decode_tokens_per_s"),
            "over_ar": o["tokens_per_s"] / ar_tps if ar_tps else None,
            "target_forwards": o.get("target_forwards"), "tokens": o["tokens"],
        }
    result["methods"] = methods
    result["gsd_over_ar"] = methods.get("gsd", {}).get("over_ar")
    return result


def run_pytest(opts, out: Path, log) -> dict:
    """tests/test_gpu.py (the `gpu`-marked tests); their outcome counts from the junit report."""
    import xml.etree.ElementTree as ET

    junit = out / "pytest-gpu.xml"
    env = dict(os.environ)
    from gsd_serve.core.config import cache_dir
    # the tests' cache is this run's: the model converted once serves both
    env.setdefault("GSD_SERVE_TEST_CACHE", str(cache_dir()))
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/test_gpu.py", "-p", "no:cacheprovider",
           f"--junitxml={junit}", "-rs"]
    t0 = time.time()
    print(f"device_check: {' '.join(cmd)}", file=log, flush=True)
    try:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=log, env=env, timeout=opts.timeout["pytest"])
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        rc = None
    result = {"returncode": rc, "seconds": round(time.time() - t0, 1)}
    try:
        suite = ET.parse(junit).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
        counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
        result.update(counts)
        result["cases"] = [{"name": c.get("name"),
                            "outcome": next((ch.tag for ch in c if ch.tag in ("failure", "error", "skipped")), "passed"),
                            "message": next((ch.get("message") for ch in c if ch.tag in ("failure", "error", "skipped")), None)}
                           for c in suite.iter("testcase")]
    except (OSError, ET.ParseError, AttributeError):
        result["error"] = "no junit report (see device_check.log)"
    # rc 5: every test was deselected or skipped (none marked gpu ran: no GPU)
    result["ok"] = rc in (0, 5) and not result.get("failures") and not result.get("errors")
    return result


DETAILS = "device_check_details.tar.gz"


def bundle_details(out: Path) -> str | None:
    """The passes' folders, the log, the junit report and the prompt files, moved into one archive in `out`:
    a run brings back 8 files at most, and the distill run adds its own beside these."""
    import shutil
    import tarfile

    names = [p for p in ("eager", "compiled", "device_check.log", "pytest-gpu.xml", "smoke_prompts.jsonl",
                         "compiled_prompts.jsonl") if (out / p).exists()]
    if not names:
        return None
    with tarfile.open(out / DETAILS, "w:gz") as tar:
        for name in names:
            tar.add(out / name, arcname=name)
    for name in names:
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return DETAILS


def to_markdown(report: dict) -> str:
    env = report["environment"]
    where = env.get("gpu") or env.get("cpu")
    lines = [f"# Device check: {env['device']} ({where}), torch {env['torch']}, transformers {env['transformers']}",
             "", f"commit {report.get('commit')}, {report['seconds']:.0f} s; ok: **{report['ok']}**", "",
             "| pass | method | identical to ar | near-ties only | tau | tok/s | over ar | divergences (index, top-2 gap) |",
             "|---|---|---|---|---|---|---|---|"]
    for p in report["passes"]:
        if "methods" not in p:
            lines.append(f"| {p['pass']} | - | - | - | - | - | - | {p.get('error')} |")
            continue
        for m, r in p["methods"].items():
            tau = "-" if r["tau"] is None else f"{r['tau']:.2f}"
            divs = ", ".join(f"{d['prompt']}@{d['index']} gap {d['top2_gap']}{'' if d['near_tie'] else ' NOT A NEAR-TIE'}"
                             for d in r["divergences"]) or "-"
            lines.append(f"| {p['pass']} | {m} | {r['identical']} | {r['identity_or_near_tie']} | {tau} | "
                         f"{r['tokens_per_s']:.1f} | {r['over_ar']:.2f}x | {divs} |")
    t = report.get("pytest")
    if t:
        lines += ["", f"pytest -m gpu: {t.get('passed', '?')} passed, {t.get('failures', '?')} failed, "
                      f"{t.get('errors', '?')} errors, {t.get('skipped', '?')} skipped ({t['seconds']:.0f} s)"]
        for c in t.get("cases", []):
            if c["outcome"] != "passed":
                lines.append(f"- {c['name']}: {c['outcome']}: {(c['message'] or '')[:200]}")
    lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    opts = parse(argv)
    on_gpu = opts.device.startswith("cuda")
    opts.limit = opts.limit or (2 if opts.smoke else 24)
    opts.max_new_tokens = opts.max_new_tokens or (16 if opts.smoke else 128)
    opts.dtype = opts.dtype or ("bfloat16" if on_gpu else "float32")
    opts.timeout = dict(zip(("eager", "compiled", "pytest"), (float(x) for x in opts.timeouts.split(","))))
    passes = opts.passes.split(",") if opts.passes else (["eager", "compiled"] if on_gpu and not opts.smoke else ["eager"])
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    opts.prompts = shortest_prompts(out / "smoke_prompts.jsonl", opts.limit) if opts.smoke else None
    t0 = time.time()
    from gsd_serve.tools.results import git_commit

    report = {"environment": environment(opts.device), "commit": git_commit(), "smoke": opts.smoke,
              "passes": [], "pytest": None}
    if on_gpu and not report["environment"]["cuda_available"]:
        print("device_check: --device cuda, but torch sees no CUDA device", file=sys.stderr)
        report["error"] = "no CUDA device"
    with open(out / "device_check.log", "a") as log:
        if "error" not in report:
            # the default target's conversion from GGUF and the shipped draft's assembly, once, before any
            # pass's clock starts
            from gsd_serve.models.checkpoints import default_draft_dir, default_target_dir

            t = time.time()
            default_target_dir()
            default_draft_dir()
            report["model_prepare_seconds"] = round(time.time() - t, 1)
            for name in passes:
                r = run_pass(name, opts, out, log)
                report["passes"].append(r)
                print(f"device_check: pass {name}: {r['seconds']} s, gsd/ar {r.get('gsd_over_ar')}, "
                      f"{r.get('error', 'ok')}", file=sys.stderr, flush=True)
            if not opts.no_pytest:
                report["pytest"] = run_pytest(opts, out, log)
                print(f"device_check: pytest -m gpu: {report['pytest']}", file=sys.stderr, flush=True)
    ran = [p for p in report["passes"] if "methods" in p]
    report["identity"] = bool(ran) and all(r["identity"] for p in ran for r in p["methods"].values())
    report["identity_or_near_tie"] = bool(ran) and all(r["identity_or_near_tie"] for p in ran for r in p["methods"].values())
    report["tau"] = {p["pass"]: p["methods"]["gsd"]["tau"] for p in ran if "gsd" in p["methods"]}
    report["gsd_over_ar"] = {p["pass"]: p["gsd_over_ar"] for p in ran}
    report["imported_forbidden"] = sorted({m for p in ran for m in (p.get("imported_forbidden") or [])})
    report["ok"] = ("error" not in report and len(ran) == len(passes) and all(p["returncode"] == 0 for p in ran)
                    and report["identity_or_near_tie"] and not report["imported_forbidden"]
                    and (report["pytest"] is None or report["pytest"]["ok"]))
    report["seconds"] = round(time.time() - t0, 1)
    report["details"] = bundle_details(out)
    (out / "device_check.json").write_text(json.dumps(report, indent=1))
    md = to_markdown(report)
    (out / "device_check.md").write_text(md)
    print(md)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
