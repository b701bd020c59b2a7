"""Models: loading target and draft checkpoints, the runner that does a forward, CPU kernels, tensor
parallelism.

May import gsd_serve.core (caches, the runner interface, the Engine it builds). Never imports
gsd_serve.serving or gsd_serve.cli. Ray is imported only by tensor_parallel.ray_actors, and only when a
Ray transport is asked for.
"""
from .loading import (DEFAULT_DRAFT, DEFAULT_TARGET, DRAFT_KINDS, DRAFT_VOCAB_FILE, SHIPPED_DRAFT_DIR,
                      SHIPPED_FEATURE_DRAFT_DIR, ModelLoadError, default_draft_spec,
                      default_draft_dir, default_target_dir, draft_output_ids, load_default_pair, load_engine,
                      load_model, load_pair, load_tokenizer, resolve, same_tokenizer, truncated_copy)
from .runner import DeviceModelRunner, ModelRunner, make_runner

__all__ = ["DEFAULT_DRAFT", "DEFAULT_TARGET", "DRAFT_KINDS", "DRAFT_VOCAB_FILE", "SHIPPED_DRAFT_DIR",
           "SHIPPED_FEATURE_DRAFT_DIR", "ModelLoadError", "default_draft_spec",
           "default_draft_dir", "default_target_dir", "draft_output_ids", "load_default_pair", "load_engine",
           "load_model", "load_pair", "load_tokenizer", "resolve", "same_tokenizer", "truncated_copy",
           "DeviceModelRunner", "ModelRunner", "make_runner"]
