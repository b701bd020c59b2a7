"""Reliability and security of the served stack: real Ray Serve, real gRPC, real redis-server.

One application with 2 draft and 2 target replicas and an API key (conftest.served_app, shared with
test_services_serving.py): authentication on HTTP, the Router
RPCs and the worker ports; hostile requests (oversized, malformed, wrong types) answered with 4xx /
INVALID_ARGUMENT / RESOURCE_EXHAUSTED; a short soak (16 streams: memory flat, nothing left behind) and a
short chaos run (8 streams while a draft replica, a target replica and Redis fail in turn: no failed
request, every answer identical to the in-process engine's greedy output). The long versions are the
`gsd-serve soak` and `gsd-serve chaos` commands.
"""
from __future__ import annotations

import os

import grpc
import httpx
import pytest

from conftest import SERVED_APP as APP
from conftest import SERVED_AUTH as AUTH
from conftest import SERVED_KEY as KEY
from conftest import SERVED_MODEL as MODEL
from conftest import served_spec, whole

pytestmark = [pytest.mark.ray, pytest.mark.timeout(1200)]

MAX = 16
SPEC = served_spec()
SOAK_S = float(os.environ.get("GSD_TEST_SOAK_S", 24))   # the long soak is `gsd-serve soak`


@pytest.fixture(scope="module")
def app(served_app):
    return whole(served_app)


@pytest.fixture(scope="module")
def cases(engine, tokenizer):
    from gsd_serve.tools.reliability import make_cases

    return make_cases(engine, tokenizer, SPEC, 8, MAX)


@pytest.fixture
def probe(app):
    from gsd_serve.tools.local_stack import AppProbe

    return AppProbe(APP)


def ask(app, case, headers=AUTH):
    r = httpx.post(app["http"] + "/v1/chat/completions", headers=headers, timeout=300,
                   json={"model": MODEL, "messages": case.messages, "max_tokens": MAX, "temperature": 0})
    return r


def test_api_key_on_http_and_grpc(app, cases):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from gsd_serve.serving.rpc import pb, pb_grpc

    url = app["http"]
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"X-Api-Key": KEY}):
        for r in (httpx.get(url + "/v1/models", headers=headers, timeout=30), ask(app, cases[0], headers)):
            assert r.status_code == 401, (headers, r.status_code, r.text)
            assert r.json()["error"]["type"] == "authentication_error" and r.headers["www-authenticate"] == "Bearer"
    assert httpx.get(url + "/v1/models", headers=AUTH, timeout=30).json()["data"][0]["id"] == MODEL
    r = ask(app, cases[0])
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == cases[0].text
    assert httpx.get(url + "/health", timeout=30).status_code == 200          # open, as in vLLM
    assert "gsd_request_rejected_total" in httpx.get(url + "/metrics", timeout=30).text
    # the official client sends the key as a bearer token
    import openai

    c = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=300)
    assert c.chat.completions.create(model=MODEL, messages=cases[1].messages, max_tokens=MAX,
                                     temperature=0).choices[0].message.content == cases[1].text
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0).models.list()

    req = pb.GenerateRequest(model=MODEL, messages=[pb.ChatMessage(role=m["role"], content=m["content"])
                                                    for m in cases[0].messages], max_tokens=MAX)
    with grpc.insecure_channel(app["grpc"]) as ch:
        stub = pb_grpc.RouterStub(ch)
        for md in ((("application", APP),), (("application", APP), ("authorization", "Bearer wrong"))):
            for call in (stub.Generate, lambda r, **kw: list(stub.GenerateStream(r, **kw))):
                with pytest.raises(grpc.RpcError) as err:
                    call(req, metadata=md, timeout=60)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, err.value
        md = (("application", APP), ("authorization", f"Bearer {KEY}"))
        assert stub.Generate(req, metadata=md, timeout=300).text == cases[0].text
        health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(),
                                                      metadata=(("application", APP),), timeout=30)
        assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_worker_ports_serve_only_their_application(app, probe):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from gsd_serve.serving.rpc import pb, pb_grpc, root_graph_proto

    workers = probe.workers()
    assert sorted(w["kind"] for w in workers) == ["draft", "draft", "target", "target"]
    for w in workers:
        with grpc.insecure_channel(w["address"]) as ch:
            if w["kind"] == "draft":
                stub = pb_grpc.DraftStub(ch)
                calls = [(stub.Propose, pb.ProposeRequest(session_id="s", delta=[1], root_index=0))]
            else:
                stub = pb_grpc.TargetStub(ch)
                calls = [(stub.Prefill, pb.PrefillRequest(session_id="s", tokens=[1, 2])),
                         (stub.Verify, pb.VerifyRequest(items=[pb.VerifyItem(session_id="s", delta=[1],
                                                                             graph=root_graph_proto(1))]))]
            calls += [(stub.Release, pb.ReleaseRequest(session_ids=["s"])), (stub.Info, pb.InfoRequest())]
            for call, req in calls:
                for md in (None, (("authorization", "Bearer guess"),), (("authorization", KEY),)):
                    with pytest.raises(grpc.RpcError) as err:
                        call(req, metadata=md, timeout=30)
                    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, (w["kind"], call, err.value)
            st = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=30)
            assert st.status == health_pb2.HealthCheckResponse.SERVING    # health checks stay open


