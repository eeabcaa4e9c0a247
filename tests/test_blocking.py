"""An engine that looks something up first (chatsse/blocking.py): blocking the event loop stops
every stream of the server; the same lookup awaited, or in a thread, stops only its own."""

from __future__ import annotations

import asyncio
from itertools import pairwise

import pytest
from conftest import FAST

from chatsse import Settings, create_app
from chatsse.blocking import LookupEngine
from chatsse.engine import SimulatedEngine
from chatsse.inprocess import InProcessServer
from chatsse.models import Message
from chatsse.streamclient import StreamView, read_chats

PACED = Settings(_env_file=None, **{**FAST, "sim_ttft_ms": 10, "sim_token_interval_ms": 20,  # type: ignore[call-arg]
                                    "sim_reply_tokens_min": 40, "sim_reply_tokens_max": 40})  # fmt: skip
LOOKUP = 0.6
SCHEDULE = [(0.0, "steady one"), (0.0, "steady two"), (0.3, "Please look up the weather.")]


def longest_gap(view: StreamView) -> float:
    return max(b - a for a, b in pairwise(view.token_times))


def test_a_blocking_lookup_stalls_every_stream_and_one_in_a_thread_or_awaited_only_its_own() -> None:
    servers = {
        how: InProcessServer(
            create_app(
                PACED, engine=LookupEngine(SimulatedEngine.from_settings(PACED), seconds=LOOKUP, how=how)
            )
        ).start()
        for how in ("time.sleep", "to_thread", "asyncio.sleep")
    }
    try:

        async def run_all() -> list[list[StreamView]]:
            return await asyncio.gather(
                *(read_chats(s.url, SCHEDULE, max_tokens=40) for s in servers.values())
            )

        runs = dict(zip(servers, asyncio.run(run_all()), strict=True))
    finally:
        for server in servers.values():
            server.stop()
    for how, views in runs.items():
        assert all(v.ending == "completed" and len(v.tokens) == 40 for v in views), how
    blocked = [longest_gap(v) for v in runs["time.sleep"][:2]]
    assert min(blocked) >= LOOKUP * 0.9  # time.sleep sleeps at least that long, holding the loop
    for how in ("to_thread", "asyncio.sleep"):
        free = [longest_gap(v) for v in runs[how][:2]]
        assert max(free) < min(blocked) / 2, how
    # The lookup's own reply waits in every case: its first token comes after the lookup.
    for views in runs.values():
        lookup = views[2]
        assert lookup.token_times[0] >= LOOKUP * 0.9


def user(content: str) -> list[Message]:
    return [Message(id="m", role="user", content=content, created_at=0.0)]


def test_only_a_message_with_the_trigger_looks_anything_up() -> None:
    inner = SimulatedEngine.from_settings(PACED)
    engine = LookupEngine(inner, seconds=1, how="time.sleep", trigger="Look Up")
    plain = engine.generate(user("hello"), max_tokens=5)
    assert type(plain) is type(inner.generate(user("hello"), max_tokens=5))
    looked = engine.generate(user("please LOOK UP this"), max_tokens=5)
    assert type(looked) is not type(plain)
    assert engine.name == inner.name


@pytest.mark.parametrize(("how", "seconds"), [("sleep", 1.0), ("time.sleep", -1.0)])
def test_a_bad_lookup_is_refused(how: str, seconds: float) -> None:
    with pytest.raises(ValueError, match=r"how|seconds"):
        LookupEngine(SimulatedEngine(), seconds=seconds, how=how)  # type: ignore[arg-type]
