"""What do chatsse's OpenAI fronts cost per event, and what does chatsse add as a proxy?
Real servers, real sockets (``chatsse.referenceservers``, ``chatsse.servercost``).

1. Server CPU per token event, ``POST /v1/chat/completions`` vs ``POST /chat``: one chatsse
   server process, both fronts, the same replies (the simulated engine), in interleaved
   rounds (``/chat``, ``/v1``, ``/chat``, ...), medians reported:
   a. bursts: ``long_requests`` replies of ``long_tokens`` tokens, zero delays, a closed loop
      of ``concurrency`` users; server CPU / tokens (per-request work included, amortized);
   b. steady: ``steady_streams`` streams at 20 tokens/s, all mid-reply; server CPU / events
      over a window where every event is a token's (``cpu_per_event_steady``).
2. The proxy's added latency: an upstream chatsse (simulated engine: 50 ms to the first
   token, then 20 ms per token, no jitter, 50 tokens) read directly at its
   ``/v1/chat/completions``, and through a second chatsse in front of it
   (``CHATSSE_ENGINE=openai``), at 1 and at 200 concurrent streams (closed loop; the users
   start over one reply's time, so the streams are in every phase at once rather than all
   starting together). Added = through the proxy - direct, for TTFT and ITL, p50 and p99;
   rounds alternate direct and proxied runs; each figure is its median over the rounds, and
   every round is in the JSON. Both servers run on core 0 and the client on core 1: with 2
   cores, the proxy and its upstream share one.

Usage: ``python scripts/bench_openai.py [--quick] [--output build/bench_openai.json]``
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

from bench_server import bench_arguments, bench_runner, running, write_report

from chatsse.loadgen import LoadConfig, arun_load_test
from chatsse.loadtargets import ChatsseTarget, OpenAITarget, Target
from chatsse.referenceservers import ReferenceServer, reply_env
from chatsse.servercost import cpu_per_event_steady, measured_run

MODEL = "simulated"
FRONTS = ("/chat", "/v1/chat/completions")


@dataclass(frozen=True)
class Plan:
    long_tokens: int = 500
    long_requests: int = 200
    concurrency: int = 8
    steady_streams: int = 400
    steady_interval_ms: float = 50.0
    steady_window: float = 5.0
    repeats: int = 3
    proxy_ttft_ms: float = 50.0
    proxy_interval_ms: float = 20.0
    proxy_tokens: int = 50
    proxy_levels: tuple[int, ...] = (1, 200)
    proxy_requests_per_stream: int = 3
    proxy_min_requests: int = 20
    proxy_repeats: int = 3


QUICK = Plan(
    long_tokens=50,
    long_requests=20,
    concurrency=4,
    steady_streams=20,
    steady_window=1.0,
    repeats=1,
    proxy_tokens=10,
    proxy_levels=(1, 10),
    proxy_requests_per_stream=2,
    proxy_min_requests=4,
    proxy_repeats=1,
)


def target(front: str, url: str, max_tokens: int) -> Target:
    if front == "/chat":
        return ChatsseTarget(url, max_tokens=max_tokens)
    return OpenAITarget(f"{url}/v1", model=MODEL, max_tokens=max_tokens)


async def bursts(server: ReferenceServer, front: str, plan: Plan) -> dict[str, Any]:
    config = LoadConfig(requests=plan.long_requests, concurrency=plan.concurrency, timeout=120)
    warm = LoadConfig(requests=max(4, plan.long_requests // 10), concurrency=plan.concurrency, timeout=120)
    await arun_load_test(target(front, server.url, plan.long_tokens), warm)
    result, server_cpu, _ = await measured_run(
        server, config, plan.long_tokens, target(front, server.url, plan.long_tokens)
    )
    tokens = sum(r.tokens for r in result.records)
    errors = result.summary().errors_by_type
    return {"tokens": tokens, "server_us_per_token": 1e6 * server_cpu / tokens, "errors": errors}


async def steady(server: ReferenceServer, front: str, plan: Plan) -> dict[str, Any]:
    if front == "/chat":
        return await cpu_per_event_steady(server, streams=plan.steady_streams, window=plan.steady_window)
    body = {"model": MODEL, "stream": True, "messages": [{"role": "user", "content": "a steady stream"}]}
    return await cpu_per_event_steady(
        server, streams=plan.steady_streams, window=plan.steady_window, path=front, body=body
    )


def _median(runs: list[float]) -> float:
    return sorted(runs)[(len(runs) - 1) // 2]


async def front_costs(plan: Plan, pin: bool, log: Any) -> dict[str, Any]:
    runs: dict[str, dict[str, list[float]]] = {
        front: {"bursts": [], "steady": [], "tokens": []} for front in FRONTS
    }
    errors: dict[str, Any] = {}
    steady_tokens = int((1.2 * plan.steady_window + 20) * 1000 / plan.steady_interval_ms)
    for round_ in range(plan.repeats):
        for front in FRONTS:
            print(f"-- round {round_ + 1} of {plan.repeats}: {front}", file=log)
            with running(
                "chatsse", reply_env("chatsse", tokens=plan.long_tokens, interval_ms=0), pin=pin
            ) as server:
                row = await bursts(server, front, plan)
            runs[front]["bursts"].append(row["server_us_per_token"])
            runs[front]["tokens"].append(row["tokens"])
            if row["errors"]:
                errors[front] = row["errors"]
            env = reply_env("chatsse", tokens=steady_tokens, interval_ms=plan.steady_interval_ms)
            with running("chatsse", env, pin=pin) as server:
                runs[front]["steady"].append((await steady(server, front, plan))["server_us_per_event"])
    fronts = {
        front: {
            "bursts_us_per_token": _median(r["bursts"]),
            "steady_us_per_event": _median(r["steady"]),
            "all_bursts_us_per_token": r["bursts"],
            "all_steady_us_per_event": r["steady"],
            "bursts_tokens": r["tokens"],
        }
        for front, r in runs.items()
    }
    chat, v1 = fronts["/chat"], fronts["/v1/chat/completions"]
    return {
        "fronts": fronts,
        "ratio_bursts": _ratio(v1["bursts_us_per_token"], chat["bursts_us_per_token"]),
        "ratio_steady": _ratio(v1["steady_us_per_event"], chat["steady_us_per_event"]),
        "errors": errors,
    }


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None  # None: too little CPU to read (a quick run)


def _latencies(result: Any) -> dict[str, float | None]:
    summary = result.summary()
    return {
        "ttft_p50_ms": 1000 * summary.ttft.p50,
        "ttft_p99_ms": 1000 * summary.ttft.p99,
        "itl_p50_ms": 1000 * summary.itl.p50,
        "itl_p99_ms": 1000 * summary.itl.p99,
        "e2e_min_ms": 1000 * summary.e2e.min if summary.e2e is not None else None,
        "failed": summary.failed,
    }


async def proxy_latency(plan: Plan, pin: bool, log: Any) -> dict[str, Any]:
    tokens = plan.proxy_tokens
    upstream_env = {
        **reply_env("chatsse", tokens=tokens, interval_ms=plan.proxy_interval_ms),
        "CHATSSE_SIM_TTFT_MS": str(plan.proxy_ttft_ms),
    }
    levels: list[dict[str, Any]] = []
    with running("chatsse", upstream_env, pin=pin) as upstream:
        proxy_env = {
            **reply_env("chatsse", tokens=tokens, interval_ms=0),
            "CHATSSE_ENGINE": "openai",
            "CHATSSE_UPSTREAM_URL": f"{upstream.url}/v1",
            "CHATSSE_UPSTREAM_MODEL": MODEL,
            "CHATSSE_UPSTREAM_MAX_CONNECTIONS": "10000",
        }
        with running("chatsse", proxy_env, pin=pin) as proxy:
            for streams in plan.proxy_levels:
                requests = max(plan.proxy_min_requests, plan.proxy_requests_per_stream * streams)
                # Users start over one reply's time, so streams are in every phase at once (as
                # on a live server), not all starting together at each round's edge.
                reply_s = (plan.proxy_ttft_ms + (tokens - 1) * plan.proxy_interval_ms) / 1000
                config = LoadConfig(requests=requests, concurrency=streams, ramp_up=reply_s, timeout=120)
                rounds = []
                for round_ in range(plan.proxy_repeats):
                    row: dict[str, Any] = {}
                    for name, server in (("direct", upstream), ("proxy", proxy)):
                        print(f"-- {streams} streams, round {round_ + 1}: {name}", file=log)
                        result = await arun_load_test(
                            OpenAITarget(f"{server.url}/v1", model=MODEL, max_tokens=tokens), config
                        )
                        row[name] = _latencies(result)
                    row["added"] = {
                        key: row["proxy"][key] - row["direct"][key]
                        for key in row["direct"]
                        if key != "failed"
                    }
                    rounds.append(row)
                medians = {
                    name: {key: _median([r[name][key] for r in rounds]) for key in rounds[0][name]}
                    for name in ("direct", "proxy", "added")
                }
                levels.append({"streams": streams, "requests": requests, **medians, "rounds": rounds})
    return {
        "upstream": {"ttft_ms": plan.proxy_ttft_ms, "interval_ms": plan.proxy_interval_ms, "tokens": tokens},
        "levels": levels,
    }


def times(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def table(report: dict[str, Any]) -> str:
    costs, proxy = report["fronts"], report["proxy"]
    chat, v1 = costs["fronts"]["/chat"], costs["fronts"]["/v1/chat/completions"]
    lines = [
        f"{'server CPU per token event (us)':<44}{'/chat':>10}{'/v1/chat':>10}{'ratio':>8}",
        f"{'  bursts (per-request work amortized)':<44}{chat['bursts_us_per_token']:>10.2f}"
        f"{v1['bursts_us_per_token']:>10.2f}{times(costs['ratio_bursts']):>8}",
        f"{'  steady, every stream mid-reply':<44}{chat['steady_us_per_event']:>10.2f}"
        f"{v1['steady_us_per_event']:>10.2f}{times(costs['ratio_steady']):>8}",
        "",
        f"{'proxy added latency (ms)':<28}{'TTFT p50':>10}{'TTFT p99':>10}{'ITL p50':>10}{'ITL p99':>10}",
    ]
    for level in proxy["levels"]:
        for name in ("direct", "proxy", "added"):
            row = level[name]
            label = f"  {level['streams']} streams, {name}"
            lines.append(
                f"{label:<28}{row['ttft_p50_ms']:>10.2f}{row['ttft_p99_ms']:>10.2f}"
                f"{row['itl_p50_ms']:>10.2f}{row['itl_p99_ms']:>10.2f}"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args, pin = bench_arguments(__doc__, argv)
    plan = QUICK if args.quick else Plan()
    started = time.monotonic()
    with bench_runner() as runner:
        fronts = runner.run(front_costs(plan, pin, sys.stderr))
        proxy = runner.run(proxy_latency(plan, pin, sys.stderr))
    report = {"plan": asdict(plan), "pinned": pin, "fronts": fronts, "proxy": proxy,
              "seconds": time.monotonic() - started}  # fmt: skip
    print(table(report))
    write_report(report, args.output)
    failed = fronts["errors"] or any(
        level[n]["failed"] for level in proxy["levels"] for n in ("direct", "proxy")
    )
    if failed:
        print(f"requests failed: {fronts['errors'] or 'in the proxy runs'}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
