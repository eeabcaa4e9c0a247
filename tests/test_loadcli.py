"""The load-test command: ``loadcli.main`` in-process, and ``scripts/run_load_test.py`` as a process."""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from conftest import Serve
from fake_openai import FakeOpenAI
from support import FailingEngine, wait_for

from chatsse.inprocess import InProcessServer
from chatsse.loadcli import ProgressLine, add_load_command, main
from chatsse.loadgen import LoadTestResult, Progress, load_results

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
    for row in ("TTFT", "TPOT", "ITL", "E2E", "lateness"):
        assert f"\n{row} " in out
    result = LoadTestResult.load(output)
    assert len(result.records) == 8
    assert result.config.turns == 2
    assert result.target["collect_text"] is True
    assert plot.read_text().count("Plotly.newPlot(") == 4


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


def test_ctrl_c_stops_the_script_and_prints_what_was_measured(serve: Serve) -> None:
    server = serve(
        sim_ttft_ms=0, sim_token_interval_ms=50, sim_reply_tokens_min=200, sim_reply_tokens_max=200
    )
    process = subprocess.Popen(
        [sys.executable, str(SCRIPT), server.url, "--duration", "60", "--concurrency", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    try:

        def streaming() -> bool:
            return bool(httpx.get(f"{server.url}/health").json()["this_worker"]["open_streams"] == 2)

        assert wait_for(streaming, 30, 0.05)
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 130, err
    assert "(interrupted)" in out
    assert "2 sent, 0 completed, 2 failed" in out
    assert "cancelled: 2" in out
