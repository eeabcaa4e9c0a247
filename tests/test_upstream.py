"""The upstream engine (CHATSSE_ENGINE=openai) against real servers on real sockets: a
fault-injecting fake upstream, and chatsse itself as the upstream (chatsse -> chatsse)."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from conftest import Serve
from fake_upstream import MODEL, RETRY_AFTER, FakeUpstream
from support import chat, wait_for

from chatsse import Settings
from chatsse.engine import SimulatedEngine, TimingModel
from chatsse.inprocess import InProcessServer
from chatsse.models import Message
from chatsse.settings import SettingsError, load_settings


@pytest.fixture
def upstream() -> Iterator[tuple[FakeUpstream, InProcessServer]]:
    fake = FakeUpstream()
    with InProcessServer(fake) as server:
        yield fake, server


@pytest.fixture
def front(serve: Serve, upstream: tuple[FakeUpstream, InProcessServer]) -> Any:
    """A chatsse server in front of the fake upstream (more settings as keywords)."""
    _, server = upstream

    def start(**settings: Any) -> InProcessServer:
        return serve(engine="openai", upstream_url=f"{server.url}/v1", upstream_model=MODEL, **settings)

    return start


def test_a_turn_streams_through_and_the_request_carries_the_options(
    front: Any, upstream: tuple[FakeUpstream, InProcessServer]
) -> None:
    fake, _ = upstream
    server = front()
    with httpx.Client(base_url=server.url, timeout=10) as client:
        result = chat(client, "hello upstream")
    assert result.deltas == fake.reply_tokens()
    completed = result.data("completed")
    assert completed["content"] == "".join(fake.reply_tokens())
    assert completed["usage"]["prompt_tokens"] == 11  # the upstream's own count
    body = fake.bodies[-1]
    assert body["model"] == MODEL
    assert body["messages"] == [{"role": "user", "content": "hello upstream"}]
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="k", max_retries=0) as sdk:
        reply = sdk.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "options"}],
            temperature=0.3,
            top_p=0.8,
            seed=5,
            stop=["never"],
            user="u1",
            max_tokens=3,
        )
    assert reply.choices[0].message.content == "".join(fake.reply_tokens()[:3])
    assert reply.choices[0].finish_reason == "length"
    body = fake.bodies[-1]
    assert {k: body[k] for k in ("temperature", "top_p", "seed", "stop", "user", "max_tokens")} == {
        "temperature": 0.3, "top_p": 0.8, "seed": 5, "stop": ["never"], "user": "u1", "max_tokens": 3,
    }  # fmt: skip


def test_the_api_key_is_sent_as_a_bearer_token(serve: Serve) -> None:
    seen: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            seen.append(dict(scope["headers"]).get(b"authorization", b"").decode())
        await FakeUpstream()(scope, receive, send)

    with InProcessServer(app) as upstream_server:
        server = serve(engine="openai", upstream_url=f"{upstream_server.url}/v1", upstream_model=MODEL,
                       upstream_api_key="sk-secret")  # fmt: skip
        with httpx.Client(base_url=server.url, timeout=10) as client:
            assert chat(client, "hi").events[-1].event == "completed"
    assert seen == ["Bearer sk-secret"]


@pytest.mark.parametrize(
    ("mode", "status", "error_type"),
    [
        ("status:429", 429, "upstream_rate_limited"),
        ("status:400", 400, "upstream_rejected"),
        ("status:401", 502, "upstream_error"),
        ("status:500", 502, "upstream_error"),
        ("status:503", 503, "upstream_unavailable"),
        ("not_a_stream", 502, "upstream_error"),
    ],
)
def test_refusals_before_the_stream_are_http_errors_and_the_turn_is_undone(
    front: Any, upstream: tuple[FakeUpstream, InProcessServer], mode: str, status: int, error_type: str
) -> None:
    fake, _ = upstream
    fake.mode = mode
    server = front(upstream_retries=0)
    with httpx.Client(base_url=server.url, timeout=10) as client:
        response = client.post("/chat", json={"message": "hi"})
        assert response.status_code == status
        assert response.json()["error"]["type"] == error_type
        if status == 429:
            assert response.headers["retry-after"] == RETRY_AFTER
        assert client.get("/conversations").json()["total"] == 0  # nothing kept of the refused turn
        v1 = client.post(
            "/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "x"}]}
        )
        assert v1.status_code == status
        assert v1.json()["error"]["code"] == error_type
        fake.mode = "ok"
        assert chat(client, "again").events[-1].event == "completed"  # healthy after


def test_a_continued_conversation_refused_by_the_upstream_keeps_its_history(
    front: Any, upstream: tuple[FakeUpstream, InProcessServer]
) -> None:
    fake, _ = upstream
    server = front(upstream_retries=0)
    with httpx.Client(base_url=server.url, timeout=10) as client:
        first = chat(client, "first")
        fake.mode = "status:429"
        refused = client.post("/chat", json={"message": "second", "conversation_id": first.conversation_id})
        assert refused.status_code == 429
        messages = client.get(f"/conversations/{first.conversation_id}").json()["messages"]
    assert [m["content"] for m in messages] == ["first", "".join(fake.reply_tokens())]


def test_unreachable_and_5xx_are_retried_before_the_first_token(
    front: Any, upstream: tuple[FakeUpstream, InProcessServer]
) -> None:
    fake, _ = upstream
    fake.script = ["status:503", "status:502"]
    server = front(upstream_retries=2)
    with httpx.Client(base_url=server.url, timeout=10) as client:
        assert chat(client, "retry me").events[-1].event == "completed"
    assert len(fake.bodies) == 3
    fake.script = ["status:500"]  # a 500 is an answer, not a failure to reach: not retried
    with httpx.Client(base_url=server.url, timeout=10) as client:
        assert client.post("/chat", json={"message": "x"}).status_code == 502
    assert len(fake.bodies) == 4


def test_an_upstream_nobody_listens_on_is_503_with_retry_after(serve: Serve) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed when the block ends: nothing listens there
    server = serve(engine="openai", upstream_url=f"http://127.0.0.1:{port}/v1", upstream_model=MODEL)
    response = httpx.post(f"{server.url}/chat", json={"message": "hi"})
    assert response.status_code == 503
    assert response.json()["error"]["type"] == "upstream_unavailable"
    assert response.headers["retry-after"] == "1"


def test_an_upstream_that_never_answers_is_a_504(
    front: Any, upstream: tuple[FakeUpstream, InProcessServer]
) -> None:
    fake, _ = upstream
    fake.mode = "stall_headers"
    server = front(engine_first_token_timeout=0.5)
    response = httpx.post(f"{server.url}/chat", json={"message": "hi"}, timeout=10)
    assert response.status_code == 504
    assert response.json()["error"]["type"] == "upstream_timeout"
    assert wait_for(lambda: fake.open_requests == 0, 5)  # and chatsse hung up on it


@pytest.mark.parametrize(
    ("mode", "error_type", "says"),
    [
        ("reset_mid", "engine_error", "broke"),
        ("malformed", "engine_error", "malformed"),
        ("inband_error", "engine_error", "the model crashed"),
        ("truncated", "engine_error", "before the reply ended"),
        ("stall_mid", "engine_timeout", "no token"),
        ("stall_first", "engine_timeout", "no first token"),
    ],
)
def test_failures_mid_stream_are_error_events_and_the_partial_reply_is_stored(
    front: Any, upstream: tuple[FakeUpstream, InProcessServer], mode: str, error_type: str, says: str
) -> None:
    fake, _ = upstream
    fake.mode = mode
    server = front(engine_first_token_timeout=0.5, engine_idle_timeout=0.5)
    with httpx.Client(base_url=server.url, timeout=10) as client:
        result = chat(client, "go")
        assert result.events[-1].event == "error"
        error = result.data("error")
        assert error["type"] == error_type
        assert says in error["message"]
        sent = [] if mode == "stall_first" else fake.reply_tokens()[:2]
        assert result.deltas == sent
        (reply,) = [m for m in client.get(f"/conversations/{result.conversation_id}").json()["messages"]
                    if m["role"] == "assistant"]  # fmt: skip
        assert reply["content"] == "".join(sent)
        assert reply["finish_reason"] == ("timeout" if error_type == "engine_timeout" else "error")
    assert wait_for(lambda: fake.open_requests == 0, 5)


def test_an_inband_upstream_error_raises_in_the_sdk(
    front: Any, upstream: tuple[FakeUpstream, InProcessServer]
) -> None:
    fake, _ = upstream
    fake.mode = "inband_error"
    server = front()
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="k", max_retries=0) as sdk:
        stream = sdk.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}], stream=True
        )
        with pytest.raises(openai.APIError, match="the model crashed"):
            list(stream)


def test_a_client_that_disconnects_aborts_the_upstream_request_at_once(
    front: Any, upstream: tuple[FakeUpstream, InProcessServer]
) -> None:
    fake, _ = upstream
    fake.tokens, fake.token_delay = 400, 0.02  # 8 s of reply
    server = front(resume_window=0)  # a client that leaves stops its reply at once

    def read_a_little(path: str, body: dict[str, Any]) -> None:
        with (
            httpx.Client(base_url=server.url, timeout=10) as client,
            client.stream("POST", path, json=body) as r,
        ):
            for _ in r.iter_bytes():
                if fake.open_requests and len(fake.bodies):
                    break

    readers = [
        threading.Thread(target=read_a_little, args=("/chat", {"message": f"m{i}"})) for i in range(4)
    ] + [
        threading.Thread(target=read_a_little, args=("/v1/chat/completions",
                         {"model": MODEL, "stream": True, "messages": [{"role": "user", "content": "x"}]}))
    ]  # fmt: skip
    for reader in readers:
        reader.start()
    for reader in readers:
        reader.join(10)
    assert fake.peak >= 1
    assert wait_for(lambda: fake.open_requests == 0, 2)  # well before the 8 s replies would end
    assert fake.disconnects == 5
    stats = httpx.get(f"{server.url}/stats").json()["all_workers"]
    assert stats["streams_by_outcome"] == {"client_disconnected": 5}


def test_upstream_connections_are_pooled_and_bounded(
    front: Any, upstream: tuple[FakeUpstream, InProcessServer]
) -> None:
    fake, _ = upstream
    fake.tokens, fake.token_delay = 10, 0.02
    server = front(upstream_max_connections=2)

    async def turns() -> list[str]:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:

            async def one(i: int) -> str:
                body = {"model": MODEL, "messages": [{"role": "user", "content": f"{i}"}]}
                response = await client.post("/v1/chat/completions", json=body)
                return str(response.json()["choices"][0]["message"]["content"])

            return await asyncio.gather(*(one(i) for i in range(6)))

    replies = asyncio.run(turns())
    assert replies == ["".join(fake.reply_tokens())] * 6
    assert fake.peak == 2  # six turns, never more than two upstream requests at once


def test_chatsse_in_front_of_chatsse(serve: Serve) -> None:
    """The simulated engine as the upstream: the proxy keeps the conversation, the upstream
    sees the whole history each turn and keeps nothing."""
    upstream = serve()
    front = serve(engine="openai", upstream_url=f"{upstream.url}/v1", upstream_model="simulated")
    history: list[Message] = []
    with httpx.Client(base_url=front.url, timeout=10) as client:
        conversation_id = None
        for turn in range(3):
            text = f"turn {turn} about proxies{turn}"
            history.append(Message("", "user", text, 0.0))
            result = chat(client, text, conversation_id)
            conversation_id = result.conversation_id
            reply = result.data("completed")["content"]
            assert reply == SimulatedEngine(TimingModel(0, 0, 0, 0)).compose(history)
            history.append(Message("", "assistant", reply, 0.0))
    assert httpx.get(f"{upstream.url}/conversations").json()["total"] == 0
    stored = httpx.get(f"{front.url}/conversations/{conversation_id}").json()["messages"]
    assert [m["content"] for m in stored] == [m.content for m in history]
    with openai.OpenAI(base_url=f"{front.url}/v1", api_key="k", max_retries=0) as sdk:
        first = sdk.responses.create(model="simulated", input="via the proxy")
        second = sdk.responses.create(model="simulated", input="and again", previous_response_id=first.id)
    assert second.previous_response_id == first.id
    assert second.output_text


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"CHATSSE_ENGINE": "openai", "CHATSSE_UPSTREAM_MODEL": "m"}, "CHATSSE_UPSTREAM_URL must be set"),
        (
            {"CHATSSE_ENGINE": "openai", "CHATSSE_UPSTREAM_URL": "ftp://x/v1", "CHATSSE_UPSTREAM_MODEL": "m"},
            "CHATSSE_UPSTREAM_URL must be an http(s) URL",
        ),
        (
            {"CHATSSE_ENGINE": "openai", "CHATSSE_UPSTREAM_URL": "http://h/v1"},
            "CHATSSE_UPSTREAM_MODEL must be set",
        ),
        ({"CHATSSE_ENGINE": "llama"}, "CHATSSE_ENGINE"),
    ],
)
def test_bad_upstream_settings_stop_start_up_naming_the_setting(
    monkeypatch: pytest.MonkeyPatch, settings: dict[str, str], named: str
) -> None:
    for name, value in settings.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError, match=re.escape(named)):
        load_settings(_env_file=None)


def test_the_api_key_never_shows_in_the_settings_repr() -> None:
    settings = Settings(_env_file=None, upstream_api_key="sk-hidden")  # type: ignore[call-arg]
    assert "sk-hidden" not in repr(settings)
    assert json.dumps(settings.model_dump(mode="json")).count("sk-hidden") == 0
