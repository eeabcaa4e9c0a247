"""chatsse.locust through Locust itself: ``locust --headless`` in a child process (Locust
monkey-patches the standard library with gevent, so it never runs inside pytest) against
real servers on free ports, judged by the statistics Locust writes (``--json-file``) and by what
the servers say they served."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import Serve
from fake_openai import FakeOpenAI
from support import FailingEngine, metric_value

from chatsse.inprocess import InProcessServer
from chatsse.keys import create_key
from chatsse.processes import free_port

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("locust") is None,
    reason="locust is not installed (the chatsse[locust] extra; make install adds it)",
)

ROOT = Path(__file__).resolve().parent.parent
LOCUSTFILE = ROOT / "scripts" / "locustfile.py"
TIMEOUT = 90  # seconds for one Locust process, start to exit (its run lasts 1 s)
WRONG_KEY = "csk_00000000_" + "A" * 43


def _locust(*args: str | Path, cwd: Path, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "locust", *map(str, args)],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _finish(process: subprocess.Popen[str]) -> str:
    try:
        output, _ = process.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
        raise AssertionError(f"locust did not exit:\n{output}") from None
    return output


class Report:
    """What ``--json-file <prefix>`` wrote: requests and failures per (type, name). Not
    ``--csv``: Locust writes its CSV files once a second and not again at the end, so they
    miss the turns that finish while the run stops."""

    def __init__(self, prefix: Path, output: str) -> None:
        self.output = output
        entries = json.loads(Path(f"{prefix}.json").read_text())
        self.requests = {(e["method"], e["name"]): e["num_requests"] for e in entries}
        self.failures = {(e["method"], e["name"]): e["num_failures"] for e in entries}

    def count(self, kind: str, name: str) -> int:
        return self.requests.get((kind, name), 0)


def run_locust(
    tmp_path: Path,
    *args: str | Path,
    locustfile: Path = LOCUSTFILE,
    run_time: str = "1s",
    env: dict[str, str] | None = None,
) -> Report:
    """One headless run in local mode; every turn in flight at the end is let finish."""
    prefix = tmp_path / "locust"
    common = ["-f", locustfile, "--headless", "--run-time", run_time, "--stop-timeout", "10"]
    process = _locust(*common, "--json-file", prefix, "--loglevel", "WARNING", *args, cwd=tmp_path, env=env)
    output = _finish(process)
    assert process.returncode in (0, 1), output  # 1: the run had failures
    return Report(prefix, output)


def completed_and_tokens(metrics: str) -> tuple[int, int]:
    """Streams a chatsse server completed, and the tokens it streamed."""
    completed = sum(metric_value(metrics, "chatsse_streams_total", outcome=o) for o in ("stop", "length"))
    return int(completed), int(metric_value(metrics, "chatsse_stream_tokens_total"))


def test_chatsse_turns_are_reported_as_the_server_served_them(serve: Serve, tmp_path: Path) -> None:
    keys = tmp_path / "keys.json"
    _, key = create_key(keys, "load")
    _, admin = create_key(keys, "operator", admin=True)
    server = serve(keys_file=str(keys), sim_reply_tokens_min=3, sim_reply_tokens_max=12)
    args = ["ChatsseUser", "--host", server.url, "-u", "3", "-r", "3", "--chat-turns", "2"]
    report = run_locust(tmp_path, *args, "--chat-think-time", "0.05", "--chat-api-key", key)

    with httpx.Client(base_url=server.url, timeout=10) as client:
        metrics = client.get("/metrics", headers={"Authorization": f"Bearer {admin}"}).text
        listing = client.get(
            "/conversations", params={"limit": 1000}, headers={"Authorization": f"Bearer {key}"}
        )
    completed, tokens = completed_and_tokens(metrics)
    assert completed > 3, report.output  # more turns than users: conversations went on
    assert report.failures == dict.fromkeys(report.requests, 0)
    assert report.count("POST", "/chat") == completed
    assert report.count("TTFT", "/chat") == completed
    assert report.count("E2E", "/chat") == completed
    # One ITL per gap: tokens - 1 per completed turn.
    assert report.count("ITL", "/chat") == tokens - completed
    # Two turns per conversation (the last of each user's may have had one): the second
    # turn sent the conversation_id that the first one's connected event gave.
    sizes = Counter(c["message_count"] for c in listing.json()["conversations"])
    assert set(sizes) <= {2, 4}
    assert sizes[4] >= 1
    assert sizes[2] <= 3
    assert sizes[2] + 2 * sizes[4] == completed


def test_openai_protocols_count_content_chunks_as_tokens(tmp_path: Path) -> None:
    fake = FakeOpenAI(tokens_per_reply=5)
    with InProcessServer(fake.app()) as server:
        args = ["OpenAIChatUser", "OpenAIResponsesUser", "--host", server.url, "-u", "2", "-r", "2"]
        report = run_locust(tmp_path, *args, "--chat-turns", "3", "--chat-max-tokens", "50")

    completions, responses = "/v1/chat/completions", "/v1/responses"
    for name in (completions, responses):
        turns = report.count("E2E", name)
        assert turns > 0, report.output
        assert report.count("TTFT", name) == turns
        assert report.count("POST", name) == turns
        # The role-only first chunk is not a token: 5 content chunks, 4 gaps.
        assert report.count("ITL", name) == 4 * turns
    assert report.count("GET", "/v1/models") >= 1  # no --chat-model: the first listed model
    assert report.failures == dict.fromkeys(report.requests, 0)

    chats = [body for body in fake.bodies if "messages" in body]
    assert len(chats) == report.count("POST", completions)
    assert all(body["stream"] and body["stream_options"] == {"include_usage": True} for body in chats)
    assert {body["model"] for body in chats} == {"fake-model"}
    assert {body["max_tokens"] for body in chats} == {50}
    # The client resends the history: 1, 3, 5 messages for turns 1, 2, 3.
    assert {len(body["messages"]) for body in chats} == {1, 3, 5}
    chained = [body for body in fake.bodies if "input" in body]
    assert len(chained) == report.count("POST", responses)
    assert sum("previous_response_id" in body for body in chained) >= 1


FAILING_USERS = """
import json
import os

