"""What do replay logs cost, and how fast are resume and stop across workers? Real servers,
real sockets (``chatsse.referenceservers``, ``chatsse.servercost``).

1. The log's cost per event: one chatsse process on SQLite (the store whose writes cost the
   most: each is a transaction in the file), ``steady_streams`` streams at 20 tokens/s, all
   mid-reply; server CPU / token events over a window with the replay log on
   (``CHATSSE_REPLAY_LOG=true``, the default) and off, in interleaved rounds, medians.
2. Resume latency: a 4-worker gunicorn on SQLite; each of ``replies`` replies is read up to a
   random token, its connection closed, and its resume URL opened on a fresh connection
   (any worker) with ``Last-Event-ID``: the time from the close to the first resumed event.
   Each reply's first part plus its resumed part must equal ``completed.content``.
3. Stop latency: the same server; each reply is stopped with ``POST .../stop`` on a fresh
   connection while it streams: the time from sending the stop to the streaming client's
   last event (``completed``, ``finish_reason: "stopped"``).

Both latencies are measured on SQLite, then on Redis when ``redis-server`` is installed.
The latencies are taken with the rest of the machine idle (one reply at a time), so they
show the protocol's own delays (the log's flush interval, the signal's poll), not queueing.

Usage: ``python scripts/bench_resume.py [--quick] [--output build/bench_resume.json]``
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import aiohttp
from bench_server import bench_arguments, bench_runner, running, write_report

from chatsse.eventstream import EventStreamParser
from chatsse.processes import GunicornServer, free_port
from chatsse.referenceservers import reply_env
from chatsse.servercost import cpu_per_event_steady


@dataclass(frozen=True)
class Plan:
    steady_streams: int = 400
    steady_interval_ms: float = 50.0
    steady_window: float = 5.0
    repeats: int = 3
    replies: int = 100
    reply_tokens: int = 100
    token_interval_ms: float = 20.0


QUICK = Plan(steady_streams=20, steady_window=0.5, repeats=1, replies=5, reply_tokens=30)


async def log_cost(plan: Plan, pin: bool, log: Any) -> dict[str, Any]:
    rounds: dict[str, list[dict[str, Any]]] = {"on": [], "off": []}
    with tempfile.TemporaryDirectory() as directory:
        for repeat in range(plan.repeats):
            for setting in ("on", "off"):
                env = {
                    **reply_env("chatsse", tokens=10_000, interval_ms=plan.steady_interval_ms),
                    "CHATSSE_STORE": f"sqlite:///{directory}/{setting}{repeat}.db",
                    "CHATSSE_REPLAY_LOG": "true" if setting == "on" else "false",
                }
                with running("chatsse", env, pin=pin) as server:
                    row = await cpu_per_event_steady(
                        server, streams=plan.steady_streams, window=plan.steady_window
                    )
                rounds[setting].append(row)
                print(
                    f"log {setting}, round {repeat + 1}: {row['server_us_per_event']:.2f} us/event", file=log
                )
    on = statistics.median(r["server_us_per_event"] for r in rounds["on"])
    off = statistics.median(r["server_us_per_event"] for r in rounds["off"])
    return {"us_per_event_log_on": on, "us_per_event_log_off": off, "ratio": on / off, "rounds": rounds}


async def _events(response: aiohttp.ClientResponse) -> Any:
    parser = EventStreamParser()
    async for chunk in response.content.iter_any():
        for event in parser.feed(chunk):
            yield event


def _delta(event: Any) -> str:
    return str(json.loads(event.data)["delta"]) if event.event == "message" else ""


async def resume_latency(url: str, plan: Plan, rng: random.Random) -> dict[str, Any]:
    latencies, mismatches = [], 0
    for reply in range(plan.replies):
        cut = rng.randrange(1, plan.reply_tokens - 10)
        first, connected, last_id = "", {}, ""
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
            async with http.post(url + "/chat", json={"message": f"resume {reply}"}) as response:
                seen = 0
                async for event in _events(response):
                    if event.event == "connected":
                        connected = json.loads(event.data)
                    first += _delta(event)
                    last_id, seen = event.id, seen + 1
                    if seen > cut:
                        break
                response.close()
            dropped = time.perf_counter()
            rest, first_at, content = "", None, None
            headers = {"Last-Event-ID": last_id}
            async with http.get(url + connected["resume_url"], headers=headers) as response:
                async for event in _events(response):
                    first_at = first_at or time.perf_counter()
                    rest += _delta(event)
                    if event.event == "completed":
                        content = json.loads(event.data)["content"]
        assert first_at is not None
        latencies.append(first_at - dropped)
        mismatches += first + rest != content
    return {**_percentiles(latencies), "replies": plan.replies, "mismatches": mismatches}


async def stop_latency(url: str, plan: Plan) -> dict[str, Any]:
    latencies, not_stopped = [], 0
    for reply in range(plan.replies):
        async with (
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http,
            http.post(url + "/chat", json={"message": f"stop {reply}"}) as response,
        ):
            seen, sent, stop = 0, 0.0, None
            async for event in _events(response):
                seen += 1
                if event.event == "connected":
                    stop_url = json.loads(event.data)["resume_url"].removesuffix("/events") + "/stop"
                if seen == 10:
                    sent = time.perf_counter()
                    stop = asyncio.ensure_future(http.post(url + stop_url))
                if event.event in ("completed", "error"):
                    latencies.append(time.perf_counter() - sent)
                    not_stopped += json.loads(event.data).get("finish_reason") != "stopped"
            if stop is not None:
                (await stop).close()
    return {**_percentiles(latencies), "replies": plan.replies, "not_stopped": not_stopped}


def _percentiles(seconds: list[float]) -> dict[str, float]:
    ordered = sorted(seconds)
    at = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {"p50_ms": 1000 * at(0.50), "p99_ms": 1000 * at(0.99), "max_ms": 1000 * ordered[-1]}


@contextlib.contextmanager
def redis_url() -> Iterator[str | None]:
    """A throwaway ``redis-server`` (no persistence) on a free port; None without the binary."""
    binary = shutil.which("redis-server")
    if binary is None:
        yield None
        return
    port = free_port()
    with tempfile.TemporaryDirectory() as directory:
        command = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        process = subprocess.Popen(
            command, cwd=directory, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            deadline = time.monotonic() + 10
            while True:
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError("redis-server did not start")
                time.sleep(0.05)
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            process.terminate()
            process.wait(10)


async def latencies(plan: Plan, log: Any) -> dict[str, Any]:
    """Resume and stop latency over a 4-worker gunicorn on SQLite, and on Redis if installed."""
    env = {
        **reply_env("chatsse", tokens=plan.reply_tokens, interval_ms=plan.token_interval_ms),
        "CHATSSE_SIM_REPLY_TOKENS_MIN": str(plan.reply_tokens),
    }
    found: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as directory, redis_url() as redis:
        stores = {"sqlite": f"sqlite:///{directory}/c.db", **({"redis": redis} if redis else {})}
        for kind, store in stores.items():
            with GunicornServer(workers=4, store=store, env=env) as server:
                resumed = await resume_latency(server.url, plan, random.Random(5))
                print(f"{kind} resume: {resumed}", file=log)
                stopped = await stop_latency(server.url, plan)
                print(f"{kind} stop: {stopped}", file=log)
            found[kind] = {"resume": resumed, "stop": stopped}
    return found


def table(report: dict[str, Any]) -> str:
    cost = report["log_cost"]
    rows = [
        ("server CPU per event, log off (us)", f"{cost['us_per_event_log_off']:.2f}"),
        ("server CPU per event, log on (us)", f"{cost['us_per_event_log_on']:.2f}"),
        ("log on / off", f"{cost['ratio']:.2f}x"),
    ]
    for kind, lat in report["latency"].items():
        for what in ("resume", "stop"):
            rows.append(
                (
                    f"{kind}: {what} latency p50 / p99 (ms)",
                    f"{lat[what]['p50_ms']:.1f} / {lat[what]['p99_ms']:.1f}",
                )
            )
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def main(argv: list[str] | None = None) -> int:
    args, pin = bench_arguments(__doc__, argv)
    plan = QUICK if args.quick else Plan()
    started = time.monotonic()
    with bench_runner() as runner:
        cost = runner.run(log_cost(plan, pin, sys.stderr))
        latency = runner.run(latencies(plan, sys.stderr))
    report = {"plan": asdict(plan), "pinned": pin, "log_cost": cost, "latency": latency,
              "seconds": time.monotonic() - started}  # fmt: skip
    print(table(report))
    write_report(report, args.output)
    if any(lat["resume"]["mismatches"] or lat["stop"]["not_stopped"] for lat in latency.values()):
        print("a resumed reply differed from its completed content, or a stop did not stop", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
