"""Prompt files and prompt encoding (chat template for chat models)."""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parents[1] / "data"
BENCH_PROMPTS = DATA_DIR / "bench_prompts.jsonl"
TRAIN_PROMPTS = DATA_DIR / "train_prompts.jsonl"


class PromptError(ValueError):
    """A prompt or prompt file is unusable."""


def load_prompts(path: str | Path) -> list[dict]:
    """JSONL records, each with a non-empty `prompt` string or a `messages` list."""
    path = Path(path)
    if not path.exists():
        raise PromptError(f"{path}: no such file")
    records = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PromptError(f"{path}:{lineno}: not JSON ({exc.msg})") from None
        if not isinstance(rec, dict):
            raise PromptError(f"{path}:{lineno}: expected a JSON object")
        if "messages" in rec:
            msgs = rec["messages"]
            if not (isinstance(msgs, list) and msgs and all(
                    isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") for m in msgs)):
                raise PromptError(f"{path}:{lineno}: 'messages' must be a list of {{role, content}} objects")
        elif not (isinstance(rec.get("prompt"), str) and rec["prompt"].strip()):
            raise PromptError(f"{path}:{lineno}: needs a non-empty 'prompt' string (or 'messages')")
        records.append(rec)
    if not records:
        raise PromptError(f"{path}: no prompts")
    return records


def is_chat_model(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def encode(tokenizer, record: dict | str, raw: bool = False) -> list[int]:
    """Token ids of a prompt: a string, or a record with `prompt` or `messages`.

    Chat models get their chat template with the assistant turn opened, unless `raw`.
    """
    if isinstance(record, str):
        record = {"prompt": record}
    if "messages" in record:
        messages = record["messages"]
    else:
        text = record["prompt"]
        if not text.strip():
            raise PromptError("the prompt is empty")
        messages = [{"role": "user", "content": text}]
    if raw or not is_chat_model(tokenizer):
        text = "\n".join(m["content"] for m in messages)
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    else:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise PromptError("the prompt encodes to no tokens")
    return list(ids)


def stop_token_ids(tokenizer, model=None) -> set[int]:
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(eos, int):
        ids.add(eos)
    elif isinstance(eos, (list, tuple)):
        ids.update(int(e) for e in eos)
    return ids


def spread(records: list[dict], n: int) -> list[dict]:
    """n records spread evenly over the categories (round robin)."""
    by_cat = defaultdict(list)
    for r in records:
        by_cat[r.get("category", "all")].append(r)
    out, i = [], 0
    while len(out) < min(n, len(records)):
        for cat in list(by_cat):
            if i < len(by_cat[cat]) and len(out) < n:
                out.append(by_cat[cat][i])
        i += 1
    return out
