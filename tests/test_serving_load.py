"""Serving under load, without Ray. Real tiny Llama weights, real gRPC over loopback.

- bounded-load routing (router.bounded_pick / RouterCore.pick): a hot prompt prefix spreads over the replicas
  within ceil((1 + slack) x share), a key keeps its replica while that one is under the bound;
- BatchGate: calls that overlap run as one batch, each call gets its own answer or its own error;
- batched drafting: core.drafting.propose_many drafts the same graphs as DraftSession.propose one by one
  (independent and feature drafts, several rounds, greedy and sampled), with one fused forward per level;
- (a) one invalid Verify item fails only itself; (b) an SSE response dropped before its first chunk releases its
  admission slot; (c) concurrent requests share the target replica's fused forwards; (d) sessions are bounded
  by the bytes their caches hold;
- (e) the served feature hand-off: a feature-conditioned draft behind draft + target workers gives exactly the
  target's greedy output, and Target Prefill / Verify return the target's features when asked.
"""
from __future__ import annotations

import asyncio
import json
import math
import threading
import time

import pytest
import torch

from gsd_serve.core.config import SpecConfig
from gsd_serve.core.sampling import SamplingParams
from gsd_serve.serving import rpc

pytestmark = pytest.mark.timeout(300)
pb = rpc.pb
SPEC = SpecConfig.for_method("gsd", max_depth=4, budget=12)
STATIC = SpecConfig.for_method("gsd", max_depth=4, budget=12, planner=False)


@pytest.fixture(scope="module")
def tokenizer():
    from gsd_serve.models import DEFAULT_TARGET, load_tokenizer

    return load_tokenizer(DEFAULT_TARGET)


@pytest.fixture(scope="module")
def workers(tiny_pair):
    """Two draft and two target workers (tiny pair) on loopback gRPC, no secret."""
    from conftest import start_workers

    servers = start_workers(tiny_pair, None, names=("d1", "d2", "t1", "t2"))
    yield servers
    for _, server, _ in servers.values():
        server.stop(0)


def _core(servers, tokenizer, **cfg):
    from conftest import router_core

    return router_core(servers, tokenizer, None, **cfg)[0]


def _engine(tiny_pair, tokenizer):
    from gsd_serve.core.engine import Engine
    from gsd_serve.models import ModelRunner

    target, draft = tiny_pair
    return Engine(ModelRunner(target), ModelRunner(draft), stop_token_ids={tokenizer.eos_token_id})


async def _generate(core, ids, n, sampling=None, seen=None):
    """Run one request to its end; `seen` collects the (draft, target) replica ids it used."""
    from gsd_serve.serving.router import GenerateParams

    run = core.start(GenerateParams(ids, n, sampling or SamplingParams()))
    out = []
    async for chunk in run.chunks():
        out += chunk
        if seen is not None:
            seen.add(("target", run.target.replica_id if run.target else None))
    return out, run


def _wait(cond, what: str, timeout_s: float = 60.0, step_s: float = 0.005) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(step_s)


# ---------------------------------------------------------------- bounded-load routing

def _fake_core(tokenizer, n: int, slack: float = 0.25):
    """A RouterCore that discovers n target replicas (channels are lazy: nothing is called here)."""
    from gsd_serve.serving.router import RouterConfig, RouterCore

    async def discover():
        return [("target", f"t{i}", f"127.0.0.1:{10000 + i}") for i in range(n)]

    return RouterCore(RouterConfig(spec=SPEC, affinity_slack=slack), discover, tokenizer=tokenizer,
                      stop_ids={tokenizer.eos_token_id})


@pytest.mark.parametrize("n,slack", [(2, 0.25), (4, 0.25), (5, 0.0), (3, 1.0)])
def test_bounded_pick_spreads_a_hot_prefix(tokenizer, n, slack):
    from gsd_serve.serving.router import GenerateParams, _rendezvous

    hot = list(range(1000, 1040))        # one shared system prompt: the same affinity key for every request

    async def main():
        core = _fake_core(tokenizer, n, slack)
        runs = []
        for i in range(6 * n + 1):
            run = core.start(GenerateParams(hot + [2000 + i], 4, SamplingParams()))
            ep = await core.pick("target", run.key)
            if i == 0:
                assert ep is _rendezvous(run.key, core.live("target"))[0]     # an idle fleet: its own replica
            run.assign(ep)
            runs.append(run)
            total = i + 1
            bound = math.ceil((1 + slack) * total / n)
            loads = [e.load for e in core.live("target")]
            assert sum(loads) == total and max(loads) <= bound, (total, loads)
        # so every replica carries at least what the others' bound leaves (the old pick: all on one replica)
        assert min(loads) >= total - (n - 1) * bound, loads
        assert sum(1 for x in loads if x) >= math.ceil(total / bound) >= 2, loads
        order = _rendezvous(runs[0].key, core.live("target"))
        # requests leave: the loads follow (Run.release gives the replica back)
        for run in runs:
            run.release()
        assert [e.load for e in order] == [0] * n and core.inflight == 0
        await core.close()
    asyncio.run(main())


def test_bounded_pick_keeps_affinity_under_the_bound(tokenizer):
    from gsd_serve.serving.router import _rendezvous, bounded_pick

    async def main():
        core = _fake_core(tokenizer, 4)
        await core.refresh(force=True)
        eps = core.live("target")
        assert len(eps) == 4
        for e in eps:
            e.load = 2                          # balanced: every key's first choice is under the bound
        firsts = set()
        for i in range(40):
            key = bytes(str([i, i + 1, i + 2]), "ascii")
            order = _rendezvous(key, eps)
            assert bounded_pick(key, eps, 0.25) is order[0]
            firsts.add(order[0].replica_id)
            # the key's first choice over the bound: it spills to its second choice, the same one every time
            order[0].load = 10
            assert bounded_pick(key, eps, 0.25) is order[1] is bounded_pick(key, eps, 0.25)
            order[0].load = 2
        assert len(firsts) == 4                 # different prefixes land on different replicas
        await core.close()
    asyncio.run(main())


