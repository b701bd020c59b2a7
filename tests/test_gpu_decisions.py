"""Every GPU decision that needs no GPU: the dtype `auto` picks on CUDA, the device a runner runs on, which runner
the factory builds for a device (on torch's meta device, which holds no data, where a real GPU is absent), where
the draft goes, the Ray placement bundles of a target with GPUs per rank, and the GPU fields of the deploy
manifests. What needs the GPU itself is in tests/test_gpu.py."""
from pathlib import Path

import pytest
import torch
import yaml
from transformers import LlamaConfig, LlamaForCausalLM

from gsd_serve.models.checkpoints import DEFAULT_TARGET
from gsd_serve.models.compiled import CompiledRunner
from gsd_serve.models.dtypes import resolve_dtype
from gsd_serve.models.factory import (apply_draft_weights, compile_wanted, load_engine, make_runner,
                                      resolve_target_weights, runner_device)
from gsd_serve.models.runner import DeviceModelRunner, ModelRunner

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


def tiny_llama(seed: int = 0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval()


# ---------------------------------------------------------------- dtype

def test_auto_dtype_is_bf16_on_cuda_and_explicit_names_win(monkeypatch):
    for dev in ("cuda", "cuda:1", torch.device("cuda", 3)):
        assert resolve_dtype("auto", dev) is torch.bfloat16
    assert resolve_dtype("float32", "cuda") is torch.float32
    assert resolve_dtype("fp16", "cuda") is torch.float16
    assert resolve_dtype(torch.float32, "cuda") is torch.float32
    # on a CPU, auto follows the CPU's bf16 measurement (forced here): a GPU's answer does not leak into it
    monkeypatch.setenv("GSD_SERVE_CPU_BF16", "0")
    assert resolve_dtype("auto", "cpu") is torch.float32
    monkeypatch.setenv("GSD_SERVE_CPU_BF16", "1")
    assert resolve_dtype("auto", "cpu") is torch.bfloat16
    # no device named: CUDA when torch sees one (the probe is what decides; its answer is set here)
    monkeypatch.setenv("GSD_SERVE_CPU_BF16", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_dtype("auto") is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_dtype("auto") is torch.float32
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("int8", "cuda")


# ---------------------------------------------------------------- devices and runners

def test_runner_device(monkeypatch):
    assert runner_device(None) == runner_device("") == runner_device("cpu") == torch.device("cpu")
    assert runner_device("cuda:1") == torch.device("cuda", 1)
    assert runner_device(torch.device("cuda", 0)) == torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert runner_device("auto") == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert runner_device("auto") == torch.device("cpu")


def test_make_runner_keeps_a_cpu_model_on_the_plain_runner(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device in (None, "cpu", "auto"):
        r = make_runner(tiny_llama(), torch.arange(40), device)
        # not DeviceModelRunner: the plain runner fuses sessions' forwards (a served draft batches its sessions)
        assert type(r) is ModelRunner and r.fuses_many
        assert r.output_ids.tolist() == list(range(40)) and r.head_weight.shape == (40, 32)


def test_make_runner_for_a_device_moves_the_model_and_its_inputs():
    """On the meta device (torch's device without data, standing in for a GPU): a DeviceModelRunner, the model
    and its reduced output layer moved there, the forward run there on inputs the core built on the CPU."""
    model = tiny_llama()
    r = make_runner(model, torch.arange(40), "meta")
    assert type(r) is DeviceModelRunner and r.device == torch.device("meta")
    assert all(p.device.type == "meta" for p in model.parameters())
    assert r.head_weight.device.type == "meta" and r.head_weight.shape == (40, 32)
    assert not r.fuses_many            # its forward_many would not move inputs: the core feeds it one by one
    hidden = DeviceModelRunner.__mro__[1].hidden(r, r.new_cache(), torch.arange(5, device="meta"))
    assert hidden.shape == (5, 32) and hidden.device.type == "meta"
    # forward moves CPU inputs to the device, then copies the logits back, which a meta tensor cannot give
    with pytest.raises(NotImplementedError, match="meta tensor"):
        r.forward(r.new_cache(), torch.arange(5))


def test_device_choices_for_weights_and_compilation(monkeypatch):
    model = tiny_llama()
    # block weights are a CPU kernel: on CUDA auto is dense without measuring the CPU, and gguf is refused
    def no_measurement(_model):
        raise AssertionError("measured GGUF blocks for a CUDA target")

    monkeypatch.setattr("gsd_serve.models.factory.gguf_blocks_faster", no_measurement)
    assert resolve_target_weights(model, DEFAULT_TARGET, "auto", "cuda") == "dense"
    with pytest.raises(ValueError, match="on a CPU"):
        resolve_target_weights(model, DEFAULT_TARGET, "gguf", "cuda")
    # a draft on a GPU stays dense (its Q8_0 blocks are the same CPU kernels)
    draft = tiny_llama(1)
    assert apply_draft_weights(draft, "auto", "dense") is draft
    assert compile_wanted("auto", torch.device("cuda")) and not compile_wanted("auto", torch.device("cpu"))


def test_load_engine_places_target_and_draft_on_the_device():
    """load_engine with device and draft_device, the real default target and draft, on the meta device."""
    engine, _ = load_engine(dtype="float32", device="meta", compile="off", draft_kind="independent")
    assert type(engine.target) is DeviceModelRunner and engine.target.device.type == "meta"
    assert engine.target.weights == "dense"                      # GGUF blocks are for a CPU target only
    assert type(engine.draft) is DeviceModelRunner and engine.draft.device.type == "meta"   # follows the target
    assert engine.draft.output_ids is not None                   # the shipped draft's reduced vocabulary

    engine, _ = load_engine(dtype="float32", device="meta", draft_device="cpu", compile="on",
                            draft_kind="independent")
    assert type(engine.target) is CompiledRunner and engine.target.head_weight.device.type == "meta"
    assert type(engine.draft) is ModelRunner and engine.draft.head_weight.device.type == "cpu"
    with pytest.raises(ValueError, match="tensor parallelism"):
        load_engine(device="meta", tensor_parallel_size=3, draft_spec=None)


# ---------------------------------------------------------------- Ray placement

def test_target_bundles_with_gpus_per_rank():
    from gsd_serve.services.app import target_bundles

    assert target_bundles({}) is None                                    # one process, no GPU: no group
    assert target_bundles({"tensor_parallel_size": 1, "gpus_per_rank": 1}) == [{"CPU": 1.0, "GPU": 1.0}]
    assert target_bundles({"tensor_parallel_size": 8, "gpus_per_rank": 1, "cpus_per_rank": 2}) == \
        [{"CPU": 2.0, "GPU": 1.0}] * 8
    assert target_bundles({"tensor_parallel_size": 2, "gpus_per_rank": 0.5}) == [{"CPU": 1.0, "GPU": 0.5}] * 2
    assert target_bundles({"tensor_parallel_size": 3}) == [{"CPU": 1.0}] * 3  # CPU ranks: no GPU asked for
    bundles = target_bundles({"tensor_parallel_size": 2, "gpus_per_rank": 1})
    bundles[0]["GPU"] = 7.0
    assert bundles[1]["GPU"] == 1.0                                      # one dict per rank, not one shared


# ---------------------------------------------------------------- the deploy manifests

def _app_and_deployments(serve_config: dict) -> tuple[dict, dict]:
    app, = serve_config["applications"]
    return app["args"], {d["name"]: d for d in app["deployments"]}


def gpu_cluster():
    return _app_and_deployments(yaml.safe_load((DEPLOY / "gpu-cluster.yaml").read_text()))


def kuberay():
    docs = list(yaml.safe_load_all((DEPLOY / "kuberay-rayservice.yaml").read_text()))
    service, = [d for d in docs if d["kind"] == "RayService"]
    return service, _app_and_deployments(yaml.safe_load(service["spec"]["serveConfigV2"]))


@pytest.mark.parametrize("manifest", ["gpu-cluster", "kuberay"])
def test_manifest_gpu_fields_agree_with_the_app(manifest):
    from gsd_serve.services.app import target_bundles

    args, deps = gpu_cluster() if manifest == "gpu-cluster" else kuberay()[1]
    target, draft = deps["Target"], deps["Draft"]
    # the file's own bundles are what build_app would ask for from its args (the file's win: they must agree)
    assert target["placement_group_bundles"] == target_bundles(args)
    assert target["placement_group_strategy"] == "STRICT_PACK"           # the ranks' NCCL stays on one node
    # the replica itself holds no GPU: its ranks (the bundles) hold them all
    assert target["ray_actor_options"]["num_gpus"] == 0
    assert sum(b["GPU"] for b in target["placement_group_bundles"]) == args["tensor_parallel_size"] * args["gpus_per_rank"]
    # draft replicas share a GPU evenly
    share = draft["ray_actor_options"]["num_gpus"]
    assert 0 < share <= 1 and (1 / share).is_integer()
    assert runner_device(args["draft_device"]).type == "cuda"
    assert resolve_dtype(args["dtype"], "cuda") is torch.bfloat16


def test_kuberay_worker_groups_hold_what_the_replicas_ask_for():
    service, (args, deps) = kuberay()
    groups = {g["groupName"]: g for g in service["spec"]["rayClusterConfig"]["workerGroupSpecs"]}
    target_group = groups["target-tp8"]
    pod = target_group["template"]["spec"]["containers"][0]["resources"]
    gpus = int(target_group["rayStartParams"]["num-gpus"])
    bundles = deps["Target"]["placement_group_bundles"]
    # one target replica per node: its bundles take exactly the node's GPUs, within the pod's CPUs
    assert gpus == int(pod["limits"]["nvidia.com/gpu"]) == sum(b["GPU"] for b in bundles)
    assert sum(b["CPU"] for b in bundles) <= int(pod["requests"]["cpu"])
    draft_group = groups["draft"]
    draft_pod = draft_group["template"]["spec"]["containers"][0]["resources"]
    assert int(draft_group["rayStartParams"]["num-gpus"]) == int(draft_pod["limits"]["nvidia.com/gpu"]) >= 1
    # drafts (and routers) land on the draft nodes through the custom resource those nodes advertise
    assert "draft_node" in draft_group["rayStartParams"]["resources"]
    assert "draft_node" in deps["Draft"]["ray_actor_options"]["resources"]
    # the head runs no replica: it advertises no GPU
    assert service["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"


def test_local_cpu_manifest_asks_for_no_gpu():
    from gsd_serve.services.app import target_bundles

    args, deps = _app_and_deployments(yaml.safe_load((DEPLOY / "local-cpu.yaml").read_text()))
    assert not args.get("gpus_per_rank") and "draft_device" not in args and "target_device" not in args
    bundles = target_bundles(args)
    assert bundles is None or all("GPU" not in b for b in bundles)
    assert all(not d.get("ray_actor_options", {}).get("num_gpus") for d in deps.values())


# ---------------------------------------------------------------- distillation on a device

def test_distill_device_choices():
    from gsd_serve.training.config import DistillConfig

    cfg = DistillConfig(kind="features", device="cuda")
    assert cfg.torch_device() == torch.device("cuda")
    assert DistillConfig().torch_device() == torch.device("cpu")          # the default stays on the CPU
    # only a feature draft trains on the device; an independent draft's answers may still be written there
    with pytest.raises(ValueError, match="kind features"):
        DistillConfig(kind="independent", device="cuda")
    assert DistillConfig(kind="independent", device="cuda", phase="data").torch_device().type == "cuda"
    with pytest.raises(ValueError, match="not a torch device"):
        DistillConfig(kind="features", device="gpu0")
    # the teacher's dtype on a GPU: auto is bf16, whatever this CPU would choose
    assert resolve_dtype(cfg.dtype, cfg.torch_device()) is torch.bfloat16
