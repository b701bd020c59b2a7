"""Issue 13: Ray autoscaling that sees the load the replicas measure.

The router calls draft and target replicas on their own gRPC ports, so Serve counts no ongoing requests on
them; they report their own load (record_autoscaling_stats) and gsd_serve/services/autoscaling.py:ReplicaLoadPolicy turns
it into a replica count. Unit tests of the policy's decisions and of the numbers a real LoadMeter hands it, then
the end-to-end check on this machine: a real Serve stack whose Draft deployment has min_replicas 1 and
max_replicas 2 scales to 2 under sustained load and back to 1 when idle, and every request, before, during
and after, completes with exactly the in-process engine's greedy output.
"""
from __future__ import annotations

import ast
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from gsd_serve.core.config import SpecConfig
from gsd_serve.services.autoscaling import METRICS, POLICY_PATH, ReplicaLoadPolicy, autoscaling_stats

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- the policy's decisions

def test_desired_replicas_follow_sessions_busy_and_queue():
    p = ReplicaLoadPolicy(target_sessions=16, target_busy=0.75, target_queued=4)
    assert p.desired(1, sessions=0, busy=0.0, queued=0) == 0.0          # idle: Serve's min_replicas decides
    assert p.desired(1, sessions=16, busy=0.1, queued=0) == 1.0         # exactly the target: still one
    assert p.desired(1, sessions=17, busy=0.1, queued=0) == 2.0
    assert p.desired(2, sessions=40, busy=0.2, queued=0) == 3.0         # ceil(40 / 16)
    assert p.desired(2, sessions=4, busy=1.9, queued=0) == 3.0          # two saturated replicas: ceil(1.9 / 0.75)
    assert p.desired(2, sessions=4, busy=0.5, queued=8) == 1.0          # 4 queued per replica: not more than target
    assert p.desired(2, sessions=4, busy=0.5, queued=9) == 3.0          # calls pile up: one more
    assert p.desired(3, sessions=100, busy=0.5, queued=100) == 7.0      # the largest signal wins
    # a signal turned off (0 or None) is not used
    only_sessions = ReplicaLoadPolicy(target_sessions=2, target_busy=0, target_queued=None)
    assert only_sessions.desired(1, sessions=3, busy=5.0, queued=50) == 2.0
    assert only_sessions.desired(2, sessions=2, busy=5.0, queued=50) == 1.0
    with pytest.raises(ValueError):
        ReplicaLoadPolicy(target_sessions=-1)


def _ctx(current: int, target: int, metrics: dict | None):
    """An AutoscalingContext as Serve's controller builds it (the fields the policy reads)."""
    from ray.serve._private.common import DeploymentID, ReplicaID
    from ray.serve.config import AutoscalingContext

    dep = DeploymentID(name="Draft", app_name="app")
    replicas = [ReplicaID(unique_id=f"r{i}", deployment_id=dep) for i in range(current)]
    agg = None if metrics is None else {name: dict(zip(replicas, values)) for name, values in metrics.items()}
    return AutoscalingContext(deployment_id=dep, deployment_name="Draft", app_name="app",
                              current_num_replicas=current, target_num_replicas=target, running_replicas=replicas,
                              total_num_requests=0.0, total_queued_requests=0.0, aggregated_metrics=agg,
                              raw_metrics=None, capacity_adjusted_min_replicas=1, capacity_adjusted_max_replicas=2,
                              policy_state={}, last_scale_up_time=None, last_scale_down_time=None,
                              current_time=time.time(), config=None)


