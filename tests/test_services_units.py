"""Serving pieces without Ray: the Redis prefix cache (real redis-server), the gsd.v1 messages, the session
protocol and failover over real in-process gRPC servers, admission control. A tiny random Llama with the
real tokenizer keeps these fast; exactness is checked against the in-process engine on the same model.
"""
from __future__ import annotations

import asyncio
import json
import time

import pytest
import torch

from gsd_serve.serving import rpc
from gsd_serve.core.config import SpecConfig
from gsd_serve.core.graph import TokenGraph, flatten_to_tree
from gsd_serve.serving.prefix_cache import KVLayout, PrefixCache, block_hashes, export_kv, import_kv
from gsd_serve.models.runner import ModelRunner
from gsd_serve.core.sampling import SamplingParams

pytestmark = pytest.mark.timeout(120)
pb = rpc.pb


@pytest.fixture(scope="module")
def tokenizer():
    from gsd_serve.models import DEFAULT_TARGET, load_tokenizer

    return load_tokenizer(DEFAULT_TARGET)


# ---------------------------------------------------------------- prefix cache

def test_prefix_cache_roundtrip_is_exact(redis_server, tiny_pair):
    target, _ = tiny_pair
    runner = ModelRunner(target)
    cache = PrefixCache(redis_server.url, f"fp-{time.time_ns()}", block_size=8)
    tokens = list(range(100, 141))          # 41 tokens: 5 full blocks
    with torch.inference_mode():
        full = runner.new_cache()
        ref = runner.forward(full, torch.tensor(tokens), last_only=True)
        cache.layout = KVLayout.of(export_kv(full, 0, 1))
        assert cache.store(tokens, lambda s, e: export_kv(full, s, e)) == 5
        assert cache.store(tokens, lambda s, e: export_kv(full, s, e)) == 0      # already there
        blocks = cache.lookup(tokens, len(tokens) - 1)
        assert len(blocks) == 5 and cache.stats.tokens_saved == 40
        kv = runner.new_cache()
        assert import_kv(kv, blocks, target.config.num_hidden_layers) == 40
        out = runner.forward(kv, torch.tensor(tokens[40:]), last_only=True)
    assert torch.allclose(out, ref, atol=1e-5)
    import redis

    r = redis.Redis.from_url(redis_server.url)
    h = block_hashes(tokens, 8, cache.fingerprint)
    assert 0 < r.ttl(cache.key(h[0])) <= cache.ttl_s
    # another prompt sharing the first 2 blocks hits exactly those
    other = tokens[:16] + [7] * 20
    assert len(cache.lookup(other, len(other))) == 2
    # a corrupt entry is a miss (and is dropped), never an error
    r.set(cache.key(h[0]), b"garbage")
    assert cache.lookup(tokens, 40) == [] and r.get(cache.key(h[0])) is None
    # an entry stored under another block's key fails the header check
    r.set(cache.key(h[0]), r.get(cache.key(h[1])))
    assert cache.lookup(tokens, 40) == []


def test_prefix_cache_outage_and_size_cap(tiny_pair):
    from gsd_serve.serving.serve_config import free_port

    dead = PrefixCache(f"redis://127.0.0.1:{free_port()}/0", "fp", block_size=4, timeout_s=0.2, retry_after_s=30)
    t0 = time.time()
    assert dead.lookup(list(range(20)), 20) == []
    assert dead.store(list(range(20)), lambda s, e: torch.zeros(1, 2, 1, e - s, 2)) == 0
    assert dead.lookup(list(range(20)), 20) == []     # no new connection attempt while marked down
    assert time.time() - t0 < 2 and dead.stats.errors == 1
    off = PrefixCache(None, "fp")
    assert off.lookup(list(range(64)), 64) == [] and off.store(list(range(64)), None) == 0


def test_prefix_cache_size_cap(redis_server):
    cache = PrefixCache(redis_server.url, f"cap-{time.time_ns()}", block_size=4, max_entry_bytes=64,
                        layout=KVLayout(2, 2, 8, "float32"))
    assert cache.store(list(range(8)), lambda s, e: torch.zeros(2, 2, 2, e - s, 8)) == 0
    assert cache.lookup(list(range(8)), 8) == []


# ---------------------------------------------------------------- messages and sessions

