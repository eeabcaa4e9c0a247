"""The ``chatsse`` command as a user runs it: a real process."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import httpx
from support import chat, wait_for

from chatsse.serving import GC_THRESHOLDS


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHATSSE_")}
    return {**env, **extra}


def test_serve_runs_the_server_and_logs_json(tmp_path: object) -> None:
    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "chatsse", "serve", "--port", str(port)],
        env=_env(CHATSSE_LOG_FORMAT="json", CHATSSE_SIM_TOKEN_INTERVAL_MS="1", CHATSSE_SIM_TTFT_MS="1"),
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"

        def healthy() -> bool:
            try:
                return httpx.get(f"{url}/health").status_code == 200
            except httpx.TransportError:
                return False

        assert wait_for(healthy, 20, 0.1)
        with httpx.Client(base_url=url) as client:
            result = chat(client, "from the command line")
            gc_state = client.get("/stats").json()["this_worker"]["gc"]
        assert result.data("completed")["content"] == "".join(result.deltas)
        assert gc_state["thresholds"] == list(GC_THRESHOLDS)  # a server process: collector tuned
        assert gc_state["frozen_objects"] > 1000
    finally:
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=20)
    assert process.returncode == 0
    logged = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    chats = [line for line in logged if line.get("path") == "/chat"]
    assert len(chats) == 1
    assert chats[0]["request_id"] == result.headers["x-request-id"]


def test_invalid_setting_fails_at_start_naming_the_variable() -> None:
    process = subprocess.run(
        [sys.executable, "-m", "chatsse", "serve"],
        env=_env(CHATSSE_MAX_HISTORY_LENGTH="zero"),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert process.returncode == 2
    assert "CHATSSE_MAX_HISTORY_LENGTH" in process.stderr
    assert "'zero'" in process.stderr


def test_serve_help_lists_options() -> None:
    process = subprocess.run(
        [sys.executable, "-m", "chatsse", "serve", "--help"], capture_output=True, text=True, timeout=30
    )
    assert process.returncode == 0
    for option in ("--host", "--port", "--reload"):
        assert option in process.stdout