def test_policy_call_sums_what_every_replica_reports():
    p = ReplicaLoadPolicy(target_sessions=4, target_busy=0.75, target_queued=4)
    # two replicas: 3 + 4 active sessions -> 2 replicas; busy 0.4 + 0.9 -> 2; queue 1 + 2 (1.5 per replica)
    n, state = p(_ctx(2, 2, {"gsd_active_sessions": [3, 4], "gsd_busy": [0.4, 0.9], "gsd_queued": [1, 2],
                             "gsd_batch_fill": [2.0, 3.0]}))
    assert n == 2.0 and state == {"gsd_sessions": 7.0, "gsd_busy": 1.3, "gsd_queued": 3.0, "gsd_desired": 2.0}
    n, _ = p(_ctx(2, 2, {"gsd_active_sessions": [9, 8], "gsd_busy": [0.1, 0.1], "gsd_queued": [0, 0]}))
    assert n == 5.0                                                     # ceil(17 / 4): Serve caps it at max
    n, _ = p(_ctx(2, 2, {"gsd_active_sessions": [0, 0], "gsd_busy": [0.0, 0.0], "gsd_queued": [0, 0]}))
    assert n == 0.0                                                     # idle: down to Serve's min_replicas
    # nothing reported yet, or no replica running: keep Serve's target
    assert p(_ctx(2, 2, None)) == (2, {}) and p(_ctx(2, 2, {})) == (2, {})
    assert p(_ctx(0, 1, {"gsd_active_sessions": []})) == (1, {})


def test_replica_load_meter_feeds_the_policy():
    """A worker's LoadMeter (what record_autoscaling_stats reports) over a window: sessions seen, busy time,
    queued calls; the policy's decision from it; the window forgets old load."""
    import threading

    from gsd_serve.serving.sessions import LoadMeter

    now = [100.0]
    meter = LoadMeter(window_s=10.0, clock=lambda: now[0])
    lock = threading.Lock()
    for i in range(6):             # 6 sessions, each a 0.5 s fused forward with its neighbour
        meter.record(now[0] + i, now[0] + i + 0.5, [f"s{i}", f"s{(i + 1) % 6}"])
    now[0] += 6
    stats = autoscaling_stats(meter.snapshot())
    assert set(stats) == set(METRICS) and all(isinstance(v, float) for v in stats.values())
    assert stats["gsd_active_sessions"] == 6.0 and stats["gsd_batch_fill"] == 2.0
    assert stats["gsd_busy"] == pytest.approx(0.3) and stats["gsd_queued"] == 0.0
    with meter.turn(lock):          # a call waits for the model while another holds it: queued
        done = threading.Event()

        def waiter():
            with meter.turn(lock):
                done.set()

        t = threading.Thread(target=waiter)
        t.start()
        deadline = time.monotonic() + 30
        while meter.snapshot()["queued"] != 1:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        assert autoscaling_stats(meter.snapshot())["gsd_queued"] == 1.0
    t.join(30)
    assert done.is_set() and meter.snapshot()["queued"] == 0
    p = ReplicaLoadPolicy(target_sessions=4, target_busy=0.75)
    assert p.desired(1, stats["gsd_active_sessions"], stats["gsd_busy"], stats["gsd_queued"]) == 2.0
    now[0] += 20                   # the window passed without calls: idle
    idle = autoscaling_stats(meter.snapshot())
    assert idle["gsd_active_sessions"] == 0.0 and idle["gsd_busy"] == 0.0
    assert p.desired(1, idle["gsd_active_sessions"], idle["gsd_busy"], idle["gsd_queued"]) == 0.0


def test_policy_module_imports_only_the_standard_library():
    """Serve pickles the policy into its controller, which has no gsd_serve: stdlib imports only."""
    tree = ast.parse((ROOT / "gsd_serve" / "services" / "autoscaling.py").read_text())
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module and
              not n.level}
    assert names and names <= set(sys.stdlib_module_names) | {"__future__"}, names


