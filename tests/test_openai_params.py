"""What OpenAI clients send beyond the prompt: stop sequences, logprobs, n choices and JSON mode, in process (Engine, `gsd-serve generate`) and through
the router and the OpenAI frontend over real gRPC workers (a tiny random Llama with the real tokenizer).

Each check runs plain decoding (`ar`) and speculation (`gsd`) side by side: a stop string ends the output exactly
where `ar`'s text would end, streamed or not, greedy or sampled; gsd's logprobs are ar's (to 1e-4, the same
tokens and alternatives); `n` seeded choices are the seeds' own samples. The served application's checks (the official
`openai` client through Ray Serve) are in test_services_serving.py.
"""
from __future__ import annotations

import asyncio
import json

import pytest

from gsd_serve.core.config import SpecConfig
from gsd_serve.core.prompts import encode
from gsd_serve.core.sampling import SamplingParams
from gsd_serve.core.stops import StopStrings, check_stops, held_back

pytestmark = pytest.mark.timeout(900)   # the first gsd generation measures the forward costs (slow on a busy machine)

SAMPLINGS = (SamplingParams(), SamplingParams(temperature=0.9, top_p=0.95, seed=7))
SECRET = "openai-params-worker-secret"


@pytest.fixture(scope="module")
def tok():
    from gsd_serve.models import DEFAULT_TARGET, load_tokenizer

    return load_tokenizer(DEFAULT_TARGET)


def stops_in(text: str) -> list[list[str]]:
    """Stop lists that match `text` somewhere after its start: a two-character piece from the middle, a piece from
    near the end together with a string that never occurs, and a piece that occurs twice or more if one does."""
    assert len(text) >= 8, text
    mid, late = len(text) // 2, len(text) - 4
    return [[text[mid: mid + 2]], ["\u2603never\u2603", text[late: late + 3]]]


def cut(text: str, stops) -> str:
    hits = [p for s in stops if (p := text.find(s)) >= 0]
    return text[: min(hits)] if hits else text


# ---------------------------------------------------------------- the pieces

def test_stop_values_are_checked():
    assert check_stops(None) == () and check_stops("") == () and check_stops([]) == ()
    assert check_stops("x") == ("x",) and check_stops(["a", "b"]) == ("a", "b")
    for bad in (["a", ""], ["a"] * 5, [1], 3, {"a": 1}):
        with pytest.raises(ValueError, match="stop"):
            check_stops(bad)
    assert held_back("Hello wor", ["world"]) == 3 and held_back("Hello", ["world"]) == 0
    assert held_back("ab", ["abc", "b"]) == 2     # the longest suffix that could still start a match


def test_stop_strings_cut_the_same_however_the_tokens_come(tok):
    """A stop string found in one big chunk cuts where token-by-token commits would: at the token that completes
    the first match, the text at the match's start."""
    ids = tok("Grüße aus Köln! One, two; three, four. Ça va? 🙂 fine.")["input_ids"]
    text = tok.decode(ids, skip_special_tokens=True)
    for stops in (["two;"], [". Ça", "va"], ["🙂"], ["x"], ["four", ","]):
        one = StopStrings(tok, stops)
        kept_one = one.push(ids)
        kept_one = len(ids) if kept_one is None else kept_one
        each = StopStrings(tok, stops)
        kept_each = 0
        for t in ids:
            k = each.push([t])
            kept_each += 1 if k is None else k
            if k is not None:
                break
        assert kept_one == kept_each and one.end == each.end, stops
        assert text[: one.end] == cut(text, stops), stops
        if one.end is not None:    # the kept tokens end with the one that completes the match
            assert cut(tok.decode(ids[: kept_one], skip_special_tokens=True), stops) == cut(text, stops)
            assert cut(tok.decode(ids[: kept_one - 1], skip_special_tokens=True), stops) == \
                tok.decode(ids[: kept_one - 1], skip_special_tokens=True)


# ---------------------------------------------------------------- in process: the real models

