"""One behaviour suite for every replay log (memory, SQLite in tmp_path, a real Redis), then
what only the shared ones do: two store objects, as two workers, on one database."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
from redis_server import redis_server
from support import FakeClock

from chatsse.replay import Replay, ReplayLimits, ReplayLog, ReplayMeta, ReplayWrite, append, open_replay_log
from chatsse.replay.memory import MemoryReplayLog
from chatsse.replay.signals import RESUMED, STOP, SQLiteSignals, open_signals
from chatsse.stores import ConversationStore, StoreLimits, open_store

KINDS = ["memory", "sqlite", "redis"]
META = ReplayMeta("conv_1", "chat")
REDIS_TTL = 0.5  # Redis expires on its own clock: its expiry test really waits


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with redis_server() as server:
        yield server.url


@dataclass
class Logs:
    """Makes replay logs on the test's database (the stores they live beside too)."""

    kind: str
    url: str
    clock: FakeClock
    stores: list[ConversationStore] = field(default_factory=list)

    def make(self, *, ttl: float = 60.0, max_items: int = 50, max_logs: int = 1000) -> ReplayLog:
        limits = ReplayLimits(ttl=ttl, max_items=max_items, max_logs=max_logs, poll_interval=0.02)
        store = open_store(self.url, StoreLimits(3600, 100, 100), timeout=5, clock=self.clock)
        self.stores.append(store)
        if self.kind == "memory":
            return MemoryReplayLog(limits, clock=self.clock)
        return open_replay_log(store, limits)


@pytest.fixture(params=KINDS)
async def logs(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Logs]:
    kind: str = request.param
    if kind == "memory":
        url = "memory"
    elif kind == "sqlite":
        url = f"sqlite:///{tmp_path / 'chat.db'}"
    else:
        url = request.getfixturevalue("redis_url")
        with redis.Redis.from_url(url) as client:
            client.flushall()
    made = Logs(kind, url, FakeClock())
    yield made
    for store in made.stores:
        await store.close()


async def read_all(log: ReplayLog, reply_id: str, after: int = -1) -> Replay:
    replay = await log.read(reply_id, after)
    assert replay is not None
    return replay


@pytest.mark.anyio
async def test_items_come_back_in_order_from_any_position(logs: Logs) -> None:
    log = logs.make()
    await append(log, "r1", 0, ["event: connected\ndata: {}\n\n"], meta=META)
    await append(log, "r1", 1, [" a", " b", " ü\n\r"], meta=META)
    replay = await read_all(log, "r1")
    assert (replay.first, replay.items, replay.length, replay.done) == (
        0, ["event: connected\ndata: {}\n\n", " a", " b", " ü\n\r"], 4, False,
    )  # fmt: skip
    assert replay.meta == META
    assert (await read_all(log, "r1", after=1)).items == [" b", " ü\n\r"]
    later = await read_all(log, "r1", after=3)
    assert (later.first, later.items, later.complete) == (4, [], False)
    limited = await log.read("r1", 0, limit=2)
    assert limited is not None
    assert limited.items == [" a", " b"]
    assert await log.read("nobody") is None


@pytest.mark.anyio
async def test_appends_are_idempotent_and_refuse_gaps_and_overflow(logs: Logs) -> None:
    log = logs.make(max_items=6)
    await append(log, "r", 0, ["o", "1", "2"], meta=META)
    await append(log, "r", 1, ["1", "2"], meta=META)  # a retried flush: nothing new
    await append(log, "r", 2, ["2", "3"], meta=META)  # half old, half new
    assert (await read_all(log, "r")).items == ["o", "1", "2", "3"]
    with pytest.raises(ValueError, match="gap"):
        await append(log, "r", 6, ["x"], meta=META)
    with pytest.raises(ValueError, match="6"):
        await append(log, "r", 4, ["4", "5", "6"], meta=META)
    assert (await read_all(log, "r")).length == 4  # a refused append left nothing


@pytest.mark.anyio
async def test_done_completes_the_log_and_later_appends_are_ignored(logs: Logs) -> None:
    log = logs.make()
    await append(log, "r", 0, ["open", " t"], meta=META)
    await append(log, "r", 2, ["last"], meta=META, done=True)
    replay = await read_all(log, "r")
    assert replay.done
    assert replay.complete
    await append(log, "r", 3, ["more"], meta=META)
    assert (await read_all(log, "r")).items == ["open", " t", "last"]
    partial = await log.read("r", -1, limit=1)
    assert partial is not None
    assert partial.done
    assert not partial.complete  # done, but this read did not reach the end