def test_graph_proto_roundtrip_and_validation():
    g = TokenGraph(5, merge_context=0)
    a, _ = g.add(0, 7, 0.6)
    b, _ = g.add(0, 8, 0.3)
    c, _ = g.add(a, 9, 0.5)
    m, created = g.add(b, 9, 0.4)          # merged into c
    assert not created and m == c
    back = rpc.graph_from_proto(rpc.graph_to_proto(g))
    assert back.tokens == g.tokens and back.merge_edges == 1
    assert back.edges == g.edges     # probabilities travel as doubles: the target ranks paths as the draft did
    t1, t2 = flatten_to_tree(g, 16), flatten_to_tree(back, 16)
    assert t1.tokens.tolist() == t2.tokens.tolist() and t1.parents.tolist() == t2.parents.tolist()
    bad = [pb.TokenGraph(),
           pb.TokenGraph(tokens=[1, 2], parents=[-1], depths=[0, 1]),
           pb.TokenGraph(tokens=[1, 2], parents=[-1, 5], depths=[0, 1]),
           pb.TokenGraph(tokens=[1, 2], parents=[-1, 0], depths=[0, 1], edge_src=[0], edge_dst=[1], edge_prob=[2.0]),
           pb.TokenGraph(tokens=[1, 2, 3], parents=[-1, 0, 1], depths=[0, 1, 2], edge_src=[0, 1, 2],
                         edge_dst=[1, 2, 1], edge_prob=[.5, .5, .5])]
    for msg in bad:
        with pytest.raises(rpc.GraphError):
            rpc.graph_from_proto(msg)


def test_session_table_ttl_and_lru():
    from gsd_serve.serving.sessions import SessionTable

    now = [0.0]
    t = SessionTable(max_sessions=2, ttl_s=2.0, clock=lambda: now[0])
    t.put("a", 1)
    t.put("b", 2)
    assert t.get("a") == 1
    t.put("c", 3)                      # evicts b, the least recently used
    assert t.ids() == ["a", "c"] and t.get("b") is None
    now[0] += 2.0                      # exactly the TTL: still leased
    assert t.get("c") == 3             # ... and touched: c's lease starts again
    now[0] += 1.0
    assert t.get("a") is None and len(t) == 1    # a expired (3 s idle), c did not (1 s)
    now[0] += 2.5
    t.sweep()
    assert len(t) == 0 and t.evicted == 3


# ---------------------------------------------------------------- workers + router over real gRPC

@pytest.fixture(scope="module")
def stack(tiny_pair):
    from conftest import start_workers

    servers = start_workers(tiny_pair, SECRET)
    yield servers
    for _, server, _ in servers.values():
        server.stop(0)


SECRET = "unit-test-worker-secret"


def _core(stack, tokenizer, **cfg):
    from conftest import router_core

    return router_core(stack, tokenizer, SECRET, **cfg)


def _engine(tiny_pair, tokenizer):
    from gsd_serve.core.engine import Engine
    from gsd_serve.models import ModelRunner

    target, draft = tiny_pair
    return Engine(ModelRunner(target), ModelRunner(draft), stop_token_ids={tokenizer.eos_token_id})


async def _generate(core, ids, n, sampling=None):
    from gsd_serve.serving.router import GenerateParams

    run = core.start(GenerateParams(ids, n, sampling or SamplingParams()))
    out = []
    async for chunk in run.chunks():
        out += chunk
    return out, run


def test_router_rounds_exact_batched_greedy_and_sampled(stack, tiny_pair, tokenizer):
    engine = _engine(tiny_pair, tokenizer)
    prompts = [tokenizer("The sea is")["input_ids"], tokenizer("One, two, three")["input_ids"],
               tokenizer("Hello there")["input_ids"]]
    spec = SpecConfig.for_method("gsd", max_depth=4, budget=12)

    async def main():
        core, _ = _core(stack, tokenizer)
        for sampling in (SamplingParams(), SamplingParams(temperature=0.9, top_p=0.95, seed=11)):
            got = await asyncio.gather(*[_generate(core, p, 20, sampling) for p in prompts])
            for p, (out, run) in zip(prompts, got):
                assert out == engine.generate(p, 20, spec=spec, sampling=sampling).token_ids
                assert run.stats.rounds >= 1 and run.finish in ("stop", "length")
        assert stack["t1"][0].scheduler.widest > 1      # concurrent requests shared the target's forwards
        await core.close()
    asyncio.run(main())