def test_stop_in_process_ar_and_gsd(engine, tokenizer):
    """The Engine (and so `gsd-serve generate --stop`): gsd's output under a stop string is ar's, tokens and text,
    greedy and sampled, streamed and not."""
    ids = encode(tokenizer, {"messages": [{"role": "user", "content": "List three colors, one per line."}]})
    ar, gsd = SpecConfig.for_method("ar"), SpecConfig.for_method("gsd", max_depth=4, budget=12)
    for i, sampling in enumerate(SAMPLINGS):
        full = engine.generate(ids, 16, ar, sampling)
        text = tokenizer.decode(full.token_ids, skip_special_tokens=True)
        for stops in stops_in(text)[i:i + 1]:     # one kind of stop list each: the real models are slow
            want = engine.generate(ids, 16, ar, sampling, StopStrings(tokenizer, stops))
            assert want.finish_reason == "stop" and len(want.token_ids) < len(full.token_ids)
            assert want.token_ids == full.token_ids[: len(want.token_ids)]
            assert tokenizer.decode(want.token_ids, skip_special_tokens=True)[: want.text_end] == cut(text, stops)
            stop = StopStrings(tokenizer, stops)
            gen = engine.stream(ids, 16, gsd, sampling, stop)
            streamed = [t for chunk in gen for t in chunk]
            got = gen.result
            assert streamed == got.token_ids == want.token_ids, (sampling, stops)
            assert (got.finish_reason, got.text_end) == ("stop", want.text_end)
            assert got.stats.new_tokens == len(got.token_ids)


def test_generate_cli_stop(engine, tokenizer, monkeypatch, capsys):
    """`gsd-serve generate --stop` (the session's engine instead of a new one): gsd's streamed text is ar's, cut
    before the stop string, and nothing of the stop string is printed."""
    from gsd_serve.cli import generate
    from gsd_serve.cli.main import main

    monkeypatch.setattr(generate, "build_engine", lambda args, method=None: (engine, tokenizer))
    prompt = ["--prompt", "What is the capital of France?", "--max-new-tokens", "10"]
    assert main(["generate", "--method", "ar", *prompt]) == 0
    full = capsys.readouterr().out
    assert "Paris" in full
    assert main(["generate", "--method", "gsd", *prompt, "--stop", "Paris", "--stop", "\u2603"]) == 0
    assert capsys.readouterr().out == full[: full.index("Paris")] + "\n"


def same_logprobs(a, b, tol=1e-4) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.token == y.token and x.top_tokens == y.top_tokens
        assert abs(x.logprob - y.logprob) <= tol
        assert all(abs(u - v) <= tol for u, v in zip(x.top_logprobs, y.top_logprobs))


def test_logprobs_in_process_gsd_equal_ar(engine, tokenizer):
    """The target's own log-probabilities of each output token (and its top alternatives), whatever round
    committed the token: gsd's equal ar's, greedy and sampled."""
    ids = encode(tokenizer, {"messages": [{"role": "user", "content": "Name three fruits."}]})
    ar, gsd = SpecConfig.for_method("ar"), SpecConfig.for_method("gsd", max_depth=4, budget=12)
    for sampling in SAMPLINGS:
        want = engine.generate(ids, 12, ar, sampling, logprobs=5)
        got = engine.generate(ids, 12, gsd, sampling, logprobs=5)
        assert got.token_ids == want.token_ids and len(want.logprobs) == len(want.token_ids)
        same_logprobs(got.logprobs, want.logprobs)
        assert all(len(lp.top_tokens) == 5 and lp.logprob <= 0 for lp in got.logprobs)
        if sampling.greedy:    # the greedy choice is the most probable token
            assert all(lp.token == lp.top_tokens[0] for lp in got.logprobs)
    assert engine.generate(ids, 4, gsd).logprobs is None     # not asked: not computed


# ---------------------------------------------------------------- served: router and frontend over gRPC workers