@pytest.mark.anyio
async def test_a_log_lives_ttl_after_its_last_append(logs: Logs) -> None:
    ttl = REDIS_TTL if logs.kind == "redis" else 30.0
    log = logs.make(ttl=ttl)
    await append(log, "r", 0, ["open"], meta=META)

    async def later(seconds: float) -> None:
        if logs.kind == "redis":
            await asyncio.sleep(seconds)
        else:
            logs.clock.advance(seconds)

    await later(ttl * 0.6)
    await append(log, "r", 1, [" t"], meta=META)  # an append renews its life
    await later(ttl * 0.6)
    assert (await read_all(log, "r")).items == ["open", " t"]
    await later(ttl * 0.6)
    assert await log.read("r") is None


@pytest.mark.anyio
async def test_a_waiting_reader_sees_the_next_append(logs: Logs) -> None:
    log = logs.make()
    await append(log, "r", 0, ["open"], meta=META)

    async def writer() -> None:
        await asyncio.sleep(0.05)
        await append(log, "r", 1, [" t"], meta=META)

    task = asyncio.create_task(writer())
    started = time.monotonic()
    length = 1
    while length == 1 and time.monotonic() - started < 5:
        await log.wait("r", length, within=1.0)
        length = (await read_all(log, "r")).length
    await task
    assert length == 2
    assert time.monotonic() - started < 1.0  # woken or polled, not the whole wait


@pytest.mark.anyio
@pytest.mark.parametrize("logs", ["sqlite", "redis"], indirect=True)
async def test_two_store_objects_share_their_logs_like_two_workers(logs: Logs) -> None:
    writer, reader = logs.make(), logs.make()
    await append(writer, "r", 0, ["open", " a"], meta=META)
    assert (await read_all(reader, "r")).items == ["open", " a"]
    await append(reader, "r", 1, [" a", " b"], meta=META, done=True)  # another worker goes on
    replay = await read_all(writer, "r")
    assert replay.items == ["open", " a", " b"]
    assert replay.done


@pytest.mark.anyio
async def test_the_memory_log_holds_at_most_max_logs() -> None:
    log = MemoryReplayLog(ReplayLimits(ttl=60, max_items=10, max_logs=3))
    for n in range(5):
        await append(log, f"r{n}", 0, ["open"], meta=META)
    assert [await log.read(f"r{n}") is not None for n in range(5)] == [False, False, True, True, True]


def test_limits_are_checked() -> None:
    with pytest.raises(ValueError, match="ttl"):
        ReplayLimits(ttl=0, max_items=10)
    with pytest.raises(ValueError, match="max_items"):
        ReplayLimits(ttl=1, max_items=1)


@pytest.mark.anyio
async def test_one_batch_appends_to_many_logs_and_refuses_only_its_bad_writes(logs: Logs) -> None:
    log = logs.make(max_items=3)
    refused = await log.append_many(
        [
            ReplayWrite("a", 0, ["open", " x"], META),
            ReplayWrite("b", 5, ["gap"], META),
            ReplayWrite("c", 0, ["1", "2", "3", "4"], META),
            ReplayWrite("d", 0, ["open"], META, done=True),
        ]
    )
    assert [type(r).__name__ for r in refused] == ["NoneType", "ValueError", "ValueError", "NoneType"]
    assert (await read_all(log, "a")).items == ["open", " x"]
    assert (await read_all(log, "d")).complete
    assert await log.read("c") is None


@pytest.mark.anyio
async def test_age_is_the_time_since_the_last_append_and_a_heartbeat_renews_it(logs: Logs) -> None:
    log = logs.make(ttl=REDIS_TTL * 4 if logs.kind == "redis" else 60.0)
    await append(log, "r", 0, ["open"], meta=META)
    wait = 0.3 if logs.kind == "redis" else 2.0  # past the SQLite log's renewal period (a second)
    if logs.kind == "redis":
        await asyncio.sleep(wait)
    else:
        logs.clock.advance(wait)
    before = await read_all(log, "r")
    assert before.age == pytest.approx(wait, abs=0.1)
    await log.append_many([ReplayWrite("r", 1, [], META)])  # no items: a heartbeat
    after = await read_all(log, "r")
    assert after.age < 0.1
    assert after.length == 1


