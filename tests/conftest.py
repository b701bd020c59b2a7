import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The tests' own cache directory (converted models, built kernels, per-CPU measurements), never the user's: what a
# test measures or builds must not change what a user's next run decides. It persists across runs (gitignored), so
# the kernels and the model conversion are not redone each time; GSD_SERVE_TEST_CACHE moves it. Subprocesses the
# tests start (servers, Ray workers, tensor-parallel ranks, an installed wheel) inherit it through the environment.
ROOT = Path(__file__).resolve().parents[1]
TEST_CACHE = Path(os.environ.get("GSD_SERVE_TEST_CACHE") or ROOT / ".test-cache")
# the user's cache as the first process of the run found it (xdist's workers inherit GSD_SERVE_CACHE already
# pointed at the tests' own, and the user's through GSD_SERVE_USER_CACHE)
USER_CACHE = Path(os.environ.get("GSD_SERVE_USER_CACHE") or os.environ.get("GSD_SERVE_CACHE") or os.path.join(
    os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "gsd-serve"))
os.environ["GSD_SERVE_USER_CACHE"] = str(USER_CACHE)
os.environ["GSD_SERVE_CACHE"] = str(TEST_CACHE)


def _seed_converted_target() -> None:
    """The default target's conversion from GGUF (deterministic, ~30 s) taken from the user's cache when it is
    there: read from, never written to (hard links where the file system allows, else copies)."""
    import shutil

    from gsd_serve.models.checkpoints import DEFAULT_TARGET

    src, dst = USER_CACHE / "models" / DEFAULT_TARGET, TEST_CACHE / "models" / DEFAULT_TARGET
    if dst.exists() or not (src / "model.safetensors").exists() or src.resolve() == dst.resolve():
        return
    tmp = dst.with_name(dst.name + f".tmp{os.getpid()}")

    def link_or_copy(a, b):
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    shutil.copytree(src, tmp, copy_function=link_or_copy)
    tmp.replace(dst)


_seed_converted_target()


# tests that start a Ray cluster of their own in this process: under xdist they run on the worker that holds
# the Ray tests, before its cluster starts (two clusters in one process cannot be)
OWN_RAY_CLUSTER = ("test_tensor_parallel.py::test_ray_actor_ranks_in_a_strict_pack_placement_group",)


@pytest.hookimpl(tryfirst=True)      # before -m deselects: a test on the Ray cluster is marked `ray` however it is declared
def pytest_collection_modifyitems(session, config, items):
    """Run alone (one process), the tests on the Ray cluster come last: once started, its controller, proxies
    and agents take ~10% of a core until the session ends, which every later test would pay for on 2 cores.
    Under xdist (scripts/test.sh runs two workers) they are one group on one worker and come first, so that
    worker starts on them while the other runs the rest. Either way the tests of the shared served application
    (served_app) come last among them, one module after the other in SERVED_APP_USERS' order, so that the
    application is up only while they run (it goes at the session's end)."""
    xdist = bool(os.environ.get("PYTEST_XDIST_WORKER"))

    def key(item):
        names = getattr(item, "fixturenames", ())
        served = "served_app" in names
        module = item.path.name if served else ""
        group = on_ray(item) or (xdist and own_cluster(item))
        return (not group if xdist else group, on_ray(item), served,
                SERVED_APP_USERS.index(module) if module in SERVED_APP_USERS else -1)

    items.sort(key=key)
    for item in items:
        if on_ray(item):
            item.add_marker(pytest.mark.ray)


def on_ray(item) -> bool:
    return "ray_serve" in getattr(item, "fixturenames", ())


def own_cluster(item) -> bool:
    return any(item.nodeid.endswith(n) for n in OWN_RAY_CLUSTER)


def pytest_itemcollected(item):
    """Under xdist the Ray tests are one group (xdist_group), marked as each is collected (before any
    pytest_collection_modifyitems: xdist's worker reads the marks in its own)."""
    if os.environ.get("PYTEST_XDIST_WORKER") and (on_ray(item) or own_cluster(item)):
        item.add_marker(pytest.mark.xdist_group("ray"))


@pytest.fixture(scope="session")
def default_pair():
    from gsd_serve.models import load_default_pair

    return load_default_pair()


@pytest.fixture(scope="session")
def engine(default_pair):
    from gsd_serve.core.engine import Engine
    from gsd_serve.core.prompts import stop_token_ids
    from gsd_serve.models import ModelRunner, draft_output_ids

    target, draft, tokenizer = default_pair
    # without the cross-request index: tests run the same prompts with every method, and the index would hand
    # each later method the earlier one's answer (tests of the index make their own engine)
    return Engine(ModelRunner(target), ModelRunner(draft, draft_output_ids("default-independent")),
                  stop_token_ids=stop_token_ids(tokenizer, target), shared_lookup_tokens=0)