def test_hostile_http_requests_get_4xx(app, cases):
    url = app["http"] + "/v1/chat/completions"
    big = b'{"model": "' + b"x" * (12 * 1024 * 1024) + b'"}'
    r = httpx.post(url, content=big, headers=dict(AUTH, **{"content-type": "application/json"}), timeout=120)
    assert r.status_code == 413 and r.json()["error"]["message"], r.text

    def chunks():     # no Content-Length: the body is cut off at the limit while it streams
        for _ in range(12):
            yield b" " * (1024 * 1024)

    r = httpx.post(url, content=chunks(), headers=dict(AUTH, **{"content-type": "application/json"}), timeout=120)
    assert r.status_code == 413, r.text
    r = httpx.post(url, content=big, headers={"content-type": "application/json"}, timeout=120)
    assert r.status_code == 401          # the key is checked before the body is read

    ok = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    wrong = [dict(ok, messages="Hi"), dict(ok, messages=[{"role": "user", "content": 5}]),
             dict(ok, messages=[{"role": "root", "content": "x"}]), dict(ok, max_tokens=1.5),
             dict(ok, max_tokens=10 ** 12), dict(ok, max_tokens=True), dict(ok, temperature="hot"),
             dict(ok, temperature=1e308 * 10 if False else 99), dict(ok, top_p=0), dict(ok, top_p=1.5),
             dict(ok, top_k=-7), dict(ok, seed=-1), dict(ok, seed=2 ** 64), dict(ok, stream="yes"),
             dict(ok, stream_options={"include_usage": "yes"}), dict(ok, stream_options=[1]), dict(ok, n=17),
             dict(ok, model=None), dict(ok, model=["x"]), dict(ok, logprobs="yes"),
             dict(ok, logprobs=True, top_logprobs=21), dict(ok, stop=["a", "b", "c", "d", "e"]), dict(ok, stop=[""]),
             dict(ok, response_format={"type": "xml"}),
             dict(ok, messages=[{"role": "user", "content": "x" * 3_000_000}])]
    for body in wrong:
        r = httpx.post(url, json=body, headers=AUTH, timeout=60)
        assert 400 <= r.status_code < 500, (str(body)[:200], r.status_code, r.text[:300])
        assert r.json()["error"]["message"]
    for raw in (b"", b"null", b"\xff\xfe", b'{"model": ' * 10000, b"[" * 100000):
        r = httpx.post(url, content=raw, headers=dict(AUTH, **{"content-type": "application/json"}), timeout=60)
        assert 400 <= r.status_code < 500, (raw[:40], r.status_code, r.text[:300])
    r = ask(app, cases[2])          # still serving, exactly
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == cases[2].text


