"""chatsse.turns through a real server: each stream ends with the outcome of where it ended,
and a turn that lost its conversation never interleaves a history."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

import httpx
from conftest import Serve
from support import chat, metric_value

from chatsse.engine import CompletionReason
from chatsse.errors import StorageUnavailable
from chatsse.models import Message
from chatsse.stores import StoreLimits
from chatsse.stores.memory import MemoryStore

SLOW = {
    "sim_ttft_ms": 0,
    "sim_token_interval_ms": 50,
    "sim_reply_tokens_min": 100,
    "sim_reply_tokens_max": 100,
}


def outcomes(url: str) -> dict[str, int]:
    summary: dict[str, int] = httpx.get(f"{url}/stats").json()["all_workers"]["streams_by_outcome"]
    return summary


def test_a_turn_whose_lock_was_taken_over_gets_turn_lost_and_the_history_stays_whole(serve: Serve) -> None:
    store = MemoryStore(StoreLimits(3600, 100, 100, lock_ttl=0.3))  # locks that expire mid-reply
    server = serve(store_object=store, **SLOW)
    first: dict[str, Any] = {}

    def slow_turn() -> None:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            first["result"] = chat(client, "a slow turn", max_tokens=20)  # 1 s of reply

    reader = threading.Thread(target=slow_turn)
    reader.start()
    time.sleep(0.5)  # the slow turn's lock has expired; its stream goes on
    with httpx.Client(base_url=server.url, timeout=30) as client:
        conversation_id = client.get("/conversations").json()["conversations"][0]["id"]
        second = chat(client, "taking over", conversation_id, max_tokens=3)
        assert second.events[-1].event == "completed"
        reader.join(10)
        slow = first["result"]
        assert slow.events[-1].event == "error"
        assert slow.data("error")["type"] == "turn_lost"
        assert len(slow.deltas) == 20  # it streamed its reply, which the store refused
        stored = client.get(f"/conversations/{conversation_id}").json()["messages"]
    assert [(m["role"], m["content"], m["finish_reason"]) for m in stored] == [
        ("user", "a slow turn", None),
        ("assistant", "", "lost"),
        ("user", "taking over", None),
        ("assistant", "".join(second.deltas), "length"),
    ]
    assert outcomes(server.url) == {"length": 1, "turn_lost": 1}


class FailingFinishStore(MemoryStore):
    """A store that takes turns but cannot store a reply."""

    async def finish_turn(self, conversation_id: str, reply: Message, *, token: str) -> None:
        raise StorageUnavailable("the disk is full")


def test_a_reply_the_store_refuses_is_a_storage_error_not_a_stop(serve: Serve) -> None:
    server = serve(store_object=FailingFinishStore(StoreLimits(3600, 100, 100)))
    with httpx.Client(base_url=server.url) as client:
        result = chat(client, "store this", max_tokens=5)
    assert [e.event for e in result.events][-1] == "error"
    error = result.data("error")
    assert error["type"] == "storage_error"
    assert "the disk is full" in error["message"]
    assert not result.named("completed")
    assert outcomes(server.url) == {"storage_error": 1}


class _NotText:
    """A generation whose second 'token' is not text: encoding it fails, not the engine."""

    def __init__(self) -> None:
        self.prompt_tokens, self.completion_tokens = 1, 0
        self.finish_reason: CompletionReason | None = None

    def __aiter__(self) -> _NotText:
        return self

    async def start(self) -> None:
        return None

    async def __anext__(self) -> list[Any]:
        self.completion_tokens += 1
        return [" fine"] if self.completion_tokens == 1 else [12345]

    async def aclose(self) -> None:
        return None


class NotTextEngine:
    name = "not-text"

    def generate(self, messages: Sequence[Message], *, max_tokens: int, options: Any = None) -> _NotText:
        return _NotText()

    async def aclose(self) -> None:
        return None


def test_an_event_that_cannot_be_encoded_is_an_internal_error_not_an_engine_error(serve: Serve) -> None:
    server = serve(engine=NotTextEngine())
    with httpx.Client(base_url=server.url) as client:
        result = chat(client, "encode this")
        assert result.deltas == [" fine"]
        assert result.data("error")["type"] == "internal_error"
        stored = client.get(f"/conversations/{result.conversation_id}").json()["messages"]
    assert (stored[-1]["content"], stored[-1]["finish_reason"]) == (" fine", "error")
    assert outcomes(server.url) == {"internal_error": 1}
    assert (
        metric_value(httpx.get(f"{server.url}/metrics").text, "chatsse_streams_total", outcome="engine_error")
        == 0
    )
