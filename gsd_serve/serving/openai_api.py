"""OpenAI-compatible HTTP (/v1/completions, /v1/chat/completions, /v1/models) and gsd.v1.Router Generate.

Framework-light: handlers take the raw body and return (status, JSON) or an async iterator of SSE lines,
so the Ray Serve deployment (services/router.py) is a thin FastAPI adapter around them.
"""
from __future__ import annotations

import json
import re
import time
import uuid
from typing import AsyncIterator

from ..core.prompts import PromptError, encode
from ..core.sampling import SamplingParams
from ..core.stops import check_stops, held_back
from . import rpc
from .errors import BadRequest, ServingError
from .router import GenerateParams, RouterCore

pb = rpc.pb

UNSUPPORTED = ("logprobs", "top_logprobs", "echo", "suffix", "tools", "functions", "logit_bias")
ROLES = ("system", "user", "assistant", "developer")


# ---------------------------------------------------------------- prompts from untrusted text

class PromptText:
    """What the frontends need to know of a tokenizer to encode untrusted text safely."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        # the control strings the tokenizer matches whole (<|im_start|>, <|endoftext|>, ...)
        self.controls = sorted({t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values()
                                if t.content}, key=len, reverse=True)
        # no token spells more characters than this: a text longer than n x this has more than n tokens
        vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        self.max_token_chars = max(len(t) for t in vocab if t)

    def check_length(self, texts, max_tokens: int) -> None:
        """Refuse text that cannot fit in max_tokens before tokenizing any of it (a character count)."""
        n = sum(len(t) for t in texts)
        if n > max_tokens * self.max_token_chars:
            raise BadRequest(f"the prompt has {n} characters, more than {max_tokens} tokens can hold",
                             "messages", "context_length_exceeded")

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """The chat template applied to `messages`, whose content stays text: a user who types
        `<|im_start|>` gets the characters, never the control token (only the template makes those)."""
        if not any(c in m["content"] for m in messages for c in self.controls):
            return encode(self.tokenizer, {"messages": messages})   # the common case: exactly the engine's ids
        tok = self.tokenizer
        marks = [f"\ue000{i}\ue001" for i in range(len(messages))]
        text = tok.apply_chat_template([dict(m, content=mark) for m, mark in zip(messages, marks)],
                                       add_generation_prompt=True, tokenize=False)
        pieces = re.split("(\ue000\\d+\ue001)", text)
        if [p for p in pieces if p in marks] != marks:
            raise BadRequest("the chat template does not take message content containing control tokens", "messages")
        ids: list[int] = []
        for piece in pieces:
            if piece in marks:
                content = messages[marks.index(piece)]["content"]
                ids += tok(content, add_special_tokens=False, split_special_tokens=True)["input_ids"]
            elif piece:
                ids += tok(piece, add_special_tokens=False)["input_ids"]
        return ids


def _integral(v):
    """An int, or a float with no fractional part as an int (JSON does not tell 3 from 3.0; JSON Schema's
    integer takes both); None for anything else (booleans included)."""
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return None


def _int(body: dict, name: str, default=None, lo=None, hi=None):
    v = body.get(name, default)
    if v is None:
        return default
    v = _integral(v)
    if v is None:
        raise BadRequest(f"'{name}' must be an integer", name)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise BadRequest(f"'{name}' must be in [{lo}, {hi}], got {v}", name)
    return v


def _unset(v) -> bool:
    """An unsupported field left at a no-op value (null, false, [] or {}: what OpenAI clients send); 0 and ""
    are not false here, as in the JSON schema."""
    return v is None or v is False or (isinstance(v, (list, dict)) and not v)


def _float(body: dict, name: str, default: float, lo: float, hi: float) -> float:
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise BadRequest(f"'{name}' must be a number", name)
    if not lo <= v <= hi:
        raise BadRequest(f"'{name}' must be in [{lo}, {hi}], got {v}", name)
    return float(v)


class OpenAIFrontend:
    def __init__(self, core: RouterCore):
        self.core = core
        self.cfg = core.config
        self.text = PromptText(core.tokenizer)

    # parsing --------------------------------------------------------------------
    def _parse_json(self, raw: bytes) -> dict:
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:   # RecursionError: nesting too deep
            raise BadRequest(f"the request body is not valid JSON: {type(exc).__name__}") from None
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object")
        return body

    def _common(self, body: dict, chat: bool) -> tuple[int, SamplingParams, bool, bool, tuple[str, ...]]:
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise BadRequest("'model' is required", "model")
        if model != self.cfg.model_name:
            raise BadRequest(f"the model '{model}' does not exist; this server serves '{self.cfg.model_name}'",
                             "model", "model_not_found")
        for name in UNSUPPORTED:
            if not _unset(body.get(name)):
                raise BadRequest(f"'{name}' is not supported", name)
        try:
            stops = check_stops(body.get("stop"))
        except ValueError as exc:
            raise BadRequest(str(exc), "stop") from None
        n = _int(body, "n", 1, 1, 1)
        del n
        if body.get("best_of") not in (None, 1):
            raise BadRequest("'best_of' must be 1", "best_of")
        max_tokens = body.get("max_completion_tokens") if chat and body.get("max_completion_tokens") is not None \
            else body.get("max_tokens")
        if max_tokens is None:   # the default, never above the limit
            max_tokens = min(self.cfg.default_max_tokens, self.cfg.max_tokens_limit)
        elif _integral(max_tokens) is None:
            raise BadRequest("'max_tokens' must be an integer", "max_tokens")
        else:
            max_tokens = _integral(max_tokens)
        if max_tokens < 1:
            raise BadRequest(f"'max_tokens' must be at least 1, got {max_tokens}", "max_tokens")
        temperature = _float(body, "temperature", 1.0, 0.0, 2.0)
        top_p = _float(body, "top_p", 1.0, 0.0, 1.0)
        if top_p == 0.0:
            raise BadRequest("'top_p' must be in (0, 1]", "top_p")
        top_k = _int(body, "top_k", 0, -1, 100000)
        seed = _int(body, "seed", None, 0, 2**63 - 1)
        stream = body.get("stream")
        stream = False if stream is None else stream
        if not isinstance(stream, bool):
            raise BadRequest("'stream' must be a boolean", "stream")
        opts = body.get("stream_options")
        opts = {} if opts is None else opts
        if not isinstance(opts, dict):
            raise BadRequest("'stream_options' must be an object", "stream_options")
        include_usage = opts.get("include_usage", False)
        if not isinstance(include_usage, bool):
            raise BadRequest("'stream_options.include_usage' must be a boolean", "stream_options")
        sampling = SamplingParams(temperature=temperature, top_k=max(top_k, 0), top_p=top_p, seed=seed)
        return max_tokens, sampling, stream, include_usage, stops

    def _prompt_ids(self, body: dict, chat: bool) -> list[int]:
        tok = self.core.tokenizer
        try:
            if chat:
                msgs = body.get("messages")
                if not isinstance(msgs, list) or not msgs:
                    raise BadRequest("'messages' must be a non-empty list", "messages")
                clean = []
                for m in msgs:
                    if not (isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)):
                        raise BadRequest("each message needs a role (system, user, assistant) and string content",
                                         "messages")
                    clean.append({"role": "system" if m["role"] == "developer" else m["role"],
                                  "content": m["content"]})
                self.text.check_length([m["content"] for m in clean], self.cfg.max_prompt_tokens)
                return self.text.encode_chat(clean)
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
                prompt = prompt[0]
            if isinstance(prompt, str):
                if not prompt.strip():
                    raise BadRequest("the prompt is empty", "prompt")
                self.text.check_length([prompt], self.cfg.max_prompt_tokens)
                return encode(tok, prompt, raw=True)
            if isinstance(prompt, list) and len(prompt) > self.cfg.max_prompt_tokens:
                raise BadRequest(f"the prompt has {len(prompt)} tokens; at most {self.cfg.max_prompt_tokens} are "
                                 "accepted", "prompt", "context_length_exceeded")
            if isinstance(prompt, list) and prompt and all(_integral(t) is not None for t in prompt):
                return [_integral(t) for t in prompt]
            if isinstance(prompt, list) and not prompt:
                raise BadRequest("the prompt is empty", "prompt")
            raise BadRequest("'prompt' must be a non-empty string or a list of token ids", "prompt")
        except PromptError as exc:
            raise BadRequest(str(exc), "prompt") from None

    # responses ------------------------------------------------------------------
    def _usage(self, run, n_prompt: int) -> dict:
        return {"prompt_tokens": n_prompt, "completion_tokens": len(run.out),
                "total_tokens": n_prompt + len(run.out),
                "prompt_tokens_details": {"cached_tokens": run.stats.cached_prompt_tokens}}

    async def handle(self, raw: bytes, chat: bool):
        """Returns ("json", status, dict) or ("sse", 200, async iterator of str)."""
        try:
            body = self._parse_json(raw)
            max_tokens, sampling, stream, include_usage, stops = self._common(body, chat)
            ids = self._prompt_ids(body, chat)
            prefix = "chatcmpl-" if chat else "cmpl-"
            params = GenerateParams(ids, max_tokens, sampling, prefix + uuid.uuid4().hex, stop=stops)
            run = self.core.start(params)
        except ServingError as exc:
            return "json", exc.http_status, exc.to_openai()
        if stream:
            return "sse", 200, SSEStream(run, self._sse(run, chat, include_usage))
        try:
            detok = Detokenizer(self.core.tokenizer)
            async for chunk in run.chunks():
                detok.ids.extend(chunk)
        except ServingError as exc:
            return "json", exc.http_status, exc.to_openai()
        finally:
            run.release()
        text = detok.text()[: run.text_end]
        created = int(time.time())
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": run.finish,
                      "logprobs": None}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "finish_reason": run.finish, "logprobs": None}
            obj = "text_completion"
        return "json", 200, {"id": run.id, "object": obj, "created": created, "model": self.cfg.model_name,
                             "choices": [choice], "usage": self._usage(run, len(ids)),
                             "gsd_stats": run.stats.to_dict(), "token_ids": run.out}

    async def _sse(self, run, chat: bool, include_usage: bool) -> AsyncIterator[str]:
        created = int(time.time())
        obj = "chat.completion.chunk" if chat else "text_completion"
        base = {"id": run.id, "object": obj, "created": created, "model": self.cfg.model_name}

        def event(choice: dict | None, **extra) -> str:
            d = dict(base, choices=[choice] if choice is not None else [], **extra)
            return f"data: {json.dumps(d)}\n\n"

        def choice(text: str | None, finish=None, role=False) -> dict:
            if chat:
                delta = {}
                if role:
                    delta["role"] = "assistant"
                if text is not None:
                    delta["content"] = text
                return {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            return {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}

        detok = Detokenizer(self.core.tokenizer, run.params.stop)
        gen = run.chunks()
        try:
            if chat:
                yield event(choice("", role=True))
            async for chunk in gen:
                delta = detok.push(chunk, final=run.finish is not None, end=run.text_end)
                if delta:
                    yield event(choice(delta))
            tail = detok.push([], final=True, end=run.text_end)
            if tail:
                yield event(choice(tail))
            yield event(choice(None if chat else "", finish=run.finish), gsd_stats=run.stats.to_dict())
            if include_usage:
                yield event(None, usage=self._usage(run, len(run.prompt)))
        except ServingError as exc:
            yield f"data: {json.dumps(exc.to_openai())}\n\n"
        finally:
            await gen.aclose()
            run.release()      # also when the stream ended before run.chunks() started (nothing else would)
        yield "data: [DONE]\n\n"

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.cfg.model_name, "object": "model", "created": 0,
                                            "owned_by": "gsd-serve"}]}

    # gRPC gsd.v1.Router ----------------------------------------------------------
    def _grpc_params(self, req: "pb.GenerateRequest") -> GenerateParams:
        if req.model and req.model != self.cfg.model_name:
            raise BadRequest(f"the model '{req.model}' does not exist; this server serves '{self.cfg.model_name}'")
        tok = self.core.tokenizer
        given = [bool(req.prompt), bool(req.messages), bool(req.prompt_token_ids)]
        if sum(given) != 1:
            raise BadRequest("set exactly one of prompt, messages, prompt_token_ids")
        try:
            if req.prompt:
                if not req.prompt.strip():
                    raise BadRequest("the prompt is empty")
                self.text.check_length([req.prompt], self.cfg.max_prompt_tokens)
                ids = encode(tok, req.prompt, raw=True) if req.raw else self.text.encode_chat(
                    [{"role": "user", "content": req.prompt}])
            elif req.messages:
                msgs = [{"role": m.role or "user", "content": m.content} for m in req.messages]
                if any(m["role"] not in ROLES for m in msgs):
                    raise BadRequest(f"a message role must be one of {', '.join(ROLES)}")
                msgs = [dict(m, role="system" if m["role"] == "developer" else m["role"]) for m in msgs]
                self.text.check_length([m["content"] for m in msgs], self.cfg.max_prompt_tokens)
                ids = encode(tok, {"messages": msgs}, raw=True) if req.raw else self.text.encode_chat(msgs)
            else:
                ids = list(req.prompt_token_ids)
        except PromptError as exc:
            raise BadRequest(str(exc)) from None
        max_tokens = req.max_tokens if req.max_tokens != 0 else self.cfg.default_max_tokens
        if max_tokens < 1:
            raise BadRequest(f"max_tokens must be at least 1, got {max_tokens}")
        try:
            sampling = rpc.sampling_from_proto(req.sampling)
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        if req.timeout_s < 0:
            raise BadRequest(f"timeout_s must be >= 0, got {req.timeout_s}")
        try:
            stops = check_stops(list(req.stop))
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        return GenerateParams(ids, max_tokens, sampling, "gen-" + uuid.uuid4().hex, req.timeout_s or None, stops)

    async def grpc_generate(self, req: "pb.GenerateRequest") -> "pb.GenerateResponse":
        run = self.core.start(self._grpc_params(req))
        out: list[int] = []
        try:
            async for chunk in run.chunks():
                out.extend(chunk)
        finally:
            run.release()
        text = self.core.tokenizer.decode(out, skip_special_tokens=True)[: run.text_end]
        return pb.GenerateResponse(id=run.id, text=text,
                                   token_ids=out, finish_reason=run.finish, prompt_tokens=len(run.prompt),
                                   completion_tokens=len(out), stats=rpc.stats_to_proto(run.stats))

    async def grpc_generate_stream(self, req: "pb.GenerateRequest") -> AsyncIterator["pb.GenerateChunk"]:
        run = self.core.start(self._grpc_params(req))
        detok = Detokenizer(self.core.tokenizer, run.params.stop)
        gen = run.chunks()
        try:
            async for chunk in gen:
                text = detok.push(chunk, final=run.finish is not None, end=run.text_end)
                yield pb.GenerateChunk(id=run.id, text=text, token_ids=chunk)
        finally:
            await gen.aclose()
            run.release()
        yield pb.GenerateChunk(id=run.id, text=detok.push([], final=True, end=run.text_end), finish_reason=run.finish,
                               stats=rpc.stats_to_proto(run.stats), prompt_tokens=len(run.prompt),
                               completion_tokens=len(run.out))


class SSEStream:
    """An SSE body that gives its request back however it ends: read to the end, closed by the server after a
    disconnect, or dropped before its first chunk. An async generator that never started runs no `finally`
    when closed, so a response dropped that early used to hold its admission slot forever (enough of them
    and every request got 429). The HTTP layer closes this stream when the response ends for any reason."""

    def __init__(self, run, agen):
        self.run = run
        self._agen = agen

    def __aiter__(self):
        return self

    async def __anext__(self) -> str:
        return await self._agen.__anext__()

    async def aclose(self) -> None:
        try:
            await self._agen.aclose()
        finally:
            self.run.release()


class Detokenizer:
    """Incremental text of a growing token list; holds back an incomplete UTF-8 character and, while the output
    goes on, any end of the text that could still become one of the `stops` strings."""

    def __init__(self, tokenizer, stops=()):
        self.tokenizer = tokenizer
        self.stops = tuple(stops)
        self.ids: list[int] = []
        self.sent = ""

    def text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def push(self, ids: list[int], final: bool = False, end: int | None = None) -> str:
        """The text not yet returned; `end`: a stop string ended the output, its text has this many characters."""
        self.ids.extend(ids)
        text = self.text()
        if end is not None:
            text = text[:end]
        elif not final:
            if text.endswith("\ufffd"):
                return ""
            text = text[: len(text) - held_back(text, self.stops)]
        if not text.startswith(self.sent):
            return ""
        delta = text[len(self.sent):]
        self.sent = text
        return delta