@pytest.fixture(scope="session")
def tokenizer(default_pair):
    return default_pair[2]


# ---------------------------------------------------------------- every kind of round

class RotatingPlanner:
    """A sequence planner forced through every kind of round in turn (plain, a lookup chain alone, a draft with
    the chain merged in), whatever the costs say. A lookup turn without a chain drafts, and the next round
    tries the lookup again."""

    def __init__(self, inner):
        self.inner = inner
        self.turn = 0

    def plan(self, tokens, room, method, lookup, max_depth, lag=0):
        from gsd_serve.core.planner import DRAFT, LOOKUP, PLAIN, RoundPlan

        plan = self.inner.plan(tokens, room, method, lookup, max_depth, lag)
        kind = (PLAIN, LOOKUP, DRAFT)[self.turn % 3]
        if kind == LOOKUP and not plan.chain:
            kind = DRAFT
        else:
            self.turn += 1
        return RoundPlan(kind, plan.chain, plan.chain_probs, len(plan.chain), plan.match_len, plan.source,
                         min(max_depth, room - 1))

    def tree_size(self, path_probs):
        return len(path_probs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


# ---------------------------------------------------------------- serving (tests/test_services_*.py)

class RedisServer:
    """A throwaway redis-server on a free loopback port (tools.local_stack.RedisProcess), or the one REDIS_URL
    names (never stopped)."""

    def __init__(self, tmpdir):
        import shutil

        from gsd_serve.serving.serve_config import free_port
        from gsd_serve.tools.local_stack import RedisProcess

        self.external = os.environ.get("REDIS_URL")
        self.local = None
        if not self.external:
            if shutil.which("redis-server") is None:
                # the install step provides it: its absence fails the serving tests, never skips them
                pytest.fail("redis-server is not installed (apt-get install redis-server) and REDIS_URL is not set")
            self.local = RedisProcess(free_port(), str(tmpdir))

    @property
    def url(self) -> str:
        return self.external or self.local.url

    def start(self) -> None:
        if self.local is not None:
            self.local.start()

    def stop(self) -> None:
        if self.local is not None:
            self.local.stop()

    @property
    def can_stop(self) -> bool:
        return not self.external


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def ray_serve():
    """One Ray cluster (2 CPUs, no GPUs) with Serve's HTTP and gRPC proxies on free loopback ports."""
    import ray   # a dependency: its absence fails, never skips
    from ray import serve

    from gsd_serve.services.app import GRPC_SERVICER_FUNCTIONS
    from gsd_serve.serving.serve_config import SLOW_START_ENV as slow
    from gsd_serve.serving.serve_config import free_port

    http_port, grpc_port = free_port(), free_port()
    for k, v in slow.items():
        os.environ.setdefault(k, v)
    for attempt in range(3):   # Ray gives its raylet 30 s to start: a starved machine can miss that once
        try:
            ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False,
                     object_store_memory=200 * 1024 * 1024,
                     runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled",
                                               "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1",
                                               "TOKENIZERS_PARALLELISM": "false",
                                               "GSD_SERVE_CACHE": os.environ["GSD_SERVE_CACHE"], **slow}})
            break
        except Exception:
            ray.shutdown()
            if attempt == 2:
                raise
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": http_port},
                    grpc_options={"port": grpc_port, "grpc_servicer_functions": GRPC_SERVICER_FUNCTIONS})
        yield {"http": f"http://127.0.0.1:{http_port}", "grpc": f"127.0.0.1:{grpc_port}"}
    finally:
        if ray.is_initialized():
            serve.shutdown()
        ray.shutdown()


# ---------------------------------------------------------------- one served application with the real models

SERVED_APP, SERVED_MODEL = "gsd", "gsd-test"
SERVED_MAX = 12                                   # the router's default max_tokens
SERVED_KEY = "test-key-" + os.urandom(8).hex()
SERVED_AUTH = {"Authorization": f"Bearer {SERVED_KEY}"}
SERVED_APP_USERS = ("test_services_serving.py", "test_services_reliability.py")   # chaos and soak last


def served_spec():
    from gsd_serve.core.config import SpecConfig

    return SpecConfig.for_method("gsd", max_depth=4, budget=12, planner=False)


