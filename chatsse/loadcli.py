"""``chatsse load URL``: load-test a streaming chat server from the command line.

A thin front over :mod:`chatsse.loadgen`: it builds a target and a configuration from
the flags, shows a progress line on stderr while the run goes, and prints a summary
table on stdout, with a warning when the client itself was the bottleneck
(:mod:`chatsse.loadhealth`). ``scripts/run_load_test.py`` calls :func:`main` with the
same flags.

Exit codes: 0 done; 1 the error rate was above ``--max-error-rate``, the single
``--simple`` request failed, or the target could not be used; 2 invalid options;
130 interrupted (Ctrl-C), after printing what was measured.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from typing import IO, Any

from chatsse.loadgen import (
    ARRIVALS,
    DEFAULT_MESSAGES,
    LoadConfig,
    LoadTestResult,
    Progress,
    run_load_test,
    run_single_request,
    run_sweep,
    save_sweep,
)
from chatsse.loadhealth import CPU_SHARE_LIMIT, LAG_P99_LIMIT
from chatsse.loadmetrics import SLO, Stats
from chatsse.loadtargets import ChatsseTarget, OpenAITarget, ResponsesTarget, Target, TargetError
from chatsse.vllmresults import save_vllm_results

__all__ = [
    "ProgressLine",
    "add_load_command",
    "build_parser",
    "configure_parser",
    "format_summary",
    "format_sweep",
    "main",
    "run_load_command",
]

DESCRIPTION = (
    "Load-test a streaming chat server: chatsse's POST /chat, an OpenAI-compatible "
    "chat-completions server (vLLM, llama.cpp, Ollama) with --openai, or an OpenAI "
    "Responses API server (POST /v1/responses, previous_response_id across turns) with --responses."
)
EPILOG = (
    "exit codes: 0 done; 1 error rate above --max-error-rate, the --simple request failed, "
    "or the target could not be used; 2 invalid options; 130 interrupted (Ctrl-C)"
)
DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_REQUESTS = 100
EXIT_INTERRUPTED = 130


def _floats(text: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or any(not v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {text!r}")
    return values


def _ints(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the load-test options to ``parser``."""
    parser.add_argument(
        "url",
        nargs="?",
        default=DEFAULT_URL,
        help="server URL; a bare host:port gets /chat (or /v1/chat/completions, /v1/responses), "
        f"a base URL ending in /v1 gets the rest (default {DEFAULT_URL})",
    )
    parser.add_argument(
        "--serve",
        action="store_true",
        help="start a chatsse server (one uvicorn process, CHATSSE_* settings) on a free port, "
        "test it, and stop it; the url is ignored",
    )
    parser.add_argument("--simple", action="store_true", help="send one request and print the streamed reply")
    parser.add_argument(
        "--message",
        action="append",
        help="message to send (repeat for several; requests cycle through them)",
    )
    bounds = parser.add_argument_group("bounds (default: --requests 100)")
    bounds.add_argument("--requests", type=int, help="requests (turns) to send in all")
    bounds.add_argument("--duration", type=float, help="seconds to send for; in-flight requests then drain")
    bounds.add_argument(
        "--drain-timeout", type=float, default=10.0, help="seconds in-flight requests get after --duration"
    )
    bounds.add_argument("--timeout", type=float, default=300.0, help="seconds one request may take")
    shape = parser.add_argument_group("load shape")
    shape.add_argument(
        "--concurrency", type=int, default=10, help="closed loop: concurrent users (default 10)"
    )
    shape.add_argument("--rate", type=float, help="open loop: new users per second (inf: all at once)")
    shape.add_argument("--arrival", choices=ARRIVALS, default="poisson", help="open loop: arrival process")
    shape.add_argument(
        "--burstiness", type=float, default=1.0, help="gamma arrivals: shape (<1 burstier, 1 = Poisson)"
    )
    shape.add_argument(
        "--max-concurrency", type=int, help="cap on requests in flight (open loop: arrivals wait for a slot)"
    )
    shape.add_argument(
        "--ramp-up", type=float, default=0.0, help="seconds to reach full load (users, or rate)"
    )
    shape.add_argument("--multi-turn", type=int, default=1, metavar="K", help="turns per user conversation")
    shape.add_argument("--think-time", type=float, default=0.0, help="seconds between a user's turns")
    shape.add_argument("--seed", type=int, default=0, help="seed of the arrival times")
    shape.add_argument(
        "--processes",
        type=int,
        default=1,
        metavar="N",
        help="client processes to run the load in (default 1): the arrivals or users, and "
        "--max-concurrency, are split between them; see README",
    )
    shape.add_argument("--sweep-rates", type=_floats, metavar="R1,R2,...", help="one open-loop run per rate")
    shape.add_argument(
        "--sweep-concurrency", type=_ints, metavar="C1,C2,...", help="one closed-loop run per concurrency"
    )
    target = parser.add_argument_group("target (default: chatsse's POST /chat)")
    protocols = target.add_mutually_exclusive_group()
    protocols.add_argument(
        "--openai", action="store_true", help="OpenAI chat-completions protocol (vLLM, ...)"
    )
    protocols.add_argument(
        "--responses",
        action="store_true",
        help="OpenAI Responses API (POST /v1/responses); turns chain with previous_response_id",
    )
    target.add_argument(
        "--model", help="--openai, --responses: model (default: the first one the server lists)"
    )
    target.add_argument(
        "--max-tokens", type=int, help="cap on reply tokens per request (Responses: max_output_tokens)"
    )
    target.add_argument(
        "--check-content",
        action="store_true",
        help="chatsse, --responses: decode every delta and check the reply equals the final text "
        "(completed.content, response.output_text.done)",
    )
    target.add_argument(
        "--drop-resume",
        type=float,
        default=0.0,
        metavar="FRACTION",
        help="chatsse: drop this share of streams (0-1) after a random number of tokens and resume "
        "them with Last-Event-ID; reports resume latency and checks each reply has no gap or duplicate",
    )
    report = parser.add_argument_group("report")
    report.add_argument("--slo-ttft-ms", type=float, help="goodput: TTFT threshold (ms)")
    report.add_argument("--slo-tpot-ms", type=float, help="goodput: TPOT threshold (ms)")
    report.add_argument("--slo-e2e-ms", type=float, help="goodput: end-to-end latency threshold (ms)")
    report.add_argument("--output", help="save the results as JSON")
    report.add_argument(
        "--save-detailed",
        metavar="PATH",
        help="save the results as vllm bench serve --save-result --save-detailed does (its keys, "
        "per-request arrays, the replies' text); a sweep writes one JSON object per line",
    )
    report.add_argument("--plot", help="save plots as one self-contained HTML file")
    report.add_argument(
        "--max-error-rate", type=float, help="exit 1 when failed/sent is above this (0-1), for CI"
    )
    report.add_argument("--quiet", action="store_true", help="no progress line")