@pytest.fixture(scope="module")
def stack(tiny_pair):
    from conftest import start_workers

    servers = start_workers(tiny_pair, SECRET)
    yield servers
    for _, server, _ in servers.values():
        server.stop(0)


@pytest.fixture(scope="module")
def tiny_engine(tiny_pair, tok):
    from gsd_serve.core.engine import Engine
    from gsd_serve.models import ModelRunner

    target, draft = tiny_pair
    return Engine(ModelRunner(target), ModelRunner(draft), stop_token_ids={tok.eos_token_id},
                  shared_lookup_tokens=0)


async def _body(front, body: dict, chat: bool):
    """The frontend's answer: (status, JSON) or, streamed, (status, [events])."""
    kind, status, payload = await front.handle(json.dumps(body).encode(), chat=chat)
    if kind == "json":
        return status, payload
    events = []
    async for line in payload:
        assert line.startswith("data: ")
        events.append(line[6:].strip())
    await payload.aclose()
    assert events[-1] == "[DONE]"
    return status, [json.loads(e) for e in events[:-1]]


def _text(events, chat: bool) -> str:
    return "".join((c["delta"].get("content") or "") if chat else c["text"] for e in events for c in e["choices"])


def _finish(events) -> list:
    return [c["finish_reason"] for e in events for c in e["choices"] if c["finish_reason"]]


def test_stop_served_exactly_where_ar_ends(stack, tiny_engine, tok):
    """Through the router (gsd rounds on the target replica) and the OpenAI frontend: chat and completions,
    streamed and not, greedy and sampled; the replicas hold no session of a stopped request afterwards."""
    from conftest import router_core

    from gsd_serve.serving.openai_api import OpenAIFrontend

    ar = SpecConfig.for_method("ar")
    msgs = [{"role": "user", "content": "Tell me a story."}]
    cases = [(True, {"messages": msgs}, encode(tok, {"messages": msgs})),
             (False, {"prompt": "Once upon a time"}, encode(tok, "Once upon a time", raw=True))]

    async def main():
        core, _ = router_core(stack, tok, SECRET)
        front = OpenAIFrontend(core)
        for chat, prompt, ids in cases:
            for sampling in SAMPLINGS:
                full = tiny_engine.generate(ids, 24, ar, sampling)
                text = tok.decode(full.token_ids, skip_special_tokens=True)
                for stops in stops_in(text):
                    body = dict(prompt, model=core.config.model_name, max_tokens=24, stop=stops,
                                temperature=sampling.temperature, top_p=sampling.top_p, seed=sampling.seed)
                    status, r = await _body(front, body, chat)
                    assert status == 200, r
                    choice = r["choices"][0]
                    assert (choice["message"]["content"] if chat else choice["text"]) == cut(text, stops)
                    assert choice["finish_reason"] == "stop"
                    want = tiny_engine.generate(ids, 24, ar, sampling, StopStrings(tok, stops)).token_ids
                    assert r["token_ids"] == want and r["usage"]["completion_tokens"] == len(want)
                    status, events = await _body(front, dict(body, stream=True), chat)
                    assert status == 200 and _text(events, chat) == cut(text, stops), (chat, sampling, stops)
                    assert _finish(events) == ["stop"]
        for _ in range(100):    # the cancelled Decode streams end their sessions (and the draft sessions)
            held = [(name, s) for name, (w, _, _) in stack.items() for s in w.info().session_ids]
            if not held:
                break
            await asyncio.sleep(0.05)
        assert not held
        await core.close()
    asyncio.run(main())


