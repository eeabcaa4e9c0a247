"""Limits that hold across workers (chatsse/limits/): the arithmetic, one suite run against
each store's limiter (several limiter objects on one SQLite file or Redis act as one), a
real server's 429s and headers, and the accuracy of a stream limit under load on a 4-worker
gunicorn (at most N open at once, exactly N admitted), with workers killed by SIGKILL."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import httpx
import openai
import pytest
import redis
from conftest import SDK, Serve
from redis_server import RedisServer, redis_server
from support import chat

from chatsse.errors import RateLimited
from chatsse.keys import KeyLimits, create_key
from chatsse.limits import Limiter, Quota
from chatsse.limits.base import Bucket, decide, duration, rate_headers, refill
from chatsse.limits.memory import MemoryLimiter
from chatsse.limits.redis import RedisLimiter
from chatsse.limits.sqlite import SQLiteLimiter
from chatsse.processes import GunicornServer
from chatsse.stores import StoreLimits
from chatsse.stores.redis import RedisStore
from chatsse.stores.sqlite import SQLiteStore

STORE_LIMITS = StoreLimits(ttl=60, max_conversations=100, max_messages=100)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def redis_srv() -> Iterator[RedisServer]:
    with redis_server() as server:
        yield server


# --- the arithmetic -------------------------------------------------------------------------


def test_a_bucket_refills_at_its_limit_per_minute_up_to_the_limit() -> None:
    assert refill(None, 60, 100.0) == Bucket(60.0, 100.0)
    assert refill(Bucket(0.0, 100.0), 60, 101.5) == Bucket(1.5, 101.5)
    assert refill(Bucket(-30.0, 0.0), 60, 30.0) == Bucket(0.0, 30.0)
    assert refill(Bucket(59.0, 0.0), 60, 1000.0).level == 60.0


def test_requests_are_admitted_until_the_bucket_is_empty_then_after_it_refills() -> None:
    quota = Quota(requests_per_minute=3)
    bucket = None
    for _ in range(3):
        decision = decide(quota, 0.0, bucket, None, 0, 0)
        assert decision.refused is None
        bucket = decision.requests
    refused = decide(quota, 0.0, bucket, None, 0, 0)
    assert refused.refused == "requests"
    assert refused.retry_after == pytest.approx(20.0)  # one request every 20 s at 3 a minute
    assert decide(quota, 20.0, bucket, None, 0, 0).refused is None


def test_a_turn_is_admitted_while_tokens_are_left_and_pays_for_what_it_used() -> None:
    from chatsse.limits.base import charge

    quota = Quota(tokens_per_minute=600)
    assert decide(quota, 0.0, None, Bucket(1.0, 0.0), 0, 0).refused is None
    after = charge(Bucket(1.0, 0.0), 600, 101, 0.0)
    assert after == Bucket(-100.0, 0.0)
    refused = decide(quota, 0.0, None, after, 0, 0)
    assert refused.refused == "tokens"
    assert refused.retry_after == pytest.approx(10.1)  # 101 tokens at 10 a second
    assert decide(quota, 10.1, None, after, 0, 0).refused is None


def test_stream_limits_count_the_keys_and_the_servers_leases() -> None:
    assert decide(Quota(max_streams=2), 0, None, None, 1, 50).refused is None
    assert decide(Quota(max_streams=2), 0, None, None, 2, 2).refused == "streams"
    assert decide(Quota(server_streams=3), 0, None, None, 0, 3).refused == "server_streams"
    assert decide(Quota(max_streams=5, server_streams=3), 0, None, None, 1, 2).refused is None


def test_headers_are_openais() -> None:
    quota = Quota(requests_per_minute=60, tokens_per_minute=1000)
    decision = decide(quota, 0.0, None, Bucket(400.0, 0.0), 0, 0)
    assert rate_headers(quota, decision) == {
        "x-ratelimit-limit-requests": "60",
        "x-ratelimit-remaining-requests": "59",
        "x-ratelimit-reset-requests": "1s",
        "x-ratelimit-limit-tokens": "1000",
        "x-ratelimit-remaining-tokens": "400",
        "x-ratelimit-reset-tokens": "36s",
    }
    assert [duration(s) for s in (0.0171, 1, 59.5, 60, 361)] == ["18ms", "1s", "1m0s", "1m0s", "6m1s"]
    assert rate_headers(Quota(max_streams=1), decide(Quota(max_streams=1), 0, None, None, 0, 0)) == {}


# --- every store's limiter ------------------------------------------------------------------


class Limiters:
    """Limiter objects on one store: each plays one worker."""

    def __init__(self, kind: str, tmp_path: Path, redis_url: str | None, lease_ttl: float) -> None:
        self.kind = kind
        self.tmp_path = tmp_path
        self.redis_url = redis_url
        self.lease_ttl = lease_ttl
        self.closers: list[object] = []
        self.memory = MemoryLimiter()  # one process: every "worker" is the one limiter

    def make(self) -> Limiter:
        limiter: Limiter
        if self.kind == "memory":
            return self.memory
        if self.kind == "sqlite":
            store: SQLiteStore | RedisStore = SQLiteStore(self.tmp_path / "c.db", STORE_LIMITS)
            limiter = SQLiteLimiter(store, lease_ttl=self.lease_ttl)
        else:
            assert self.redis_url is not None
            store = RedisStore(self.redis_url, STORE_LIMITS)
            limiter = RedisLimiter(store, lease_ttl=self.lease_ttl)
        self.closers += [limiter, store]
        return limiter

    async def close(self) -> None:
        for closer in [self.memory, *self.closers]:
            await closer.close()  # type: ignore[attr-defined]


async def _limiters(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Limiters]:
    url = None
    if request.param == "redis":
        url = request.getfixturevalue("redis_srv").url
        with redis.Redis.from_url(url) as client:
            client.flushall()
    made = Limiters(request.param, tmp_path, url, lease_ttl=0.6)
    yield made
    await made.close()


@pytest.fixture(params=["memory", "sqlite", "redis"])
async def limiters(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Limiters]:
    async for made in _limiters(request, tmp_path):
        yield made


@pytest.fixture(params=["sqlite", "redis"])
async def shared(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Limiters]:
    """Stores that several processes share (a memory store's leases die with its process)."""
    async for made in _limiters(request, tmp_path):
        yield made


async def _admit_all(limiter: Limiter, owner: str, quota: Quota, count: int) -> tuple[list[object], int]:
    admitted, refused = [], 0
    for _ in range(count):
        try:
            admitted.append(await limiter.admit(owner, quota))
        except RateLimited:
            refused += 1
    return admitted, refused


@pytest.mark.anyio
async def test_a_keys_streams_are_capped_and_freed(limiters: Limiters) -> None:
    limiter = limiters.make()
    quota = Quota(max_streams=2)
    admitted, refused = await _admit_all(limiter, "alice", quota, 3)
    assert (len(admitted), refused) == (2, 1)
    assert len((await _admit_all(limiter, "bob", quota, 2))[0]) == 2  # another key's own
    with pytest.raises(RateLimited) as error:
        await limiter.admit("alice", quota)
    assert error.value.status == 429
    assert error.value.headers == {"Retry-After": "1"}
    await limiter.finish(admitted[0], 0)  # type: ignore[arg-type]
    assert (await limiter.admit("alice", quota)).lease is not None


@pytest.mark.anyio
async def test_workers_sharing_a_store_share_every_limit(limiters: Limiters) -> None:
    workers = [limiters.make() for _ in range(4)]
    quota = Quota(max_streams=3, requests_per_minute=5, server_streams=4)
    results = await asyncio.gather(
        *(w.admit(owner, quota) for w in workers for owner in ("alice", "alice", "bob")),
        return_exceptions=True,
    )
    admitted = [r for r in results if not isinstance(r, BaseException)]
    assert len(admitted) == 4  # the server's cap, across the four
    assert sum(1 for a in admitted if a.owner == "alice") <= 3  # type: ignore[union-attr]
    assert all(isinstance(r, RateLimited) for r in results if isinstance(r, BaseException))
    for admission in admitted:
        await workers[0].finish(admission, 0)  # type: ignore[arg-type]
    rpm = Quota(requests_per_minute=5)  # ten tries, round the four workers: five admitted
    tries = [await _admit_all(workers[i % 4], "carol", rpm, 1) for i in range(10)]
    assert [len(ok) for ok, _ in tries] == [1] * 5 + [0] * 5


@pytest.mark.anyio
async def test_tokens_used_by_a_turn_are_paid_from_the_bucket_every_worker_sees(limiters: Limiters) -> None:
    first, second = limiters.make(), limiters.make()
    quota = Quota(tokens_per_minute=100)
    admission = await first.admit("alice", quota)
    assert admission.headers["x-ratelimit-remaining-tokens"] == "100"
    await first.finish(admission, 250)
    with pytest.raises(RateLimited, match="tokens per minute") as error:
        await second.admit("alice", quota)
    assert error.value.headers is not None
    assert 90 <= int(error.value.headers["Retry-After"]) <= 91  # 151 tokens at 100 a minute
    assert error.value.headers["x-ratelimit-remaining-tokens"] == "0"


@pytest.mark.anyio
async def test_the_leases_of_a_worker_that_died_expire_and_live_ones_are_renewed(shared: Limiters) -> None:
    limiters = shared
    dead, alive, other = limiters.make(), limiters.make(), limiters.make()
    quota = Quota(server_streams=2)
    await dead.admit("alice", quota)
    await dead.close()  # stops renewing: as if killed
    kept = await alive.admit("bob", quota)
    with pytest.raises(RateLimited):
        await other.admit("carol", quota)
    await asyncio.sleep(limiters.lease_ttl * 2.5)  # the dead lease expired; the live one was renewed
    await other.admit("carol", quota)
    with pytest.raises(RateLimited):
        await other.admit("carol", quota)
    await alive.finish(kept, 0)


# --- a real server --------------------------------------------------------------------------


def test_over_a_keys_limit_a_turn_gets_429_with_retry_after_and_openais_headers(
    serve: Serve, tmp_path: Path, sdk: SDK
) -> None:
    keys_file = tmp_path / "keys.json"
    _, alice = create_key(keys_file, "alice", limits=KeyLimits(requests_per_minute=2))
    _, bob = create_key(keys_file, "bob")  # the server's defaults: 3 a minute
    server = serve(keys_file=str(keys_file), key_requests_per_minute=3)
    with httpx.Client(
        base_url=server.url, timeout=10, headers={"Authorization": f"Bearer {alice}"}
    ) as client:
        first = chat(client, "one")
        assert first.status == 200
        assert first.headers["x-ratelimit-limit-requests"] == "2"
        assert first.headers["x-ratelimit-remaining-requests"] == "1"
        assert chat(client, "two").status == 200
        refused = client.post("/chat", json={"message": "three"})
        assert refused.status_code == 429
        assert refused.json()["error"]["type"] == "rate_limit_exceeded"
        assert 1 <= int(refused.headers["retry-after"]) <= 30
        assert refused.headers["x-ratelimit-remaining-requests"] == "0"
        assert client.get("/conversations").json()["total"] == 2  # nothing stored for the refused turn
    ai = openai.OpenAI(base_url=f"{server.url}/v1", api_key=alice, max_retries=0, timeout=10)
    try:
        with pytest.raises(openai.RateLimitError) as error:
            ai.chat.completions.create(model="simulated", messages=[{"role": "user", "content": "hi"}])
        assert error.value.code == "rate_limit_exceeded"
    finally:
        ai.close()
    with httpx.Client(base_url=server.url, timeout=10, headers={"Authorization": f"Bearer {bob}"}) as client:
        answers = [client.post("/v1/responses", json={"model": "simulated", "input": "x"}) for _ in range(4)]
    assert [a.status_code for a in answers] == [200, 200, 200, 429]
    assert answers[0].headers["x-ratelimit-limit-requests"] == "3"
    assert answers[3].json()["error"]["type"] == "rate_limit_error"  # OpenAI's shape on /v1
    assert answers[3].json()["error"]["code"] == "rate_limit_exceeded"


def test_a_server_without_limits_sends_no_rate_headers(serve: Serve) -> None:
    server = serve()
    with httpx.Client(base_url=server.url, timeout=10) as client:
        result = chat(client, "hello")
    assert result.status == 200
    assert not [name for name in result.headers if name.startswith("x-ratelimit")]


# --- accuracy under load, across 4 workers --------------------------------------------------

LONG = {
    "CHATSSE_SIM_TTFT_MS": "0",
    "CHATSSE_SIM_TOKEN_INTERVAL_MS": "20",
    "CHATSSE_SIM_JITTER": "0",
    "CHATSSE_LOG_LEVEL": "warning",
    "CHATSSE_RESUME_WINDOW": "0",
}


def _server_store(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / 'c.db'}"
    url: str = request.getfixturevalue("redis_srv").url
    with redis.Redis.from_url(url) as client:
        client.flushall()
    return url


async def _stream(client: httpx.AsyncClient, statuses: list[int]) -> None:
    async with client.stream("POST", "/chat", json={"message": "load"}) as response:
        statuses.append(response.status_code)
        if response.status_code != 200:
            await response.aread()
            return
        async for _ in response.aiter_bytes():
            pass


async def _burst_and_churn(url: str, limit: int) -> tuple[list[int], list[int]]:
    """40 long streams at once; then 3x the limit of clients looping short streams for 4 s."""
    limits = httpx.Limits(
        max_connections=200, max_keepalive_connections=0
    )  # a new connection each: any worker
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:
        burst: list[int] = []
        await asyncio.gather(*(_stream(client, burst) for _ in range(40)))
        statuses: list[int] = []
        stop_at = time.monotonic() + 4

        async def loop() -> None:
            while time.monotonic() < stop_at:
                await _stream(client, statuses)
                if statuses[-1] == 429:
                    await asyncio.sleep(0.01)

        await asyncio.gather(*(loop() for _ in range(3 * limit)))
    return burst, statuses


class LeaseSampler:
    """Counts the live leases in the store every millisecond, from a thread: the streams the
    limit holds open, as every worker sees them."""

    def __init__(self, store: str) -> None:
        self.store = store
        self.most = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def counter(self) -> Callable[[], int]:
        if self.store.startswith("sqlite:///"):
            conn = sqlite3.connect(self.store.removeprefix("sqlite:///"), timeout=5, check_same_thread=False)
            return lambda: int(
                conn.execute(
                    "SELECT COUNT(*) FROM limit_leases WHERE expires_at > ?", (time.time(),)
                ).fetchone()[0]
            )
        client = redis.Redis.from_url(self.store)
        return lambda: int(client.zcount("chatsse:limits:leases", int(time.time() * 1000), "+inf"))

    def _run(self) -> None:
        count = self.counter()
        while not self._stop.is_set():
            with contextlib.suppress(sqlite3.OperationalError):  # the table is made by the first worker
                self.most = max(self.most, count())
                self.samples += 1
            time.sleep(0.001)

    def __enter__(self) -> LeaseSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@pytest.mark.parametrize(
    ("kind", "setting"), [("sqlite", "CHATSSE_KEY_MAX_STREAMS"), ("redis", "CHATSSE_MAX_STREAMS")]
)
def test_at_most_n_streams_are_ever_open_across_four_workers(
    kind: str, setting: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    limit = 5
    env = {
        **LONG,
        setting: str(limit),
        "CHATSSE_SIM_REPLY_TOKENS_MIN": "25",
        "CHATSSE_SIM_REPLY_TOKENS_MAX": "25",
    }
    store = _server_store(kind, tmp_path, request)
    with GunicornServer(workers=4, store=store, env=env) as server, LeaseSampler(store) as leases:
        burst, statuses = asyncio.run(_burst_and_churn(server.url, limit))
    assert sorted(set(burst)) == [200, 429]
    assert burst.count(200) == limit  # exactly N of the 40 that came at once: none more, none fewer
    assert leases.samples > 1000
    assert leases.most == limit  # never more than N held; and the limit is used, not undershot
    assert statuses.count(200) >= 2 * limit  # streams kept flowing through the limit
    assert set(statuses) <= {200, 429}


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_streams_of_killed_workers_free_their_leases_within_the_lease_ttl(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    limit, lease_ttl = 3, 2.0
    env = {**LONG, "CHATSSE_MAX_STREAMS": str(limit), "CHATSSE_LIMIT_LEASE_TTL": str(lease_ttl),
           "CHATSSE_SIM_REPLY_TOKENS_MIN": "1000", "CHATSSE_SIM_REPLY_TOKENS_MAX": "1000"}  # fmt: skip
    store = _server_store(kind, tmp_path, request)
    live_leases = LeaseSampler(store).counter()
    with GunicornServer(workers=4, store=store, env=env) as server:

        async def scenario() -> tuple[int, int, float, int]:
            limits = httpx.Limits(max_keepalive_connections=0)
            async with httpx.AsyncClient(base_url=server.url, timeout=30, limits=limits) as client:
                opened = [client.stream("POST", "/chat", json={"message": "held"}) for _ in range(limit)]
                responses = [await stream.__aenter__() for stream in opened]
                assert [r.status_code for r in responses] == [200] * limit
                refused = await client.post("/chat", json={"message": "one more"})
                for pid in server.worker_pids():
                    os.kill(pid, signal.SIGKILL)
                killed = time.monotonic()
                del responses  # their connections died with the workers
                held = live_leases()  # the dead workers' leases are still in the store
                while live_leases() > 0:  # noqa: ASYNC110 (the store is polled: no event to wait on)
                    await asyncio.sleep(0.01)
                freed_after = time.monotonic() - killed
                while True:  # once the workers are back, streams are admitted again
                    try:
                        answer = await client.post("/chat", json={"message": "after", "max_tokens": 1})
                    except httpx.TransportError:
                        await asyncio.sleep(0.1)
                        continue
                    return refused.status_code, held, freed_after, answer.status_code

        refused_status, held, freed_after, after = asyncio.run(scenario())
    assert refused_status == 429
    assert held == limit
    assert freed_after <= lease_ttl + 0.5  # at most a lease's life after its last renewal
    assert after == 200