from locust import events

import chatsse.locust


@events.quitting.add_listener
def _errors(environment, **_kwargs):  # what Locust's error report lists, once the run is over
    errors = environment.runner.stats.serialize_errors().values()
    with open(os.environ["ERRORS"], "w") as file:
        json.dump([[e["method"], e["name"], e["error"], e["occurrences"]] for e in errors], file)


class TooLong(chatsse.locust.ChatsseUser):
    host = os.environ["CHATSSE_URL"]
    api_key = os.environ["GOOD_KEY"]
    message = "x" * 200
    think_time = 0.05


class WrongKey(chatsse.locust.ChatsseUser):
    host = os.environ["CHATSSE_URL"]
    api_key = os.environ["WRONG_KEY"]
    think_time = 0.05


class EngineFails(chatsse.locust.ChatsseUser):
    host = os.environ["CHATSSE_URL"]
    api_key = os.environ["GOOD_KEY"]
    think_time = 0.05


class Cut(chatsse.locust.OpenAIChatUser):
    host = os.environ["OPENAI_URL"]
    model = "fake-model"
    think_time = 0.05
"""


def test_failed_turns_are_failures_with_their_reason(serve: Serve, tmp_path: Path) -> None:
    keys = tmp_path / "keys.json"
    _, key = create_key(keys, "load")
    _, admin = create_key(keys, "operator", admin=True)
    server = serve(keys_file=str(keys), max_message_size=100, engine=FailingEngine(good_tokens=2))
    fake = FakeOpenAI(tokens_per_reply=5, truncate=True)
    locustfile = tmp_path / "failing.py"
    locustfile.write_text(FAILING_USERS)
    with InProcessServer(fake.app()) as openai_server:
        env = {"CHATSSE_URL": server.url, "OPENAI_URL": openai_server.url, "GOOD_KEY": key}
        env.update(WRONG_KEY=WRONG_KEY, ERRORS=str(tmp_path / "errors.json"))
        report = run_locust(tmp_path, "-u", "4", "-r", "4", locustfile=locustfile, env=env)
    rows = json.loads(Path(env["ERRORS"]).read_text())
    reported = {(method, name, error): count for method, name, error, count in rows}
    with httpx.Client(base_url=server.url, timeout=10) as client:
        metrics = client.get("/metrics", headers={"Authorization": f"Bearer {admin}"}).text

    chat, completions = ("POST", "/chat"), ("POST", "/v1/chat/completions")
    errors = {
        (*chat, "TurnRefused('HTTP 413 message_too_large')"): "too long",
        (*chat, "TurnRefused('HTTP 401 invalid_api_key')"): "wrong key",
        (*chat, "StreamFailed('error event: engine_error')"): "engine error",
        (*completions, "StreamCut('the stream ended without data: [DONE]')"): "cut",
    }
    assert set(reported) == set(errors), report.output
    seen = {errors[error]: count for error, count in reported.items()}
    assert all(seen.values())
    # Every turn failed, and a failed turn reports no latency.
    assert set(report.requests) == {chat, completions}
    assert report.failures == report.requests
    assert report.requests[chat] == seen["too long"] + seen["wrong key"] + seen["engine error"]
    assert report.requests[completions] == seen["cut"] == len(fake.bodies)
    # The server counted the same refusals and broken streams.
    assert metric_value(metrics, "chatsse_rejections_total", type="message_too_large") == seen["too long"]
    assert metric_value(metrics, "chatsse_streams_total", outcome="engine_error") == seen["engine error"]
    # Refused before routing: the only POSTs answered 401.
    unauthorized = metric_value(metrics, "chatsse_http_requests_total", method="POST", status="401")
    assert unauthorized == seen["wrong key"]


def test_a_bad_option_is_refused_before_the_run(tmp_path: Path) -> None:
    process = _locust("-f", LOCUSTFILE, "--headless", "--chat-turns", "0", cwd=tmp_path)
    output = _finish(process)
    assert process.returncode == 2
    assert "--chat-turns: turns must be at least 1, got '0'" in output


COUNTING_USERS = """
import os
from pathlib import Path

