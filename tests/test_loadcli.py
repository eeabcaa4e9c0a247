"""The load-test command: ``loadcli.main`` in-process, and ``scripts/run_load_test.py`` as a process."""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
from conftest import Serve
from fake_openai import FakeOpenAI
from support import FailingEngine, wait_for

from chatsse.inprocess import InProcessServer
from chatsse.loadcli import ProgressLine, add_load_command, format_summary, main
from chatsse.loadgen import LoadConfig, LoadTestResult, Progress, load_results
from chatsse.loadhealth import ClientProcess
from chatsse.loadmetrics import RequestRecord

ROOT = Path(__file__).parent.parent
SCRIPT = ROOT / "scripts" / "run_load_test.py"


def test_run_prints_a_summary_and_saves_results_and_plots(
    serve: Serve, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server = serve(sim_ttft_ms=5)
    output, plot = tmp_path / "results.json", tmp_path / "plots.html"
    load = [server.url, "--requests", "8", "--concurrency", "2", "--multi-turn", "2", "--check-content"]
    code = main([*load, "--slo-ttft-ms", "2000", "--output", str(output), "--plot", str(plot), "--quiet"])
    out = capsys.readouterr().out
    assert code == 0
    assert "8 sent, 8 completed, 0 failed" in out
    assert "SLO: TTFT <= 2000 ms" in out
    for row in ("TTFT", "TPOT", "ITL", "E2E", "client"):
        assert f"\n{row} " in out
    # A closed loop without a cap sends every request at its intended start: no rows that
    # would repeat E2E or show zeros.
    for row in ("E2E (intended)", "lateness", "slot wait", "goodput (send)"):
        assert f"\n{row} " not in out
    assert "1 process: " in out
    result = LoadTestResult.load(output)
    assert len(result.records) == 8
    assert result.config.turns == 2
    assert result.target["collect_text"] is True
    assert plot.read_text().count("Plotly.newPlot(") == 4


def test_open_loop_with_a_cap_shows_slot_waits_and_both_goodputs(
    serve: Serve, capsys: pytest.CaptureFixture[str]
) -> None:
    server = serve(sim_ttft_ms=50)
    load = [server.url, "--requests", "6", "--rate", "100", "--arrival", "constant", "--max-concurrency", "1"]
    assert main([*load, "--slo-ttft-ms", "1000", "--quiet"]) == 0
    out = capsys.readouterr().out
    for row in ("E2E (intended)", "lateness", "slot wait", "goodput (send)"):
        assert f"\n{row} " in out
    assert "from the intended start" in out


def test_processes_split_the_run_and_report_each_process(
    serve: Serve, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server = serve(sim_ttft_ms=5)
    detailed = tmp_path / "vllm.json"
    load = [server.url, "--requests", "10", "--concurrency", "4", "--processes", "2", "--quiet"]
    assert main([*load, "--save-detailed", str(detailed)]) == 0
    out = capsys.readouterr().out
    assert "10 sent, 10 completed, 0 failed" in out
    assert "2 client processes" in out
    assert "\nclient          2 processes: " in out
    document = json.loads(detailed.read_text())
    assert document["completed"] == 10
    assert document["max_concurrency"] == 4
    assert all(text for text in document["generated_texts"])  # --save-detailed collects the replies


def test_a_saturated_client_gets_a_warning_with_its_limits() -> None:
    config = LoadConfig(requests=1)
    record = RequestRecord(request_id=0, user_id=0, turn=0, intended_start=1.0, sent=1.0, end=1.5, status=200)
    busy = ClientProcess(
        index=0, pid=1, wall_seconds=1.0, cpu_seconds=0.97, loop_lag_p99=0.045, loop_lag_max=0.2, ticks=100
    )
    result = LoadTestResult(
        config, {"protocol": "chatsse", "url": "u"}, [record], 1.0, 2.0, 0.0, client=(busy,)
    )
    text = format_summary(result)
    warning = text.splitlines()[-1]
    assert warning.startswith("WARNING: the load client was a bottleneck")
    assert "event loop woke 45.0 ms late at p99" in warning
    assert "used 97% of a core" in warning
    assert "event-loop lag p99 20 ms" in warning
    assert "CPU 90% of a core" in warning
    calm = replace(busy, cpu_seconds=0.2, loop_lag_p99=0.002)
    assert "WARNING" not in format_summary(replace(result, client=(calm,)))


def test_simple_prints_the_streamed_reply(serve: Serve, capsys: pytest.CaptureFixture[str]) -> None:
    server = serve()
    assert main([server.url, "--simple", "--message", "Tell me about streams"]) == 0
    captured = capsys.readouterr()
    assert 'On "Tell me about streams"' in captured.out or "Tell me about streams" in captured.out
    assert captured.err.startswith("[ok] status 200, TTFT")


def test_simple_failure_exits_1(serve: Serve, capsys: pytest.CaptureFixture[str]) -> None:
    server = serve(engine=FailingEngine(good_tokens=1))
    assert main([server.url, "--simple"]) == 1
    assert "failed: stream_error:engine_error" in capsys.readouterr().err


def test_max_error_rate_sets_the_exit_code(serve: Serve, capsys: pytest.CaptureFixture[str]) -> None:
    server = serve(engine=FailingEngine(good_tokens=1))
    args = [server.url, "--requests", "3", "--concurrency", "1", "--quiet"]
    assert main([*args, "--max-error-rate", "0.05"]) == 1
    assert "error rate 100.0%" in capsys.readouterr().err
    assert main([*args, "--max-error-rate", "1"]) == 0
    assert main(args) == 0


def test_openai_sweep_over_concurrency(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    output = tmp_path / "sweep.json"
    with InProcessServer(FakeOpenAI().app()) as server:
        load = [server.url, "--openai", "--model", "fake-model", "--requests", "4", "--quiet"]
        code = main([*load, "--sweep-concurrency", "1,2", "--output", str(output)])
    assert code == 0
    out = capsys.readouterr().out
    assert "concurrency 1" in out
    assert "concurrency 2" in out
    assert " sweep " in out
    results = load_results(output)
    assert [r.config.concurrency for r in results] == [1, 2]
    assert all(r.target["model"] == "fake-model" for r in results)


def test_responses_multi_turn_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    output = tmp_path / "responses.json"
    fake = FakeOpenAI()
    with InProcessServer(fake.app()) as server:
        load = [f"{server.url}/v1", "--responses", "--requests", "6", "--rate", "inf", "--quiet"]
        code = main(
            [*load, "--multi-turn", "3", "--max-tokens", "4", "--check-content", "--output", str(output)]
        )
    assert code == 0
    out = capsys.readouterr().out
    assert "6 sent, 6 completed, 0 failed" in out
    assert f"responses {server.url}/v1/responses (model fake-model)" in out  # discovered
    result = LoadTestResult.load(output)
    assert result.target["protocol"] == "responses"
    assert result.target["collect_text"] is True
    assert all(body["max_output_tokens"] == 4 for body in fake.bodies)
    chained = [body["previous_response_id"] for body in fake.bodies if "previous_response_id" in body]
    assert len(chained) == 4  # turns 2 and 3 of the two users (arriving at once)
    assert sorted(fake.chains.values()) == [1, 1, 2, 2, 3, 3]


def test_responses_simple_prints_the_streamed_reply(capsys: pytest.CaptureFixture[str]) -> None:
    with InProcessServer(FakeOpenAI().app()) as server:
        assert main([server.url, "--responses", "--model", "m", "--simple"]) == 0
    captured = capsys.readouterr()
    assert "turn 1 reply w0 w1 w2 w3" in captured.out
    assert captured.err.startswith("[ok] status 200, TTFT")


def test_openai_and_responses_exclude_each_other(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["http://127.0.0.1:9", "--openai", "--responses"])
    assert exit_info.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


@pytest.mark.parametrize(
    "bad",
    [
        ["--sweep-rates", "1,2", "--sweep-concurrency", "1,2"],
        ["--rate", "2", "--sweep-concurrency", "1,2"],
        ["--multi-turn", "0"],
        ["--max-error-rate", "2"],
        ["--max-tokens", "0"],
        ["--processes", "0"],
        ["--processes", "3", "--concurrency", "2"],
    ],
)
def test_invalid_options_exit_2(bad: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["http://127.0.0.1:9", *bad]) == 2
    assert capsys.readouterr().err.startswith("chatsse load: ")


def test_unparsable_list_is_a_usage_error() -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--sweep-rates", "1,x"])
    assert exit_info.value.code == 2


def test_add_load_command_registers_a_handler(serve: Serve, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="chatsse")
    add_load_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["load", serve().url, "--requests", "2", "--quiet"])
    assert args.run(args) == 0
    assert "2 sent, 2 completed" in capsys.readouterr().out


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_line_rewrites_itself_on_a_terminal() -> None:
    terminal = FakeTerminal()
    show = ProgressLine(terminal)
    show(Progress(elapsed=1.0, sent=10, completed=8, failed=1, open_streams=1))
    show(Progress(elapsed=2.0, sent=20, completed=19, failed=1, open_streams=0, finished=True))
    text = terminal.getvalue()
    assert text.startswith("\r")
    assert text.count("\r") == 2
    assert text.endswith("10.0 req/s\n")
    log = io.StringIO()
    show = ProgressLine(log, every=5.0)
    for second in range(12):
        show(Progress(elapsed=float(second), sent=second, completed=second, failed=0, open_streams=1))
    assert log.getvalue().count("\n") == 3  # at 0, 5 and 10 s


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("CHATSSE_")}


def test_script_runs_against_a_server(serve: Serve, tmp_path: Path) -> None:
    server = serve()
    output = tmp_path / "out.json"
    process = subprocess.run(
        [sys.executable, str(SCRIPT), server.url, "--requests", "5", "--rate", "50", "--output", str(output)],
        capture_output=True,
        text=True,
        timeout=60,
        env=_env(),
    )
    assert process.returncode == 0, process.stderr
    assert "5 sent, 5 completed" in process.stdout
    assert "open loop, 50 users/s" in process.stdout
    assert json.loads(output.read_text())["completed"] == 5


@pytest.mark.parametrize("processes", [1, 2])
def test_ctrl_c_stops_the_script_and_prints_what_was_measured(
    serve: Serve, tmp_path: Path, processes: int
) -> None:
    server = serve(
        sim_ttft_ms=0, sim_token_interval_ms=50, sim_reply_tokens_min=200, sim_reply_tokens_max=200
    )
    output = tmp_path / "interrupted.json"
    load = [server.url, "--duration", "60", "--concurrency", "2", "--processes", str(processes)]
    process = subprocess.Popen(
        [sys.executable, str(SCRIPT), *load, "--output", str(output)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
        start_new_session=True,  # its own process group, as a terminal's foreground job
    )
    try:

        def streaming() -> bool:
            return bool(httpx.get(f"{server.url}/health").json()["this_worker"]["open_streams"] == 2)

        assert wait_for(streaming, 30, 0.05)
        os.killpg(process.pid, signal.SIGINT)  # a terminal's Ctrl-C reaches the whole group
        out, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 130, err
    assert "(interrupted)" in out
    assert "2 sent, 0 completed, 2 failed" in out
    assert "cancelled: 2" in out
    result = LoadTestResult.load(output)  # the records were kept and saved
    assert [r.error for r in result.records] == ["cancelled", "cancelled"]
    assert len(result.client) == processes
    for client in result.client:  # no client process is left behind
        with pytest.raises(ProcessLookupError):
            os.kill(client.pid, 0)
