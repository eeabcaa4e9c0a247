"""The three fronts' bodies, read back by chatsse.wireformats: one real server, one turn each."""

from __future__ import annotations

import httpx
import pytest
from conftest import Serve
from sse_starlette import ServerSentEvent

from chatsse.inprocess import InProcessServer
from chatsse.wireformats import FRONTS, ROLES, blocks, framing, reply_text, roles, wire_table

TOKENS = 5
REQUESTS = {
    "/chat": {"message": "How do SSE streams work?", "max_tokens": TOKENS},
    "/v1/chat/completions": {
        "model": "simulated",
        "messages": [{"role": "user", "content": "How do SSE streams work?"}],
        "max_tokens": TOKENS,
        "stream": True,
        "stream_options": {"include_usage": True},
    },
    "/v1/responses": {
        "model": "simulated",
        "input": "How do SSE streams work?",
        "max_output_tokens": TOKENS,
        "stream": True,
    },
}


@pytest.fixture
def bodies(serve: Serve) -> dict[str, bytes]:
    server: InProcessServer = serve()
    return {path: httpx.post(server.url + path, json=body).content for path, body in REQUESTS.items()}


def _roles(front: str, body: bytes) -> list[tuple[str, ...]]:
    return [roles(front, block.event) for block in blocks(body) if block.event is not None]


def test_every_front_carries_the_same_reply_in_its_token_events(bodies: dict[str, bytes]) -> None:
    texts = {front: reply_text(front, body) for front, body in bodies.items()}
    assert len(set(texts.values())) == 1
    assert texts["/chat"]  # the same turn, not three empty ones
    for front, body in bodies.items():
        assert sum(1 for parts in _roles(front, body) if "carries a token" in parts) == TOKENS, front


def test_each_event_plays_its_protocols_part(bodies: dict[str, bytes]) -> None:
    chat = _roles("/chat", bodies["/chat"])
    assert chat[0] == ("opens the stream",)
    assert chat[-1] == ("finishes the reply", "carries the usage", "ends the stream")
    completions = _roles("/v1/chat/completions", bodies["/v1/chat/completions"])
    assert completions[0] == ("opens the stream",)  # the role chunk, no content
    assert completions[-3:] == [("finishes the reply",), ("carries the usage",), ("ends the stream",)]
    responses = _roles("/v1/responses", bodies["/v1/responses"])
    assert responses[:4] == [("opens the stream",)] * 4
    assert responses[-1] == ("finishes the reply", "carries the usage", "ends the stream")


def test_the_table_has_a_row_per_role_and_a_column_per_front(bodies: dict[str, bytes]) -> None:
    table = wire_table(bodies)
    assert list(table.columns) == list(FRONTS)
    assert list(table.index) == [*ROLES, "events", "size"]
    assert table.loc["carries a token", "/chat"].startswith(f"{TOKENS} events\nid: ")
    assert table.loc["ends the stream", "/v1/chat/completions"] == "1 event\ndata: [DONE]"
    assert table.loc["carries the usage", "/chat"] == "1 event\n↑ the same event"
    assert table.loc["events", "/chat"] == f"{TOKENS + 2} events, {TOKENS + 2} with an id: line"
    assert table.loc["events", "/v1/responses"].endswith(", 0 with an id: line")


def test_framing_tells_crlf_and_field_order_and_keeps_comments_apart() -> None:
    crlf = ServerSentEvent('{"delta":"hi"}', event="message", id="m:1", retry=3000).encode()
    body = b": ping\r\n\r\n" + crlf
    assert [block.event is None for block in blocks(body)] == [True, False]
    assert framing(body) == {
        "events": 1,
        "comments": 1,
        "line end": "CRLF",
        "first event's fields": "id event data retry",
        "bytes": len(body),
    }
    assert framing(b"event: a\ndata: 1\n\nevent: b\ndata: 2\n\n")["line end"] == "LF"


def test_an_unknown_front_is_refused() -> None:
    (block,) = blocks(b"data: {}\n\n")
    assert block.event is not None
    with pytest.raises(ValueError, match="unknown front"):
        roles("/v2/chat", block.event)