@pytest.fixture(scope="session")
def served_app(ray_serve, redis_server):
    """The gsd application with the real models (float32), 2 draft and 2 target replicas, an API key, the
    Redis prefix cache and a direct HTTP port, shared by the serving and reliability tests (one deployment
    instead of one per module). Its spec drafts every round (no planner): those tests exercise drafting rounds
    (a killed draft replica, failover), which the planner may turn into plain steps where speculation does
    not pay."""
    from ray import serve

    from gsd_serve.serving.serve_config import free_port
    from gsd_serve.tools.local_stack import deploy_app

    direct = free_port()
    args = {"model_name": SERVED_MODEL, "redis_url": redis_server.url, "spec": served_spec().to_dict(),
            "dtype": "float32", "api_key": SERVED_KEY, "max_sessions": 64, "prefix_block_size": 16,
            # a killed target replica cannot release its sessions' draft sessions: their TTL frees them, within
            # the chaos test's wait for an idle application
            "session_ttl_s": 30,
            "direct_http_port": direct,
            "router": {"max_prompt_tokens": 400, "max_inflight": 32, "default_max_tokens": SERVED_MAX}}
    deploy_app(SERVED_APP, args, ray_serve["http"], drafts=2, targets=2)
    yield {**ray_serve, "direct": f"http://127.0.0.1:{direct}"}
    serve.delete(SERVED_APP)


def whole(app: dict, timeout_s: float = 600) -> dict:
    """`app` (served_app) once both its draft and both its target replicas answer: a module that kills replicas
    leaves Serve replacing them, and the next module starts from the whole application."""
    from gsd_serve.tools.local_stack import AppProbe

    probe = AppProbe(SERVED_APP)
    for kind in ("draft", "target"):
        probe.wait_replicas(kind, 2, None, timeout_s)
    return app


# ---------------------------------------------------------------- a tiny random Llama with the real tokenizer

@pytest.fixture(scope="session")
def tiny_pair():
    """(target, draft): a 3-layer random Llama over the default target's tokenizer and its 1-layer copy.
    Fast enough to serve hundreds of requests; exactness is checked against the engine on the same pair."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from gsd_serve.models import DEFAULT_TARGET, load_tokenizer, truncated_copy

    vocab = len(load_tokenizer(DEFAULT_TARGET))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True)
    target = LlamaForCausalLM(cfg).eval()
    draft = truncated_copy(target, 1)
    return target, draft


def start_workers(tiny_pair, secret: str | None = None, names=("d1", "d2", "t1"), **target_kw) -> dict:
    """In-process gRPC draft ("d...") and target ("t...") workers on loopback: {name: (worker, server, port)}.
    The targets find the drafts in the returned dict (drop a draft's name from it to hide that draft); they hold
    the real tokenizer (JSON mode's grammar reads it)."""
    from gsd_serve.models import DEFAULT_TARGET, load_tokenizer
    from gsd_serve.serving.auth import SharedSecret
    from gsd_serve.serving.draft_worker import DraftWorker
    from gsd_serve.serving.grpc_server import serve_grpc
    from gsd_serve.serving.target_worker import TargetWorker

    target, draft = tiny_pair
    servers = {}
    target_kw.setdefault("tokenizer", load_tokenizer(DEFAULT_TARGET))

    def drafts():
        return [(n, f"127.0.0.1:{port}") for n, (_, _, port) in list(servers.items()) if n.startswith("d")]

    for name in sorted(names, key=lambda n: not n.startswith("d")):     # drafts first
        worker = DraftWorker(draft, replica_id=name) if name.startswith("d") else \
            TargetWorker(target, replica_id=name, drafts=drafts, secret=SharedSecret(secret) if secret else None,
                         **target_kw)
        servers[name] = (worker,) + serve_grpc(worker, secret=SharedSecret(secret) if secret else None)
    return servers


def router_core(servers: dict, tokenizer, secret: str | None = None, **cfg):
    """A RouterCore over `servers` (start_workers); returns (core, live): drop a name from `live` to hide it."""
    from gsd_serve.core.config import SpecConfig
    from gsd_serve.serving.router import RouterConfig, RouterCore

    live = dict(servers)

    async def discover():
        return [("draft" if n.startswith("d") else "target", n, f"127.0.0.1:{port}")
                for n, (_, _, port) in live.items()]

    cfg.setdefault("spec", SpecConfig.for_method("gsd", max_depth=4, budget=12))
    config = RouterConfig(**cfg)
    return RouterCore(config, discover, tokenizer=tokenizer, stop_ids={tokenizer.eos_token_id},
                      worker_token=secret), live
