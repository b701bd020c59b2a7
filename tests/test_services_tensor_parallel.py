"""A tensor-parallel target replica (TP=3 on CPU) behind the real serving stack: Ray Serve, gRPC, HTTP.

The Target deployment owns a STRICT_PACK placement group of 3 CPU bundles and runs one rank actor per
bundle. Greedy text through the router must equal the in-process engine's (TP=1). Then one rank actor is
killed while a request streams: the replica fails its health check, Serve replaces it whole (new placement
group, new ranks), and the router rebuilds the session on the replacement: the request completes, exact.
"""
from __future__ import annotations

import threading
import time

import pytest

from gsd_serve.core.config import SpecConfig
from gsd_serve.core.prompts import encode

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]

APP = "gsd-tp"
MODEL = "gsd-tp-test"
SPEC = SpecConfig.for_method("gsd", max_depth=4, budget=12)


def _rank_actors() -> list[dict]:
    import ray

    from gsd_serve.models.tensor_parallel.ray_actors import RANK_ACTOR_PREFIX

    return [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(RANK_ACTOR_PREFIX)]


def _wait_health(base: str, timeout_s: float = 400) -> dict:
    import httpx

    deadline = time.time() + timeout_s
    while True:
        try:
            r = httpx.get(base + "/health", timeout=10)
            if r.status_code == 200 and r.json()["target_replicas"] == 1 and r.json()["draft_replicas"] == 1:
                return r.json()
        except httpx.HTTPError:
            pass
        assert time.time() < deadline, "the TP application did not become healthy"
        time.sleep(1)


@pytest.fixture(scope="module")
def tp_app(ray_serve):
    from ray import serve

    from gsd_serve.services.app import build_app

    args = {"model_name": MODEL, "spec": SPEC.to_dict(), "dtype": "float32", "replicas": {"draft": 1}, "max_sessions": 16,
            "tensor_parallel_size": 3, "cpus_per_rank": 0.25,
            # a replacement replica loads 3 ranks: on a starved machine that takes minutes, not seconds
            "router": {"default_max_tokens": 16, "failover_timeout_s": 600, "dead_s": 2, "stall_timeout_s": 30}}
    try:
        serve.run(build_app(args), name=APP, route_prefix="/")
        _wait_health(ray_serve["http"])
        yield ray_serve
    finally:     # also when it failed to deploy: the next module's application takes the same route prefix
        serve.delete(APP)


def test_tp3_replica_serves_exact_and_a_killed_rank_costs_no_request(tp_app, engine, tokenizer):
    import openai
    import ray
    from ray.util.placement_group import placement_group_table

    ranks = _rank_actors()
    assert len(ranks) == 3, ranks
    tables = [t for t in placement_group_table().values() if t["state"] == "CREATED" and len(t["bundles"]) == 3]
    assert any(t["strategy"] == "STRICT_PACK" for t in tables)

    c = openai.OpenAI(base_url=tp_app["http"] + "/v1", api_key="unused", max_retries=0, timeout=900)
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ids = encode(tokenizer, {"messages": msgs})
    want = tokenizer.decode(engine.generate(ids, 16, spec=SPEC).token_ids, skip_special_tokens=True)
    r = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=16, temperature=0)
    assert r.choices[0].message.content == want

    # a rank dies while a longer request streams
    msgs = [{"role": "user", "content": "Write a short poem about the sea."}]
    ids = encode(tokenizer, {"messages": msgs})
    want = tokenizer.decode(engine.generate(ids, 40, spec=SPEC).token_ids, skip_special_tokens=True)
    victim = ranks[1]
    killed = threading.Event()
    pieces = []
    stream = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=40, temperature=0, stream=True)
    for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
        if not killed.is_set() and "".join(pieces):
            ray.kill(ray.get_actor(victim["name"], namespace=victim["namespace"]), no_restart=True)
            killed.set()
    assert killed.is_set()
    assert "".join(pieces) == want

    # the replica was replaced whole: three new ranks, none of the old ones
    new_ranks = _rank_actors()
    assert len(new_ranks) == 3 and not {a["name"] for a in new_ranks} & {a["name"] for a in ranks}
    health = _wait_health(tp_app["http"])
    assert health["status"] == "ok"