def test_grpc_generate_takes_stop(stack, tiny_engine, tok):
    from conftest import router_core

    from gsd_serve.serving.errors import BadRequest
    from gsd_serve.serving.openai_api import OpenAIFrontend
    from gsd_serve.serving.rpc import pb

    ids = encode(tok, "Once upon a time", raw=True)
    full = tok.decode(tiny_engine.generate(ids, 24, SpecConfig.for_method("ar")).token_ids, skip_special_tokens=True)
    stops = stops_in(full)[0]

    async def main():
        core, _ = router_core(stack, tok, SECRET)
        front = OpenAIFrontend(core)
        req = pb.GenerateRequest(model=core.config.model_name, prompt="Once upon a time", raw=True, max_tokens=24,
                                 stop=stops)
        r = await front.grpc_generate(req)
        assert (r.text, r.finish_reason) == (cut(full, stops), "stop")
        chunks = [c async for c in front.grpc_generate_stream(req)]
        assert "".join(c.text for c in chunks) == cut(full, stops) and chunks[-1].finish_reason == "stop"
        for bad in (["a", ""], ["a"] * 5):
            with pytest.raises(BadRequest, match="stop"):
                await front.grpc_generate(pb.GenerateRequest(prompt="Hi", max_tokens=2, stop=bad))
        await core.close()
    asyncio.run(main())


def test_bad_values_get_400_naming_the_parameter(stack, tok):
    from conftest import router_core

    from gsd_serve.serving.openai_api import OpenAIFrontend

    async def main():
        core, _ = router_core(stack, tok, SECRET)
        front = OpenAIFrontend(core)
        base = {"model": core.config.model_name, "prompt": "Hi", "max_tokens": 2}
        for name, value in (("stop", ["a", ""]), ("stop", ["a", "b", "c", "d", "e"]), ("stop", 7),
                            ("stop", [None]), ("logprobs", 21), ("logprobs", -1), ("logprobs", "yes"),
                            ("top_logprobs", 2), ("response_format", {"type": "xml"}), ("response_format", "json"),
                            ("response_format", {"type": "json_schema"}),
                            ("response_format", {"type": "json_schema", "json_schema": {"schema": {"type": "objectx"}}}),
                            ("response_format", {"type": "json_schema", "json_schema": {"schema": []}}), ("n", 17),
                            ("n", 0), ("best_of", 3)):
            status, r = await _body(front, dict(base, **{name: value}), False)
            assert status == 400 and r["error"]["param"] == name, (name, value, r)
        chat = {"model": core.config.model_name, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
        status, r = await _body(front, dict(chat, response_format={"type": "text"}, stop=[], logprobs=False), True)
        assert status == 200 and r["choices"][0]["logprobs"] is None
        for extra, param in (({"logprobs": 3}, "logprobs"), ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
                             ({"top_logprobs": 2}, "top_logprobs"), ({"logprobs": True, "top_logprobs": -1},
                                                                     "top_logprobs")):
            status, r = await _body(front, dict(chat, **extra), True)
            assert status == 400 and r["error"]["param"] == param, (extra, r)
        await core.close()
    asyncio.run(main())


def test_logprobs_served_in_openai_format(stack, tiny_engine, tok):
    """Chat (`logprobs`, `top_logprobs`) and completions (`logprobs`: n): the served gsd values are the in-process
    ar ones, streamed and not; gRPC's top_logprobs too."""
    from conftest import router_core

    from gsd_serve.serving.openai_api import OpenAIFrontend, TokenWords
    from gsd_serve.serving.rpc import pb

    ar = SpecConfig.for_method("ar")
    words = TokenWords(tok)
    msgs = [{"role": "user", "content": "Tell me a story."}]

    def check_chat(content, want):
        assert [c["token"] for c in content] == [words.text(lp.token) for lp in want]
        assert [bytes(c["bytes"]) for c in content] == [words.bytes(lp.token) for lp in want]
        for c, lp in zip(content, want):
            assert abs(c["logprob"] - lp.logprob) <= 1e-4
            assert [t["token"] for t in c["top_logprobs"]] == [words.text(t) for t in lp.top_tokens]
            assert all(abs(t["logprob"] - v) <= 1e-4 for t, v in zip(c["top_logprobs"], lp.top_logprobs))

    async def main():
        core, _ = router_core(stack, tok, SECRET)
        front = OpenAIFrontend(core)
        model = core.config.model_name
        for sampling in SAMPLINGS:
            knobs = dict(model=model, max_tokens=16, temperature=sampling.temperature, top_p=sampling.top_p,
                         seed=sampling.seed)
            ids = encode(tok, {"messages": msgs})
            want = tiny_engine.generate(ids, 16, ar, sampling, logprobs=3)
            status, r = await _body(front, dict(knobs, messages=msgs, logprobs=True, top_logprobs=3), True)
            assert status == 200, r
            check_chat(r["choices"][0]["logprobs"]["content"], want.logprobs)
            status, events = await _body(front, dict(knobs, messages=msgs, logprobs=True, top_logprobs=3,
                                                     stream=True), True)
            check_chat([c for e in events for ch in e["choices"] if ch["logprobs"]
                        for c in ch["logprobs"]["content"]], want.logprobs)

            ids = encode(tok, "Once upon a time", raw=True)
            want = tiny_engine.generate(ids, 16, ar, sampling, logprobs=2)
            status, r = await _body(front, dict(knobs, prompt="Once upon a time", logprobs=2), False)
            assert status == 200, r
            lp = r["choices"][0]["logprobs"]
            assert lp["tokens"] == [words.text(x.token) for x in want.logprobs]
            assert all(abs(a - b.logprob) <= 1e-4 for a, b in zip(lp["token_logprobs"], want.logprobs))
            assert [list(d) for d in lp["top_logprobs"]] == [[words.text(t) for t in x.top_tokens]
                                                            for x in want.logprobs]
            text = r["choices"][0]["text"]
            assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])
            assert all(text[o:].startswith(t.rstrip("\ufffd")) for o, t in zip(lp["text_offset"], lp["tokens"])
                       if "\ufffd" not in t and t in text)
            status, events = await _body(front, dict(knobs, prompt="Once upon a time", logprobs=2, stream=True),
                                         False)
            streamed = [ch["logprobs"] for e in events for ch in e["choices"] if ch["logprobs"]]
            assert [t for x in streamed for t in x["tokens"]] == lp["tokens"]
            assert [o for x in streamed for o in x["text_offset"]] == lp["text_offset"]

            req = pb.GenerateRequest(model=model, prompt="Once upon a time", raw=True, max_tokens=16, top_logprobs=2,
                                     sampling=pb.SamplingParams(temperature=sampling.temperature,
                                                                top_p=sampling.top_p, seed=sampling.seed or 0))
            g = await front.grpc_generate(req)
            assert [m.token for m in g.logprobs] == list(g.token_ids) == want.token_ids
            assert all(abs(m.logprob - x.logprob) <= 1e-4 for m, x in zip(g.logprobs, want.logprobs))
        status, r = await _body(front, dict(model=model, max_tokens=4, prompt="Hi"), False)
        assert r["choices"][0]["logprobs"] is None
        await core.close()
    asyncio.run(main())


