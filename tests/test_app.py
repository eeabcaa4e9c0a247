"""The non-streaming endpoints, error bodies, CORS and the chat page, through a real server."""

from __future__ import annotations

import gc
import json
import os
import re

import httpx
from conftest import Serve
from support import chat

from chatsse import __version__, protocol
from chatsse.serving import GC_THRESHOLDS


def test_health_reports_status_version_uptime_pid(client: httpx.Client) -> None:
    body = client.get("/health").json()
    assert body["status"] == "ok"
    assert body["version"] == __version__
    assert body["this_worker"] == {"pid": os.getpid(), "open_streams": 0}
    assert body["uptime_seconds"] >= 0
    assert body["engine"] == "simulated"
    assert body["store"] == "memory"


def test_get_conversation_with_limit_returns_latest_messages(client: httpx.Client) -> None:
    first = chat(client, "one")
    chat(client, "two", first.conversation_id)
    full = client.get(f"/conversations/{first.conversation_id}").json()
    assert full["message_count"] == 4
    assert [m["role"] for m in full["messages"]] == ["user", "assistant", "user", "assistant"]
    latest = client.get(f"/conversations/{first.conversation_id}", params={"limit": 2}).json()
    assert latest["messages"] == full["messages"][2:]
    assert client.get(f"/conversations/{first.conversation_id}", params={"limit": 0}).status_code == 422


def test_create_list_and_delete_conversations(client: httpx.Client) -> None:
    created = client.post("/conversations")
    assert created.status_code == 201
    conversation_id = created.json()["id"]
    assert created.json()["messages"] == []
    reply = chat(client, "hello", conversation_id)
    assert reply.conversation_id == conversation_id
    other = chat(client, "another").conversation_id
    listing = client.get("/conversations").json()
    assert listing["total"] == 2
    assert [c["id"] for c in listing["conversations"]] == [other, conversation_id]
    assert client.delete(f"/conversations/{conversation_id}").status_code == 204
    assert client.get(f"/conversations/{conversation_id}").status_code == 404
    missing = client.delete(f"/conversations/{conversation_id}")
    assert missing.status_code == 404
    assert missing.json()["error"]["type"] == "conversation_not_found"


def test_unknown_route_and_method_have_json_errors(client: httpx.Client) -> None:
    response = client.get("/nope")
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "not_found"
    response = client.get("/chat")
    assert response.status_code == 405
    assert response.json()["error"]["type"] == "method_not_allowed"


def test_chat_page_is_served(client: httpx.Client) -> None:
    response = client.get("/")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    page = response.text
    for element_id in ("messages", "input", "send", "status", "conversation-id"):
        assert f'id="{element_id}"' in page
    assert "getReader" in page  # streams with fetch + ReadableStream
    assert "innerHTML" not in page  # all text goes in as text


def test_chat_page_speaks_the_protocol_module(client: httpx.Client) -> None:
    """The page's event names and data keys come from chatsse.protocol: its constants are
    written into the page, and every key the script reads from event data is one the
    protocol declares."""
    page = client.get("/").text
    assert "/*CHATSSE_PROTOCOL*/" not in page
    assert json.dumps(protocol.page_constants(), separators=(",", ":")) in page
    script = page.split("<script>", 1)[1]
    assert not re.search(r"ev\.type\s*===\s*[\"']", script)  # no event name spelled out
    # The chatsse wire's reader (the page speaks the OpenAI wires too, tests/test_page.py).
    script = script.split("// ---- chatsse protocol ----", 1)[1].split("// ---- end chatsse protocol ----")[0]
    assert set(re.findall(r"\bEV\.(\w+)", script)) == set(protocol.EVENTS)
    fields = protocol.page_constants()["fields"]
    event_keys = set().union(*(fields[name] for name in protocol.EVENTS))
    read = set(re.findall(r"(?<![\w.])data\.(\w+)", script))  # not this.data
    assert read
    assert read <= event_keys, read - event_keys
    for group in ("usage", "timings"):
        keys = set(re.findall(rf"\b{group}\.(\w+)", script))
        assert keys
        assert keys <= set(fields[group]), keys - set(fields[group])


def test_request_id_is_returned_and_echoed(client: httpx.Client) -> None:
    generated = client.get("/health").headers["x-request-id"]
    assert generated.startswith("req_")
    assert client.get("/health").headers["x-request-id"] != generated
    echoed = client.get("/health", headers={"X-Request-ID": "trace-123"})
    assert echoed.headers["x-request-id"] == "trace-123"
    unsafe = client.get("/health", headers={"X-Request-ID": "bad id\twith tab"})
    assert unsafe.headers["x-request-id"].startswith("req_")


def test_no_cors_headers_by_default(client: httpx.Client) -> None:
    response = client.get("/health", headers={"Origin": "https://example.test"})
    assert "access-control-allow-origin" not in response.headers


def test_cors_allows_only_configured_origins(serve: Serve) -> None:
    server = serve(cors_origins=["https://app.example"])
    with httpx.Client(base_url=server.url) as client:
        allowed = client.options(
            "/chat",
            headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                     "Access-Control-Request-Headers": "content-type"},
        )  # fmt: skip
        assert allowed.headers["access-control-allow-origin"] == "https://app.example"
        other = client.get("/health", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers
        streamed = chat(client, "cors stream", max_tokens=2)
        assert streamed.status == 200
        for _ in range(3):  # each stream's headers are its own: nothing piles up between responses
            with client.stream(
                "POST", "/chat", json={"message": "again", "max_tokens": 2},
                headers={"Origin": "https://app.example"},
            ) as response:  # fmt: skip
                assert response.headers.get_list("access-control-allow-origin") == ["https://app.example"]
                assert response.headers.get_list("content-type") == ["text/event-stream; charset=utf-8"]


def test_unreachable_store_answers_503_storage_unavailable(serve: Serve) -> None:
    from chatsse.processes import free_port

    server = serve(store=f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
    with httpx.Client(base_url=server.url) as client:
        response = client.post("/chat", json={"message": "is anyone there?"})
        assert response.status_code == 503
        assert response.json()["error"]["type"] == "storage_unavailable"
        assert response.headers["retry-after"] == "1"
        assert client.get("/conversations").status_code == 503
        assert client.get("/health").json()["this_worker"]["open_streams"] == 0


def test_openapi_documents_chat_with_its_body_and_errors(client: httpx.Client) -> None:
    schema = client.get("/openapi.json").json()
    chat = schema["paths"]["/chat"]["post"]
    body = chat["requestBody"]["content"]["application/json"]["schema"]
    assert body["$ref"].endswith("/ChatRequest")
    assert set(schema["components"]["schemas"]["ChatRequest"]["properties"]) == {
        "message", "conversation_id", "max_tokens",
    }  # fmt: skip
    assert "text/event-stream" in chat["responses"]["200"]["content"]
    assert {"404", "409", "413", "422", "503"} <= set(chat["responses"])


def test_create_app_leaves_the_processs_garbage_collector_alone(client: httpx.Client) -> None:
    """Only the server commands tune the collector; an app in a notebook's kernel does not."""
    assert client.get("/stats").json()["this_worker"]["gc"]["thresholds"] == list(gc.get_threshold())
    assert tuple(gc.get_threshold()) != GC_THRESHOLDS