def test_hostile_grpc_requests_to_the_router(app, cases):
    from gsd_serve.serving.rpc import MAX_ROUTER_REQUEST_BYTES, pb, pb_grpc

    md = (("application", APP), ("authorization", f"Bearer {KEY}"))
    with grpc.insecure_channel(app["grpc"], options=[("grpc.max_send_message_length", 64 * 2**20)]) as ch:
        for method in ("/gsd.v1.Router/Generate", "/gsd.v1.Router/GenerateStream"):
            raw = (ch.unary_unary if method.endswith("Generate") else ch.unary_stream)(method)
            for body, code in ((b"\xff\xff\xff\xff", grpc.StatusCode.INVALID_ARGUMENT),
                               (b"\x0a\xff\xff\xff\xff\x0f", grpc.StatusCode.INVALID_ARGUMENT),
                               (pb.GenerateRequest(model=MODEL, prompt="x" * (MAX_ROUTER_REQUEST_BYTES + 10))
                                .SerializeToString(), grpc.StatusCode.RESOURCE_EXHAUSTED)):
                with pytest.raises(grpc.RpcError) as err:
                    result = raw(body, metadata=md, timeout=60)
                    if not method.endswith("Generate"):
                        list(result)
                assert err.value.code() == code, (method, body[:10], err.value)
        stub = pb_grpc.RouterStub(ch)
        for req in (pb.GenerateRequest(model=MODEL, prompt="word " * 100000, max_tokens=2),
                    pb.GenerateRequest(model=MODEL, messages=[pb.ChatMessage(role="root", content="x")]),
                    pb.GenerateRequest(model=MODEL, prompt_token_ids=list(range(5000)), max_tokens=2),
                    pb.GenerateRequest(model=MODEL, prompt="Hi", max_tokens=10 ** 9),
                    pb.GenerateRequest(model=MODEL, prompt="Hi", sampling=pb.SamplingParams(top_p=7))):
            with pytest.raises(grpc.RpcError) as err:
                stub.Generate(req, metadata=md, timeout=60)
            assert err.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED), \
                err.value
        req = pb.GenerateRequest(model=MODEL, messages=[pb.ChatMessage(role=m["role"], content=m["content"])
                                                        for m in cases[3].messages], max_tokens=MAX)
        assert stub.Generate(req, metadata=md, timeout=300).text == cases[3].text


def test_soak_short(app, cases, probe):
    """16 streams for 24 s: no failure, exact answers, every process's memory flat after warm-up,
    nothing left behind (sessions, in-flight requests, queued Verify items)."""
    from gsd_serve.tools.reliability import LoadGenerator, SoakConfig, run_soak

    load = LoadGenerator(app["http"], MODEL, cases, MAX, streams=16, api_key=KEY)
    report = run_soak(SoakConfig(duration_s=SOAK_S, warmup_s=SOAK_S / 2, sample_every_s=3), load, probe)
    print("soak:", report)
    assert report["failed"] == 0 and report["mismatches"] == 0 and report["completed"] >= 16, report
    assert report["after"] == {"sessions_held": 0, "inflight": 0, "runs": 0}, report
    assert len(report["memory"]) == 5 and report["max_drift"] <= 0.10, report["memory"]
    assert report["passed"], report


def test_chaos_short(app, cases, probe, redis_server):
    """8 streams while a draft replica, a target replica and Redis fail in turn: 0 failed requests, every
    answer identical to the in-process engine's, every replica replaced, nothing left behind."""
    from gsd_serve.tools.reliability import ChaosConfig, LoadGenerator, run_chaos

    if not redis_server.can_stop:
        pytest.fail("the chaos test restarts Redis: run it with its own redis-server (unset REDIS_URL)")
    load = LoadGenerator(app["http"], MODEL, cases, MAX, streams=8, api_key=KEY)
    report = run_chaos(ChaosConfig(duration_s=0, cycles=1, settle_s=3), load, probe, redis_server)
    print("chaos:", report)
    assert report["faults_by_kind"] == {"draft": 1, "target": 1, "redis": 1}, report
    assert not report["fault_errors"], report
    assert report["failed"] == 0 and report["mismatches"] == 0 and report["completed"] >= 8, report
    assert report["after"]["sessions_held"] == 0 and report["after"]["inflight"] == 0, report
    assert report["passed"], report
