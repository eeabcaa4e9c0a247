"""Run chatsse as a child process, under gunicorn or a single uvicorn: start, wait for
health, stop, clean up.

Used by the tests and the notebooks. The child gets its own session, so a Ctrl-C in a
notebook kernel does not reach it half-way; it is always stopped by :meth:`stop`, by the
context manager, or at interpreter exit.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import weakref
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import httpx

from chatsse.errors import ChatsseError
from chatsse.settings import ENV_PREFIX

__all__ = [
    "GUNICORN_CONF",
    "GunicornServer",
    "ServerProcess",
    "ServerProcessError",
    "UvicornServer",
    "child_pids",
    "free_port",
]

GUNICORN_CONF = "python:chatsse.gunicorn_conf"
"""gunicorn's ``-c`` for chatsse: the package's configuration module, from a checkout or a wheel."""
_running: weakref.WeakSet[ServerProcess] = weakref.WeakSet()


class ServerProcessError(ChatsseError, RuntimeError):
    """The server process failed to start or to stop in time."""


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (the OS may hand it out again, rarely)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def child_pids(pid: int) -> list[int]:
    """The direct children of ``pid`` (Linux ``/proc``)."""
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            children += [int(p) for p in (task / "children").read_text().split()]
    return sorted(children)


class ServerProcess:
    """A chatsse server in a child process; subclasses say which command runs it."""

    kind = "server"

    def __init__(
        self,
        *,
        workers: int = 1,
        store: str | None = None,
        env: dict[str, str] | None = None,
        host: str = "127.0.0.1",
        port: int | None = None,
        cwd: Path | None = None,
        startup_timeout: float = 30.0,
    ) -> None:
        self.workers = workers
        self.store = store
        self.extra_env = env or {}
        self.host = host
        self.port = port
        self.cwd = cwd
        self.startup_timeout = startup_timeout
        self.process: subprocess.Popen[bytes] | None = None
        self._log = tempfile.NamedTemporaryFile(prefix=f"chatsse-{self.kind}-", suffix=".log", delete=False)  # noqa: SIM115

    def command(self) -> list[str]:
        raise NotImplementedError

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def pid(self) -> int:
        if self.process is None:
            raise ServerProcessError("not started")
        return self.process.pid

    def environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        env.update(CHATSSE_HOST=self.host, CHATSSE_PORT=str(self.port), CHATSSE_WORKERS=str(self.workers))
        if self.store is not None:
            env["CHATSSE_STORE"] = self.store
        env.update(self.extra_env)
        return env

    def start(self) -> Self:
        if self.process is not None:
            raise ServerProcessError("already started")
        if self.port is None:
            self.port = free_port(self.host)
        self.process = subprocess.Popen(
            self.command(),
            cwd=self.cwd,
            env=self.environment(),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        _running.add(self)
        try:
            self.wait_healthy(self.startup_timeout)
        except BaseException:
            self.stop(timeout=5)
            raise
        return self

    def wait_healthy(self, timeout: float) -> None:
        """Wait until ``/health`` answers and every worker has booted."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                code = None if self.process is None else self.process.returncode
                raise ServerProcessError(f"{self.kind} exited with code {code}:\n{self.logs()[-3000:]}")
            with contextlib.suppress(httpx.TransportError):
                if (
                    httpx.get(f"{self.url}/health", timeout=1).status_code == 200
                    and len(self.worker_pids()) >= self.workers
                ):
                    return
            time.sleep(0.1)
        raise ServerProcessError(f"{self.kind} not healthy within {timeout} s:\n{self.logs()[-3000:]}")

    def worker_pids(self) -> list[int]:
        """The processes that serve requests."""
        return [self.pid] if self.process is not None else []

    def logs(self) -> str:
        return Path(self._log.name).read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
        """Signal the master (SIGTERM: graceful), wait, and kill it if it overstays."""
        process = self.process
        if process is None:
            return None
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(sig)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(10)
        _running.discard(self)
        return process.returncode

    def close(self) -> None:
        """Stop the server and delete its log file."""
        self.stop()
        self._log.close()
        with contextlib.suppress(OSError):
            os.unlink(self._log.name)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class GunicornServer(ServerProcess):
    """``with GunicornServer(workers=4, store="sqlite:///tmp/c.db") as server: server.url``

    ``gunicorn_args`` are added to the command line, where they override gunicorn.conf.py
    (e.g. ``["--worker-class", "asgi"]`` for gunicorn's own ASGI worker)."""

    kind = "gunicorn"

    def __init__(
        self,
        *,
        workers: int = 2,
        config: str | Path = GUNICORN_CONF,
        gunicorn_args: list[str] | None = None,
        **options: Any,
    ) -> None:
        super().__init__(workers=workers, **options)
        self.config = config
        self.gunicorn_args = gunicorn_args or []

    def command(self) -> list[str]:
        return [sys.executable, "-m", "gunicorn", "-c", str(self.config), *self.gunicorn_args]

    def worker_pids(self) -> list[int]:
        return child_pids(self.pid) if self.process is not None else []


class UvicornServer(ServerProcess):
    """One uvicorn process (``chatsse serve``): no process manager, one core."""

    kind = "uvicorn"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "chatsse", "serve", "--host", self.host, "--port", str(self.port)]


@atexit.register
def _stop_all() -> None:
    for server in list(_running):
        server.stop(timeout=10)
