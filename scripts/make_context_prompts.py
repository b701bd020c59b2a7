#!/usr/bin/env python3
"""Prompts built around real passages, for distilling drafts on more varied text than train_prompts.jsonl.

train_prompts.jsonl is templated chat (explain X, translate Y); a draft trained only on its answers memorises
them (held-out top-1 stalls while training batches keep rising). These prompts add what that set lacks:
answers that read, quote and condense a passage (summaries, questions over a context, explanations of a
text), plus arithmetic word problems and translations whose numbers, names and sentences are drawn at
random. The passages are the docstrings of this Python's own standard library (every machine with CPython has
them), so no download is needed.

Deterministic for a given Python (random.Random(seed)); drops anything identical to a benchmark prompt.

Usage: python3 scripts/make_context_prompts.py --out prompts.jsonl [--count 5000] [--seed 0]
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import json
import pkgutil
import random
import re
import sys
import warnings
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "gsd_serve" / "data" / "bench_prompts.jsonl"
SKIP_MODULES = ("test", "idlelib", "tkinter", "turtle", "antigravity", "this", "lib2to3", "ensurepip", "venv",
                "pydoc_data", "__main__", "distutils")


def passages(min_chars: int = 160, max_chars: int = 1100) -> list[tuple[str, str]]:
    """(name, text) for the plain-English docstrings of the standard library's public modules (and their
    submodules), classes, methods and functions, first paragraphs only, plus the language reference's topics
    (pydoc_data) cut into passages."""
    found: dict[str, str] = {}
    seen_texts: set[str] = set()

    def keep(name: str, text: str) -> None:
        if len(text) >= min_chars and text not in seen_texts:
            seen_texts.add(text)
            found[name] = text

    tops = sorted(m.name for m in pkgutil.iter_modules() if not m.name.startswith("_")
                  and m.name in sys.stdlib_module_names and m.name not in SKIP_MODULES)
    for mod_name in _with_submodules(tops):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                mod = importlib.import_module(mod_name)
        except BaseException:   # some modules refuse to import here (platform-specific); skip them
            continue
        objs = [(mod_name, mod)]
        for n, o in vars(mod).items():
            if n.startswith("_") or getattr(o, "__module__", None) != mod_name:
                continue
            if inspect.isclass(o) or inspect.isfunction(o):
                objs.append((f"{mod_name}.{n}", o))
            if inspect.isclass(o):
                objs += [(f"{mod_name}.{n}.{mn}", mo) for mn, mo in vars(o).items()
                         if not mn.startswith("_") and inspect.isfunction(mo)]
        for name, obj in objs:
            keep(name, clean(inspect.getdoc(obj) or "", max_chars))
    from pydoc_data.topics import topics
    for topic, doc in sorted(topics.items()):
        chunk, part = [], 0
        for para in re.split(r"\n\s*\n", doc):
            para = " ".join(line.strip() for line in para.splitlines())
            if not _is_prose(para):
                continue
            if chunk and len(" ".join(chunk + [para])) > max_chars:
                keep(f"{topic} ({part})", "\n\n".join(chunk))
                chunk, part = [], part + 1
            if len(para) <= max_chars:
                chunk.append(para)
        if chunk:
            keep(f"{topic} ({part})", "\n\n".join(chunk))
    return sorted(found.items())


def _with_submodules(tops: list[str]) -> list[str]:
    names = []
    for top in tops:
        names.append(top)
        try:
            spec = importlib.util.find_spec(top)
        except BaseException:
            continue
        if spec and spec.submodule_search_locations:
            names += sorted(f"{top}.{m.name}" for m in pkgutil.iter_modules(spec.submodule_search_locations)
                            if not m.name.startswith("_") and m.name not in SKIP_MODULES and "test" not in m.name)
    return names


def _is_prose(para: str) -> bool:
    """Plain sentences: no doctests, signatures, code blocks or tables."""
    if not para or ">>>" in para or " -> " in para or "::" in para or "@" in para or " = " in para:
        return False
    return sum(c.isalpha() or c in " ,.;:'-" for c in para) >= 0.9 * len(para)


def clean(doc: str, max_chars: int) -> str:
    keep = []
    for para in re.split(r"\n\s*\n", doc):
        para = " ".join(line.strip() for line in para.splitlines())
        if not _is_prose(para):
            continue
        if len(" ".join(keep + [para])) > max_chars:
            break
        keep.append(para)
    return "\n\n".join(keep)


def short_name(name: str) -> str:
    return name.rsplit(".", 1)[-1]


PASSAGE_TEMPLATES = [
    ("summarization", "{text}\n\nSummarize the text above in one sentence."),
    ("summarization", "{text}\n\nSummarize this in two or three sentences for a beginner."),
    ("summarization", "Here is part of a Python library's documentation:\n\n{text}\n\nWhat is the main point?"),
    ("summarization", "Read this and give me the key points as a short list:\n\n{text}"),
    ("rag", "Context: {text}\n\nQuestion: What is {short} used for?"),
    ("rag", "Context: {text}\n\nQuestion: According to the context, what does {short} do?"),
    ("rag", "Use only the text below to answer.\n\n{text}\n\nQuestion: What should a programmer know before using {short}?"),
    ("explain", "Explain the following documentation in simple words:\n\n{text}"),
    ("explain", "{text}\n\nRewrite the text above so that a high school student can understand it."),
    ("qa", "I am reading about {name} in Python. The documentation says:\n\n{text}\n\nCan you give me an example of when I would use it?"),
]

NAMES = ["Sara", "Tom", "Aisha", "Liam", "Mei", "Carlos", "Nina", "Omar", "Priya", "Jonas", "Elena", "Kofi",
         "Yuki", "Marta", "Ben", "Leila", "Ivan", "Grace", "Hugo", "Zara"]
THINGS = [("apples", "apple"), ("stickers", "sticker"), ("books", "book"), ("marbles", "marble"),
          ("cookies", "cookie"), ("pencils", "pencil"), ("stamps", "stamp"), ("cards", "card"),
          ("shells", "shell"), ("eggs", "egg"), ("flowers", "flower"), ("coins", "coin")]
MATH_TEMPLATES = [
    "{a} has {x} {things}. {a} gives {y} {things} to {b} and then buys {z} more. How many {things} does {a} have now?",
    "{a} reads {x} pages every day. How many pages does {a} read in {y} days?",
    "A box holds {x} {things}. {a} has {y} boxes and gives away {z} {things}. How many {things} are left?",
    "{a} saves {x} dollars each week. After {y} weeks, {a} spends {z} dollars on a gift. How much money is left?",
    "A class has {x} students. They sit in groups of {y}. How many full groups are there, and how many students are left over?",
    "{a} walks {x} kilometers on Monday and {y} kilometers on Tuesday. {b} walks {z} kilometers in total. Who walked farther, and by how much?",
    "A shop sells {things} for {y} dollars each. {a} buys {x} of them and pays with a {p}-dollar bill. How much change does {a} get?",
    "{a} has {x} {things} and {b} has {y} times as many. How many {things} do they have together?",
    "A train leaves at {h}:00 and the trip takes {y} hours and {m} minutes. At what time does it arrive?",
    "A rectangle is {x} centimeters long and {y} centimeters wide. What are its area and its perimeter?",
    "{a} bakes {x} {things} and shares them equally among {y} friends. How many does each friend get, and how many are left?",
    "The price of a jacket is {p} dollars. It is on sale for {pct} percent off. What is the sale price?",
]
MATH_ENDINGS = ["Explain step by step.", "Think step by step.", "Show your work.", "Explain your reasoning.", ""]

SUBJECTS = ["My brother", "The teacher", "Our neighbors", "The children", "My grandmother", "The doctor",
            "Your friend", "The old man", "The students", "My cat", "The baker", "We", "They", "She", "He"]
PREDICATES = ["is cooking dinner", "walks to the park", "reads a book", "is looking for the keys",
              "bought fresh bread", "will visit the museum", "likes to swim in the lake", "forgot the umbrella",
              "is learning to play the piano", "wants a cup of tea", "cleaned the kitchen", "is waiting for the bus",
              "planted tomatoes in the garden", "cannot find the train station", "wrote a letter to a friend",
              "is very tired", "opened the window", "sings in a choir", "lost a glove", "paints the fence"]
TIMES = ["every morning", "on Sundays", "yesterday", "this evening", "after school", "before breakfast",
         "next week", "in the summer", "at night", "right now", ""]
LANGUAGES = ["French", "Spanish", "German", "Italian", "Portuguese"]
TRANSLATION_TEMPLATES = ["Translate into {lang}: {s}", "How do you say this in {lang}? \"{s}\"",
                         "Translate the following sentence to {lang}.\n\n{s}"]


def subject_form(subject: str, predicate: str) -> str:
    if subject in ("We", "They", "The children", "The students", "Our neighbors") and predicate.startswith("is "):
        predicate = "are " + predicate[3:]
    elif subject in ("We", "They", "The children", "The students", "Our neighbors"):
        first, _, rest = predicate.partition(" ")
        if first.endswith("s") and first not in ("is",):
            first = first[:-1] if not first.endswith("es") or first in ("likes",) else first[:-2]
        predicate = f"{first} {rest}"
    return f"{subject} {predicate}"


def math_prompt(rng: random.Random) -> str:
    a, b = rng.sample(NAMES, 2)
    things, _ = rng.choice(THINGS)
    vals = dict(a=a, b=b, things=things, x=rng.randint(3, 60), y=rng.randint(2, 12), z=rng.randint(2, 25),
                p=rng.choice([20, 50, 100]), h=rng.randint(6, 18), m=rng.choice([10, 15, 20, 30, 45]),
                pct=rng.choice([10, 20, 25, 30, 50]))
    return (rng.choice(MATH_TEMPLATES).format(**vals) + " " + rng.choice(MATH_ENDINGS)).strip()


def translation_prompt(rng: random.Random) -> str:
    s = subject_form(rng.choice(SUBJECTS), rng.choice(PREDICATES))
    t = rng.choice(TIMES)
    s = f"{s} {t}." if t else f"{s}."
    return rng.choice(TRANSLATION_TEMPLATES).format(lang=rng.choice(LANGUAGES), s=s)


def build(count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    texts = passages()
    bench = {json.loads(line).get("prompt") for line in BENCH.read_text().splitlines() if line.strip()}
    n_math, n_trans = count // 8, count // 8
    out, seen = [], set(bench)

    def add(prompt: str, kind: str) -> None:
        if prompt not in seen:
            seen.add(prompt)
            out.append({"prompt": prompt, "kind": kind})

    order = list(range(len(texts)))
    rng.shuffle(order)
    i = 0
    while len(out) < count - n_math - n_trans and i < 3 * len(order):   # each passage up to 3 templates
        name, text = texts[order[i % len(order)]]
        kind, template = rng.choice(PASSAGE_TEMPLATES)
        add(template.format(text=text, name=name, short=short_name(name)), kind)
        i += 1
    for _ in range(n_math):
        add(math_prompt(rng), "math_word")
    for _ in range(n_trans):
        add(translation_prompt(rng), "translation")
    rng.shuffle(out)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--count", type=int, default=5000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    rows = build(args.count, args.seed)
    Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows))
    kinds: dict[str, int] = {}
    for r in rows:
        kinds[r["kind"]] = kinds.get(r["kind"], 0) + 1
    print(f"{len(rows)} prompts -> {args.out}: {kinds}", file=sys.stderr)


if __name__ == "__main__":
    main()
