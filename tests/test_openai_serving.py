"""The Responses API's server-side state across the workers of a real gunicorn server: chains
of previous_response_id continue on whichever worker takes each turn (SQLite and Redis)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from redis_server import RedisServer, redis_server

from chatsse.engine import SimulatedEngine, TimingModel, count_prompt_tokens
from chatsse.models import Message
from chatsse.processes import GunicornServer

ENV = {
    "CHATSSE_SIM_TTFT_MS": "1",
    "CHATSSE_SIM_PREFILL_MS_PER_TOKEN": "0",
    "CHATSSE_SIM_TOKEN_INTERVAL_MS": "1",
    "CHATSSE_SIM_JITTER": "0",
    "CHATSSE_LOG_LEVEL": "warning",
    "CHATSSE_MAX_HISTORY_LENGTH": "4",
}
USERS, TURNS = 12, 3


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    with redis_server() as server:
        yield server


async def _user(url: str, user: int) -> list[str]:
    """One user's chain; every turn on a fresh connection, so any worker may take it."""
    problems: list[str] = []
    history: list[Message] = []
    previous: str | None = None
    ids: list[str] = []
    for turn in range(TURNS):
        http = httpx.AsyncClient(limits=httpx.Limits(max_keepalive_connections=0), timeout=30)
        async with openai.AsyncOpenAI(
            base_url=f"{url}/v1", api_key="k", http_client=http, max_retries=0
        ) as sdk:
            text = f"user {user} turn {turn}: and topic{user}x{turn}?"
            history.append(Message("", "user", text, 0.0))
            stream = await sdk.responses.create(
                model="simulated", input=text, previous_response_id=previous, stream=True
            )
            events = [event async for event in stream]
        final = events[-1]
        if final.type != "response.completed":
            return [f"user {user} turn {turn}: ended with {final.type}"]
        reply = final.response.output_text
        if reply != SimulatedEngine(TimingModel(0, 0, 0, 0)).compose(history[-4:]):
            problems.append(f"user {user} turn {turn}: the reply does not answer the stored history")
        usage = final.response.usage
        if usage is None or usage.input_tokens != count_prompt_tokens(history[-4:]):
            problems.append(f"user {user} turn {turn}: usage {usage}")
        history.append(Message("", "assistant", reply, 0.0))
        previous = final.response.id
        ids.append(previous)
    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0) as sdk:
        for index, response_id in enumerate(ids):
            got = await sdk.responses.retrieve(response_id)
            if got.output_text != history[2 * index + 1].content:
                problems.append(f"user {user}: response {index} reads back differently")
        with pytest.raises(openai.NotFoundError):
            await sdk.responses.create(model="simulated", input="x", previous_response_id=ids[-1] + "x")
    return problems


async def _users(url: str) -> list[str]:
    results = await asyncio.gather(*(_user(url, u) for u in range(USERS)))
    return [problem for problems in results for problem in problems]


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_response_chains_continue_on_any_of_four_workers(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if kind == "sqlite":
        store = f"sqlite:///{tmp_path / 'conversations.db'}"
    else:
        redis: RedisServer = request.getfixturevalue("redis")
        store = redis.url
    with GunicornServer(workers=4, store=store, env=ENV) as server:
        assert asyncio.run(_users(server.url)) == []
        pids = {httpx.get(f"{server.url}/health").json()["this_worker"]["pid"] for _ in range(40)}
        assert len(pids) >= 2  # fresh connections reach several workers
        stats = httpx.get(f"{server.url}/stats").json()
        assert stats["all_workers"]["conversations"] == USERS
        assert stats["all_workers"]["streams_by_outcome"] == {"stop": USERS * TURNS}
