"""POST /v1/chat/completions and GET /v1/models through a real server, read by the official
``openai`` SDK (sync and async) and, raw, by httpx-sse."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import openai
import pytest
from conftest import SDK, Serve
from httpx_sse import connect_sse
from support import FailingEngine, RecordingEngine

from chatsse.engine import SimulatedEngine, TimingModel

MODEL = "simulated"
ASK = [{"role": "user", "content": "How do SSE streams behave under load?"}]


def test_models_lists_the_engine(serve: Serve, sdk: SDK) -> None:
    models = sdk(serve().url).models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].owned_by == "chatsse"


def test_a_streamed_completion_as_the_sdk_reads_it(serve: Serve, sdk: SDK) -> None:
    client = sdk(serve().url)
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=ASK, stream=True, stream_options={"include_usage": True}
        )
    )
    first, *content, finish, usage = chunks
    assert first.choices[0].delta.role == "assistant"
    assert first.choices[0].delta.content == ""
    assert content
    assert all(c.choices[0].delta.content for c in content)
    assert all(c.choices[0].finish_reason is None for c in [first, *content])
    assert finish.choices[0].finish_reason == "stop"
    assert usage.choices == []
    assert usage.usage is not None
    assert usage.usage.completion_tokens == len(content)
    assert usage.usage.total_tokens == usage.usage.prompt_tokens + len(content)
    assert {c.id for c in chunks} == {first.id}  # one id and one created per stream
    assert {c.created for c in chunks} == {first.created}
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    # The same turn without streaming: the same reply, in one object.
    whole = client.chat.completions.create(model=MODEL, messages=ASK)
    assert whole.object == "chat.completion"
    assert whole.choices[0].message.content == "".join(c.choices[0].delta.content or "" for c in content)
    assert whole.choices[0].finish_reason == "stop"
    assert whole.usage is not None
    assert whole.usage.completion_tokens == len(content)


def test_without_include_usage_there_is_no_usage_chunk(serve: Serve, sdk: SDK) -> None:
    chunks = list(sdk(serve().url).chat.completions.create(model=MODEL, messages=ASK, stream=True))
    assert all(c.choices for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_the_raw_stream_is_data_lines_ending_with_done(serve: Serve) -> None:
    server = serve()
    body = {"model": MODEL, "messages": ASK, "stream": True, "stream_options": {"include_usage": True}}
    with (
        httpx.Client(base_url=server.url) as client,
        connect_sse(client, "POST", "/v1/chat/completions", json=body) as source,
    ):
        assert source.response.headers["content-type"].startswith("text/event-stream")
        events = list(source.iter_sse())
    assert {e.event for e in events} == {"message"}  # no event: lines, as OpenAI sends
    assert events[-1].data == "[DONE]"
    payloads = [json.loads(e.data) for e in events[:-1]]
    assert payloads[-1]["choices"] == []
    assert "usage" in payloads[-1]
    assert all(p["object"] == "chat.completion.chunk" for p in payloads)


def test_the_async_sdk_streams_too(serve: Serve) -> None:
    url = serve().url

    async def run() -> tuple[str, str | None, Any]:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        parts, finish, usage = [], None, None
        stream = await client.chat.completions.create(
            model=MODEL, messages=ASK, stream=True, max_tokens=7, stream_options={"include_usage": True}
        )
        async for chunk in stream:
            if chunk.choices:
                parts.append(chunk.choices[0].delta.content or "")
                finish = chunk.choices[0].finish_reason or finish
            else:
                usage = chunk.usage
        await client.close()
        return "".join(parts), finish, usage

    text, finish, usage = asyncio.run(run())
    assert finish == "length"
    assert usage.completion_tokens == 7
    expected = SimulatedEngine(TimingModel(0, 0, 0, 0)).compose(_messages(ASK))
    assert expected.startswith(text)
    assert text
    assert text != expected


def _messages(raw: list[dict[str, str]]) -> list[Any]:
    from chatsse.models import Message

    return [Message("", m["role"], m["content"], 0.0) for m in raw]  # type: ignore[arg-type]


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_a_token_limit_ends_with_length(serve: Serve, sdk: SDK, field: str) -> None:
    stream = sdk(serve().url).chat.completions.create(model=MODEL, messages=ASK, stream=True, **{field: 4})
    chunks = list(stream)
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) == 4
    assert chunks[-1].choices[0].finish_reason == "length"


def test_stop_ends_the_reply_before_the_stop_sequence(serve: Serve, sdk: SDK) -> None:
    client = sdk(serve().url)
    full = client.chat.completions.create(model=MODEL, messages=ASK).choices[0].message.content
    assert full is not None
    stop = full.split()[3]  # a word well inside the reply
    cut = client.chat.completions.create(model=MODEL, messages=ASK, stop=[stop, "never-said"])
    text = cut.choices[0].message.content
    assert text == full[: full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(model=MODEL, messages=ASK, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == text


def test_sampling_options_reach_the_engine_and_the_seed_changes_the_reply(serve: Serve, sdk: SDK) -> None:
    engine = RecordingEngine(TimingModel(0, 0, 0, 0))
    client = sdk(serve(engine=engine).url)
    replies = {
        seed: client.chat.completions.create(model=MODEL, messages=ASK, seed=seed).choices[0].message.content
        for seed in (1, 2)
    }
    again = client.chat.completions.create(
        model=MODEL, messages=ASK, seed=1, temperature=0.5, top_p=0.9, user="u7"
    )
    assert replies[1] != replies[2]
    assert again.choices[0].message.content == replies[1]
    options = engine.options[-1]
    assert (options.seed, options.temperature, options.top_p, options.user) == (1, 0.5, 0.9, "u7")


def test_the_whole_history_is_the_prompt_and_nothing_is_stored(serve: Serve, sdk: SDK) -> None:
    engine = RecordingEngine()
    server = serve(engine=engine)
    history = [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": [{"type": "text", "text": "an answer"}]},
        {"role": "user", "content": "second"},
    ]
    sdk(server.url).chat.completions.create(model=MODEL, messages=history)  # type: ignore[arg-type]
    prompt = engine.prompts[-1]
    assert [(m.role, m.content) for m in prompt] == [
        ("system", "be brief"),
        ("user", "first"),
        ("assistant", "an answer"),
        ("user", "second"),
    ]
    assert httpx.get(f"{server.url}/conversations").json()["total"] == 0


def test_an_engine_failure_mid_stream_raises_api_error_in_the_sdk(serve: Serve, sdk: SDK) -> None:
    client = sdk(serve(engine=FailingEngine(good_tokens=3)).url)
    received: list[Any] = []
    stream = client.chat.completions.create(model=FailingEngine.name, messages=ASK, stream=True)
    with pytest.raises(openai.APIError) as raised:
        received.extend(stream)
    assert len(received) == 1 + 3  # the role chunk and three tokens came first
    assert "backend went away" in raised.value.message
    assert isinstance(raised.value.body, dict)
    assert raised.value.body["code"] == "engine_error"
    with pytest.raises(openai.InternalServerError) as whole:  # not streamed: the HTTP status says it
        client.chat.completions.create(model=FailingEngine.name, messages=ASK)
    assert whole.value.status_code == 502


BAD_BODIES = [
    ({"n": 2}, 400, "n"),
    ({"logprobs": True}, 400, "logprobs"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
    ({"frequency_penalty": 0.5}, 400, "frequency_penalty"),
    ({"response_format": {"type": "json_object"}}, 400, "response_format"),
    ({"functions": []}, 400, "functions"),  # not a parameter chatsse knows
    ({"stream_options": {"include_usage": True}}, 400, "stream_options"),  # without stream
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"role": "tool", "content": "x"}]}, 400, "messages"),
    ({"temperature": 3}, 400, "temperature"),
    ({"model": "gpt-nothing"}, 404, "gpt-nothing"),
]


@pytest.mark.parametrize(("change", "status", "named"), BAD_BODIES)
def test_bad_bodies_get_openai_errors_and_the_server_stays_healthy(
    serve: Serve, sdk: SDK, change: dict[str, Any], status: int, named: str
) -> None:
    server = serve()
    body = {"model": MODEL, "messages": ASK, **change}
    response = httpx.post(f"{server.url}/v1/chat/completions", json=body)
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert named in error["message"] or named == error["param"]
    assert httpx.get(f"{server.url}/health").status_code == 200
    good = sdk(server.url).chat.completions.create(model=MODEL, messages=ASK)
    assert good.choices[0].message.content


def test_sdk_errors_by_status(serve: Serve, sdk: SDK) -> None:
    client = sdk(serve(max_message_size=100).url)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=ASK, n=3)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="other", messages=ASK)
    long = [{"role": "user", "content": "x" * 5000}]
    with pytest.raises(openai.APIStatusError) as raised:
        client.chat.completions.create(model=MODEL, messages=long)  # type: ignore[arg-type]
    assert raised.value.status_code == 413


def test_not_json_is_a_400(serve: Serve) -> None:
    response = httpx.post(
        f"{serve().url}/v1/chat/completions",
        content=b"{not json",
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_parameter"


def test_a_body_over_the_size_limit_is_a_413_in_openai_shape(serve: Serve) -> None:
    server = serve(max_message_size=100)  # the body limit is 6 x that plus 4 KiB
    messages = [{"role": "user", "content": "x" * 10_000}]
    response = httpx.post(f"{server.url}/v1/chat/completions", json={"model": MODEL, "messages": messages})
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"
    assert response.json()["error"]["type"] == "invalid_request_error"
    chat = httpx.post(f"{server.url}/chat", json={"message": "x" * 10_000})
    assert chat.status_code == 413
    assert set(chat.json()["error"]) == {"type", "message"}  # chatsse's own shape on its own route