def test_hot_prefix_is_served_by_every_replica_exactly(workers, tiny_pair, tokenizer):
    """Requests sharing their first affinity_block tokens (one system prompt) over 2 drafts and 2 targets:
    both targets and both drafts serve them (the code before 9b8da75 sent all of them to one of each), and
    every answer is the engine's."""
    engine = _engine(tiny_pair, tokenizer)
    system = tokenizer("You are a helpful assistant. Answer briefly and kindly, in plain words, and never "
                       "make things up. When you do not know, say so. Keep to the point; use short sentences "
                       "and simple words. Questions follow.")["input_ids"]
    assert len(system) > 32
    prompts = [system + tokenizer(q)["input_ids"] for q in
               ("Hi", "What is two and two?", "Name a color.", "Tell a joke.", "Count to five.", "Why is the sky blue?",
                "Say hello.", "Where is Paris?")]

    async def main():
        # every session drafts from its first round (no planner), so their drafting overlaps and the bound spreads it
        core = _core(workers, tokenizer, affinity_block=32, spec=STATIC)
        seen = [set() for _ in prompts]
        got = await asyncio.gather(*[_generate(core, p, 24, seen=s) for p, s in zip(prompts, seen)])
        for p, (out, _) in zip(prompts, got):
            assert out == engine.generate(p, 24, spec=SPEC).token_ids
        used = [{rid for k, rid in s if k == "target" and rid} for s in seen]
        assert all(len(u) == 1 for u in used), used          # each request stays on its replica
        per = {name: sum(1 for u in used if name in u) for name in ("t1", "t2")}
        assert all(c > 0 for c in per.values()), per
        # all placed at once (their prefills start together): within the bound
        assert max(per.values()) <= math.ceil(1.25 * len(prompts) / 2), per
        # the target replicas spread their sessions' drafting over both draft replicas the same way
        drafted = {d: workers[d][0].load.snapshot()["active_sessions"] for d in ("d1", "d2")}
        assert all(drafted.values()), drafted
        await core.close()
    asyncio.run(main())


# ---------------------------------------------------------------- BatchGate

def _submitter(gate):
    """(results, call): call(x) submits x to the gate and records its result or error under x."""
    results: dict = {}

    def call(x):
        try:
            results[x] = gate.submit(x)
        except Exception as exc:  # noqa: BLE001
            results[x] = exc
    return results, call


def test_batch_gate_fuses_overlapping_calls_and_answers_each():
    from gsd_serve.serving.batching import BatchGate

    first_in, release = threading.Event(), threading.Event()
    batches: list[list] = []

    def run_batch(jobs):
        batches.append([j.payload for j in jobs])
        if len(batches) == 1:           # the model is busy with the first call while the others arrive
            first_in.set()
            assert release.wait(60)
        for j in jobs:
            if j.payload == "bad":
                j.error = ValueError("this call alone is refused")
            elif j.payload != "forgotten":
                j.result = j.payload * 10

    gate = BatchGate(run_batch, max_batch=4)
    results, call = _submitter(gate)

    threads = [threading.Thread(target=call, args=(1,))]
    threads[0].start()
    assert first_in.wait(60)
    others = [2, 3, "bad", 4, 5, "forgotten"]
    for x in others:
        threads.append(threading.Thread(target=call, args=(x,)))
        threads[-1].start()
    _wait(lambda: gate.queued == len(others), "the calls to queue")
    release.set()
    for t in threads:
        t.join(60)
        assert not t.is_alive()
    assert batches[0] == [1]
    assert [len(b) for b in batches] == [1, 4, 2], batches     # the queue leaves together, max_batch at a time
    assert sorted(map(str, batches[1] + batches[2])) == sorted(map(str, others))
    assert gate.batches == 3 and gate.largest == 4 and gate.queued == 0
    assert {k: v for k, v in results.items() if isinstance(k, int)} == {1: 10, 2: 20, 3: 30, 4: 40, 5: 50}
    assert isinstance(results["bad"], ValueError) and "alone" in str(results["bad"])
    assert isinstance(results["forgotten"], RuntimeError)        # a batch that forgot a call still answers it
    assert gate.submit(7) == 70                                  # a lone call runs at once


def test_batch_gate_batch_failure_reaches_only_unanswered_calls():
    from gsd_serve.serving.batching import BatchGate

    gate_in, release = threading.Event(), threading.Event()
    calls = []

    def run_batch(jobs):
        calls.append(len(jobs))
        if len(calls) == 1:
            gate_in.set()
            assert release.wait(60)
            jobs[0].result = "ok"
            return
        jobs[0].result = "answered before the failure"
        raise RuntimeError("the fused forward failed")

    gate = BatchGate(run_batch)
    results, call = _submitter(gate)

    t0 = threading.Thread(target=call, args=(0,))
    t0.start()
    assert gate_in.wait(60)
    ts = [threading.Thread(target=call, args=(i,)) for i in (1, 2, 3)]
    for t in ts:
        t.start()
    _wait(lambda: gate.queued == 3, "the calls to queue")
    release.set()
    for t in [t0] + ts:
        t.join(60)
    assert calls == [1, 3] and results[0] == "ok"
    answered = [v for v in results.values() if v == "answered before the failure"]
    failed = [v for v in results.values() if isinstance(v, RuntimeError) and "fused forward" in str(v)]
    assert len(answered) == 1 and len(failed) == 2
    # the gate is free again after a failed batch
    gate2 = BatchGate(lambda jobs: [setattr(j, "result", j.payload + 1) for j in jobs])
    assert gate2.submit(1) == 2


# ---------------------------------------------------------------- batched drafting: exact against propose

def _tiny_llama(dtype, seed: int = 0, layers: int = 3):
    from transformers import LlamaConfig, LlamaForCausalLM

    from gsd_serve.models import DEFAULT_TARGET, load_tokenizer

    vocab = len(load_tokenizer(DEFAULT_TARGET))
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval().to(dtype)


# deep and wide graphs from a random draft: no confidence cut, every sibling kept
DEEP = SpecConfig.for_method("gsd", k=3, max_depth=4, max_width=4, budget=16, confidence_threshold=0.0,
                             sibling_threshold=0.0, lookup=3)


def _graph_key(graph, slots):
    return (list(graph.tokens), list(graph.parent), list(graph.depth), list(slots),
            [[c for c, _ in e] for e in graph.edges])


def _assert_same_graph(a, b):
    (ga, sa), (gb, sb) = a, b
    assert _graph_key(ga, sa) == _graph_key(gb, sb)
    pa = [p for e in ga.edges for _, p in e]
    pb_ = [p for e in gb.edges for _, p in e]
    assert torch.allclose(torch.tensor(pa, dtype=torch.float64), torch.tensor(pb_, dtype=torch.float64),
                          rtol=1e-9, atol=1e-12)


