"""Isolation between API keys on a real server: each key's conversations, replies and replay
logs are its own on every front; another key finds nothing there (404, never 403), and
nothing it tries changes them. The stores' part is tested on each store in test_stores.py."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
from conftest import Serve
from httpx_sse import connect_sse
from support import chat

from chatsse.keys import create_key

SLOW = {"sim_ttft_ms": 0, "sim_token_interval_ms": 20, "sim_reply_tokens_min": 60, "sim_reply_tokens_max": 60}
MODEL = "simulated"


@dataclass
class Tenants:
    url: str
    alice: httpx.Client
    bob: httpx.Client
    alice_sdk: openai.OpenAI
    bob_sdk: openai.OpenAI


@pytest.fixture(params=["memory", "sqlite"])
def tenants(request: pytest.FixtureRequest, serve: Serve, tmp_path: Path) -> Iterator[Tenants]:
    keys_file = tmp_path / "keys.json"
    _, alice_key = create_key(keys_file, "alice")
    _, bob_key = create_key(keys_file, "bob")
    store = "memory" if request.param == "memory" else f"sqlite:///{tmp_path / 'chat.db'}"
    server = serve(keys_file=str(keys_file), store=store, **SLOW)
    clients = [
        httpx.Client(base_url=server.url, timeout=30, headers={"Authorization": f"Bearer {key}"})
        for key in (alice_key, bob_key)
    ]
    sdks = [
        openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=30)
        for key in (alice_key, bob_key)
    ]
    yield Tenants(server.url, *clients, *sdks)
    for client in (*clients, *sdks):
        client.close()


def test_conversation_routes_show_each_key_its_own(tenants: Tenants) -> None:
    alice, bob = tenants.alice, tenants.bob
    first = chat(alice, "alice's secret")
    conversation = first.conversation_id
    created = alice.post("/conversations").json()["id"]
    mine = chat(bob, "bob's")
    listed = alice.get("/conversations").json()
    assert {c["id"] for c in listed["conversations"]} == {conversation, created}
    assert listed["total"] == 2
    assert [c["id"] for c in bob.get("/conversations").json()["conversations"]] == [mine.conversation_id]
    for cid in (conversation, created):
        for answer in (bob.get(f"/conversations/{cid}"), bob.delete(f"/conversations/{cid}")):
            assert answer.status_code == 404
            assert answer.json()["error"]["type"] == "conversation_not_found"
        continued = chat(bob, "let me in", conversation_id=cid)
        assert continued.status == 404
    stored = alice.get(f"/conversations/{conversation}").json()
    assert next(m["content"] for m in stored["messages"]) == "alice's secret"
    assert stored["message_count"] == 2
    assert chat(alice, "still mine", conversation_id=conversation).status == 200
    assert alice.delete(f"/conversations/{created}").status_code == 204


def test_another_key_can_neither_resume_nor_stop_a_reply(tenants: Tenants) -> None:
    alice, bob = tenants.alice, tenants.bob
    stop_answers: list[httpx.Response] = []
    with connect_sse(alice, "POST", "/chat", json={"message": "long one"}) as source:
        events = source.iter_sse()
        connected = next(events).json()
        conversation, reply = connected["conversation_id"], connected["message_id"]
        next(events)  # a token: it is streaming
        resume = bob.get(connected["resume_url"])
        with_id = bob.get(connected["resume_url"], headers={"Last-Event-ID": f"{reply}:1"})
        stopper = threading.Thread(
            target=lambda: stop_answers.append(
                bob.post(f"/conversations/{conversation}/messages/{reply}/stop")
            )
        )
        stopper.start()
        rest = list(events)
        stopper.join()
    for answer in (resume, with_id, *stop_answers):
        assert answer.status_code == 404
        assert answer.json()["error"]["type"] == "replay_not_found"
    assert rest[-1].event == "completed"
    assert rest[-1].json()["finish_reason"] == "stop"  # bob's stop did nothing
    replayed = alice.get(connected["resume_url"])  # alice herself can read it back
    assert replayed.status_code == 200
    assert "event: completed" in replayed.text


def test_responses_of_another_key_are_not_found(tenants: Tenants) -> None:
    alice, bob = tenants.alice_sdk, tenants.bob_sdk
    first = alice.responses.create(model=MODEL, input="alice asks")
    streamed = list(
        alice.responses.create(model=MODEL, input="and streams", previous_response_id=first.id, stream=True)
    )
    latest = streamed[-1].response
    for response_id in (first.id, latest.id):
        with pytest.raises(openai.NotFoundError):
            bob.responses.retrieve(response_id)
        with pytest.raises(openai.NotFoundError):
            bob.responses.retrieve(response_id, stream=True).close()
        with pytest.raises(openai.NotFoundError):
            bob.responses.cancel(response_id)
        with pytest.raises(openai.NotFoundError):
            bob.responses.delete(response_id)
    with pytest.raises(openai.NotFoundError):
        bob.responses.create(model=MODEL, input="continue hers", previous_response_id=latest.id)
    with pytest.raises(openai.NotFoundError):  # nor read her history into a turn that stores nothing
        bob.responses.create(model=MODEL, input="peek", previous_response_id=latest.id, store=False)
    assert alice.responses.retrieve(latest.id).output_text == latest.output_text
    again = alice.responses.create(model=MODEL, input="go on", previous_response_id=latest.id)
    assert again.previous_response_id == latest.id
    assert tenants.bob.get("/conversations").json()["total"] == 0


def test_a_streaming_response_of_another_key_is_not_found_while_it_streams(tenants: Tenants) -> None:
    alice, bob = tenants.alice_sdk, tenants.bob_sdk
    stream = alice.responses.create(model=MODEL, input="streaming", stream=True)
    events = iter(stream)
    created = next(events)
    with pytest.raises(openai.NotFoundError):
        bob.responses.retrieve(created.response.id)  # in_progress, but not bob's
    with pytest.raises(openai.NotFoundError):
        bob.responses.cancel(created.response.id)
    assert alice.responses.retrieve(created.response.id).status == "in_progress"
    assert [e.type for e in events][-1] == "response.completed"
