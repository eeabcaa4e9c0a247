"""What does the load client itself cost, with 1 and 2 client processes? Real server, real sockets.

The server is the bare reference (``benchmarks/bare_asgi.py``: pre-encoded SSE bytes, the
cheapest Python server), one uvicorn process, started as ``scripts/bench_server.py`` starts
it. Nothing is pinned: a two-process client needs both cores, and the server competes with
it for them. The client is ``chatsse.loadgen`` with ``LoadConfig.processes`` = 1, then 2.

Two workloads, each run with 1 and then 2 client processes:

- **paced**: ``streams`` closed-loop users, replies of ``tokens`` tokens ``interval_ms``
  apart (users ramped up over one reply, so their tokens interleave), two replies each.
  One event per network read: the regime a load test of a chat server lives in.
- **bursts**: ``burst_users`` users, replies of ``burst_tokens`` tokens sent without
  pauses; reads carry many events each, and client and server run flat out.

Figures per run: events received; events per second over the run's window; the client's
CPU seconds, summed over its processes (each process's ``time.process_time()`` over the
run, from the self-check); **events per client CPU-second**, i.e. events per second per
core the client can take; each process's CPU share and event-loop lag p99; whether the
self-check flagged the client; the server's CPU share. A single run each (no repeats):
the machine is shared, so read the ratios between columns, not the digits.

Usage: ``python scripts/bench_loadclient.py [--quick] [--output build/bench_loadclient.json]``
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from dataclasses import asdict, dataclass
from typing import Any

from bench_server import bench_runner, reply_env, running, write_report

from chatsse.loadgen import LoadConfig, arun_load_test
from chatsse.loadtargets import ChatsseTarget
from chatsse.servercost import cpu_seconds

PROCESSES = (1, 2)


@dataclass(frozen=True)
class Plan:
    streams: int = 2000
    tokens: int = 100
    interval_ms: float = 50.0
    burst_users: int = 64
    burst_tokens: int = 500
    burst_requests: int = 400


QUICK = Plan(streams=20, tokens=10, interval_ms=20.0, burst_users=4, burst_tokens=50, burst_requests=8)


async def measure(url: str, server_pid: int, config: LoadConfig, tokens: int) -> dict[str, Any]:
    """One load test; the client's figures from its self-check, the server's from its clock."""
    server_before = cpu_seconds(server_pid)
    result = await arun_load_test(ChatsseTarget(url, max_tokens=tokens), config)
    server_cpu = cpu_seconds(server_pid) - server_before  # idle while client processes start
    summary = result.summary()
    events = sum(r.events for r in result.records)
    client_cpu = sum(c.cpu_seconds for c in result.client)
    return {
        "processes": config.processes,
        "requests": len(result.records),
        "failed": summary.failed,
        "errors": summary.errors_by_type,
        "events": events,
        "window_s": result.window,
        "events_per_s": events / result.window,
        "client_cpu_s": client_cpu,
        "events_per_client_cpu_s": events / client_cpu if client_cpu > 0 else None,
        "client_cpu_share": [c.cpu_share for c in result.client],
        "loop_lag_p99_ms": [1000 * c.loop_lag_p99 for c in result.client],
        "loop_lag_max_ms": [1000 * c.loop_lag_max for c in result.client],
        "client_flagged": result.client_warnings(),
        "server_cpu_share": server_cpu / result.duration,
        "itl_p99_ms": None if summary.itl is None else 1000 * summary.itl.p99,
    }


async def bench(plan: Plan, log: Any) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {"paced": [], "bursts": []}
    reply_s = plan.tokens * plan.interval_ms / 1000
    paced_env = reply_env("bare-asgi", tokens=plan.tokens, interval_ms=plan.interval_ms)
    with running("bare-asgi", paced_env, pin=False) as server:
        for processes in PROCESSES:
            rate = 1000 / plan.interval_ms
            print(f"paced: {plan.streams} streams at {rate:g} tokens/s, {processes} process(es)", file=log)
            config = LoadConfig(
                requests=2 * plan.streams,
                concurrency=plan.streams,
                ramp_up=reply_s,
                timeout=10 * reply_s + 60,
                processes=processes,
            )
            out["paced"].append(await measure(server.url, server.pid, config, plan.tokens))
    burst_env = reply_env("bare-asgi", tokens=plan.burst_tokens, interval_ms=0)
    with running("bare-asgi", burst_env, pin=False) as server:
        for processes in PROCESSES:
            print(
                f"bursts: {plan.burst_users} users x {plan.burst_tokens} tokens, {processes} process(es)",
                file=log,
            )
            config = LoadConfig(
                requests=plan.burst_requests, concurrency=plan.burst_users, timeout=120, processes=processes
            )
            out["bursts"].append(await measure(server.url, server.pid, config, plan.burst_tokens))
    return out


def table(runs: dict[str, list[dict[str, Any]]]) -> str:
    def num(value: float | None, digits: int = 0) -> str:
        return "-" if value is None else f"{value:,.{digits}f}"

    def each(values: list[float], digits: int) -> str:
        return " / ".join(f"{v:.{digits}f}" for v in values)

    lines = [f"{'':<36}" + "".join(f"{f'{p} process' + ('es' if p > 1 else ''):>18}" for p in PROCESSES)]
    for workload, rows in runs.items():
        lines.append(workload)
        for name, cell in (
            ("  events received", lambda r: num(r["events"])),
            ("  events/s (over the window)", lambda r: num(r["events_per_s"])),
            ("  client CPU (s, all processes)", lambda r: num(r["client_cpu_s"], 2)),
            ("  events per client CPU-second", lambda r: num(r["events_per_client_cpu_s"])),
            ("  client CPU share per process", lambda r: each(r["client_cpu_share"], 2)),
            ("  event-loop lag p99 (ms)", lambda r: each(r["loop_lag_p99_ms"], 1)),
            ("  client flagged as the bottleneck", lambda r: "yes" if r["client_flagged"] else "no"),
            ("  server CPU share", lambda r: num(r["server_cpu_share"], 2)),
            ("  ITL p99 (ms)", lambda r: num(r["itl_p99_ms"], 1)),
        ):
            lines.append(f"{name:<36}" + "".join(f"{cell(r):>18}" for r in rows))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny numbers: a smoke test in seconds")
    parser.add_argument("--output", help="save the report as JSON")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else Plan()
    with bench_runner() as runner:
        runs = runner.run(bench(plan, sys.stderr))
    report = {
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "load_avg": os.getloadavg()},
        "plan": asdict(plan),
        "runs": runs,
    }
    print(table(runs))
    write_report(report, args.output)
    failures = {workload: [r["errors"] for r in rows if r["failed"]] for workload, rows in runs.items()}
    if any(failures.values()):
        print(f"requests failed: {failures}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