from locust import events
from locust.runners import WorkerRunner

from chatsse.locust import ChatsseUser

ttfts = 0


@events.request.add_listener
def _count(request_type, **_kwargs):
    global ttfts
    ttfts += request_type == "TTFT"


@events.quitting.add_listener
def _write(environment, **_kwargs):
    if isinstance(environment.runner, WorkerRunner):
        Path(os.environ["COUNTS"], str(os.getpid())).write_text(str(ttfts))
"""


def test_distributed_mode_adds_up_every_workers_turns(serve: Serve, tmp_path: Path) -> None:
    server = serve(sim_reply_tokens_min=3, sim_reply_tokens_max=12)
    locustfile, counts, prefix = tmp_path / "counting.py", tmp_path / "counts", tmp_path / "master"
    locustfile.write_text(COUNTING_USERS)
    counts.mkdir()
    port = free_port()
    master = _locust(
        *("-f", locustfile, "--master", "--master-bind-host", "127.0.0.1", "--master-bind-port", port),
        *("--expect-workers", "2", "--headless", "-u", "2", "-r", "2", "--run-time", "1s"),
        *("--stop-timeout", "10", "--host", server.url, "--chat-think-time", "0.05", "--json-file", prefix),
        cwd=tmp_path,
    )
    # "-f -": each worker takes the locustfile from the master, and writes it into its temporary
    # directory under the file's own name: a directory each, or one would import the file while
    # the other rewrites it.
    worker_args: list[Any] = ["-f", "-", "--worker", "--master-host", "127.0.0.1", "--master-port", port]
    workers = []
    for n in range(2):
        (tmp_path / f"worker{n}").mkdir()
        env = {"COUNTS": str(counts), "TMPDIR": str(tmp_path / f"worker{n}")}
        workers.append(_locust(*worker_args, cwd=tmp_path, env=env))
    try:
        output = _finish(master)
    except AssertionError:  # the master did not exit: neither will the workers
        for worker in workers:
            worker.kill()
            worker.communicate()
        raise
    for worker in workers:
        output += _finish(worker)
    assert master.returncode == 0, output

    report = Report(prefix, output)
    per_worker = [int(path.read_text()) for path in counts.iterdir()]
    assert len(per_worker) == 2, output
    assert all(per_worker), per_worker
    assert report.count("TTFT", "/chat") == sum(per_worker)
    with httpx.Client(base_url=server.url, timeout=10) as client:
        completed, _ = completed_and_tokens(client.get("/metrics").text)
    assert report.count("E2E", "/chat") == completed == sum(per_worker)