def add_load_command(subparsers: Any) -> None:
    """Register ``load`` on an ``add_subparsers()`` object; its handler returns an exit code."""
    parser = subparsers.add_parser(
        "load",
        help="load-test a streaming chat server (chatsse, OpenAI chat completions or Responses)",
        description=DESCRIPTION,
        epilog=EPILOG,
    )
    configure_parser(parser)
    parser.set_defaults(run=run_load_command)


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=DESCRIPTION, epilog=EPILOG)
    configure_parser(parser)
    return parser


def main(argv: Sequence[str] | None = None, *, prog: str | None = None) -> int:
    """Parse ``argv`` (the load-test flags) and run; returns the exit code."""
    return run_load_command(build_parser(prog).parse_args(argv))


def _slo(args: argparse.Namespace) -> SLO | None:
    limits = (args.slo_ttft_ms, args.slo_tpot_ms, args.slo_e2e_ms)
    if all(v is None for v in limits):
        return None
    ttft, tpot, e2e = (None if v is None else v / 1000.0 for v in limits)
    return SLO(ttft=ttft, tpot=tpot, e2e=e2e)


def _target(args: argparse.Namespace) -> Target:
    # --save-detailed writes the replies (vLLM's generated_texts): collect them.
    collect = bool(args.check_content or args.save_detailed)
    if args.openai:
        return OpenAITarget(args.url, model=args.model, max_tokens=args.max_tokens, collect_text=collect)
    if args.responses:
        return ResponsesTarget(args.url, model=args.model, max_tokens=args.max_tokens, collect_text=collect)
    return ChatsseTarget(
        args.url, max_tokens=args.max_tokens, collect_text=collect, drop_fraction=args.drop_resume
    )


