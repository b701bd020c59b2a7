"""This process's resource use, as the soak and chaos checks read it from each replica."""
from __future__ import annotations

import os


def rss_bytes(pid: int | None = None) -> int:
    """Resident memory of a process (this one by default), from /proc (0 where there is no /proc)."""
    try:
        with open(f"/proc/{pid or os.getpid()}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