def _rounds_exact(runner, prompts, samplings, depths, rounds=3, features=None):
    """Draft `rounds` rounds for each prompt twice: every session alone (DraftSession.propose) and all together
    (propose_many); after each round both commit the same path and take the same next root. Returns the runner's
    forwards per round for (alone, together)."""
    from gsd_serve.core.drafting import DraftSession

    def sessions():
        out = []
        for p in prompts:
            s = DraftSession(runner)
            s.pending = list(p[:-1])
            out.append(s)
        return out

    with torch.inference_mode():      # as in the draft worker
        return _rounds(runner, prompts, samplings, depths, rounds, features, sessions)


def _rounds(runner, prompts, samplings, depths, rounds, features, sessions):
    from gsd_serve.core.drafting import ProposeJob, propose_many
    from gsd_serve.core.sampling import TokenChooser

    alone, together = sessions(), sessions()
    seqs = [list(p) for p in prompts]
    choosers = [TokenChooser(sp, runner.vocab_size) for sp in samplings]
    forwards = []
    gen = torch.Generator().manual_seed(1)
    for rnd in range(rounds):
        if features is not None:            # the target's features of the newly committed positions
            for i, seq in enumerate(seqs):
                start = 0 if rnd == 0 else len(seq) - 3
                f = torch.randn(len(seq) - start, features, generator=gen, dtype=torch.float64)
                alone[i].add_features(start, f.clone())
                together[i].add_features(start, f.clone())
        jobs = lambda ss: [ProposeJob(s, seq[-1], len(seq) - 1, (), DEEP, ch, d, seq)   # noqa: E731
                           for s, seq, ch, d in zip(ss, seqs, choosers, depths)]
        f0 = runner.forwards
        a = [s.propose(j.root, j.root_index, j.context, j.config, j.chooser, j.max_depth, j.history)
             for s, j in zip(alone, jobs(alone))]
        f1 = runner.forwards
        b = propose_many(jobs(together))
        f2 = runner.forwards
        forwards.append((f1 - f0, f2 - f1))
        for x, y in zip(a, b):
            _assert_same_graph(x, y)
        for i, ((graph, slots), s_a, s_b) in enumerate(zip(a, alone, together)):
            assert s_a.cache.length == s_b.cache.length
            # accept the first child chain (two levels where there are), then a bonus token
            path = [0]
            while len(path) < 3 and graph.edges[path[-1]]:
                path.append(graph.edges[path[-1]][0][0])
            new = [graph.tokens[v] for v in path[1:]] + [4000 + 7 * rnd + i]
            seqs[i] = seqs[i] + new
            for s in (s_a, s_b):
                s.commit(graph, slots, path)
                s.pending = seqs[i][s.cache.length:-1]
    for s_a, s_b in zip(alone, together):
        assert s_a.cache.length == s_b.cache.length and s_a.pending == s_b.pending
        assert s_a.forwards == s_b.forwards and s_a.tokens_fed == s_b.tokens_fed
    return forwards


PROMPTS = [list(range(100, 117)), list(range(500, 505)), [7, 8, 9, 7, 8, 9, 7, 8], list(range(2000, 2030))]
SAMPLINGS = [SamplingParams(), SamplingParams(temperature=0.8, top_p=0.9, seed=3), SamplingParams(),
             SamplingParams(temperature=1.1, top_k=50, seed=9)]


def test_propose_many_drafts_exactly_what_propose_drafts_independent_draft():
    from gsd_serve.models import ModelRunner

    runner = ModelRunner(_tiny_llama(torch.float64, seed=1, layers=1))
    assert runner.fuses_many
    forwards = _rounds_exact(runner, PROMPTS, SAMPLINGS, depths=[4, 2, 0, 3])
    for alone, together in forwards:
        # one fused forward per drafting level for all sessions: as many as the deepest session needs
        assert together == 4 and alone == 4 + 2 + 3, forwards


def test_propose_many_drafts_exactly_what_propose_drafts_with_a_reduced_vocabulary():
    from gsd_serve.models import ModelRunner

    ids = torch.arange(0, 49152, 5)
    model = _tiny_llama(torch.float64, seed=2, layers=1)
    runner = ModelRunner(model, ids[ids < model.config.vocab_size])
    forwards = _rounds_exact(runner, PROMPTS[:3], SAMPLINGS[:3], depths=[3, 3, 1], rounds=2)
    assert all(together < alone for alone, together in forwards)


def test_propose_many_drafts_exactly_what_propose_drafts_feature_draft():
    from gsd_serve.models.feature_draft import FeatureDraftRunner, new_feature_draft

    target = _tiny_llama(torch.float64, seed=3)
    vocab = target.config.vocab_size
    fd = new_feature_draft(target.float(), torch.arange(0, vocab, 3), feature_layers=(0, 1, 2)).double().eval()
    runner = FeatureDraftRunner(fd)
    assert runner.fuses_many and runner.feature_width == 3 * 64
    forwards = _rounds_exact(runner, PROMPTS, SAMPLINGS, depths=[4, 1, 3, 2], features=runner.feature_width)
    assert all(together == 4 and alone == 4 + 1 + 3 + 2 for alone, together in forwards), forwards


def test_draft_worker_batches_concurrent_proposes_exactly(tiny_pair):
    """Concurrent Propose calls on a real draft worker over gRPC, while its model is busy, are drafted in one
    batch; each answer is the graph the worker drafts for that session alone."""
    import grpc

    from gsd_serve.serving.draft_worker import DraftWorker
    from gsd_serve.serving.grpc_server import serve_grpc

    _, draft = tiny_pair
    batched, alone = DraftWorker(draft, replica_id="db"), DraftWorker(draft, replica_id="da")
    servers = [serve_grpc(w) for w in (batched, alone)]
    try:
        stubs = [rpc.pb_grpc.DraftStub(grpc.insecure_channel(f"127.0.0.1:{port}")) for _, port in servers]
        spec = rpc.spec_to_proto(DEEP)
        reqs = [pb.ProposeRequest(session_id=f"s{i}", delta_start=0, delta=p, root_index=len(p) - 1, spec=spec,
                                  sampling=rpc.sampling_to_proto(sp))
                for i, (p, sp) in enumerate(zip(PROMPTS, SAMPLINGS))]
        want = [stubs[1].Propose(r, timeout=60) for r in reqs]
        got: dict = {}
        batched.lock.acquire()        # the model is busy: the calls queue and leave as one batch
        try:
            threads = [threading.Thread(target=lambda r=r: got.__setitem__(r.session_id, stubs[0].Propose(
                r, timeout=60))) for r in reqs]
            for t in threads:
                t.start()
            # one call holds the gate waiting for the lock, the others queue behind it
            _wait(lambda: batched.gate.queued == len(reqs) - 1, "the Propose calls to queue")
        finally:
            batched.lock.release()
        for t in threads:
            t.join(60)
        assert batched.gate.largest == len(reqs) - 1
        for r, w in zip(reqs, want):
            g = got[r.session_id]
            assert g.status == rpc.OK == w.status
            assert list(g.graph.tokens) == list(w.graph.tokens) and list(g.graph.parents) == list(w.graph.parents)
            assert list(g.graph.edge_dst) == list(w.graph.edge_dst)
            assert torch.allclose(torch.tensor(list(g.graph.edge_prob)), torch.tensor(list(w.graph.edge_prob)),
                                  atol=1e-5)
    finally:
        for server, _ in servers:
            server.stop(0)


