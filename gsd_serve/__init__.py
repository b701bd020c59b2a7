"""gsd-serve: Graph-structured Speculative Decoding, as a library and as a serving system.

Layers, each importing only those before it (training and serving never import each other):
    core      the algorithm (graph, drafting, verification, acceptance, sampling, caches, decode loop, Engine)
    models    checkpoints, the runner that does a forward, CPU kernels, tensor parallelism, the factory
    training  distilling drafts from a target
    serving   workers, router, gRPC and OpenAI frontends, prefix cache; services: the Ray Serve deployments
    tools     bench, tune, bench-serve, a local stack, chaos and soak (the [bench] extra)
    cli       the `gsd-serve` command: arguments, then a call into the layers above
"""
import importlib

# what `from gsd_serve import X` gives, imported on first use: the command line's --help and its argument
# errors then answer without loading torch and transformers (~3 s)
_EXPORTS = {"SpecConfig": ".core.config", "Engine": ".core.engine", "TokenGraph": ".core.graph",
            "VerifyTree": ".core.graph", "flatten_to_tree": ".core.graph", "tree_attention_mask": ".core.graph",
            "SamplingParams": ".core.sampling", "ModelRunner": ".models", "load_default_pair": ".models",
            "load_engine": ".models", "load_pair": ".models"}

__version__ = "0.1.0"

__all__ = ["SpecConfig", "Engine", "TokenGraph", "VerifyTree", "flatten_to_tree", "tree_attention_mask",
           "SamplingParams", "ModelRunner", "load_default_pair", "load_engine", "load_pair", "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'gsd_serve' has no attribute '{name}'")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
