from __future__ import annotations

from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import httpx
import nbformat
import openai
import pytest
from exercised import unexplained_results

from chatsse import Settings, create_app
from chatsse.inprocess import InProcessServer

# Fast, jitter-free simulated timing unless a test asks for something else.
FAST = {
    "sim_ttft_ms": 1.0,
    "sim_prefill_ms_per_token": 0.0,
    "sim_token_interval_ms": 0.5,
    "sim_jitter": 0.0,
    "log_level": "warning",
    "shutdown_grace_period": 0.5,
}

Serve = Callable[..., InProcessServer]
SDK = Callable[[str], openai.OpenAI]


@pytest.fixture
def serve() -> Iterator[Serve]:
    """Start real uvicorn servers on free ports; all are stopped after the test."""
    servers: list[InProcessServer] = []

    def start(*, engine: Any = None, store_object: Any = None, **overrides: Any) -> InProcessServer:
        """Settings as keyword arguments; ``engine`` (an engine object) and ``store_object``
        replace the defaults; ``engine`` as a string is the ``CHATSSE_ENGINE`` setting."""
        if isinstance(engine, str):
            overrides["engine"], engine = engine, None
        settings = Settings(_env_file=None, **{**FAST, **overrides})  # type: ignore[call-arg]
        server = InProcessServer(create_app(settings, engine=engine, store=store_object)).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def server(serve: Serve) -> InProcessServer:
    return serve()


@pytest.fixture
def client(server: InProcessServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=10) as c:
        yield c


@pytest.fixture
def sdk() -> Iterator[SDK]:
    """Clients of the official ``openai`` SDK for servers' URLs (``/v1`` added), closed after
    the test."""
    clients: list[openai.OpenAI] = []

    def make(url: str) -> openai.OpenAI:
        clients.append(openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=30))
        return clients[-1]

    yield make
    for client in clients:
        client.close()


# The test files that take a minute or so each (gunicorns of their own, benchmarks, a chaos run),
# longest first, then the notebooks: under xdist (make test) they start at once, not last.
HEAVY = (
    "test_resume.py",
    "test_serving.py",
    "test_bench.py",
    "test_soak.py",
    "test_limits.py",
    "test_page.py",
)


def _weight(item: pytest.Item) -> int:
    if item.path.name in HEAVY:
        return HEAVY.index(item.path.name)
    return len(HEAVY) + (item.path.suffix != ".ipynb")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=_weight)  # stable: each file's tests keep their order


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, Any]:
    """A notebook that ran (nbmake, ``--overwrite``: its outputs written back) fails if a result
    of its own has no sentence after it (tests/exercised.py)."""
    report = yield
    if (
        call.when == "call"
        and report.passed
        and getattr(item, "nbmake", False)
        and item.config.option.overwrite
    ):
        executed = nbformat.read(Path(item.config.rootpath) / item.filename, as_version=4)  # type: ignore[attr-defined]
        unexplained = unexplained_results(executed)
        if unexplained:
            report.outcome = "failed"
            shown = "\n---\n".join(source[:300] for source in unexplained)
            report.longrepr = f"results with no markdown cell after them to say what they show:\n{shown}"
    return report