def _config(args: argparse.Namespace) -> LoadConfig:
    requests = args.requests
    if requests is None and args.duration is None:
        requests = DEFAULT_REQUESTS
    return LoadConfig(
        requests=requests,
        duration=args.duration,
        concurrency=args.concurrency,
        rate=args.rate,
        arrival=args.arrival,
        burstiness=args.burstiness,
        max_concurrency=args.max_concurrency,
        ramp_up=args.ramp_up,
        turns=args.multi_turn,
        think_time=args.think_time,
        timeout=args.timeout,
        drain_timeout=args.drain_timeout,
        seed=args.seed,
        messages=tuple(args.message) if args.message else DEFAULT_MESSAGES,
        slo=_slo(args),
        processes=args.processes,
    )


PLOTS_MISSING = "--plot needs plotly, which this installation lacks: pip install 'chatsse[load]'"


def run_load_command(args: argparse.Namespace) -> int:
    """The ``load`` command's handler."""
    if args.plot:
        try:
            import plotly  # type: ignore[import-untyped]  # noqa: F401
        except ImportError:
            print(f"chatsse load: {PLOTS_MISSING}", file=sys.stderr)
            return 2
    if args.serve:
        from chatsse.processes import ServerProcessError, UvicornServer

        try:
            with UvicornServer() as server:
                print(f"chatsse load: started a chatsse server at {server.url}", file=sys.stderr)
                args.url = server.url
                args.serve = False
                return run_load_command(args)
        except ServerProcessError as exc:
            print(f"chatsse load: {exc}", file=sys.stderr)
            return 1
    err = sys.stderr
    if args.sweep_rates and args.sweep_concurrency:
        print("chatsse load: --sweep-rates and --sweep-concurrency exclude each other", file=err)
        return 2
    if args.sweep_concurrency and args.rate is not None:
        print("chatsse load: --sweep-concurrency is closed loop; drop --rate", file=err)
        return 2
    if args.max_error_rate is not None and not 0 <= args.max_error_rate <= 1:
        print("chatsse load: --max-error-rate must be within [0, 1]", file=err)
        return 2
    try:
        target = _target(args)
        config = _config(args)
    except ValueError as exc:
        print(f"chatsse load: {exc}", file=err)
        return 2
    try:
        if args.simple:
            return _simple(target, config.messages[0], args.timeout)
        progress = None if args.quiet else ProgressLine(err)
        if args.sweep_rates or args.sweep_concurrency:

            def announce(result: LoadTestResult) -> None:
                print(format_summary(result), flush=True)

            results = run_sweep(
                target,
                config,
                rates=args.sweep_rates,
                concurrencies=args.sweep_concurrency,
                progress=progress,
                on_result=announce,
            )
            print(format_sweep(results))
        else:
            results = [run_load_test(target, config, progress=progress)]
            print(format_summary(results[0]))
    except TargetError as exc:
        print(f"chatsse load: {exc}", file=err)
        return 1
    except KeyboardInterrupt:  # a second Ctrl-C, or one outside a run
        print("chatsse load: interrupted", file=err)
        return EXIT_INTERRUPTED
    _write_outputs(args, results)
    if any(r.interrupted for r in results):
        return EXIT_INTERRUPTED
    if args.max_error_rate is not None:
        worst = max(results, key=lambda r: r.error_rate)
        if worst.error_rate > args.max_error_rate:
            print(
                f"chatsse load: error rate {worst.error_rate:.1%} ({worst.config.label}) is above "
                f"--max-error-rate {args.max_error_rate:.1%}",
                file=err,
            )
            return 1
    return 0


def _write_outputs(args: argparse.Namespace, results: list[LoadTestResult]) -> None:
    if args.output:
        if len(results) == 1 and not (args.sweep_rates or args.sweep_concurrency):
            results[0].save(args.output)
        else:
            save_sweep(results, args.output)
        print(f"results saved to {args.output}")
    if args.save_detailed:
        save_vllm_results(results, args.save_detailed)
        print(f"vLLM-style results saved to {args.save_detailed}")
    if args.plot:
        from chatsse import plots

        if len(results) == 1:
            (result,) = results
            figures = [
                plots.latency_cdf(result),
                plots.percentile_spectrum(result),
                plots.request_timeline(result),
                plots.throughput_over_time(result),
            ]
        else:
            figures = [plots.sweep_knee(results), plots.goodput_vs_rate(results)]
            figures += [plots.throughput_over_time(r) for r in results]
        plots.save_html(figures, args.plot)
        print(f"plots saved to {args.plot}")