def test_app_and_manifests_autoscale_on_replica_load():
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from gsd_serve.services.app import autoscaling_config, build_app

    conf = autoscaling_config({"min_replicas": 1, "max_replicas": 2})
    assert conf["policy"] == {"policy_function": POLICY_PATH} and conf["max_replicas"] == 2
    own = {"policy_function": "x:y"}
    assert autoscaling_config({"policy": own})["policy"] is own          # a deployment's own policy wins
    app = build_app({"autoscaling": {"draft": {"min_replicas": 1, "max_replicas": 2}}})
    router = app._bound_deployment
    draft, target = (a._bound_deployment for a in router.init_args[1:3])
    assert (draft.name, target.name) == ("Draft", "Target")
    auto = draft._deployment_config.autoscaling_config
    assert (auto.min_replicas, auto.max_replicas) == (1, 2) and auto.policy.policy_function == POLICY_PATH
    assert target._deployment_config.autoscaling_config is None      # not asked for: a fixed count
    for f in ("gpu-cluster.yaml",):
        config = yaml.safe_load((ROOT / "deploy" / f).read_text())
        ServeDeploySchema.model_validate(config)
        for d in config["applications"][0]["deployments"]:
            if d["name"] in ("Draft", "Target"):
                pol = d["autoscaling_config"]["policy"]
                assert pol["policy_function"] == POLICY_PATH
                ReplicaLoadPolicy(**pol.get("policy_kwargs", {}))       # its kwargs are the policy's
    docs = list(yaml.safe_load_all((ROOT / "deploy" / "kuberay-rayservice.yaml").read_text()))
    serve_conf = yaml.safe_load(next(d for d in docs if d["kind"] == "RayService")["spec"]["serveConfigV2"])
    for d in serve_conf["applications"][0]["deployments"]:
        if d["name"] in ("Draft", "Target"):
            assert d["autoscaling_config"]["policy"]["policy_function"] == POLICY_PATH


# ---------------------------------------------------------------- end to end: Draft 1 -> 2 -> 1 under real load

APP = "gsd-autoscale"
MODEL = "gsd-autoscale"
MAX = 32
# every round drafts (no planner), so the drafts see the sustained load this test makes (with the planner, a
# machine where verification is costly decodes plainly under load and the drafts go idle)
SPEC = SpecConfig.for_method("gsd", max_depth=4, budget=12, planner=False)
TARGET_SESSIONS = 2


def _tiny_llama_dirs(root: Path) -> tuple[Path, Path]:
    """The tiny random pair of conftest.tiny_pair (same recipe and seed), saved as model directories with the
    real tokenizer, so that Serve replicas load them like any checkpoint."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from gsd_serve.models import DEFAULT_TARGET, load_tokenizer, truncated_copy

    tok = load_tokenizer(DEFAULT_TARGET)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    target = LlamaForCausalLM(cfg).eval()
    draft = truncated_copy(target, 1)
    dirs = root / "target", root / "draft"
    for model, d in zip((target, draft), dirs):
        model.save_pretrained(d)
        tok.save_pretrained(d)
    return dirs


def _running(kind: str) -> int:
    from ray import serve

    app = serve.status().applications.get(APP)
    if app is None or kind not in app.deployments:
        return 0
    states = app.deployments[kind].replica_states
    return sum(n for state, n in states.items() if getattr(state, "value", state) == "RUNNING")


def _wait_for(cond, what: str, timeout_s: float, load=None, every_s: float = 0.5):
    """Poll `cond` until it holds; fail after timeout_s (and at once if the load already lost a request)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = cond()
        if value:
            return value
        if load is not None:
            bad = [o for o in list(load.outcomes) if not (o.ok and o.exact)]
            assert not bad, f"while waiting for {what}: {bad[:3]}"
        assert time.monotonic() < deadline, f"timed out after {timeout_s:.0f}s waiting for {what}"
        time.sleep(every_s)