# ---------------------------------------------------------------- (a) one invalid Verify item fails only itself

def test_invalid_verify_item_fails_only_its_own_request(workers, tiny_pair):
    import grpc

    t1 = workers["t1"]
    stub = rpc.pb_grpc.TargetStub(grpc.insecure_channel(f"127.0.0.1:{t1[2]}"))
    prompt = list(range(200, 215))
    firsts = {}
    for sid in ("good", "twin", "bad-token", "bad-graph", "bad-root"):
        firsts[sid] = stub.Prefill(pb.PrefillRequest(session_id=sid, tokens=prompt), timeout=60).first_token
    f = firsts["good"]
    assert set(firsts.values()) == {f}
    n = len(prompt)

    def item(sid, **kw):
        d = dict(session_id=sid, delta_start=n, delta=[f], graph=rpc.root_graph_proto(f), root_index=n)
        d.update(kw)
        return pb.VerifyItem(**d)

    vocab = t1[0].vocab_size
    items = [item("bad-token", delta=[vocab + 5], graph=rpc.root_graph_proto(vocab + 5)),
             item("good"),
             item("bad-graph", graph=pb.TokenGraph(tokens=[f, 3], parents=[-1, 7], depths=[0, 1])),
             item("bad-root", root_index=n + 3)]
    resp = stub.Verify(pb.VerifyRequest(items=items), timeout=60)      # the call itself succeeds
    by = {r.session_id: r for r in resp.results}
    assert [r.session_id for r in resp.results] == [i.session_id for i in items]
    for sid in ("bad-token", "bad-graph", "bad-root"):
        assert by[sid].status == rpc.ERROR and by[sid].error, sid
        assert by[sid].error_code == grpc.StatusCode.INVALID_ARGUMENT.value[0], (sid, by[sid].error)
    assert by["good"].status == rpc.OK and resp.sessions == 1
    alone = stub.Verify(pb.VerifyRequest(items=[item("twin")]), timeout=60).results[0]
    assert alone.status == rpc.OK
    assert list(by["good"].emitted) == list(alone.emitted) and len(alone.emitted) == 1
    # the refused sessions were left as they were: their next valid round is verified, with the same answer
    again = stub.Verify(pb.VerifyRequest(items=[item("bad-token"), item("bad-graph")]), timeout=60)
    assert [r.status for r in again.results] == [rpc.OK, rpc.OK]
    assert [list(r.emitted) for r in again.results] == [list(alone.emitted)] * 2
    stub.Release(pb.ReleaseRequest(session_ids=list(firsts)), timeout=60)


# ---------------------------------------------------------------- (b) SSE dropped before its first chunk

def _asgi_post(path: str, body: bytes, spec_version: str) -> dict:
    return {"type": "http", "asgi": {"version": "3.0", "spec_version": spec_version}, "http_version": "1.1",
            "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
            "root_path": "", "headers": [(b"content-type", b"application/json"),
                                         (b"content-length", str(len(body)).encode())],
            "client": ("127.0.0.1", 40000), "server": ("127.0.0.1", 8000)}


@pytest.mark.parametrize("spec_version", ["2.3", "2.4"])
def test_sse_dropped_before_its_first_chunk_releases_its_slot(workers, tokenizer, spec_version):
    """The client goes away while the response starts: the server cancels the streaming task (ASGI < 2.4) or
    the send fails (ASGI 2.4) before the body was ever iterated. The request's admission slot must come back
    (before 9b8da75 an unstarted SSE generator was never closed: enough of these and every request got 429)."""
    from gsd_serve.serving.http_app import HttpApi, create_app
    from gsd_serve.serving.openai_api import OpenAIFrontend

    async def main():
        core = _core(workers, tokenizer, max_inflight=1, admit_timeout_s=3600.0)   # no reaping in this test
        front = OpenAIFrontend(core)
        app = create_app(HttpApi(front))
        body = json.dumps({"model": core.config.model_name, "prompt": "Hello", "max_tokens": 4,
                           "stream": True}).encode()
        for attempt in range(3):        # more drops than the limit: each must give its slot back
            sent, delivered = [], []

            async def receive():
                if not delivered:
                    delivered.append(True)
                    return {"type": "http.request", "body": body, "more_body": False}
                return {"type": "http.disconnect"}

            async def send(message):
                sent.append(message["type"])
                if message["type"] == "http.response.start":
                    if spec_version == "2.4":
                        raise OSError("the client is gone")
                    await asyncio.Event().wait()        # never delivered: the disconnect cancels the stream

            try:
                await asyncio.wait_for(app(_asgi_post("/v1/completions", body, spec_version), receive, send), 60)
            except (OSError, asyncio.CancelledError):
                pass
            except Exception as exc:  # noqa: BLE001 (starlette's ClientDisconnect)
                assert type(exc).__name__ == "ClientDisconnect", exc
            assert sent == ["http.response.start"], sent          # no chunk went out: the body never started
            assert core.inflight == 0 and not core.runs, attempt
        # the slot is usable: a request is admitted and served
        kind, status, payload = await front.handle(json.dumps({"model": core.config.model_name, "prompt": "Hi",
                                                               "max_tokens": 3}).encode(), chat=False)
        assert (kind, status) == ("json", 200) and payload["usage"]["completion_tokens"] >= 1
        assert core.inflight == 0
        await core.close()
    asyncio.run(main())


