"""Run a chatsse server inside the current process, on a free port, in a background thread.

Used by the tests and the notebooks. Each :class:`InProcessServer` owns a fresh
``uvicorn.Server`` and event loop, so several can run at once and one can be started after
another has stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from types import TracebackType
from typing import Any

import uvicorn
from starlette.types import ASGIApp

from chatsse import registry
from chatsse.errors import ChatsseError
from chatsse.lifecycle import lifecycle_of
from chatsse.serving import ChatsseServer

__all__ = ["STARTUP_TIMEOUT", "InProcessServer", "ServerStartError"]

STARTUP_TIMEOUT = 10.0


class ServerStartError(ChatsseError, RuntimeError):
    """The server did not start (a bind failure, a failing lifespan, or a time-out)."""


class InProcessServer:
    """``with InProcessServer(create_app(settings)) as server: server.url``"""

    def __init__(
        self,
        app: ASGIApp,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        graceful_timeout: float | None = None,
        name: str | None = None,
        **config: Any,
    ) -> None:
        """``graceful_timeout``: how long ``stop()`` lets open connections finish; for a chatsse
        app, what its deadlines allow (chatsse/deadlines.py), else 2 s. ``name``: starting this
        server first stops a running one of that name (a notebook cell run again)."""
        self.name = name
        self.app = app
        self.host = host
        self.requested_port = port
        self.lifecycle = lifecycle_of(app)
        if graceful_timeout is None:
            graceful_timeout = 2.0 if self.lifecycle is None else self.lifecycle.deadlines.server_shutdown
        self.graceful_timeout = graceful_timeout
        self.config_options = config
        self.port: int | None = None
        self._server: ChatsseServer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("server not started")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self, timeout: float = STARTUP_TIMEOUT) -> InProcessServer:
        if self._thread is not None:
            raise RuntimeError("server already started")
        registry.register(self, self.name)
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.requested_port))
        except OSError as exc:
            sock.close()
            registry.unregister(self)
            raise ServerStartError(f"cannot bind {self.host}:{self.requested_port}: {exc}") from exc
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self.app,
            log_config=None,
            lifespan="on",
            **self.config_options,
        )
        server = self._server = ChatsseServer(config, self.lifecycle)
        if self.lifecycle is None:
            config.timeout_graceful_shutdown = self.graceful_timeout  # type: ignore[assignment]
        self._thread = threading.Thread(
            target=self._run, args=(server, sock), name=f"chatsse-server-{self.port}", daemon=True
        )
        self._thread.start()
        waited = 0.0
        while not server.started:
            if self._error is not None or not self._thread.is_alive():
                self._thread.join(1)
                registry.unregister(self)
                raise ServerStartError(f"server on port {self.port} failed to start: {self._error!r}")
            if waited >= timeout:
                self.stop()
                raise ServerStartError(f"server on port {self.port} did not start within {timeout} s")
            self._thread.join(0.01)
            waited += 0.01
        return self

    def _run(self, server: ChatsseServer, sock: socket.socket) -> None:
        async def serve() -> None:
            self._loop = asyncio.get_running_loop()
            await server.serve(sockets=[sock])

        try:
            with sock:
                asyncio.run(serve())
            if not server.started:
                self._error = ServerStartError("lifespan start-up failed")
        except BaseException as exc:
            self._error = exc

    def drain(self) -> None:
        """Begin the app's drain (as ``stop()`` does first) without stopping the server."""
        if self.lifecycle is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(self.lifecycle.drain)

    def write_buffers(self) -> list[int]:
        """The bytes each open connection's transport holds unsent (what the server buffers
        for a slow reader), read in the server's own event loop; [] when it is not running."""
        server, loop = self._server, self._loop
        if server is None or loop is None:
            return []

        async def sizes() -> list[int]:
            return [c.transport.get_write_buffer_size() for c in server.server_state.connections]

        return asyncio.run_coroutine_threadsafe(sizes(), loop).result(5)

    def stop(self, timeout: float | None = None) -> None:
        """Stop accepting, drain the app's streams (each ends with its last event), stop."""
        server, thread = self._server, self._thread
        registry.unregister(self)
        if server is None or thread is None:
            return
        server.should_exit = True
        thread.join(timeout if timeout is not None else self.graceful_timeout + 5)
        if thread.is_alive():
            server.force_exit = True
            thread.join(5)
        self._thread = None
        self._server = None

    def __enter__(self) -> InProcessServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.stop(0)