@pytest.fixture(scope="module")
def autoscaled_app(ray_serve, tmp_path_factory):
    from ray import serve

    from gsd_serve.tools.local_stack import deploy_app

    tdir, ddir = _tiny_llama_dirs(tmp_path_factory.mktemp("autoscale-models"))
    args = {"model_name": MODEL, "target": str(tdir), "draft": str(ddir), "dtype": "float32",
            "spec": SPEC.to_dict(), "redis_url": None, "torch_threads": 1, "load_window_s": 2.0,
            "router": {"max_inflight": 64, "default_max_tokens": MAX, "max_prompt_tokens": 400},
            "autoscaling": {"draft": {
                "min_replicas": 1, "max_replicas": 2, "initial_replicas": 1,
                "upscale_delay_s": 1.0, "downscale_delay_s": 3.0,
                "metrics_interval_s": 0.5, "look_back_period_s": 2.0,
                "policy": {"policy_function": POLICY_PATH,
                           "policy_kwargs": {"target_sessions": TARGET_SESSIONS, "target_busy": 0,
                                             "target_queued": 0}}}}}
    deploy_app(APP, args, ray_serve["http"], drafts=1, targets=1)
    try:
        yield SimpleNamespace(http=ray_serve["http"], tdir=tdir, ddir=ddir)
    finally:
        serve.delete(APP)


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_draft_scales_up_under_load_and_down_when_idle_without_losing_a_request(autoscaled_app):
    import httpx

    from gsd_serve.models import load_engine
    from gsd_serve.tools.local_stack import AppProbe
    from gsd_serve.tools.reliability import LoadGenerator, make_cases, summarize

    engine, tokenizer = load_engine(str(autoscaled_app.tdir), str(autoscaled_app.ddir), dtype="float32")
    cases = make_cases(engine, tokenizer, SPEC, 8, MAX)
    probe = AppProbe(APP)
    url = autoscaled_app.http
    assert _running("Draft") == 1 and len(probe.workers("draft")) == 1
    first_draft = probe.workers("draft")[0]["replica_id"]
    seen_max = [1]

    def drafts_at(n):
        def check():
            running = _running("Draft")
            seen_max[0] = max(seen_max[0], running)
            return running == n
        return check

    t0 = time.monotonic()
    # sustained load: 6 streams, each a new session every request -> > TARGET_SESSIONS active sessions
    load = LoadGenerator(url, MODEL, cases, MAX, streams=6).start()
    try:
        _wait_for(lambda: len(load.outcomes) >= 2, "the first answers", 300, load)
        _wait_for(drafts_at(2), "Serve to run 2 Draft replicas", 300, load)
        print(f"autoscaling: 2 Draft replicas after {time.monotonic() - t0:.0f}s of load")
        # the new replica registers and the router puts sessions on it (bounded load spreads the hot prefix)
        _wait_for(lambda: httpx.get(url + "/health", timeout=30).json().get("draft_replicas") == 2,
                  "the router to see 2 draft replicas", 120, load)
        _wait_for(lambda: any(w["replica_id"] != first_draft and w["info"].load.active_sessions > 0
                              for w in probe.workers("draft")), "the new draft replica to serve sessions", 120, load)
        done_before = len(load.outcomes)
        _wait_for(lambda: len(load.outcomes) >= done_before + 6, "requests served by 2 drafts", 300, load)
    finally:
        outcomes = load.stop()
    summary = summarize(outcomes)
    assert summary["failed"] == 0 and summary["mismatches"] == 0 and summary["completed"] >= 12, summary

    # idle: the drafts' windows empty, the policy asks for 0 and Serve goes back to min_replicas
    t1 = time.monotonic()
    _wait_for(drafts_at(1), "Serve to go back to 1 Draft replica", 300)
    print(f"autoscaling: back to 1 Draft replica {time.monotonic() - t1:.0f}s after the load stopped; {summary}")
    _wait_for(lambda: len(probe.workers("draft")) == 1, "the removed replica to leave the registry", 120)
    assert seen_max[0] == 2                       # never above max_replicas
    # the stack serves on after the scale-down, exactly: the router drops the replica that went away
    after = LoadGenerator(url, MODEL, cases, MAX, streams=3).start()
    try:
        _wait_for(lambda: len(after.outcomes) >= 8, "answers after the scale-down", 300, after)
    finally:
        outcomes = after.stop()
    summary = summarize(outcomes)
    assert summary["failed"] == 0 and summary["mismatches"] == 0 and summary["completed"] >= 8, summary
    assert _running("Draft") >= 1