def test_n_choices_are_seeded_streams(stack, tiny_engine, tok):
    """n = 4 with a seed: choice i is the sample of seed + i (so it reproduces), streamed and not; without a
    seed each choice draws its own; greedy choices are all the greedy answer."""
    from conftest import router_core

    from gsd_serve.serving.openai_api import OpenAIFrontend

    ar = SpecConfig.for_method("ar")
    ids = encode(tok, "Once upon a time", raw=True)

    async def main():
        core, _ = router_core(stack, tok, SECRET)
        front = OpenAIFrontend(core)
        body = {"model": core.config.model_name, "prompt": "Once upon a time", "max_tokens": 12, "n": 4,
                "temperature": 1.0, "seed": 40}
        want = [tok.decode(tiny_engine.generate(ids, 12, ar, SamplingParams(1.0, seed=40 + i)).token_ids,
                           skip_special_tokens=True) for i in range(4)]
        status, r = await _body(front, body, False)
        assert status == 200, r
        assert [c["index"] for c in r["choices"]] == [0, 1, 2, 3]
        assert [c["text"] for c in r["choices"]] == want and len(set(want)) > 1
        assert r["usage"]["completion_tokens"] == sum(len(t) for t in r["token_ids"])
        status, again = await _body(front, body, False)
        assert [c["text"] for c in again["choices"]] == want
        status, events = await _body(front, dict(body, stream=True, stream_options={"include_usage": True}), False)
        texts = ["".join(c["text"] for e in events for c in e["choices"] if c["index"] == i) for i in range(4)]
        assert texts == want
        assert sorted(c["index"] for e in events for c in e["choices"] if c["finish_reason"]) == [0, 1, 2, 3]
        assert events[-1]["usage"]["completion_tokens"] == r["usage"]["completion_tokens"]
        status, r = await _body(front, dict(body, seed=None, n=3), False)
        assert status == 200 and len(r["choices"]) == 3
        status, r = await _body(front, dict(body, seed=None, n=2, temperature=0, stream=False,
                                            messages=[{"role": "user", "content": "Hi"}]), True)
        assert status == 200 and r["choices"][0]["message"] == r["choices"][1]["message"]
        assert core.inflight == 0
        await core.close()
    asyncio.run(main())