def _simple(target: Target, message: str, time_limit: float) -> int:
    """One request, its reply printed as it streams, then its timings."""

    def show(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    record = run_single_request(target, message, time_limit=time_limit, on_text=show)
    print()
    ttft = "-" if record.ttft is None else f"{record.ttft * 1000:.1f} ms"
    e2e = "-" if record.e2e is None else f"{record.e2e * 1000:.1f} ms"
    outcome = "ok" if record.ok else f"failed: {record.error}"
    print(
        f"[{outcome}] status {record.status}, TTFT {ttft}, {record.tokens} tokens, "
        f"{record.events} events, end-to-end {e2e}",
        file=sys.stderr,
    )
    return 0 if record.ok else 1


class ProgressLine:
    """Progress on a terminal: one line rewritten in place; elsewhere a line every few seconds."""

    def __init__(self, stream: IO[str], *, every: float = 5.0) -> None:
        self.stream = stream
        self.live = stream.isatty()
        self.every = every
        self._next_line_at = 0.0
        self._width = 0

    def __call__(self, progress: Progress) -> None:
        text = (
            f"{progress.elapsed:7.1f} s  sent {progress.sent}  done {progress.completed}  "
            f"failed {progress.failed}  open {progress.open_streams}  {progress.request_rate:.1f} req/s"
        )
        if self.live:
            self.stream.write("\r" + text.ljust(self._width))
            self._width = len(text)
            if progress.finished:
                self.stream.write("\n")
                self._width = 0
        elif progress.finished or progress.elapsed >= self._next_line_at:
            self.stream.write(text + "\n")
            self._next_line_at = progress.elapsed + self.every
        if progress.finished:
            self._next_line_at = 0.0
        self.stream.flush()


def _ms(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value * 1000:.2f}"


def format_summary(result: LoadTestResult, slo: SLO | None = None) -> str:
    """A plain-text report of one run (the configuration's SLO unless ``slo`` is given).

    Rows that would repeat others by construction are left out: intended E2E and lateness
    when every request went at its intended start, slot wait and goodput from send when no
    request waited for a slot.
    """
    s = result.summary(slo)
    sent = len(result.records)
    lines = [f"{' ' + result.config.label + ' ':=^78}"]

    def row(name: str, value: str) -> None:
        lines.append(f"{name:<16}{value}")

    target = result.target
    model = f" (model {target['model']})" if target.get("model") else ""
    row("target", f"{target['protocol']} {target['url']}{model}")
    row("load", result.config.describe())
    duration = f"{result.duration:.2f} s"
    if result.window < result.duration - 0.005:
        duration += f" (sending {result.window:.2f} s, then {result.duration - result.window:.2f} s of drain)"
    row("duration", duration + ("  (interrupted)" if result.interrupted else ""))
    failed_share = f" ({s.failed / sent:.1%})" if sent else ""
    row("requests", f"{sent} sent, {s.completed} completed, {s.failed} failed{failed_share}")
    if result.unsent:
        row("not sent", f"{result.unsent} (still waiting for a slot when sending stopped)")
    if s.errors_by_type:
        row("errors", ", ".join(f"{kind}: {n}" for kind, n in s.errors_by_type.items()))
    row(
        "throughput",
        f"{s.request_throughput:.2f} req/s, {s.output_token_throughput:.1f} tokens/s, "
        f"{s.event_throughput:.1f} events/s",
    )
    if s.drained:
        row("", f"(over the {s.duration:.2f} s window; {s.drained} completed in the drain, not counted)")
    row("goodput", _goodput(s.goodput, s.good_fraction, s.slo))
    if s.lateness is not None:  # some request went out late: from send, goodput differs
        row("", "(from the intended start: a request is good if it met the SLO from when it was due)")
        row("goodput (send)", _goodput(s.goodput_from_send, s.good_fraction_from_send, s.slo) + ", from send")
    row("tokens", f"{s.total_input_tokens} in, {s.total_output_tokens} out, {s.total_events} events")
    if s.resumed:
        row("resumed", f"{s.resumed} completed requests were dropped mid-stream and resumed")
    row("client", _client(result))
    lines.append(
        f"{'latency (ms)':<16}" + "".join(f"{h:>10}" for h in ("mean", "p50", "p90", "p95", "p99", "max"))
    )
    series: list[tuple[str, Stats | None]] = [
        ("TTFT", s.ttft),
        ("TPOT", s.tpot),
        ("ITL", s.itl),
        ("E2E", s.e2e),
    ]
    if s.lateness is not None:  # else every request went at its intended start
        series += [("E2E (intended)", s.e2e_intended), ("lateness", s.lateness)]
    if s.slot_wait is not None:
        series.append(("slot wait", s.slot_wait))
    if s.resume is not None:  # streams were dropped and resumed (--drop-resume)
        series.append(("resume", s.resume))
    for name, stats in series:
        if stats is None:
            lines.append(f"{name:<16}{'-':>10}")
            continue
        values = (stats.mean, stats.p50, stats.p90, stats.p95, stats.p99, stats.max)
        lines.append(f"{name:<16}" + "".join(f"{_ms(v):>10}" for v in values))
    warnings = result.client_warnings()
    if warnings:
        lines.append(
            "WARNING: the load client was a bottleneck; its latencies include its own delays: "
            + "; ".join(warnings)
            + f". (Limits: event-loop lag p99 {LAG_P99_LIMIT * 1000:g} ms, a token gap of a fast server; "
            f"CPU {CPU_SHARE_LIMIT:.0%} of a core, where a single-threaded loop queues.) "
            "Use more --processes, fewer streams, or a bigger client machine."
        )
    return "\n".join(lines)


def _goodput(goodput: float, fraction: float | None, slo: SLO | None) -> str:
    good = "-" if fraction is None else f"{fraction:.1%}"
    text = f"{goodput:.2f} req/s, {good} of requests good"
    if slo is not None:
        limits = [
            f"{name} <= {limit * 1000:g} ms"
            for name, limit in (("TTFT", slo.ttft), ("TPOT", slo.tpot), ("E2E", slo.e2e))
            if limit is not None
        ]
        text += f" (SLO: {', '.join(limits)})"
    return text


def _client(result: LoadTestResult) -> str:
    """Each client process's CPU share and event-loop lag, ``/``-separated."""
    client = result.client
    if not client:
        return "-"

    def each(values: list[str]) -> str:
        return " / ".join(values)

    count = f"{len(client)} process{'es' if len(client) > 1 else ''}"
    return (
        f"{count}: {each([f'{c.cpu_share:.0%}' for c in client])} of a core, event-loop lag p99 "
        f"{each([f'{c.loop_lag_p99 * 1000:.1f}' for c in client])} ms, "
        f"max {each([f'{c.loop_lag_max * 1000:.1f}' for c in client])} ms"
    )


def format_sweep(results: Sequence[LoadTestResult], slo: SLO | None = None) -> str:
    """One row per run: load level, counts, throughput, goodput and tail latencies."""
    header = (
        f"{'run':<18}{'sent':>6}{'ok':>6}{'failed':>7}{'req/s':>8}{'tok/s':>9}{'goodput':>9}"
        f"{'p50 TTFT':>10}{'p95 TTFT':>10}{'p95 ITL':>9}{'p95 E2E':>10}"
    )
    lines = [f"{' sweep ':=^{len(header)}}", header]
    for result in results:
        s = result.summary(slo)

        def p(stats: Stats | None, which: str) -> str:
            return _ms(None if stats is None else getattr(stats, which))

        lines.append(
            f"{result.config.label:<18}{len(result.records):>6}{s.completed:>6}{s.failed:>7}"
            f"{s.request_throughput:>8.2f}{s.output_token_throughput:>9.1f}{s.goodput:>9.2f}"
            f"{p(s.ttft, 'p50'):>10}{p(s.ttft, 'p95'):>10}{p(s.itl, 'p95'):>9}{p(s.e2e, 'p95'):>10}"
        )
    lines.append("latencies in ms; rates over each run's sending window; goodput: requests/s within the SLO")
    return "\n".join(lines)
