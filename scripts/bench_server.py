"""What does chatsse cost per streamed event, per request, per open stream? Real servers, real sockets.

Each server under test runs as its own uvicorn process (``chatsse.referenceservers``), pinned
to core 0; this script is the load client (``chatsse.loadgen``), pinned to core 1. Servers:

- ``bare-asgi``: ``benchmarks/bare_asgi.py``, pre-encoded SSE bytes (the floor for Python).
- ``sse-starlette``: ``benchmarks/sse_starlette_app.py``, plain ``EventSourceResponse`` usage.
- ``chatsse``: the real app, ``POST /chat``, simulated engine configured by environment, as
  ``chatsse serve`` runs it (the garbage collector's thresholds, its connection limits, a
  drain on SIGTERM). The references run under ``uvicorn`` with the same loop and parser.

All send the same reply shape: ``connected``, one ``message`` event per token, ``completed``.

Measurements (server CPU = the server process's CPU clock, ``chatsse.servercost.cpu_seconds``):

1. CPU per streamed event, bursts: long replies, zero delays, closed loop; server CPU /
   events. Each reply is written in one tight loop, so how many events the kernel merges
   into one segment, and how often the client wakes, depends on the relative speed of the
   two processes: the bare floor lands at about 2.5 or about 4.5 us from run to run.
1b. CPU per streamed event, steady: 400 streams at 20 tokens/s, all mid-reply; server CPU /
   events over a 5 s window. One write and one timer wake-up per event for every server:
   the regime a chat server lives in, and a stable figure.
2. CPU per request: short replies (``--short-tokens`` + 2 events), zero delays; CPU / requests.
3. Streams held at 10 tokens/s: tokens paced at 100 ms; the number of streams doubles
   from 100 until ITL p99 exceeds twice the interval, a request fails, or a process
   saturates its core, then one more level halfway back; the highest level held and its
   ITL p99 are reported.
4. Memory per open stream, on a fresh server process: open 1000 slow streams (paced
   tokens), a fifth of them first; (VmRSS with all open - VmRSS with a fifth open) / the
   streams added. VmHWM is the peak.
5. Client CPU per event: this process's CPU during step 1 / events received.

Steps 1, 1b and 2 run three times per server, in rounds that visit every server in turn; the
report gives the median run and every run's figure (``all_server_us_per_*`` in the JSON).

Usage: ``python scripts/bench_server.py [--quick] [--output bench.json]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from chatsse.loadgen import LoadConfig, arun_load_test
from chatsse.loadtargets import ChatsseTarget
from chatsse.referenceservers import REFERENCE_APPS, ReferenceServer, reply_env, uvicorn_options
from chatsse.servercost import cpu_per_event_steady, cpu_per_request, measured_run

SERVERS = tuple(REFERENCE_APPS)
SERVER_CORE, CLIENT_CORE = 0, 1


@dataclass(frozen=True)
class Plan:
    long_tokens: int = 500
    long_requests: int = 200
    short_tokens: int = 6
    short_requests: int = 3000
    concurrency: int = 8
    interval_ms: float = 100.0
    paced_tokens: int = 30
    paced_start: int = 100
    paced_max: int = 3200
    streams: int = 1000
    settle: float = 0.5  # seconds to let memory settle before reading it
    steady_streams: int = 400
    steady_interval_ms: float = 50.0
    steady_window: float = 5.0  # seconds of CPU and events counted, every stream mid-reply
    repeats: int = 3  # CPU measurements per server, interleaved across servers; medians reported


QUICK = Plan(
    long_tokens=50,
    long_requests=20,
    short_requests=60,
    concurrency=4,
    interval_ms=50.0,
    paced_tokens=4,
    paced_start=10,
    paced_max=10,
    streams=40,
    settle=0.1,
    steady_streams=20,
    steady_window=1.0,
    repeats=1,
)


def running(name: str, env: dict[str, str], *, pin: bool) -> ReferenceServer:
    """One server process, to use as a context manager (started on entry, stopped on exit),
    pinned to the server core when ``pin``."""
    return ReferenceServer(name, env=env, core=SERVER_CORE if pin else None, startup_timeout=60)


def memory_kib(pid: int) -> dict[str, int]:
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0])
    return values


async def cpu_per_event(server: ReferenceServer, plan: Plan) -> dict[str, Any]:
    warm = LoadConfig(requests=max(4, plan.long_requests // 10), concurrency=plan.concurrency, timeout=120)
    await arun_load_test(ChatsseTarget(server.url, max_tokens=plan.long_tokens), warm)
    config = LoadConfig(requests=plan.long_requests, concurrency=plan.concurrency, timeout=120)
    result, server_cpu, client_cpu = await measured_run(server, config, plan.long_tokens)
    events = sum(r.events for r in result.records)
    return {
        "requests": len(result.records),
        "events": events,
        "server_cpu_s": server_cpu,
        "server_us_per_event": 1e6 * server_cpu / events,
        "client_cpu_s": client_cpu,
        "client_us_per_event": 1e6 * client_cpu / events,
        "events_per_s": result.summary().event_throughput,
        "errors": result.summary().errors_by_type,
    }


async def paced_level(server: ReferenceServer, plan: Plan, streams: int) -> dict[str, Any]:
    """``streams`` users, two paced replies each, started over one reply's time."""
    interval = plan.interval_ms / 1000
    config = LoadConfig(
        requests=2 * streams, concurrency=streams, ramp_up=plan.paced_tokens * interval, timeout=120
    )
    started = time.perf_counter()
    result, server_cpu, client_cpu = await measured_run(server, config, plan.paced_tokens)
    wall = time.perf_counter() - started
    summary = result.summary()
    itl_p99 = None if summary.itl is None else summary.itl.p99
    return {
        "streams": streams,
        "completed": summary.completed,
        "failed": summary.failed,
        "itl_p99_ms": None if itl_p99 is None else 1000 * itl_p99,
        "ttft_p99_ms": None if summary.ttft is None else 1000 * summary.ttft.p99,
        "server_cpu_share": server_cpu / wall,
        "client_cpu_share": client_cpu / wall,
        "held": summary.failed == 0 and itl_p99 is not None and itl_p99 <= 2 * interval,
    }