# ---------------------------------------------------------------- JSON mode (response_format)

# a schema whose every output is a few tokens: no whitespace between them (llguidance's own option), else the random
# model picks whitespace forever
FLAG = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False,
        "x-guidance": {"whitespace_flexible": False}}


@pytest.fixture(scope="module")
def tiny_grammars(tiny_engine, tok):
    from gsd_serve.core.grammar import GrammarCompiler

    return GrammarCompiler(tok, tiny_engine.stop_token_ids, tiny_engine.target.vocab_size)


def test_json_mode_served_is_ar_under_the_grammar(stack, tiny_engine, tiny_grammars, tok):
    """Through the router (gsd rounds on the target replica) and the frontend, chat and completions, greedy and
    sampled, streamed and not: the tokens are the in-process ar tokens under the same grammar, and an output the
    grammar ended (finish_reason stop) parses; gRPC's Generate takes the same response_format."""
    from conftest import router_core

    from gsd_serve.core.grammar import parse_response_format
    from gsd_serve.serving.openai_api import OpenAIFrontend
    from gsd_serve.serving.rpc import pb

    ar = SpecConfig.for_method("ar")
    msgs = [{"role": "user", "content": "Give me a JSON object."}]
    flag = {"type": "json_schema", "json_schema": {"name": "flag", "schema": FLAG}}
    cases = [(True, {"messages": msgs}, encode(tok, {"messages": msgs}), {"type": "json_object"}, SAMPLINGS[0]),
             (False, {"prompt": "{"}, encode(tok, "{", raw=True), {"type": "json_object"}, SAMPLINGS[1]),
             (True, {"messages": msgs}, encode(tok, {"messages": msgs}), flag, SAMPLINGS[1])]

    async def main():
        core, _ = router_core(stack, tok, SECRET)
        front = OpenAIFrontend(core)
        for chat, prompt, ids, fmt, sampling in cases:
            want = tiny_engine.generate(ids, 16, ar, sampling, grammar=tiny_grammars.constraint(
                parse_response_format(fmt)))
            text = tok.decode(want.token_ids, skip_special_tokens=True)
            assert text.lstrip().startswith("{")
            if want.finish_reason == "stop":
                json.loads(text)
            body = dict(prompt, model=core.config.model_name, max_tokens=16, response_format=fmt,
                        temperature=sampling.temperature, top_p=sampling.top_p, seed=sampling.seed)
            status, r = await _body(front, body, chat)
            assert status == 200, r
            choice = r["choices"][0]
            assert r["token_ids"] == want.token_ids and choice["finish_reason"] == want.finish_reason, fmt
            assert (choice["message"]["content"] if chat else choice["text"]) == text
            status, events = await _body(front, dict(body, stream=True), chat)
            assert status == 200 and _text(events, chat) == text and _finish(events) == [want.finish_reason]
        assert want.finish_reason == "stop" and json.loads(text) in ({"ok": True}, {"ok": False})
        req = pb.GenerateRequest(model=core.config.model_name, messages=[pb.ChatMessage(role="user", content="Hi")],
                                 max_tokens=16, response_format=pb.ResponseFormat(type="json_schema",
                                                                                  schema=json.dumps(FLAG)))
        g = await front.grpc_generate(req)
        assert g.finish_reason == "stop" and json.loads(g.text) in ({"ok": True}, {"ok": False})
        for bad in (pb.ResponseFormat(type="xml"), pb.ResponseFormat(type="json_schema", schema="{x"),
                    pb.ResponseFormat(type="json_schema", schema='{"type": "objectx"}')):
            with pytest.raises(BadRequest, match="response_format"):
                await front.grpc_generate(pb.GenerateRequest(prompt="Hi", max_tokens=2, response_format=bad))
        await core.close()

    from gsd_serve.serving.errors import BadRequest
    asyncio.run(main())