def test_served_requests_mix_every_kind_of_round_exactly(stack, tiny_pair, tokenizer, monkeypatch):
    """On the target replica, plain steps, lookup chains alone and drafted graphs alternate within a request."""
    from conftest import RotatingPlanner

    engine = _engine(tiny_pair, tokenizer)
    prompts = [tokenizer("The sea is")["input_ids"], tokenizer("1 2 3 4 5 6 1 2 3 4 5 6 1 2")["input_ids"]]
    spec = SpecConfig.for_method("gsd", max_depth=4, budget=12)
    planner = stack["t1"][0].planner
    real = planner.sequence
    monkeypatch.setattr(planner, "sequence", lambda *a, **k: RotatingPlanner(real(*a, **k)))

    async def main():
        core, _ = _core(stack, tokenizer)
        kinds = [0, 0, 0]
        for sampling in (SamplingParams(), SamplingParams(temperature=0.9, seed=5)):
            for ids in prompts:
                out, run = await _generate(core, ids, 40, sampling)
                assert out == engine.generate(ids, 40, spec=spec, sampling=sampling).token_ids
                s = run.stats
                assert s.plain_steps + s.lookup_rounds + s.drafted_rounds == s.rounds
                kinds = [kinds[0] + s.plain_steps, kinds[1] + s.lookup_rounds, kinds[2] + s.drafted_rounds]
        assert all(kinds), kinds
        await core.close()
    asyncio.run(main())


def test_resync_and_draft_failover_stay_exact(stack, tiny_pair, tokenizer):
    engine = _engine(tiny_pair, tokenizer)
    ids = tokenizer("Once upon a time")["input_ids"]
    spec = SpecConfig.for_method("gsd", max_depth=4, budget=12)
    want = engine.generate(ids, 24, spec=spec).token_ids

    # a worker that never saw a session asks for the whole sequence
    t1 = stack["t1"][0]
    res = t1.verify(pb.VerifyRequest(items=[pb.VerifyItem(session_id="ghost", delta_start=5, delta=[1],
                                                          graph=rpc.root_graph_proto(1), root_index=5)]))
    assert res.results[0].status == rpc.RESYNC
    d1 = stack["d1"][0]
    assert d1.propose(pb.ProposeRequest(session_id="ghost", delta_start=5, delta=[1], root_index=5)).status == \
        rpc.RESYNC

    async def main():
        # every round drafts (no planner), so the draft replica is in use when it disappears
        core, _ = _core(stack, tokenizer, spec=SpecConfig.for_method("gsd", max_depth=4, budget=12, planner=False))
        from gsd_serve.serving.router import GenerateParams

        run = core.start(GenerateParams(ids, 24, SamplingParams()))
        out, stopped = [], None
        async for chunk in run.chunks():
            out += chunk
            session = t1.scheduler.sessions.get(f"{run.id}.0")
            if len(out) >= 3 and stopped is None and session is not None and session.draft.replica:
                # the draft replica in use disappears: its server stops and its sessions are lost
                stopped = session.draft.replica
                worker, server, _ = stack[stopped]
                server.stop(0)
                worker.sessions = type(worker.sessions)()
        assert out == want
        assert stopped is not None and t1.drafts.failovers >= 1
        await core.close()
    asyncio.run(main())


