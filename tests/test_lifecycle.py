"""The lifecycle owner (chatsse/lifecycle.py): admission, the drain, and every server command
calling it. tests/test_shutdown.py has the drain's basic cases; these are the edges."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from typing import Any

import httpx
import pytest
from conftest import Serve
from wire import parse_events

from chatsse.models import Message
from chatsse.processes import UvicornServer
from chatsse.stores import StoreLimits
from chatsse.stores.memory import MemoryStore

SLOW = {
    "sim_ttft_ms": 0,
    "sim_token_interval_ms": 50,
    "sim_reply_tokens_min": 400,
    "sim_reply_tokens_max": 400,
}


class SlowBeginStore(MemoryStore):
    """A memory store whose ``begin_turn`` takes ``delay`` seconds (a slow shared store)."""

    local = False

    def __init__(self, delay: float) -> None:
        super().__init__(StoreLimits(3600, 100, 100))
        self.delay = delay
        self.begun = threading.Event()

    async def begin_turn(self, *args: Any, **kwargs: Any) -> list[Message]:
        self.begun.set()
        await asyncio.sleep(self.delay)
        return await super().begin_turn(*args, **kwargs)


def _read(url: str, body: dict[str, Any], out: dict[str, Any]) -> None:
    """Read one /chat stream; ``out["open"]``, if given, is set once its first bytes came."""
    raw = b""
    with (
        httpx.Client(base_url=url, timeout=30) as client,
        client.stream("POST", "/chat", json=body) as response,
    ):
        out["status"] = response.status_code
        for chunk in response.iter_bytes():
            raw += chunk
            if "open" in out:
                out["open"].set()
    out["raw"] = raw


def test_a_stream_still_beginning_its_turn_when_the_grace_period_ends_gets_its_shutdown_event(
    serve: Serve,
) -> None:
    """The drain race: admitted before the drain, inside begin_turn after the grace period."""
    store = SlowBeginStore(delay=1.0)
    server = serve(store_object=store, shutdown_grace_period=0.2, **SLOW)
    out: dict[str, Any] = {}
    reader = threading.Thread(target=_read, args=(server.url, {"message": "late"}, out))
    reader.start()
    assert store.begun.wait(5)
    server.drain()  # the grace period (0.2 s) ends while the turn is still beginning (1 s)
    reader.join(10)
    assert out["status"] == 200
    events = parse_events(out["raw"])
    assert [name for name, _ in events] == ["connected", "error"]
    assert events[-1][1]["type"] == "shutdown"
    conversation_id = events[0][1]["conversation_id"]
    stored = httpx.get(f"{server.url}/conversations/{conversation_id}").json()["messages"]
    assert [(m["role"], m["finish_reason"]) for m in stored] == [("user", None), ("assistant", "shutdown")]


def test_health_says_draining_and_new_streams_are_refused(serve: Serve) -> None:
    server = serve(shutdown_grace_period=5, **SLOW)
    server.drain()
    with httpx.Client(base_url=server.url) as client:

        def draining() -> bool:
            return bool(client.get("/health").json()["status"] == "draining")

        deadline = time.monotonic() + 2
        while not draining() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert draining()
        refused = client.post("/chat", json={"message": "too late"})
        assert (refused.status_code, refused.json()["error"]["type"]) == (503, "shutting_down")
        stats = client.get("/stats").json()
        assert stats["all_workers"]["rejections"] == {"shutting_down": 1}


def test_chatsse_serve_drains_on_sigterm() -> None:
    """``chatsse serve`` runs the same lifecycle: SIGTERM ends open streams with their event."""
    env = {f"CHATSSE_{k.upper()}": str(v) for k, v in SLOW.items()}
    env.update(CHATSSE_SHUTDOWN_GRACE_PERIOD="0.5", CHATSSE_LOG_LEVEL="warning")
    server = UvicornServer(env=env).start()
    try:
        outs: list[dict[str, Any]] = [{"open": threading.Event()} for _ in range(3)]
        readers = [
            threading.Thread(target=_read, args=(server.url, {"message": f"m{i}"}, outs[i])) for i in range(3)
        ]
        for reader in readers:
            reader.start()
        assert all(out["open"].wait(10) for out in outs)  # every stream has begun
        sent = time.monotonic()
        server.stop(signal.SIGTERM, timeout=20)
        took = time.monotonic() - sent
        for reader in readers:
            reader.join(10)
    finally:
        server.close()
    for out in outs:
        events = parse_events(out["raw"])
        assert events[0][0] == "connected"
        assert events[-1] == ("error", {**events[-1][1], "type": "shutdown"})
    assert 0.5 <= took < 10


@pytest.mark.parametrize("limit", [1, 3])
def test_admission_holds_at_most_the_per_worker_limit(serve: Serve, limit: int) -> None:
    server = serve(max_streams_per_worker=limit, **SLOW)
    outs: list[dict[str, Any]] = [{} for _ in range(limit)]
    readers = [threading.Thread(target=_read, args=(server.url, {"message": "hold"}, out)) for out in outs]
    for reader in readers:
        reader.start()
    with httpx.Client(base_url=server.url) as client:
        deadline = time.monotonic() + 5
        while (
            client.get("/health").json()["this_worker"]["open_streams"] < limit
            and time.monotonic() < deadline
        ):
            time.sleep(0.01)
        refused = client.post("/chat", json={"message": "one more"})
        assert refused.status_code == 503
        assert refused.json()["error"]["type"] == "server_busy"
        assert "CHATSSE_MAX_STREAMS_PER_WORKER" in refused.json()["error"]["message"]
    server.stop()
    for reader in readers:
        reader.join(10)


class _Gauge:
    def __init__(self) -> None:
        self.value = 0

    def inc(self) -> None:
        self.value += 1

    def dec(self) -> None:
        self.value -= 1


@pytest.mark.anyio
async def test_a_keepalive_that_fails_on_an_open_stream_is_logged_not_swallowed() -> None:
    from structlog.testing import capture_logs

    from chatsse.deadlines import derive
    from chatsse.lifecycle import Lifecycle
    from chatsse.settings import Settings

    gauge = _Gauge()
    lifecycle = Lifecycle(
        derive(Settings(_env_file=None)),  # type: ignore[call-arg]
        max_streams=1,
        gauge=gauge,
    )
    slot = lifecycle.admit()

    async def send(message: Any) -> None:
        raise RuntimeError("the transport broke")

    async def receive() -> Any:
        await asyncio.Event().wait()

    slot.attach(send, receive)
    with capture_logs() as logs:
        await slot._ping()
    assert logs == [
        {"event": "keepalive_failed", "error": "RuntimeError: the transport broke", "log_level": "warning"}
    ]
    slot.detach()
    lifecycle.release(slot)
    assert gauge.value == 0
    await lifecycle.aclose()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
