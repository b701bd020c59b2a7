"""The environment switches of the model layer, read here and nowhere else.

Each is unset by default (the measured or built-in choice holds); "1/true/yes/on" forces it on, "0/false/no/off"
off. They are read at every call, so a process may change them between loads (the tests do).

    GSD_SERVE_GGUF_BLOCKS     --target-weights auto: whether the default target runs on its GGUF blocks
    GSD_SERVE_CPU_BF16        --dtype auto on a CPU: whether bf16 is chosen
    GSD_SERVE_COMPILE         0: never compile (--compile on/auto are ignored)
    GSD_SERVE_PACKED_LINEAR   0: keep the stock CPU linear kernels instead of oneDNN-packed ones
    GSD_SERVE_LEAN_FORWARD    0: run transformers' own decoder forward instead of the lean Llama one
"""
from __future__ import annotations

import os

SWITCHES = ("GSD_SERVE_GGUF_BLOCKS", "GSD_SERVE_CPU_BF16", "GSD_SERVE_COMPILE", "GSD_SERVE_PACKED_LINEAR",
            "GSD_SERVE_LEAN_FORWARD")
_ON, _OFF = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def forced(name: str) -> bool | None:
    """What switch `name` forces: True (on), False (off) or None (unset or unreadable: the usual choice holds)."""
    if name not in SWITCHES:
        raise KeyError(f"unknown switch {name}")
    value = os.environ.get(name)
    if value is None:
        return None
    value = value.lower()
    return True if value in _ON else False if value in _OFF else None
