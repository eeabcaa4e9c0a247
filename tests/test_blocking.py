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
                                    "sim_reply_tokens_min": 60, "sim_reply_tokens_max": 60})  # fmt: skip
TOKENS = 60  # 1.2 s of steady stream, to outlast a lookup that starts 0.3 s in and takes 0.6 s
LOOKUP = 0.6
SCHEDULE = [(0.0, "steady one"), (0.0, "steady two"), (0.3, "Please look up the weather.")]


def longest_gap(view: StreamView) -> float:
    return max(b - a for a, b in pairwise(view.token_times))


def _three_servers() -> dict[str, list[StreamView]]:
    """The schedule's streams on three servers at once, one per way of looking up."""
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
                *(read_chats(s.url, SCHEDULE, max_tokens=TOKENS) for s in servers.values())
            )

        return dict(zip(servers, asyncio.run(run_all()), strict=True))
    finally:
        for server in servers.values():
            server.stop()


def spans_the_lookup(views: list[StreamView]) -> bool:
    """Both steady streams were under way before the lookup's request went out and still going
    when its first token came: only then can a stall (or none) during the lookup show."""
    steady, lookup = views[:2], views[2]
    looked_up = lookup.tokens[0].at
    return all(v.tokens[0].at < lookup.started and v.tokens[-1].at > looked_up for v in steady)


def test_a_blocking_lookup_stalls_every_stream_and_one_in_a_thread_or_awaited_only_its_own() -> None:
    # The three servers share this process with their client. A busy machine can leave it without
    # the CPU for a while: the lookup's request then goes out late, after the steady streams ended
    # (which hides the stall), or every stream stalls alike. Such a run shows nothing either way
    # and is run again; a run whose steady streams span every lookup must show the difference.
    seen: list[str] = []
    for _ in range(5):
        runs = _three_servers()
        for how, views in runs.items():
            assert all(v.ending == "completed" and len(v.tokens) == TOKENS for v in views), how
            # The lookup's own reply waits in every case: its first token comes after the lookup.
            assert views[2].token_times[0] >= LOOKUP * 0.9, how
        if not all(spans_the_lookup(views) for views in runs.values()):
            seen.append("a steady stream did not span its lookup")
            continue
        blocked = [longest_gap(v) for v in runs["time.sleep"][:2]]
        # time.sleep holds the loop for the whole lookup: no token of the steady streams in it.
        assert min(blocked) >= LOOKUP * 0.9, blocked
        free = {how: [longest_gap(v) for v in runs[how][:2]] for how in ("to_thread", "asyncio.sleep")}
        if all(max(gaps) < min(blocked) / 2 for gaps in free.values()):
            return
        seen.append(f"a lookup off the loop stalled the other streams: {free}, blocked {blocked}")
    raise AssertionError("; ".join(seen))


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
