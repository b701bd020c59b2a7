"""gsd-serve: Graph-structured Speculative Decoding, as a library and as a serving system.

Layers, each importing only those before it:
    core     the algorithm (graph, drafting, verification, acceptance, sampling, caches, decode loop, Engine)
    models   loading checkpoints, the runner that does a forward, CPU kernels, tensor parallelism
    serving  workers, router, gRPC and OpenAI frontends, prefix cache, Ray Serve deployments (services)
    cli      the `gsd-serve` command: generate, bench, tune, distill, serve
"""
from .core.config import SpecConfig
from .core.engine import Engine
from .core.graph import TokenGraph, VerifyTree, flatten_to_tree, tree_attention_mask
from .core.sampling import SamplingParams
from .models import ModelRunner, load_default_pair, load_engine, load_pair

__version__ = "0.1.0"

__all__ = ["SpecConfig", "Engine", "TokenGraph", "VerifyTree", "flatten_to_tree", "tree_attention_mask",
           "SamplingParams", "ModelRunner", "load_default_pair", "load_engine", "load_pair", "__version__"]
