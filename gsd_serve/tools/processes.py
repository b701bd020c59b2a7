"""A child process whose output goes to a log file: its log's tail, and a stop that escalates."""
from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path


class LoggedProcess:
    """Base for the servers the tools start: subclasses set `proc` (started in its own session, so a SIGKILL
    reaches its whole group), `_log` (the open log file) and `log_path`."""

    proc: subprocess.Popen
    log_path: str

    def log_tail(self, n: int = 2000) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self, timeout_s: float = 120.0) -> None:
        """SIGTERM (the server shuts down cleanly), SIGKILL to its process group if it has not after timeout_s."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(30)
        self._log.close()
