"""The router's HTTP app on a port of its own, served from the router's event loop (no Serve proxy hop).

Through Ray Serve every SSE chunk goes router replica -> Serve's proxy actor (another process) -> client: on
the 2-core dev machine the proxy took ~9% of a core at one stream and each chunk paid the hop. A router
replica can also serve the same app (same routes, API key, limits and metrics: it is the same HttpApi over
the same RouterCore) straight from its own event loop, like draft and target replicas serve gRPC on their own
ports. The port is bound exclusively (no SO_REUSEPORT): two servers sharing one port would hand each other's
clients to the wrong application without a word. One router replica per machine serves it (one per node in
a cluster); another replica on the same machine finds it taken, says so, and serves through the proxy only.
"""
from __future__ import annotations

import asyncio
import logging
import socket

from .serve_config import client_host

log = logging.getLogger(__name__)


def listening_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on (host, port); OSError (EADDRINUSE) where another server holds the port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # rebinding after a restart, not sharing
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.listen(1024)
    sock.setblocking(False)
    return sock


class DirectHttpServer:
    """uvicorn serving `app` on (host, port) as a task of the running event loop; `port` 0 picks a free one."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0):
        import uvicorn

        self.sock = listening_socket(host, port)
        self.host, self.port = host, self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, lifespan="off", log_level="warning", access_log=False))
        self.task: asyncio.Task | None = None

    @property
    def url(self) -> str:
        return f"http://{client_host(self.host)}:{self.port}"

    def start(self) -> "DirectHttpServer":
        """Start serving in the running event loop (call from a coroutine or a callback of that loop)."""
        self.task = asyncio.get_running_loop().create_task(self._serve())
        return self

    async def _serve(self) -> None:
        # startup / main_loop / shutdown rather than Server.serve(), which would take over the process's
        # signal handlers when run on the main thread (tests)
        server = self.server
        server.config.load()
        server.lifespan = server.config.lifespan_class(server.config)
        await server.startup(sockets=[self.sock])
        if not server.should_exit:
            await server.main_loop()
        if server.started:
            await server.shutdown(sockets=[self.sock])
        else:
            log.error("direct HTTP on %s did not start", self.url)

    async def stop(self) -> None:
        self.server.should_exit = True
        if self.task is not None:
            await self.task


__all__ = ["DirectHttpServer", "listening_socket"]