class GatedLog(MemoryReplayLog):
    """A memory log whose writes wait at a gate: a write can be held on its way."""

    def __init__(self) -> None:
        super().__init__(ReplayLimits(ttl=60, max_items=100))
        self.gate = asyncio.Event()
        self.gate.set()

    async def append_many(self, writes: Any) -> Any:
        await self.gate.wait()
        return await super().append_many(writes)


@pytest.mark.anyio
async def test_the_recorder_writes_a_stream_that_ends_while_a_write_is_on_its_way() -> None:
    from chatsse.replay.recorder import ReplayRecorder

    log = GatedLog()
    recorder = ReplayRecorder(log, interval=0.01)
    parts: list[str] = []
    recording = recorder.start("r", META, "open", parts)
    parts += [" a", " b"]
    log.gate.clear()
    flushing = asyncio.create_task(recorder.flush())
    await asyncio.sleep(0.02)  # the write of the opening and two tokens waits at the gate
    parts.append(" c")
    recorder.finish(recording, "last")  # the stream ends meanwhile
    log.gate.set()
    await flushing
    deadline = time.monotonic() + 2
    while not (replay := await read_all(log, "r")).done and time.monotonic() < deadline:
        await log.wait("r", replay.length, within=0.05)
    assert replay.items == ["open", " a", " b", " c", "last"]
    assert replay.complete
    await recorder.aclose(within=1)


# --- signals to the worker streaming a reply (chatsse/replay/signals.py) ---


async def _received(got: list[Any], count: int, within: float = 3.0) -> bool:
    """Whether ``got`` holds ``count`` items within ``within`` seconds (looking every 5 ms)."""
    for _ in range(int(within / 0.005)):
        if len(got) >= count:
            return True
        await asyncio.sleep(0.005)
    return len(got) >= count


@pytest.mark.anyio
async def test_a_signal_reaches_the_watcher_of_its_reply_through_another_store_object(logs: Logs) -> None:
    """Two store objects on one database stand for two workers (memory: one process)."""
    stores = [open_store(logs.url, StoreLimits(3600, 100, 100), timeout=5) for _ in range(2)]
    logs.stores += stores
    watcher = open_signals(stores[0])
    sender = watcher if logs.kind == "memory" else open_signals(stores[1])
    got: list[str] = []
    other: list[str] = []
    try:
        watcher.watch("msg_a", got.append)
        watcher.watch("msg_b", other.append)
        await asyncio.sleep(0.1)  # the watcher's subscription or first poll
        await sender.send("msg_a", STOP)
        await sender.send("msg_a", RESUMED)
        await sender.send("msg_nobody", STOP)  # nobody watches it: dropped
        assert await _received(got, 2)
        assert got == [STOP, RESUMED]
        watcher.unwatch("msg_a")
        await sender.send("msg_a", STOP)
        await sender.send("msg_b", STOP)
        assert await _received(other, 1)
        assert other == [STOP]
        assert got == [STOP, RESUMED]  # unwatched: no more
    finally:
        await watcher.close()
        if sender is not watcher:
            await sender.close()


@pytest.mark.anyio
async def test_sqlite_signals_arrive_within_a_few_poll_intervals(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'chat.db'}"
    one, two = (open_store(url, StoreLimits(3600, 100, 100), timeout=5) for _ in range(2))
    watcher, sender = open_signals(one), open_signals(two)
    assert isinstance(watcher, SQLiteSignals)
    arrived: list[float] = []
    try:
        watcher.watch("msg_a", lambda kind: arrived.append(time.monotonic()))
        await asyncio.sleep(0.1)
        sent = []
        for _ in range(20):
            sent.append(time.monotonic())
            await sender.send("msg_a", STOP)
            await _received(arrived, len(sent))
        assert len(arrived) == 20  # every one, in order, none twice
        delays = sorted(a - s for a, s in zip(arrived, sent, strict=True))
        print(f"SQLite signal delay: median {delays[10] * 1000:.1f} ms, max {delays[-1] * 1000:.1f} ms")
        assert delays[10] < 20 * watcher.poll  # a generous bound on a shared machine; the figure is printed
    finally:
        await watcher.close()
        await sender.close()
        await one.close()
        await two.close()
