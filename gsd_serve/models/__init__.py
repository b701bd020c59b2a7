"""Models: checkpoints, the runners that do a forward, their CPU kernels, tensor parallelism, and the factory
that chooses what a pair runs in and assembles the runners.

Inside, each part imports only those before it: switches, hardware, dtypes, checkpoints -> kernels
(cpu_linear, llama_forward, gguf_kernels) and block weights (gguf_blocks), feature_draft -> runner, compiled,
tensor_parallel -> factory.

May import gsd_serve.core (caches, the runner interface, the Engine it builds). Never imports
gsd_serve.training, gsd_serve.serving, gsd_serve.tools or gsd_serve.cli. Ray is imported only by
tensor_parallel.ray_actors, and only when a Ray transport is asked for.
"""
from .checkpoints import (DEFAULT_DRAFT, DEFAULT_TARGET, DRAFT_KINDS, DRAFT_VOCAB_FILE, SHIPPED_DRAFT_DIR,
                          SHIPPED_FEATURE_DRAFT_DIR, ModelLoadError, default_draft_dir, default_draft_spec,
                          default_target_dir, draft_output_ids, load_model, load_tokenizer, resolve, same_tokenizer,
                          truncated_copy)
from .factory import load_default_pair, load_engine, load_pair, make_runner
from .runner import DeviceModelRunner, ModelRunner

__all__ = ["DEFAULT_DRAFT", "DEFAULT_TARGET", "DRAFT_KINDS", "DRAFT_VOCAB_FILE", "SHIPPED_DRAFT_DIR",
           "SHIPPED_FEATURE_DRAFT_DIR", "ModelLoadError", "default_draft_spec",
           "default_draft_dir", "default_target_dir", "draft_output_ids", "load_default_pair", "load_engine",
           "load_model", "load_pair", "load_tokenizer", "resolve", "same_tokenizer", "truncated_copy",
           "DeviceModelRunner", "ModelRunner", "make_runner"]
