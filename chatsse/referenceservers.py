"""The servers ``make bench`` and the workbook compare, each one uvicorn child process: chatsse
(``POST /chat``, the simulated engine) as ``chatsse serve`` runs it, and the two reference apps
in the checkout's ``benchmarks/`` under the uvicorn command with the same loop and HTTP parser
(:func:`uvicorn_options`): a bare ASGI app writing pre-encoded bytes (the floor for a Python
SSE server) and plain sse-starlette (``EventSourceResponse`` over ``ServerSentEvent`` objects).

All send the same reply shape, ``connected``, one ``message`` event per token, ``completed``,
with ids of the same length; :func:`reply_env` gives each the same length and pace. The
reference apps are part of the checkout, not of the installed package.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path
from typing import Any, Final

import aiohttp
import httpx

from chatsse.processes import ServerProcess, ServerProcessError
from chatsse.servercost import cpu_seconds
from chatsse.soak import TASKS_METRIC

__all__ = ["CHECKOUT", "REFERENCE_APPS", "ReferenceServer", "reply_env", "uvicorn_options"]

REFERENCE_APPS: Final = {
    "bare-asgi": "benchmarks.bare_asgi:app",
    "sse-starlette": "benchmarks.sse_starlette_app:app",
    # As chatsse's server commands run it (chatsse serve): the app, the process's garbage
    # collector tuned, its connection limits, and a drain on SIGTERM.
    "chatsse": "chatsse serve",
}
CHECKOUT: Final = Path(__file__).resolve().parent.parent
"""The checkout chatsse runs from; its ``benchmarks/`` holds the reference apps."""


def uvicorn_options() -> list[str]:
    """The fastest loop and HTTP parser installed, the same for every server."""
    options = ["--log-level", "warning", "--no-access-log", "--timeout-graceful-shutdown", "1"]
    for flag, fast, module in (("--loop", "uvloop", "uvloop"), ("--http", "httptools", "httptools")):
        try:
            __import__(module)
        except ImportError:
            continue
        options += [flag, fast]
    return options


def reply_env(app: str, *, tokens: int, interval_ms: float) -> dict[str, str]:
    """Environment giving ``app`` replies of ``tokens`` tokens, ``interval_ms`` apart, the
    first one at once (a request's ``max_tokens`` asks for fewer)."""
    if app == "chatsse":
        return {
            "CHATSSE_SIM_TTFT_MS": "0",
            "CHATSSE_SIM_PREFILL_MS_PER_TOKEN": "0",
            "CHATSSE_SIM_TOKEN_INTERVAL_MS": str(interval_ms),
            "CHATSSE_SIM_JITTER": "0",
            "CHATSSE_SIM_REPLY_TOKENS_MIN": str(tokens),
            "CHATSSE_SIM_REPLY_TOKENS_MAX": str(tokens),
            "CHATSSE_MAX_REPLY_TOKENS": str(tokens),
            "CHATSSE_LOG_LEVEL": "warning",
            "CHATSSE_MAX_CONVERSATIONS": "10000000",
            "CHATSSE_MAX_STREAMS_PER_WORKER": "1000000",
            # A benchmark ends by dropping its streams: the replies whose clients left must not
            # hold the server's stop for the whole resume window (a served one gets it).
            "CHATSSE_SHUTDOWN_GRACE_PERIOD": "0.5",
        }
    return {
        "BENCH_REPLY_TOKENS": str(tokens),
        "BENCH_TTFT_MS": "0",
        "BENCH_TOKEN_INTERVAL_MS": str(interval_ms),
    }


class ReferenceServer(ServerProcess):
    """One of :data:`REFERENCE_APPS` under uvicorn with :func:`uvicorn_options`:
    ``with ReferenceServer("sse-starlette", env=reply_env(...)) as server: server.url``.

    ``core``: pin the process to that CPU core (``taskset``). ``cpu()`` is the CPU time it has
    used; ``tasks()`` its asyncio tasks."""

    def __init__(
        self, app: str, *, env: dict[str, str] | None = None, core: int | None = None, **options: Any
    ) -> None:
        if app not in REFERENCE_APPS:
            raise ValueError(f"unknown app {app!r}; choose from {sorted(REFERENCE_APPS)}")
        self.app = app
        self.kind = app
        self.core = core
        super().__init__(env=env, cwd=CHECKOUT, **options)

    def command(self) -> list[str]:
        if self.app != "chatsse" and not (CHECKOUT / "benchmarks").is_dir():
            raise ServerProcessError(
                f"{self.app} is one of the checkout's benchmarks/, not found in {CHECKOUT}"
            )
        where = ["--host", self.host, "--port", str(self.port)]
        if self.app == "chatsse":
            command = [sys.executable, "-m", "chatsse", "serve", *where]
        else:
            command = [sys.executable, "-m", "uvicorn", REFERENCE_APPS[self.app], "--app-dir", str(CHECKOUT)]
            command += [*where, *uvicorn_options()]
        if self.core is not None:
            command = ["taskset", "-c", str(self.core), *command]
        return command

    def environment(self) -> dict[str, str]:
        """The parent's environment without its chatsse and reference-reply settings, plus ``env``."""
        env = {k: v for k, v in super().environment().items() if not k.startswith("BENCH_")}
        env.update(self.extra_env)
        return env

    def is_ready(self) -> bool:
        """``GET /`` answers (chatsse's chat page, the references' ``ok``)."""
        return httpx.get(f"{self.url}/", timeout=1).status_code == 200

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int | None:
        """Stop it as a benchmark does: SIGTERM, at most ``timeout`` seconds to exit, then kill
        (a measured server is not given the long drain a served one gets)."""
        return super().stop(sig, timeout)

    def cpu(self) -> float:
        """CPU seconds the process has used (:func:`chatsse.servercost.cpu_seconds`)."""
        return cpu_seconds(self.pid)

    async def tasks(self) -> int:
        """The server's asyncio tasks: the references answer ``GET /tasks``; chatsse's count is
        its ``chatsse_worker_asyncio_tasks`` gauge, set every second, so this waits a second
        and more for a sample taken now."""
        async with aiohttp.ClientSession() as http:
            if self.app != "chatsse":
                async with http.get(f"{self.url}/tasks") as response:
                    return int(await response.text())
            from prometheus_client.parser import text_string_to_metric_families

            await asyncio.sleep(1.1)
            async with http.get(f"{self.url}/metrics") as response:
                text = await response.text()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == TASKS_METRIC and sample.labels.get("pid", str(self.pid)) == str(self.pid):
                    return int(sample.value)
        raise ServerProcessError(f"no {TASKS_METRIC} in {self.url}/metrics")