def test_a_target_whose_forward_fails_costs_a_failover_not_the_request(tiny_pair, tokenizer):
    """A Verify item refused for the request's content fails the request; one the replica itself failed (its
    forward raised: a tensor-parallel rank died, the device failed) is the replica's fault, and the router fails
    over to another target, which rebuilds the session. With several sessions in the call, a failed fused
    forward is retried item by item and each item comes back refused with INTERNAL: the router used to fail
    those requests ("target replica refused a round", seen with a killed TP rank in
    test_services_tensor_parallel.py)."""
    from conftest import router_core, start_workers

    from gsd_serve.serving.router import GenerateParams

    engine = _engine(tiny_pair, tokenizer)
    spec = SpecConfig.for_method("gsd", max_depth=4, budget=12)
    prompts = [tokenizer(t)["input_ids"] for t in ("Once upon a time", "The sea is", "One, two, three")]
    wants = [engine.generate(p, 24, spec=spec).token_ids for p in prompts]
    servers = start_workers(tiny_pair, SECRET, names=("d1", "t1", "t2"))
    broken, live, spare = [], None, None

    def dead(*args, **kwargs):
        raise RuntimeError("tensor-parallel rank(s) [2] died during forward")

    async def one(core, ids):
        run = core.start(GenerateParams(ids, 24, SamplingParams()))
        out, last = [], None
        async for chunk in run.chunks():
            out += chunk
            last = run.target.replica_id if run.target is not None else last
            if len(out) >= 4 and not broken and run.target is not None:
                worker = servers[run.target.replica_id][0]
                broken.append(worker.replica_id)
                live["t2"] = spare                      # the other target appears now
                # the replica's own forwards fail from now on (its process and gRPC server stay up)
                worker.runner.forward = dead
                worker.runner.forward_many = dead
        return out, run, last

    try:
        async def main():
            nonlocal live, spare
            core, live = router_core(servers, tokenizer, SECRET)
            spare = live.pop("t2")      # every session starts on t1, so t1's Verify calls carry several items
            got = await asyncio.gather(*[one(core, p) for p in prompts])
            await core.close()
            return got
        got = asyncio.run(main())
    finally:
        for _, server, _ in servers.values():
            server.stop(0)
    assert broken
    for want, (out, run, last) in zip(wants, got):
        assert out == want
        assert last != broken[0]           # every request finished on the other target
    assert broken == ["t1"] and all(run.stats.failovers >= 1 for _, run, _ in got)


def test_admission_control_and_http_errors(stack, tokenizer):
    from gsd_serve.serving.openai_api import OpenAIFrontend
    from gsd_serve.serving.router import GenerateParams, Overloaded

    async def main():
        core, _ = _core(stack, tokenizer, max_inflight=1, max_prompt_tokens=50)
        front = OpenAIFrontend(core)
        run = core.start(GenerateParams([1, 2, 3], 4, SamplingParams()))
        with pytest.raises(Overloaded):
            core.start(GenerateParams([1, 2, 3], 4, SamplingParams()))
        body = json.dumps({"model": core.config.model_name, "prompt": "Hi", "max_tokens": 2}).encode()
        kind, status, payload = await front.handle(body, chat=False)
        assert (kind, status) == ("json", 429) and "limit" in payload["error"]["message"]
        async for _ in run.chunks():
            pass
        assert core.inflight == 0
        for raw, code in ((b"{", 400), (b'"x"', 400),
                          (json.dumps({"model": "other", "prompt": "Hi"}).encode(), 400),
                          (json.dumps({"model": core.config.model_name, "prompt": "Hi", "max_tokens": 0}).encode(), 400),
                          (json.dumps({"model": core.config.model_name, "prompt": "word " * 200}).encode(), 400)):
            kind, status, payload = await front.handle(raw, chat=False)
            assert status == code and payload["error"]["message"], raw
        kind, status, payload = await front.handle(body, chat=False)
        assert status == 200 and payload["usage"]["completion_tokens"] >= 1
        await core.close()
    asyncio.run(main())


def test_detokenizer_stream_equals_full_decode(tokenizer):
    from gsd_serve.serving.openai_api import Detokenizer

    ids = tokenizer("Grüße, 世界! Ça va? 🙂 fine.")["input_ids"]
    d = Detokenizer(tokenizer)
    text = "".join(d.push([t]) for t in ids) + d.push([], final=True)
    assert text == tokenizer.decode(ids, skip_special_tokens=True)


# ---------------------------------------------------------------- CLI and deploy manifests

def test_serve_cli_dry_run(capsys, monkeypatch):
    from gsd_serve.cli import main

    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:6390/0")
    assert main(["serve", "--dry-run", "--http-port", "18001", "--grpc-port", "19001"]) == 0
    out = capsys.readouterr().out
    assert "http://127.0.0.1:18001/v1" in out and "127.0.0.1:19001" in out and "redis://127.0.0.1:6390/0" in out
    from pathlib import Path

    local = Path(__file__).resolve().parents[1] / "deploy" / "local-cpu.yaml"
    assert main(["serve", "--dry-run", "--config", str(local)]) == 0
    assert main(["serve", "--dry-run", "--config", "no/such/file.yaml"]) == 2
    assert "cannot read" in capsys.readouterr().err
    assert main(["serve", "--dry-run", "--direct-http-port", "18002"]) == 0
    assert "direct  http://127.0.0.1:18002/v1" in capsys.readouterr().out
    assert main(["serve", "--dry-run", "--direct-http-port", "0"]) == 0
    assert "direct" not in capsys.readouterr().out


