"""One structured log line per request or stream, never per token."""

from __future__ import annotations

import json

import httpx
import pytest
from conftest import Serve
from support import chat


def _request_lines(err: str) -> list[dict[str, object]]:
    lines = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    return [line for line in lines if line.get("event") == "request"]


def test_json_log_has_one_line_per_stream_with_its_request_id(
    serve: Serve, capsys: pytest.CaptureFixture[str]
) -> None:
    server = serve(log_format="json", log_level="info")
    with httpx.Client(base_url=server.url) as client:
        result = chat(client, "log me", max_tokens=30)
        client.get("/health")
    server.stop()
    lines = _request_lines(capsys.readouterr().err)
    # One line each; the stream's line is written after its last byte, so it may follow /health.
    assert sorted(line["path"] for line in lines) == ["/chat", "/health"]
    (stream_line,) = [line for line in lines if line["path"] == "/chat"]
    assert stream_line["request_id"] == result.headers["x-request-id"]
    assert stream_line["status"] == 200
    assert stream_line["outcome"] == result.data("completed")["finish_reason"]
    assert stream_line["tokens"] == 30
    assert stream_line["events"] == len(result.events)
    assert stream_line["conversation_id"] == result.conversation_id
    assert stream_line["level"] == "info"


def test_console_format_is_not_json(serve: Serve, capsys: pytest.CaptureFixture[str]) -> None:
    server = serve(log_format="console", log_level="info")
    httpx.get(f"{server.url}/health")
    server.stop()
    err = capsys.readouterr().err
    request_lines = [line for line in err.splitlines() if "request" in line and "/health" in line]
    assert len(request_lines) == 1
    assert not request_lines[0].startswith("{")