def test_sse_stream_closed_unread_releases_and_read_stream_is_exact(workers, tiny_pair, tokenizer):
    from gsd_serve.serving.openai_api import OpenAIFrontend

    engine = _engine(tiny_pair, tokenizer)

    async def main():
        core = _core(workers, tokenizer, max_inflight=1, admit_timeout_s=3600.0)
        front = OpenAIFrontend(core)
        body = json.dumps({"model": core.config.model_name, "prompt": [5, 6, 7, 8], "max_tokens": 6,
                           "temperature": 0, "stream": True}).encode()
        kind, _, stream = await front.handle(body, chat=False)
        assert kind == "sse" and core.inflight == 1
        await stream.aclose()                 # what the HTTP layer does with a response that ends unread
        assert core.inflight == 0
        kind, _, stream = await front.handle(body, chat=False)
        events = [e async for e in stream]
        assert events[-1] == "data: [DONE]\n\n" and core.inflight == 0
        text = "".join(json.loads(e[6:])["choices"][0]["text"] for e in events[:-1] if json.loads(e[6:])["choices"])
        want = engine.generate([5, 6, 7, 8], 6, spec=SPEC).token_ids
        assert text == tokenizer.decode(want, skip_special_tokens=True) and len(want) == 6
        assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] == "length"
        await core.close()
    asyncio.run(main())


def test_decode_loop_runs_ahead_of_a_slow_reader_and_stays_exact(workers, tiny_pair, tokenizer):
    """A request decodes while its reader is busy (formatting, sending): the next Verify does not wait for the
    previous chunk to be read. What piled up meanwhile comes as one chunk; the tokens are the engine's."""
    from gsd_serve.serving.router import GenerateParams

    engine = _engine(tiny_pair, tokenizer)
    prompt = [5, 6, 7, 8]
    want = engine.generate(prompt, 16, spec=SPEC).token_ids

    async def main():
        core = _core(workers, tokenizer, spec=SPEC)
        run = core.start(GenerateParams(prompt, 16, SamplingParams()))
        gen = run.chunks()
        first = await gen.__anext__()
        for _ in range(600):             # the reader does not read; the request must finish anyway
            if run.finish is not None:
                break
            await asyncio.sleep(0.05)
        assert run.finish == "length", "the decode loop waited for its reader"
        rest = [c async for c in gen]
        assert len(rest) == 1            # everything decoded while the reader was away, as one chunk
        assert first + rest[0] == want and len(want) == 16
        assert core.inflight == 0
        await core.close()
    asyncio.run(main())


def test_reader_leaving_early_stops_the_decode_loop_and_releases(workers, tokenizer):
    from gsd_serve.serving.router import GenerateParams

    async def main():
        core = _core(workers, tokenizer, spec=SPEC, max_inflight=1)
        run = core.start(GenerateParams([5, 6, 7, 8], 400, SamplingParams()))
        gen = run.chunks()
        await gen.__anext__()
        await gen.aclose()               # what the HTTP layer does when the client goes away
        assert core.inflight == 0 and not core.runs
        decoded = len(run.out)
        await asyncio.sleep(0.3)
        assert len(run.out) == decoded and run.finish is None     # no round ran after the reader left
        await core.close()
    asyncio.run(main())


def test_direct_http_port_serves_the_api_exactly_with_its_checks(workers, tiny_pair, tokenizer):
    """The router's app on its own port (what a Router replica serves with `direct_http_port`): streamed
    completions are the engine's tokens, the API key is enforced, and a second server cannot take the same
    port (two servers on one port would answer each other's clients)."""
    import httpx

    from gsd_serve.serving.direct_http import DirectHttpServer
    from gsd_serve.serving.http_app import HttpApi, create_app
    from gsd_serve.serving.openai_api import OpenAIFrontend

    engine = _engine(tiny_pair, tokenizer)
    want = engine.generate([5, 6, 7, 8], 10, spec=SPEC).token_ids

    async def main():
        core = _core(workers, tokenizer, spec=SPEC)
        server = DirectHttpServer(create_app(HttpApi(OpenAIFrontend(core), api_key="k3y")), "127.0.0.1", 0).start()
        with pytest.raises(OSError):
            DirectHttpServer(create_app(HttpApi(OpenAIFrontend(core))), "127.0.0.1", server.port)
        body = {"model": core.config.model_name, "prompt": [5, 6, 7, 8], "max_tokens": 10, "temperature": 0,
                "stream": True}
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            for _ in range(100):         # the servers start as tasks of this loop
                try:
                    if (await client.get("/health")).status_code in (200, 503):
                        break
                except httpx.TransportError:
                    await asyncio.sleep(0.05)
            denied = await client.post("/v1/completions", json=body)
            assert denied.status_code == 401
            text = ""
            async with client.stream("POST", "/v1/completions", json=body,
                                     headers={"Authorization": "Bearer k3y"}) as r:
                assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        choices = json.loads(line[6:])["choices"]
                        text += choices[0]["text"] if choices else ""
            assert text == tokenizer.decode(want, skip_special_tokens=True) and len(want) == 10
        assert core.inflight == 0
        await server.stop()
        await core.close()
    asyncio.run(main())


def test_admitted_request_that_never_starts_is_reaped(workers, tokenizer):
    from gsd_serve.serving.router import GenerateParams, Overloaded

    async def main():
        core = _core(workers, tokenizer, max_inflight=1, admit_timeout_s=3600.0)
        core.start(GenerateParams([1, 2, 3], 2, SamplingParams()))
        with pytest.raises(Overloaded):            # within admit_timeout_s the slot is held
            core.start(GenerateParams([1, 2, 3], 2, SamplingParams()))
        core.config.admit_timeout_s = 0.0           # now it is past: the never-started request is released
        stale = next(iter(core.runs.values()))
        run = core.start(GenerateParams([1, 2, 3], 2, SamplingParams()))
        assert stale.released and core.inflight == 1 and list(core.runs) == [run.id]
        out = [t async for chunk in run.chunks() for t in chunk]
        assert len(out) == 2 and core.inflight == 0
        await core.close()
    asyncio.run(main())


# ---------------------------------------------------------------- (c) concurrent requests share forwards