def test_direct_http_ports_are_checked():
    from gsd_serve.serving.serve_config import default_config, load_config

    assert load_config(direct_http_port=0)["applications"][0]["args"].get("direct_http_port") is None
    with pytest.raises(ValueError, match="Serve's HTTP proxy"):
        load_config(http_port=18003, direct_http_port=18003)
    import copy

    import yaml

    two = default_config(direct_http_port=18004)
    second = copy.deepcopy(two["applications"][0])
    second.update(name="other", route_prefix="/other")
    two["applications"].append(second)
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(two, f)
    with pytest.raises(ValueError, match="application other: direct_http_port 18004 is already application gsd's"):
        load_config(f.name)
    from gsd_serve.tools.bench_serve import BenchServeConfig

    with pytest.raises(ValueError, match="entries must be direct and/or proxy"):
        BenchServeConfig(entries=("sideways",))


def test_deploy_manifests_are_valid_serve_configs():
    from pathlib import Path

    import yaml
    from ray.serve.schema import ServeDeploySchema

    root = Path(__file__).resolve().parents[1] / "deploy"
    configs = [yaml.safe_load((root / f).read_text()) for f in ("local-cpu.yaml", "gpu-cluster.yaml")]
    docs = list(yaml.safe_load_all((root / "kuberay-rayservice.yaml").read_text()))
    service = next(d for d in docs if d["kind"] == "RayService")
    assert service["apiVersion"] == "ray.io/v1"
    configs.append(yaml.safe_load(service["spec"]["serveConfigV2"]))
    for config in configs:
        schema = ServeDeploySchema.model_validate(config)
        app = schema.applications[0]
        assert app.import_path == "gsd_serve.services.app:build_app"
        assert {d["name"] for d in app.model_dump()["deployments"]} == {"Router", "Draft", "Target"}
        assert "gsd_serve.serving.rpc.add_RouterServicer_to_server" in config["grpc_options"]["grpc_servicer_functions"]
        from gsd_serve.serving.router import RouterConfig

        RouterConfig.from_dict(app.args.get("router"))   # the router section is what the router accepts
    for config in configs[1:]:   # GPU: fractional drafts, one 8-bundle STRICT_PACK target, autoscaling everywhere
        deps = {d["name"]: d for d in config["applications"][0]["deployments"]}
        assert 0 < deps["Draft"]["ray_actor_options"]["num_gpus"] < 1
        assert len(deps["Target"]["placement_group_bundles"]) == 8 == config["applications"][0]["args"][
            "tensor_parallel_size"]
        assert deps["Target"]["placement_group_strategy"] == "STRICT_PACK"
        assert all("autoscaling_config" in d for d in deps.values())
    groups = {g["groupName"]: g for g in service["spec"]["rayClusterConfig"]["workerGroupSpecs"]}
    assert groups["target-tp8"]["rayStartParams"]["num-gpus"] == "8"
    ports = service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]
    assert {"serve", "serve-grpc"} <= {p["name"] for p in ports}
    assert any(d["kind"] == "Service" and d["metadata"]["name"] == "redis" for d in docs)