def test_json_mode_goes_on_after_a_failover(stack, tiny_engine, tiny_grammars, tok):
    """A target replica handed a request with output already generated (`output_tokens`) feeds that output to the
    grammar first, so it goes on exactly where the failed replica left off; output the grammar forbids is
    refused (INVALID_ARGUMENT), and so is a bad response_format."""
    from gsd_serve.core.grammar import parse_response_format
    from gsd_serve.serving.errors import BadRequest
    from gsd_serve.serving.rpc import pb, spec_to_proto

    fmt = parse_response_format({"type": "json_object"})
    ids = encode(tok, {"messages": [{"role": "user", "content": "JSON please"}]})
    want = tiny_engine.generate(ids, 12, SpecConfig.for_method("ar"), grammar=tiny_grammars.constraint(fmt))
    worker = stack["t1"][0]
    k = 5

    def decode(tokens, output_tokens, response_format, session):
        req = pb.DecodeRequest(session_id=session, tokens=tokens, max_tokens=12 - output_tokens,
                               stop_token_ids=[tok.eos_token_id], output_tokens=output_tokens,
                               spec=spec_to_proto(SpecConfig.for_method("gsd", max_depth=4, budget=12)),
                               response_format=response_format)
        return [t for chunk in worker.decode(req) for t in chunk.tokens]

    json_object = pb.ResponseFormat(type="json_object")
    assert decode(ids + want.token_ids[:k], k, json_object, "json-failover") == want.token_ids[k:]
    with pytest.raises(BadRequest, match="grammar"):
        decode(ids + encode(tok, "not json", raw=True), 2, json_object, "json-bad-output")
    with pytest.raises(BadRequest, match="response_format"):
        decode(ids, 0, pb.ResponseFormat(type="json_schema", schema='{"type": 3}'), "json-bad-format")


def test_logprobs_list_no_alternative_of_probability_zero(stack, tok):
    """Where a grammar (or top-k) leaves fewer tokens than top_logprobs asks for, the alternatives are the tokens
    still possible: no -inf, and the answer is strict JSON (the fuzzer found a 500 from serializing -inf)."""
    from conftest import router_core

    from gsd_serve.serving.openai_api import OpenAIFrontend

    async def main():
        core, _ = router_core(stack, tok, SECRET)
        front = OpenAIFrontend(core)
        base = dict(model=core.config.model_name, prompt=[0, 0], max_tokens=4, temperature=0.0)
        for extra in (dict(logprobs=5, response_format={"type": "json_object"}),
                      dict(logprobs=5, temperature=1.0, top_k=2, seed=3)):
            status, r = await _body(front, dict(base, **extra), False)
            assert status == 200, r
            json.dumps(r, allow_nan=False)
            tops = r["choices"][0]["logprobs"]["top_logprobs"]
            assert tops and all(v > float("-inf") for d in tops for v in d.values())
            if "response_format" in extra:     # once the object is closed only the stop tokens remain possible
                assert any(len(d) < 5 for d in tops)

    asyncio.run(main())