def test_concurrent_streams_share_each_forward(workers, tiny_pair, tokenizer):
    """Four streams on one target replica: its scheduler carries all four in each fused forward, and prefills
    the late ones in chunks fused with the others' steps."""
    engine = _engine(tiny_pair, tokenizer)
    ar = SpecConfig.for_method("ar")
    prompts = [[11, 12, 13, 14], [21, 22, 23], [31, 32, 33, 34, 35], [41, 42]]
    one_target = {k: v for k, v in workers.items() if k in ("d1", "t1")}
    t1 = workers["t1"][0]

    async def main():
        core = _core(one_target, tokenizer, spec=ar)
        # stagger the starts, as arriving requests are: the first stream runs alone for a few rounds
        async def late(p, delay):
            await asyncio.sleep(delay)
            return await _generate(core, p, 64)

        forwards = t1.scheduler.forwards
        got = await asyncio.gather(*(late(p, 0.02 * i) for i, p in enumerate(prompts)))
        for p, (out, _) in zip(prompts, got):
            assert out == engine.generate(p, 64, spec=ar).token_ids
        await core.close()
        return t1.scheduler.forwards - forwards, [out for out, _ in got]

    forwards, outs = asyncio.run(main())
    steps = sum(len(o) for o in outs)          # one forward each (prefill or step) if none were shared
    assert t1.scheduler.widest >= 4 and forwards < 0.5 * steps, (forwards, steps)


# ---------------------------------------------------------------- (d) sessions bounded by bytes

def test_session_table_bounded_by_bytes():
    from gsd_serve.serving.sessions import SessionTable

    now = [0.0]
    t = SessionTable(max_sessions=100, ttl_s=10.0, clock=lambda: now[0], max_bytes=100, size_of=lambda v: v)
    t.put("a", 40)
    t.put("b", 40)
    assert t.ids() == ["a", "b"] and t.bytes == 80
    t.put("c", 40)                          # 120 > 100: the least recently used goes
    assert t.ids() == ["b", "c"] and t.bytes == 80 and t.evicted == 1
    assert t.get("b") == 40                 # b is now the most recently used
    t.put("c", 70)                          # c grew (a longer cache): the bytes follow, b goes
    assert t.ids() == ["c"] and t.bytes == 70 and t.evicted == 2
    t.put("huge", 150)                      # alone over the bound: kept (it is the one in use), the rest goes
    assert t.ids() == ["huge"] and t.bytes == 150
    t.put("d", 10)                          # ... and it goes first once it is the oldest
    assert t.ids() == ["d"] and t.bytes == 10
    assert t.pop("d") == 10 and t.bytes == 0 and len(t) == 0
    t.put("e", 30)
    now[0] += 11                            # expired
    t.sweep()
    assert len(t) == 0 and t.bytes == 0
    # the count bound still holds on its own
    c = SessionTable(max_sessions=2, max_bytes=10 ** 9, size_of=lambda v: 1)
    for s in "xyz":
        c.put(s, 0)
    assert c.ids() == ["y", "z"] and c.bytes == 2


def test_target_worker_holds_sessions_within_its_byte_bound(tiny_pair):
    """A real target worker over gRPC: its sessions' caches stay within max_session_bytes, whatever the count
    bound allows; an evicted session resyncs (before 9b8da75 only the count bounded them)."""
    import grpc

    from gsd_serve.serving.grpc_server import serve_grpc
    from gsd_serve.serving.target_worker import TargetWorker

    target, _ = tiny_pair
    prompt = list(range(400, 460))
    probe = TargetWorker(target, replica_id="probe", max_session_bytes=10 ** 9)
    server, port = serve_grpc(probe)
    try:
        stub = rpc.pb_grpc.TargetStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        stub.Prefill(pb.PrefillRequest(session_id="one", tokens=prompt), timeout=60)
        one = stub.Info(pb.InfoRequest(), timeout=60).session_bytes
    finally:
        server.stop(0)
    # 3 layers x (K + V) x 2 heads x 16 dims x 4 bytes per position, at least the prompt's positions
    assert one >= len(prompt) * 3 * 2 * 2 * 16 * 4
    bound = 2 * one + one // 2
    worker = TargetWorker(target, replica_id="bounded", max_sessions=64, max_session_bytes=bound)
    server, port = serve_grpc(worker)
    try:
        stub = rpc.pb_grpc.TargetStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        firsts = [stub.Prefill(pb.PrefillRequest(session_id=f"s{i}", tokens=prompt), timeout=60).first_token
                  for i in range(5)]
        info = stub.Info(pb.InfoRequest(), timeout=60)
        assert list(info.session_ids) == ["s3", "s4"], list(info.session_ids)
        assert info.session_bytes == 2 * one <= info.max_session_bytes == bound
        n = len(prompt)
        res = stub.Verify(pb.VerifyRequest(items=[
            pb.VerifyItem(session_id="s0", delta_start=n, delta=[firsts[0]], graph=rpc.root_graph_proto(firsts[0]),
                          root_index=n),
            pb.VerifyItem(session_id="s4", delta_start=n, delta=[firsts[4]], graph=rpc.root_graph_proto(firsts[4]),
                          root_index=n)]), timeout=60)
        assert [r.status for r in res.results] == [rpc.RESYNC, rpc.OK]     # s0 was evicted, s4 was not
        assert stub.Info(pb.InfoRequest(), timeout=60).session_bytes <= bound
    finally:
        server.stop(0)


# ---------------------------------------------------------------- (e) the served feature hand-off (issue 15)

FEATURE_LAYERS = (0, 1, 2)


@pytest.fixture(scope="module")
def feature_stack(tiny_pair):
    """A draft worker serving an untrained feature draft of the tiny target, and a target worker."""
    from gsd_serve.models.feature_draft import new_feature_draft
    from gsd_serve.serving.draft_worker import DraftWorker
    from gsd_serve.serving.grpc_server import serve_grpc
    from gsd_serve.serving.target_worker import TargetWorker

    target, _ = tiny_pair
    torch.manual_seed(0)
    fd = new_feature_draft(target, torch.arange(0, target.config.vocab_size, 2), feature_layers=FEATURE_LAYERS)
    servers = {}
    drafts = DraftWorker(fd, replica_id="dfeat")
    servers["dfeat"] = (drafts,) + serve_grpc(drafts)
    worker = TargetWorker(target, replica_id="tfeat", drafts=lambda: [("dfeat", f"127.0.0.1:{servers['dfeat'][2]}")])
    servers["tfeat"] = (worker,) + serve_grpc(worker)
    yield servers, fd
    for _, server, _ in servers.values():
        server.stop(0)