def _saturated(row: dict[str, Any]) -> str | None:
    if row["server_cpu_share"] >= 0.9:
        return "server_cpu"
    if row["client_cpu_share"] >= 0.9:
        return "client_cpu"
    return None


async def paced_capacity(server: ReferenceServer, plan: Plan) -> dict[str, Any]:
    """Double the streams until ITL p99 > 2 x interval, a failure, or a saturated core; then
    try once halfway between the last level held and the first one lost."""
    levels: list[dict[str, Any]] = []
    held: dict[str, Any] | None = None
    lost: int | None = None
    stopped_by = "max_level"
    streams = plan.paced_start
    while streams <= plan.paced_max:
        row = await paced_level(server, plan, streams)
        levels.append(row)
        if not row["held"]:
            lost, stopped_by = streams, "itl_or_errors"
            break
        held = row
        saturated = _saturated(row)
        if saturated is not None:
            stopped_by = saturated
            break
        streams *= 2
    if held is not None and lost is not None and lost - held["streams"] > 1:
        row = await paced_level(server, plan, (held["streams"] + lost) // 2)
        levels.append(row)
        if row["held"]:
            held = row
    return {
        "interval_ms": plan.interval_ms,
        "held_streams": None if held is None else held["streams"],
        "held_itl_p99_ms": None if held is None else held["itl_p99_ms"],
        "stopped_by": stopped_by,
        "levels": levels,
    }


async def memory_per_stream(server: ReferenceServer, plan: Plan) -> dict[str, Any]:
    """Open slow streams (a fifth first, then the rest) and compare resident memory."""
    first = max(1, plan.streams // 5)
    body = {"message": "hold this stream open"}
    responses: list[aiohttp.ClientResponse] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:

        async def open_stream() -> None:
            response = await http.post(server.url + "/chat", json=body)
            responses.append(response)
            if response.status != 200:
                raise RuntimeError(f"{server.app}: HTTP {response.status} opening a stream")
            await response.content.readany()  # the connected event: the stream is open

        try:
            await asyncio.gather(*(open_stream() for _ in range(first)))
            await asyncio.sleep(plan.settle)
            before = memory_kib(server.pid)
            await asyncio.gather(*(open_stream() for _ in range(plan.streams - first)))
            await asyncio.sleep(plan.settle)
            during = memory_kib(server.pid)
        finally:
            for response in responses:
                response.close()
    added = plan.streams - first
    return {
        "streams": plan.streams,
        "rss_kib_with_fifth": before["VmRSS"],
        "rss_kib_with_all": during["VmRSS"],
        "peak_rss_kib": during["VmHWM"],
        "kib_per_stream": (during["VmRSS"] - before["VmRSS"]) / added,
    }


async def bench_cpu(name: str, plan: Plan, *, pin: bool, log: Any) -> dict[str, Any]:
    """One round of the CPU measurements (1, 2 and 5 above), each on a fresh server."""
    out: dict[str, Any] = {}
    with running(name, reply_env(name, tokens=plan.long_tokens, interval_ms=0), pin=pin) as server:
        print(f"{name}: CPU per event ({plan.long_requests} x {plan.long_tokens} tokens)", file=log)
        out["events"] = await cpu_per_event(server, plan)
    with running(name, reply_env(name, tokens=plan.short_tokens, interval_ms=0), pin=pin) as server:
        print(f"{name}: CPU per request ({plan.short_requests} x {plan.short_tokens} tokens)", file=log)
        out["requests"] = await cpu_per_request(
            server, requests=plan.short_requests, tokens=plan.short_tokens, concurrency=plan.concurrency
        )
    # Replies long enough that none ends before the window does (they are cut after it).
    tokens = int((1.2 * plan.steady_window + 20) * 1000 / plan.steady_interval_ms)
    with running(
        name, reply_env(name, tokens=tokens, interval_ms=plan.steady_interval_ms), pin=pin
    ) as server:
        rate = 1000 / plan.steady_interval_ms
        print(f"{name}: CPU per event, {plan.steady_streams} streams at {rate:g} tokens/s", file=log)
        steady = await cpu_per_event_steady(server, streams=plan.steady_streams, window=plan.steady_window)
        out["steady"] = {**steady, "interval_ms": plan.steady_interval_ms}
    return out


async def bench_streams(name: str, plan: Plan, *, pin: bool, log: Any) -> dict[str, Any]:
    """Streams held at the paced rate, and memory per open stream (3 and 4 above)."""
    out: dict[str, Any] = {}
    # Replies long enough to outlive the memory measurement; paced runs ask for fewer tokens.
    slow = reply_env(
        name, tokens=max(plan.paced_tokens, int(60_000 / plan.interval_ms)), interval_ms=plan.interval_ms
    )
    with running(name, slow, pin=pin) as server:
        print(f"{name}: streams held at {1000 / plan.interval_ms:g} tokens/s", file=log)
        out["paced"] = await paced_capacity(server, plan)
    # A fresh process: memory freed by earlier runs would be reused and hide the growth.
    with running(name, slow, pin=pin) as server:
        print(f"{name}: memory of {plan.streams} open streams", file=log)
        out["memory"] = await memory_per_stream(server, plan)
    return out


def median_run(runs: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """The run with the median ``key`` (the lower middle one for an even count), with every
    run's value of ``key`` alongside, so the spread is in the report."""
    ordered = sorted(runs, key=lambda run: float(run[key]))
    return {**ordered[(len(ordered) - 1) // 2], "all_" + key: [run[key] for run in runs]}


async def bench_servers(names: list[str], plan: Plan, *, pin: bool, log: Any) -> dict[str, dict[str, Any]]:
    """CPU rounds interleaved across servers (slow drifts of a shared machine then touch every
    server alike), then the stream measurements server by server."""
    rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for round_ in range(plan.repeats):
        for name in names:
            print(f"-- round {round_ + 1} of {plan.repeats}", file=log)
            rounds[name].append(await bench_cpu(name, plan, pin=pin, log=log))
    servers: dict[str, dict[str, Any]] = {}
    for name in names:
        servers[name] = {
            "events": median_run([r["events"] for r in rounds[name]], "server_us_per_event"),
            "requests": median_run([r["requests"] for r in rounds[name]], "server_us_per_request"),
            "steady": median_run([r["steady"] for r in rounds[name]], "server_us_per_event"),
            **await bench_streams(name, plan, pin=pin, log=log),
        }
    return servers


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def ratios(servers: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    chat, bare = servers["chatsse"], servers["bare-asgi"]
    return {
        "cpu_per_event_vs_bare": _ratio(
            chat["events"]["server_us_per_event"], bare["events"]["server_us_per_event"]
        ),
        "cpu_per_event_steady_vs_bare": _ratio(
            chat["steady"]["server_us_per_event"], bare["steady"]["server_us_per_event"]
        ),
        "cpu_per_request_vs_bare": _ratio(
            chat["requests"]["server_us_per_request"], bare["requests"]["server_us_per_request"]
        ),
        "memory_per_stream_vs_bare": _ratio(
            chat["memory"]["kib_per_stream"], bare["memory"]["kib_per_stream"]
        ),
    }


def table(report: dict[str, Any]) -> str:
    servers: dict[str, dict[str, Any]] = report["servers"]
    plan = report["plan"]

    def num(value: float | None, digits: int = 1) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    rows: list[tuple[str, list[str]]] = [
        (
            "server CPU per event, bursts (us)",
            [num(s["events"]["server_us_per_event"], 2) for s in servers.values()],
        ),
        (
            f"server CPU per event, {plan['steady_streams']} streams at "
            f"{1000 / plan['steady_interval_ms']:g} tok/s (us)",
            [num(s["steady"]["server_us_per_event"], 2) for s in servers.values()],
        ),
        (
            f"server CPU per request, {plan['short_tokens'] + 2} events (us)",
            [num(s["requests"]["server_us_per_request"]) for s in servers.values()],
        ),
        ("memory per open stream (KiB)", [num(s["memory"]["kib_per_stream"]) for s in servers.values()]),
        (
            f"peak RSS with {plan['streams']} streams (MiB)",
            [num(s["memory"]["peak_rss_kib"] / 1024) for s in servers.values()],
        ),
        (
            f"streams held at {1000 / plan['interval_ms']:g} tokens/s",
            [str(s["paced"]["held_streams"] or "-") for s in servers.values()],
        ),
        ("  ITL p99 at that level (ms)", [num(s["paced"]["held_itl_p99_ms"]) for s in servers.values()]),
        ("  stopped by", [s["paced"]["stopped_by"] for s in servers.values()]),
        ("client CPU per event (us)", [num(s["events"]["client_us_per_event"], 2) for s in servers.values()]),
    ]
    ratio = report["ratios"]

    def times(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}x"

    ratio_column = [
        times(ratio["cpu_per_event_vs_bare"]),
        times(ratio["cpu_per_event_steady_vs_bare"]),
        times(ratio["cpu_per_request_vs_bare"]),
        times(ratio["memory_per_stream_vs_bare"]),
        "",
        "",
        "",
        "",
        "",
    ]
    width = max(len(name) for name, _ in rows) + 2
    header = f"{'':<{width}}" + "".join(f"{name:>15}" for name in servers) + f"{'chatsse/bare':>15}"
    lines = [header]
    for (name, values), extra in zip(rows, ratio_column, strict=True):
        lines.append(f"{name:<{width}}" + "".join(f"{v:>15}" for v in values) + f"{extra:>15}")
    return "\n".join(lines)


def bench_arguments(
    doc: str | None, argv: list[str] | None, extra: Any = None
) -> tuple[argparse.Namespace, bool]:
    """The benchmarks' shared command line (``--quick``, ``--output``, ``--no-pin``, and what
    ``extra(parser)`` adds); pins this process, the client, to its core when it can. Returns
    the arguments and whether the servers are to be pinned."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny numbers: a smoke test in seconds")
    parser.add_argument("--output", help="save the report as JSON")
    parser.add_argument("--no-pin", action="store_true", help="do not pin server and client to cores")
    if extra is not None:
        extra(parser)
    args = parser.parse_args(argv)
    args.parser = parser
    pin = not args.no_pin and shutil.which("taskset") is not None and len(os.sched_getaffinity(0)) >= 2
    if pin:
        os.sched_setaffinity(0, {CLIENT_CORE})
    return args, pin


def bench_runner() -> asyncio.Runner:
    """An event loop for the load client: uvloop's, as ``chatsse load`` uses."""
    try:
        import uvloop

        return asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:  # pragma: no cover - uvicorn[standard] installs it
        return asyncio.Runner()


def write_report(report: dict[str, Any], output: str | None) -> None:
    if output:
        path = Path(output)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=1))


def main(argv: list[str] | None = None) -> int:
    def servers_option(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--servers", default=",".join(SERVERS), help="comma-separated subset to run")

    args, pin = bench_arguments(__doc__, argv, servers_option)
    plan = QUICK if args.quick else Plan()
    names = [n for n in args.servers.split(",") if n]
    unknown = set(names) - set(SERVERS)
    if unknown:
        args.parser.error(f"unknown servers {sorted(unknown)}; choose from {SERVERS}")
    with bench_runner() as runner:
        servers = runner.run(bench_servers(names, plan, pin=pin, log=sys.stderr))
    report: dict[str, Any] = {
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "pinned": pin,
            "uvicorn_options": uvicorn_options(),
        },
        "plan": plan.__dict__,
        "servers": servers,
    }
    if {"chatsse", "bare-asgi"} <= set(servers):
        report["ratios"] = ratios(servers)
        print(table(report))
    else:
        report["ratios"] = {}
        print(json.dumps(servers, indent=1))
    errors = {name: s["events"]["errors"] or s["requests"]["errors"] for name, s in servers.items()}
    write_report(report, args.output)
    if any(errors.values()):
        print(f"requests failed: {errors}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