def test_request_deadline_reaches_the_replicas(stack, tiny_pair, tokenizer):
    """A request whose deadline passes while the target is busy fails with DEADLINE_EXCEEDED; the replica is
    not blamed (no failover), drops the stale session before any work on it, and the next request is exact."""
    from gsd_serve.serving.router import DeadlineExceeded, GenerateParams

    engine = _engine(tiny_pair, tokenizer)
    ids = tokenizer("The weather today")["input_ids"]
    t1 = stack["t1"][0]

    async def main():
        core, _ = _core(stack, tokenizer)
        skipped = t1.scheduler.dropped
        t1.lock.acquire()          # the replica is busy with someone else's long forward
        try:
            run = core.start(GenerateParams(ids, 8, SamplingParams(), "late-1", timeout_s=0.5))
            with pytest.raises(DeadlineExceeded):
                async for _ in run.chunks():
                    pass
        finally:
            t1.lock.release()
        assert run.stats.failovers == 0 and core.endpoints and all(ep.alive for ep in core.endpoints.values())
        deadline = time.monotonic() + 60
        while t1.scheduler.dropped == skipped:   # the scheduler gets the lock, sees it is over, drops it
            assert time.monotonic() < deadline, "the stale session was never dropped"
            await asyncio.sleep(0.01)
        assert not t1.scheduler.sessions and "late-1.0" not in t1.info().session_ids
        out, _ = await _generate(core, ids, 8)
        assert out == engine.generate(ids, 8, spec=SpecConfig.for_method("gsd", max_depth=4, budget=12)).token_ids
        await core.close()
    asyncio.run(main())


def test_prefix_cache_entries_are_checked_against_the_model(redis_server, tiny_pair):
    """Redis is shared: an entry with a valid hash and checksum but another dtype, shape, block length or
    layer count than the model's is a miss, never K/V fed to the model."""
    import redis

    target, _ = tiny_pair
    runner = ModelRunner(target)
    tokens = list(range(300, 316))                      # 2 blocks of 8
    with torch.inference_mode():
        full = runner.new_cache()
        runner.forward(full, torch.tensor(tokens), last_only=True)
    layout = KVLayout.of(export_kv(full, 0, 1))
    assert layout == KVLayout(3, 2, 16, "float32")
    cache = PrefixCache(redis_server.url, f"check-{time.time_ns()}", block_size=8, layout=layout)
    assert cache.store(tokens, lambda s, e: export_kv(full, s, e)) == 2
    assert len(cache.lookup(tokens, 16)) == 2
    r = redis.Redis.from_url(redis_server.url)
    h = block_hashes(tokens, 8, cache.fingerprint)
    good = export_kv(full, 0, 8)
    forged = {"dtype": good.half(), "layers": good[:2], "heads": good[:, :, :1], "block": export_kv(full, 0, 4),
              "head_dim": good[..., :8]}
    for what, kv in forged.items():
        r.set(cache.key(h[0]), PrefixCache.pack(h[0], kv))     # a well-formed entry of the wrong shape
        errors = cache.stats.errors
        assert cache.lookup(tokens, 16) == [], what
        assert cache.stats.errors == errors + 1 and r.get(cache.key(h[0])) is None, what
    assert PrefixCache(redis_server.url, cache.fingerprint, block_size=8).lookup(tokens, 16) == []  # no layout


def test_fingerprint_covers_every_weight(tiny_pair):
    from gsd_serve.serving.prefix_cache import model_fingerprint

    target, _ = tiny_pair
    before = model_fingerprint(target, "t")
    last = list(target.parameters())[-1]
    with torch.no_grad():
        last.view(-1)[-1] += 1.0          # one value of the last tensor, beyond any sample of leading values
        try:
            assert model_fingerprint(target, "t") != before
        finally:
            last.view(-1)[-1] -= 1.0
    assert model_fingerprint(target, "t") == before


def test_router_config_refuses_a_spec_the_drafts_would_refuse():
    from gsd_serve.serving.router import RouterConfig

    with pytest.raises(ValueError, match="could draft"):
        RouterConfig.from_dict({"spec": {"method": "gsd", "k": 64, "max_width": 256, "max_depth": 64}})
    assert RouterConfig.from_dict({"spec": {"method": "gsd"}}).max_body_bytes == 4 * 1024 * 1024


def test_serve_cli_api_key(capsys, monkeypatch):
    from gsd_serve.cli import main

    monkeypatch.delenv("GSD_SERVE_API_KEY", raising=False)
    assert main(["serve", "--dry-run"]) == 0
    assert "API key none" in capsys.readouterr().out
    assert main(["serve", "--dry-run", "--api-key", "k1"]) == 0
    assert "API key required" in capsys.readouterr().out
    monkeypatch.setenv("GSD_SERVE_API_KEY", "k2")
    from gsd_serve.serving.serve_config import load_config

    from gsd_serve.serving.auth import api_key_from_env
    assert load_config(api_key=api_key_from_env(None))["applications"][0]["args"]["api_key"] == "k2"