def test_served_feature_draft_is_exactly_target_greedy(feature_stack, tiny_pair, tokenizer):
    from gsd_serve.core.engine import Engine
    from gsd_serve.models import ModelRunner
    from gsd_serve.models.feature_draft import FeatureDraftRunner

    servers, fd = feature_stack
    target, _ = tiny_pair
    assert servers["dfeat"][0].feature_layers == FEATURE_LAYERS
    engine = Engine(ModelRunner(target), FeatureDraftRunner(fd), stop_token_ids={tokenizer.eos_token_id})
    prompts = [tokenizer(t)["input_ids"] for t in ("The sea is", "One, two, three, four", "Hello there, friend")]

    async def main():
        # every round drafts (no planner): the features must reach the draft in every round
        core = _core(servers, tokenizer, feature_layers=list(FEATURE_LAYERS),
                     spec=SpecConfig.for_method("gsd", max_depth=4, budget=12, planner=False))
        assert core.feature_layers == list(FEATURE_LAYERS)
        got = await asyncio.gather(*[_generate(core, p, 24) for p in prompts])
        for p, (out, run) in zip(prompts, got):
            assert out == engine.generate(p, 24, spec=SpecConfig.for_method("ar")).token_ids
            assert out == engine.generate(p, 24, spec=SPEC).token_ids
            assert run.stats.drafted_rounds > 0 and run.stats.feature_bytes > 0
            # every committed token reached the draft with the target's features (none fed as zeros)
            assert run.stats.draft_features_missing == 0, run.stats
        await core.close()
    asyncio.run(main())


