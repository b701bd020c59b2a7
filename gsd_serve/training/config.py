"""What a `gsd-serve distill` run does (its command-line flags, checked)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..core.prompts import TRAIN_PROMPTS


@dataclass
class DistillConfig:
    target: str = "smollm2-135m-instruct"
    out: str = "runs/draft"
    prompts: str = str(TRAIN_PROMPTS)
    layers: str = "0,29"            # target layers copied into the draft, in order
    vocab: int = 8192               # reduced output vocabulary (0: full)
    max_new_tokens: int = 128
    gen_batch: int = 32
    sampled_passes: int = 0         # extra passes over the prompts at temperature 0.8
    max_prompts: int = 0            # 0: all
    tokens: int = 0                 # stop generating data after the target wrote this many tokens (0: no limit)
    topk: int = 64                  # teacher distribution entries kept per token
    steps: int = 1000
    batch: int = 8
    lr: float = 5e-4
    warmup: int = 30
    seed: int = 0
    ckpt_every: int = 25
    time_limit_s: float = 0.0       # stop training (with a checkpoint) after this long; 0: no limit
    follow_data: bool = False       # pick up new data shards while a generation process still writes them
    init: str = ""                  # start the draft's own layers from this draft checkpoint, not the target's
    phase: str = "all"              # "data", "train" or "all"
    dtype: str = "auto"             # the teacher's dtype while it writes data (training is always fp32)
    target_weights: str = "auto"    # the teacher's weights while it writes data: auto|dense|gguf (models/factory.py)
    kind: str = "independent"       # "independent" (target layers as a small model) or "features" (EAGLE-3)
    feature_layers: str = "2,15,29"  # --kind features: target layers whose outputs the draft reads
    ttt_steps: int = 3              # --kind features: drafting steps unrolled in training-time test
    magpie: int = 0                 # the target writes this many user prompts itself (instead of --prompts)
    extra_data: str = ""            # train also on the data shards of these earlier --out folders (comma-separated)
    device: str = "cpu"             # where the target writes data and features and a feature draft trains

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch < 1 or self.gen_batch < 1:
            raise ValueError("steps, batch and gen_batch must be >= 1")
        if self.target_weights not in ("auto", "dense", "gguf"):
            raise ValueError(f"target_weights must be auto, dense or gguf, got '{self.target_weights}'")
        if not 1 <= self.topk <= 1024:
            raise ValueError("topk must be in [1, 1024]")
        if self.vocab < 0:
            raise ValueError("vocab must be >= 0")
        if self.lr <= 0:
            raise ValueError("lr must be > 0")
        if self.kind not in ("independent", "features"):
            raise ValueError(f"kind must be 'independent' or 'features', got '{self.kind}'")
        phases = ("all", "data", "features", "train") if self.kind == "features" else ("all", "data", "train")
        if self.phase not in phases:
            raise ValueError(f"phase must be one of {', '.join(phases)} for --kind {self.kind}, got '{self.phase}'")
        if not 1 <= self.ttt_steps <= 8:
            raise ValueError(f"ttt_steps must be in [1, 8], got {self.ttt_steps}")
        if self.init and not (Path(self.init) / "model.safetensors").exists():
            raise ValueError(f"--init: no model.safetensors in '{self.init}'")
        self.layer_list()
        try:
            dev = self.torch_device()
        except RuntimeError:
            raise ValueError(f"--device: not a torch device: '{self.device}'") from None
        if dev.type != "cpu" and self.kind == "independent" and self.phase in ("all", "train"):
            raise ValueError("--device runs a feature draft's distillation (--kind features); the independent "
                             "draft trains on the CPU (--phase data runs on the device)")

    def torch_device(self):
        """The torch device `device` names (models.factory.runner_device: "auto" is CUDA when present)."""
        from ..models.factory import runner_device

        return runner_device(self.device)

    def layer_list(self) -> list[int]:
        try:
            layers = [int(x) for x in self.layers.split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"--layers must be comma-separated layer indices, got '{self.layers}'") from None
        if not layers:
            raise ValueError("--layers names no layer")
        return layers
