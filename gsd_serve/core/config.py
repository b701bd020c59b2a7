"""Configuration of speculation: one validated object per method."""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

METHODS = ("ar", "chain", "tree", "gsd")


def cache_dir() -> Path:
    """Where converted models and tuned settings live: $GSD_SERVE_CACHE, else ~/.cache/gsd-serve."""
    root = os.environ.get("GSD_SERVE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "gsd-serve")
    return Path(root)


class ConfigError(ValueError):
    """A configuration value is out of range or does not fit the method."""


@dataclass(frozen=True)
class SpecConfig:
    """How one round drafts and verifies.

    method: ar (no speculation), chain (k=1), tree (k>1, no merging) or gsd (k>1 with merging).
    k: candidates per drafted node. merge_context: n of the merge rule (-1 never merges).
    sibling_threshold: drop a candidate whose draft probability is below s * the best sibling's.
    confidence_threshold: a node whose path has a draft probability below tau is not confident; drafting
    stops at the first level without confident nodes. max_depth: draft levels per round.
    max_width: nodes expanded per level (the most probable paths). budget: draft nodes verified per round
    at most (the root included). lookup (gsd only): up to this many tokens that followed the longest earlier
    matches of the sequence's suffix (its prompt and output, and with shared_lookup earlier requests too)
    are proposed as a chain (0: off); they cost no draft forward, and a round may verify them alone.
    planner: the planner (planner.py) decides each round (plain, lookup chain alone, or draft) and how many
    nodes to verify, from the costs measured where it runs; False: every round drafts and verifies the whole
    budget (for experiments). shared_lookup: propose continuations of earlier requests (the engine's or
    application's cross-request index). The output is the target's own whatever these are.
    """

    method: str = "gsd"
    k: int = 4
    # n=0 (merge equal tokens): in paired runs (12 bench prompts) it drafted 0.28 tokens per output token
    # against n=1's 0.30 at the same acceptance, ~3% faster; 55% fewer than tree in wide drafting
    # (bench/results/2026-11-25-epyc-avx2-bench-wide-merge)
    merge_context: int = 0
    sibling_threshold: float = 0.2
    # `gsd-serve tune` on the 2-core dev CPU with the shipped draft: 0.5 beat 0.3 by ~7% (paired runs);
    # a stronger draft or a GPU (cheaper draft levels) wants lower values
    confidence_threshold: float = 0.5
    max_depth: int = 6
    max_width: int = 8
    budget: int = 16
    # long chains pay where the context spells out what follows (code edits, quotes, repeated requests); the
    # planner verifies only as many of them as their measured acceptance pays for
    lookup: int = 32
    planner: bool = True
    shared_lookup: bool = True

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"unknown method '{self.method}' (choose from {', '.join(METHODS)})")
        if not 1 <= self.k <= 64:
            raise ConfigError(f"k must be in [1, 64], got {self.k}")
        if not -1 <= self.merge_context <= 16:
            raise ConfigError(f"merge_context must be in [-1, 16], got {self.merge_context}")
        if not 0.0 <= self.sibling_threshold <= 1.0:
            raise ConfigError(f"sibling_threshold must be in [0, 1], got {self.sibling_threshold}")
        if not 0.0 <= self.confidence_threshold <= 1.0:
            raise ConfigError(f"confidence_threshold must be in [0, 1], got {self.confidence_threshold}")
        if not 1 <= self.max_depth <= 64:
            raise ConfigError(f"max_depth must be in [1, 64], got {self.max_depth}")
        if not 1 <= self.max_width <= 256:
            raise ConfigError(f"max_width must be in [1, 256], got {self.max_width}")
        if not 2 <= self.budget <= 1024:
            raise ConfigError(f"budget must be in [2, 1024], got {self.budget}")
        if not 0 <= self.lookup <= 64:
            raise ConfigError(f"lookup must be in [0, 64], got {self.lookup}")
        for name in ("planner", "shared_lookup"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.lookup and self.method != "gsd":
            raise ConfigError("context lookup is a gsd proposal (lookup=0 for chain and tree)")
        if self.method == "chain" and self.k != 1:
            raise ConfigError("chain drafts one candidate per node (k=1); use tree or gsd for k > 1")
        if self.method == "tree" and self.merge_context != -1:
            raise ConfigError("tree never merges (merge_context=-1); use gsd to merge")
        if self.method == "gsd" and self.merge_context < 0:
            raise ConfigError("gsd merges: merge_context must be >= 0 (use tree for -1)")

    @classmethod
    def for_method(cls, method: str, base: "SpecConfig | None" = None, **overrides) -> "SpecConfig":
        """The config of `method`, starting from `base` (e.g. a tuned default) and explicit overrides."""
        base = base or cls()
        fields = dataclasses.asdict(base)
        fields["method"] = method
        if method != "gsd":
            fields["lookup"] = 0   # context lookup is a gsd proposal
        if method == "chain":
            fields.update(k=1, merge_context=-1, max_width=1)
        elif method == "tree":
            fields["merge_context"] = -1
        elif method == "gsd" and fields["merge_context"] < 0:   # from a chain or tree base
            fields.update(merge_context=cls.merge_context, lookup=cls.lookup)
        fields.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**fields)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def load_tuned_defaults(path: Path | None = None) -> SpecConfig | None:
    """The configuration `gsd-serve tune` saved, if any (explicit flags still override it)."""
    path = path or cache_dir() / "tuned.json"
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        return SpecConfig(**{k: v for k, v in data["config"].items() if k in SpecConfig.__dataclass_fields__})
    except (OSError, ValueError, KeyError, TypeError, ConfigError):
        return None