def test_target_returns_features_when_asked(feature_stack, tiny_pair):
    import grpc

    from gsd_serve.models import ModelRunner

    servers, _ = feature_stack
    target, _ = tiny_pair
    stub = rpc.pb_grpc.TargetStub(grpc.insecure_channel(f"127.0.0.1:{servers['tfeat'][2]}"))
    prompt = list(range(600, 620))
    n, width = len(prompt), 3 * target.config.hidden_size
    layers = list(FEATURE_LAYERS)
    pre = stub.Prefill(pb.PrefillRequest(session_id="f", tokens=prompt, feature_layers=layers), timeout=60)
    plain = stub.Prefill(pb.PrefillRequest(session_id="p", tokens=prompt), timeout=60)
    assert pre.first_token == plain.first_token
    assert not plain.HasField("features")
    assert (pre.features.start, pre.features.rows, pre.features.width) == (0, n, width)
    f = pre.first_token
    item = lambda sid: pb.VerifyItem(session_id=sid, delta_start=n, delta=[f], graph=rpc.root_graph_proto(f),  # noqa
                                     root_index=n)
    asked = stub.Verify(pb.VerifyRequest(items=[item("f")], feature_layers=layers), timeout=60).results[0]
    unasked = stub.Verify(pb.VerifyRequest(items=[item("p")]), timeout=60).results[0]
    assert asked.status == rpc.OK == unasked.status and list(asked.emitted) == list(unasked.emitted)
    assert not unasked.HasField("features")
    assert (asked.features.start, asked.features.rows, asked.features.width) == (n, 1, width)
    # the values are the target's hidden states after those layers (bf16 on the wire)
    runner = ModelRunner(target)
    with torch.inference_mode():
        _, ref = runner.forward_features(runner.new_cache(), torch.tensor(prompt + [f]), layers=FEATURE_LAYERS)
    for msg, rows in ((pre.features, slice(0, n)), (asked.features, slice(n, n + 1))):
        start, got = rpc.features_from_proto(msg)
        assert got.shape == ref[rows].shape
        assert torch.allclose(got, ref[rows].float(), rtol=2e-2, atol=2e-2)
        assert not torch.allclose(got, torch.zeros_like(got))
    # layers the target does not have are refused
    with pytest.raises(grpc.RpcError) as err:
        stub.Prefill(pb.PrefillRequest(session_id="x", tokens=prompt, feature_layers=[0, 99]), timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    stub.Release(pb.ReleaseRequest(session_ids=["f", "p"]), timeout=60)


def test_replica_threads_follow_what_the_replica_is_given():
    from gsd_serve.serving.threads import choose_threads

    assert choose_threads(3, "5", 2.0, cores=8) == (3, "app args")
    assert choose_threads(None, "5", 2.0, cores=8)[0] == 5
    assert choose_threads(None, None, 1.5, cores=8)[0] == 2          # Ray's CPUs, rounded up
    assert choose_threads(None, None, 16.0, cores=8)[0] == 8         # never more than the cores
    # sharing the machine (num_cpus 0): a target takes every core, a draft one thread (its idle threads would
    # spin on the cores the target computes on)
    assert choose_threads(None, None, 0.0, cores=8, kind="target")[0] == 8
    assert choose_threads(None, None, 0.0, cores=8, kind="draft")[0] == 1
    with pytest.raises(ValueError):
        choose_threads(0.5 - 1, None, None, cores=8)


def test_feature_draft_failover_to_a_replica_without_the_features_stays_exact(tiny_pair, tokenizer):
    """The draft replica in use dies mid-request: the session moves to a replica that never received the
    target's features of the committed tokens. It drafts with zeros in their place (counted), and the output
    is still exactly the target's."""
    from gsd_serve.core.engine import Engine
    from gsd_serve.models import ModelRunner
    from gsd_serve.models.feature_draft import FeatureDraftRunner, new_feature_draft
    from gsd_serve.serving.draft_worker import DraftWorker
    from gsd_serve.serving.grpc_server import serve_grpc
    from gsd_serve.serving.router import GenerateParams
    from gsd_serve.serving.target_worker import TargetWorker

    target, _ = tiny_pair
    torch.manual_seed(0)
    fd = new_feature_draft(target, torch.arange(0, target.config.vocab_size, 2), feature_layers=FEATURE_LAYERS)
    servers = {}
    live = {}

    def drafts():
        return [(n, f"127.0.0.1:{port}") for n, (_, _, port) in list(live.items()) if n.startswith("d")]

    for name, worker in (("dA", DraftWorker(fd, replica_id="dA")), ("dB", DraftWorker(fd, replica_id="dB")),
                         ("tfo", TargetWorker(target, replica_id="tfo", drafts=drafts))):
        servers[name] = live[name] = (worker,) + serve_grpc(worker)
    engine = Engine(ModelRunner(target), FeatureDraftRunner(fd), stop_token_ids={tokenizer.eos_token_id})
    ids = tokenizer("Once upon a time there was")["input_ids"]
    want = engine.generate(ids, 28, spec=SpecConfig.for_method("ar")).token_ids

    async def main():
        from conftest import router_core

        spec = SpecConfig.for_method("gsd", max_depth=4, budget=12, planner=False)   # every round drafts
        core, _ = router_core(servers, tokenizer, feature_layers=list(FEATURE_LAYERS), spec=spec)
        run = core.start(GenerateParams(ids, 28, SamplingParams()))
        out, victim = [], None
        tfo = servers["tfo"][0]
        async for chunk in run.chunks():
            out += chunk
            session = tfo.scheduler.sessions.get(f"{run.id}.0")
            if len(out) >= 4 and victim is None and session is not None and session.draft.replica:
                victim = session.draft.replica
                worker, server, _ = live.pop(victim)
                server.stop(0)
                worker.sessions = type(worker.sessions)()
        assert out == want
        assert victim is not None and run.stats.draft_failovers >= 1
        # the new replica drafted for committed tokens whose features it never got (fed as zeros)
        assert run.stats.draft_features_missing > 0 and run.stats.draft_forwards > 0
        await core.close()
    try:
        asyncio.run(main())
    finally:
        for _, server, _ in servers.values():
            server.stop(0)


# ---------------------------------------------------------------- the cross-request index, shared through Redis

def test_a_repeat_on_another_replica_through_another_router_comes_from_the_shared_index(tiny_pair, tokenizer,
                                                                                        redis_server):
    """Two routers, two target replicas sharing their cross-request index through Redis: a request answered on
    one replica is proposed, as long lookup chains, to its repeat on the other; the answer is still exact."""
    from conftest import router_core, start_workers

    engine = _engine(tiny_pair, tokenizer)
    ids = tokenizer("Write a limerick about a cat who learns to play the piano at night.")["input_ids"]
    want = engine.generate(ids, 48, spec=SPEC).token_ids
    servers = start_workers(tiny_pair, None, names=("d1", "t1", "t2"), shared_redis_url=redis_server.url)
    t2 = servers["t2"][0]
    try:
        async def main():
            first, _ = router_core({k: servers[k] for k in ("d1", "t1")}, tokenizer, None, spec=SPEC)
            second, _ = router_core({k: servers[k] for k in ("d1", "t2")}, tokenizer, None, spec=SPEC)
            out1, run1 = await _generate(first, ids, 48)       # the first router knows t1 only, the second t2
            deadline = time.monotonic() + 30
            while t2.shared_log.received < 1:       # t1 published it; t2's reader picks it up
                assert time.monotonic() < deadline, "the shared index never reached the other replica"
                await asyncio.sleep(0.05)
            out2, run2 = await _generate(second, ids, 48)
            await first.close()
            await second.close()
            return out1, out2, run1, run2
        out1, out2, run1, run2 = asyncio.run(main())
    finally:
        for _, server, _ in servers.values():
            server.stop(0)
    assert out1 == out2 == want
    assert run2.stats.lookup_accepted >= len(want) // 2 > run1.stats.lookup_accepted
    assert servers["t1"][0].shared_log.published >= 1


# ---------------------------------------------------------------- chunked prefill

def test_a_prompt_prefilled_in_chunks_beside_other_streams_is_exact(tiny_pair, tokenizer):
    """A long prompt arriving while another stream decodes is prefilled a few tokens per iteration, fused with the
    other stream's steps (so it cannot stall them); both answers are exactly the in-process ones."""
    from conftest import router_core, start_workers

    engine = _engine(tiny_pair, tokenizer)
    ar = SpecConfig.for_method("ar")
    short = tokenizer("The sea is")["input_ids"]
    long = tokenizer(" ".join(f"item {i} is {i * 7 % 13}." for i in range(40)))["input_ids"]
    assert len(long) > 150
    servers = start_workers(tiny_pair, None, names=("t1",), prefill_chunk=8, prefill_share=0)   # 8 tokens a forward
    t1 = servers["t1"][0]
    try:
        async def main():
            core, _ = router_core(servers, tokenizer, None, spec=ar)

            async def late():
                while t1.scheduler.forwards < 5:       # the short stream is decoding by now
                    await asyncio.sleep(0.005)
                return await _generate(core, long, 24)
            got = await asyncio.gather(_generate(core, short, 200), late())
            await core.close()
            return got
        (out_short, _), (out_long, _) = asyncio.run(main())
    finally:
        servers["t1"][1].stop(0)
    assert out_short == engine.generate(short, 200, spec=ar).token_ids
    assert out_long == engine.generate(long, 24, spec=ar).token_ids
    assert t1.scheduler.widest >= 2 and t1.scheduler.prefill_chunks >= len(long) // 8


def test_the_prefill_budget_follows_the_measured_cost_of_prompt_tokens():
    """While sessions decode, an iteration feeds prompt tokens that cost prefill_share times the decoding rows'
    forward (from the measured cost of a prompt token), never fewer than prefill_chunk nor more than
    whole_prefill; with no session decoding, a whole prefill."""
    from types import SimpleNamespace

    from gsd_serve.core.costs import ForwardCosts
    from gsd_serve.core.planner import Planner
    from gsd_serve.serving.scheduler import READY, Scheduler

    planner = Planner(ForwardCosts(([1, 2, 4, 8, 16, 32], [0.010, 0.012, 0.016, 0.024, 0.040, 0.072])))
    sched = Scheduler(None, planner, prefill_chunk=16, whole_prefill=1024, prefill_share=1.5)
    decoding = [SimpleNamespace(tree=[0] * 4, seq=SimpleNamespace(tokens=[1] * 100), state=READY) for _ in range(4)]
    assert sched._prefill_budget([]) == 1024                       # nothing decodes: the whole prompt at once
    assert sched._prefill_budget(decoding) == 16                   # no prompt token measured yet: the fewest
    sched.prompt_token_s = 0.001
    rows16 = planner.target_costs.seconds(16, 100)
    assert sched._prefill_budget(decoding) == int(1.5 * rows16 / 0.001) > 16
    sched.prompt_token_s = 0.1                                     # dear prompt tokens: still the fewest
    assert sched._prefill_budget(decoding) == 16
    sched.prompt_token_s = 1e-6                                    # cheap ones: at most whole_prefill
    assert sched._prefill_budget(decoding) == 1024
    sched.prompt_token_s = 0.001
    sched.sessions = {"a": decoding[0]}      # a session between rounds (or drafting) decodes too: no whole prefill
    assert sched._prefill_budget([]) == max(16, int(1.5 * planner.target_costs.seconds(1, 0) / 0.001)) < 1024

