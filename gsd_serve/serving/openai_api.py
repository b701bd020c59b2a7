"""OpenAI-compatible HTTP (/v1/completions, /v1/chat/completions, /v1/models) and gsd.v1.Router Generate.

Framework-light: handlers take the raw body and return (status, JSON) or an async iterator of SSE lines,
so the Ray Serve deployment (services/router.py) is a thin FastAPI adapter around them.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import time
import uuid
from typing import AsyncIterator

from ..core.grammar import GrammarError, parse_response_format
from ..core.prompts import PromptError, encode
from ..core.sampling import MAX_TOP_LOGPROBS, SamplingParams
from ..core.stops import check_stops, held_back
from . import rpc
from .errors import BadRequest, ServingError
from .router import GenerateParams, RouterCore

pb = rpc.pb

MAX_CHOICES = 16            # `n`: choices one request may ask for
UNSUPPORTED = ("echo", "suffix", "tools", "functions", "logit_bias")
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
        self.words = TokenWords(core.tokenizer)

    # parsing --------------------------------------------------------------------
    def _parse_json(self, raw: bytes) -> dict:
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:   # RecursionError: nesting too deep
            raise BadRequest(f"the request body is not valid JSON: {type(exc).__name__}") from None
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object")
        return body

    def _logprobs(self, body: dict, chat: bool) -> int | None:
        """How many alternatives to return with each token's logprob; None: no logprobs. Chat: `logprobs` (a
        boolean) and `top_logprobs`; completions: `logprobs` (an integer, OpenAI's legacy form)."""
        if chat:
            on = body.get("logprobs")
            if on is not None and not isinstance(on, bool):
                raise BadRequest("'logprobs' must be a boolean", "logprobs")
            top = _int(body, "top_logprobs", None, 0, MAX_TOP_LOGPROBS)
            if top is not None and top > 0 and not on:
                raise BadRequest("'top_logprobs' needs 'logprobs': true", "top_logprobs")
            return (top or 0) if on else None
        if not _unset(body.get("top_logprobs")):
            raise BadRequest("'top_logprobs' is a chat parameter; completions take 'logprobs': an integer",
                             "top_logprobs")
        if body.get("logprobs") is False:
            return None
        return _int(body, "logprobs", None, 0, MAX_TOP_LOGPROBS)

    def _common(self, body: dict, chat: bool) -> tuple[int, SamplingParams, bool, bool, tuple[str, ...], int]:
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
        n = _int(body, "n", 1, 1, MAX_CHOICES)
        if body.get("best_of") not in (None, 1, n):
            raise BadRequest("'best_of' must be 1 or equal to 'n'", "best_of")
        # both fields are checked when both are sent (the chat API's max_completion_tokens wins), so a bad value
        # is refused whichever one carries it
        given = {}
        for name in (("max_completion_tokens", "max_tokens") if chat else ("max_tokens",)):
            value = body.get(name)
            if value is None:
                continue
            if _integral(value) is None:
                raise BadRequest(f"'{name}' must be an integer", name)
            if _integral(value) < 1:
                raise BadRequest(f"'{name}' must be at least 1, got {value}", name)
            given[name] = _integral(value)
        # the default never goes above the limit
        max_tokens = next(iter(given.values()), min(self.cfg.default_max_tokens, self.cfg.max_tokens_limit))
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
        return max_tokens, sampling, stream, include_usage, stops, n

    @staticmethod
    def _response_format(body: dict):
        """JSON mode's format (core.grammar.ResponseFormat), None for text."""
        try:
            fmt = body.get("response_format")
            return None if _unset(fmt) else parse_response_format(fmt)
        except GrammarError as exc:
            raise BadRequest(str(exc), "response_format") from None

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
    def _usage(self, runs: list, n_prompt: int) -> dict:
        """Usage of a request's choices: the prompt counted once (as OpenAI), the completions summed."""
        out = sum(len(run.out) for run in runs)
        return {"prompt_tokens": n_prompt, "completion_tokens": out, "total_tokens": n_prompt + out,
                "prompt_tokens_details": {"cached_tokens": runs[0].stats.cached_prompt_tokens}}

    def _start(self, params: GenerateParams, n: int) -> list:
        """Admit the request's n choices (each its own run; a seeded request's choice i samples with seed + i, an
        unseeded one's each with its own random seed); all or none."""
        if n == 1:
            return [self.core.start(params)]
        runs = []
        try:
            for i in range(n):
                seed = params.sampling.seed + i if params.sampling.seed is not None else None
                sampling = SamplingParams(params.sampling.temperature, params.sampling.top_k, params.sampling.top_p,
                                          seed % 2**63 if seed is not None else None)
                runs.append(self.core.start(dataclasses.replace(params, sampling=sampling,
                                                                request_id=f"{params.request_id}-{i}")))
        except BaseException:
            for run in runs:
                run.release()
            raise
        return runs

    async def handle(self, raw: bytes, chat: bool):
        """Returns ("json", status, dict) or ("sse", 200, async iterator of str)."""
        try:
            body = self._parse_json(raw)
            max_tokens, sampling, stream, include_usage, stops, n = self._common(body, chat)
            top_logprobs = self._logprobs(body, chat)
            fmt = self._response_format(body)
            ids = self._prompt_ids(body, chat)
            prefix = "chatcmpl-" if chat else "cmpl-"
            params = GenerateParams(ids, max_tokens, sampling, prefix + uuid.uuid4().hex, stop=stops,
                                    top_logprobs=top_logprobs, response_format=fmt)
            runs = self._start(params, n)
        except ServingError as exc:
            return "json", exc.http_status, exc.to_openai()
        group = RunGroup(runs)
        if stream:
            return "sse", 200, SSEStream(group, self._sse(params.request_id, runs, chat, include_usage))

        async def drain(run) -> None:
            async for _ in run.chunks():
                pass

        try:
            for outcome in await asyncio.gather(*[drain(run) for run in runs], return_exceptions=True):
                if isinstance(outcome, BaseException):
                    raise outcome
        except ServingError as exc:
            return "json", exc.http_status, exc.to_openai()
        finally:
            group.release()
        created = int(time.time())
        choices = []
        for i, run in enumerate(runs):
            text = self.core.tokenizer.decode(run.out, skip_special_tokens=True)[: run.text_end]
            logprobs = self._logprobs_json(run, 0, chat)
            if chat:
                choices.append({"index": i, "message": {"role": "assistant", "content": text},
                                "finish_reason": run.finish, "logprobs": logprobs})
            else:
                choices.append({"index": i, "text": text, "finish_reason": run.finish, "logprobs": logprobs})
        one = len(runs) == 1
        return "json", 200, {"id": params.request_id, "object": "chat.completion" if chat else "text_completion",
                             "created": created, "model": self.cfg.model_name, "choices": choices,
                             "usage": self._usage(runs, len(ids)),
                             "gsd_stats": runs[0].stats.to_dict() if one else [r.stats.to_dict() for r in runs],
                             "token_ids": runs[0].out if one else [r.out for r in runs]}

    async def _sse(self, request_id: str, runs: list, chat: bool, include_usage: bool) -> AsyncIterator[str]:
        created = int(time.time())
        obj = "chat.completion.chunk" if chat else "text_completion"
        base = {"id": request_id, "object": obj, "created": created, "model": self.cfg.model_name}

        def event(choice: dict | None, **extra) -> str:
            d = dict(base, choices=[choice] if choice is not None else [], **extra)
            return f"data: {json.dumps(d)}\n\n"

        def choice(index: int, text: str | None, finish=None, role=False, logprobs=None) -> dict:
            if chat:
                delta = {}
                if role:
                    delta["role"] = "assistant"
                if text is not None:
                    delta["content"] = text
                return {"index": index, "delta": delta, "finish_reason": finish, "logprobs": logprobs}
            return {"index": index, "text": text or "", "finish_reason": finish, "logprobs": logprobs}

        # each choice's relay feeds one queue: (index, tokens, final) per chunk, (index, None, None) at its end,
        # (index, exception, None) when it failed
        events: asyncio.Queue = asyncio.Queue()

        async def relay(index: int, run) -> None:
            gen = run.chunks()
            try:
                async for chunk in gen:
                    # whether this chunk is the run's last, as it arrives (a later look could be told "finished"
                    # about an earlier chunk)
                    events.put_nowait((index, chunk, run.finish is not None))
                events.put_nowait((index, None, None))
            except Exception as exc:  # noqa: BLE001 (handed to the reader, who reports it)
                events.put_nowait((index, exc, None))
            finally:
                await gen.aclose()

        detoks = [Detokenizer(self.core.tokenizer, run.params.stop) for run in runs]
        sent = [0] * len(runs)          # each choice's output tokens whose logprobs went out
        tasks = []
        try:
            if chat:
                for i in range(len(runs)):
                    yield event(choice(i, "", role=True))
            tasks = [asyncio.get_running_loop().create_task(relay(i, run)) for i, run in enumerate(runs)]
            open_ = len(runs)
            while open_:
                i, item, final = await events.get()
                run, detok = runs[i], detoks[i]
                if isinstance(item, BaseException):
                    raise item
                if item is None:
                    open_ -= 1
                    tail = detok.push([], final=True, end=run.text_end)
                    if tail:
                        yield event(choice(i, tail))
                    yield event(choice(i, None if chat else "", finish=run.finish), gsd_stats=run.stats.to_dict())
                    continue
                delta = detok.push(item, final=final, end=run.text_end)
                logprobs = self._logprobs_json(run, sent[i], chat, sent[i] + len(item))
                sent[i] += len(item)
                if delta or logprobs is not None:
                    yield event(choice(i, delta, logprobs=logprobs))
            if include_usage:
                yield event(None, usage=self._usage(runs, len(runs[0].prompt)))
        except ServingError as exc:
            yield f"data: {json.dumps(exc.to_openai())}\n\n"
        finally:
            for task in tasks:
                if not task.done():
                    task.cancel()
            for task in tasks:
                try:
                    await task
                except BaseException:  # noqa: BLE001 (cancelled, or its outcome was reported above)
                    pass
            for run in runs:
                run.release()  # also when the stream ended before run.chunks() started (nothing else would)
        yield "data: [DONE]\n\n"

    def _logprobs_json(self, run, start: int, chat: bool, end: int | None = None) -> dict | None:
        """The OpenAI `logprobs` object of output tokens start..end (None when the request asked for none).
        Completions' text_offset counts characters of the whole completion's text."""
        if run.logprobs is None:
            return None
        lps = run.logprobs[start:end]
        words = self.words
        if chat:
            def entry(token: int, logprob: float) -> dict:
                b = words.bytes(token)
                return {"token": b.decode("utf-8", "replace"), "logprob": logprob, "bytes": list(b)}
            return {"content": [dict(entry(lp.token, lp.logprob), top_logprobs=[
                entry(t, v) for t, v in zip(lp.top_tokens, lp.top_logprobs)]) for lp in lps]}
        out = run.out
        offsets, text = [], ""
        tok = self.core.tokenizer
        for i in range(start, start + len(lps)):
            text = tok.decode(out[:i], skip_special_tokens=True) if i else ""
            offsets.append(len(text.rstrip("\ufffd")))
        return {"tokens": [words.text(lp.token) for lp in lps], "token_logprobs": [lp.logprob for lp in lps],
                "top_logprobs": [{words.text(t): v for t, v in zip(lp.top_tokens, lp.top_logprobs)} for lp in lps],
                "text_offset": offsets}

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
        top_logprobs = req.top_logprobs if req.HasField("top_logprobs") else None
        if top_logprobs is not None and not 0 <= top_logprobs <= MAX_TOP_LOGPROBS:
            raise BadRequest(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {top_logprobs}")
        try:
            fmt = rpc.format_from_proto(req.response_format)
        except GrammarError as exc:
            raise BadRequest(str(exc), "response_format") from None
        return GenerateParams(ids, max_tokens, sampling, "gen-" + uuid.uuid4().hex, req.timeout_s or None, stops,
                              top_logprobs, fmt)

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
                                   completion_tokens=len(out), stats=rpc.stats_to_proto(run.stats),
                                   logprobs=[rpc.logprob_to_proto(lp) for lp in run.logprobs or ()])

    async def grpc_generate_stream(self, req: "pb.GenerateRequest") -> AsyncIterator["pb.GenerateChunk"]:
        run = self.core.start(self._grpc_params(req))
        detok = Detokenizer(self.core.tokenizer, run.params.stop)
        gen = run.chunks()
        try:
            sent = 0
            async for chunk in gen:
                text = detok.push(chunk, final=run.finish is not None, end=run.text_end)
                lps = run.logprobs[sent: sent + len(chunk)] if run.logprobs is not None else ()
                sent += len(chunk)
                yield pb.GenerateChunk(id=run.id, text=text, token_ids=chunk,
                                       logprobs=[rpc.logprob_to_proto(lp) for lp in lps])
        finally:
            await gen.aclose()
            run.release()
        yield pb.GenerateChunk(id=run.id, text=detok.push([], final=True, end=run.text_end), finish_reason=run.finish,
                               stats=rpc.stats_to_proto(run.stats), prompt_tokens=len(run.prompt),
                               completion_tokens=len(run.out))


class RunGroup:
    """The runs of one request's choices, released together."""

    def __init__(self, runs: list):
        self.runs = runs

    def release(self) -> None:
        for run in self.runs:
            run.release()


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


class TokenWords:
    """Each token's own bytes and text (byte-level BPE pieces mapped back to their bytes), as logprobs show them."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        # byte-level BPE (GPT-2's scheme) spells byte b as chr(b) for printable bytes, else as chr(256 + n)
        printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
        others = [b for b in range(256) if b not in printable]
        self.byte_of = {chr(b): b for b in printable} | {chr(256 + n): b for n, b in enumerate(others)}
        self.special = set(getattr(tokenizer, "all_special_ids", ()))
        self._bytes: dict[int, bytes] = {}

    def bytes(self, token: int) -> bytes:
        b = self._bytes.get(token)
        if b is None:
            piece = self.tokenizer.convert_ids_to_tokens(token) or ""
            if token not in self.special and piece and all(c in self.byte_of for c in piece):
                b = bytes(self.byte_of[c] for c in piece)
            else:
                b = (piece if token in self.special else self.tokenizer.decode([token])).encode("utf-8")
            self._bytes[token] = b
        return b

    def text(self, token: int) -> str:
        return self.bytes(token).decode("utf-8", "replace")


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
