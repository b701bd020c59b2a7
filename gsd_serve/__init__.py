"""gsd-serve: Graph-structured Speculative Decoding, as a library and as a serving system."""
from .graph import TokenGraph, VerifyTree, flatten_to_tree, tree_attention_mask
from .models import load_default_pair, load_pair
from .sampling import SamplingParams

__version__ = "0.1.0"

__all__ = ["TokenGraph", "VerifyTree", "flatten_to_tree", "tree_attention_mask", "load_default_pair",
           "load_pair", "SamplingParams", "__version__"]
