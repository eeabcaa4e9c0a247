"""Abuse at the edges, against real servers on loopback sockets: slow and silent request
bodies and headers, oversized headers and bodies, pathological JSON, readers that stop
reading, and CORS by default (chatsse/connection.py, chatsse/middleware.py). Clients that
misbehave are raw sockets."""

from __future__ import annotations

import asyncio
import contextlib
import json
import select
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import httpx
import pytest
from conftest import FAST, Serve
from pydantic import BaseModel
from support import metric_value, wait_for

from chatsse import Settings, create_app
from chatsse.engine import CompletionReason
from chatsse.inprocess import InProcessServer
from chatsse.models import Message
from chatsse.processes import GunicornServer

MODEL = "simulated"
# A valid request body for each JSON front (those under /v1/ answer errors in OpenAI's shape).
FRONTS = {
    "/chat": {"message": "hello"},
    "/v1/chat/completions": {"model": MODEL, "messages": [{"role": "user", "content": "hello"}]},
    "/v1/responses": {"model": MODEL, "input": "hello"},
}
SLACK = 2.0  # seconds a bound may be late by on a busy machine (the sweep's own lag is < 1 s)


def error_type(path: str, body: dict[str, Any]) -> str:
    """The error type of a JSON error body, checking it has its front's shape."""
    error = body["error"]
    if path.startswith("/v1/"):
        assert set(error) == {"message", "type", "param", "code"}  # OpenAI's
        return str(error["code"])
    assert set(error) <= {"type", "message", "details"}  # chatsse's
    return str(error["type"])


# --- raw HTTP/1.1 over a socket -----------------------------------------------------------------


def connect(server: InProcessServer | GunicornServer, *, rcvbuf: int | None = None) -> socket.socket:
    url = server.url.removeprefix("http://")
    host, port = url.rsplit(":", 1)
    sock = socket.socket()
    if rcvbuf is not None:  # before connecting, so the window is small from the start
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(10)
    sock.connect((host, int(port)))
    return sock


def head(method: str, path: str, *lines: bytes, length: int | None = None) -> bytes:
    fields = [b"Host: x", b"Content-Type: application/json", *lines]
    if length is not None:
        fields.append(b"Content-Length: %d" % length)
    return f"{method} {path} HTTP/1.1\r\n".encode() + b"".join(f + b"\r\n" for f in fields) + b"\r\n"


def read_to_close(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            data += chunk
    return data


def read_response(sock: socket.socket) -> bytes:
    """One response with a Content-Length, on a connection the server keeps open."""
    data = b""
    while b"\r\n\r\n" not in data or len(parse(data)[2]) < int(parse(data)[1]["content-length"]):
        chunk = sock.recv(65536)
        assert chunk, f"the server closed the connection after {data!r}"
        data += chunk
    return data


def parse(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body of one response with a Content-Length."""
    head_part, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head_part.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, body[: int(headers.get("content-length", len(body)))]


def trickle(sock: socket.socket, data: bytes, every: float = 0.2) -> float:
    """Send ``data`` a byte at a time, ``every`` seconds apart, until the server answers;
    the seconds that took."""
    started = time.monotonic()
    for byte in data:
        readable, _, _ = select.select([sock], [], [], every)
        if readable:
            break
        sock.sendall(bytes([byte]))
    else:
        select.select([sock], [], [], 30)
    return time.monotonic() - started


def open_streams(url: str) -> int:
    return int(httpx.get(f"{url}/health").json()["this_worker"]["open_streams"])


@pytest.fixture(scope="module")
def shared() -> Iterator[InProcessServer]:
    """One server with the default limits (a 100 KiB body), for the cases that send one
    request each and check that the server goes on serving."""
    settings = Settings(_env_file=None, **FAST)  # type: ignore[call-arg]
    with InProcessServer(create_app(settings)) as server:
        yield server


# --- an app with an ordinary FastAPI route that parses a JSON body ------------------------------


class Echo(BaseModel):
    text: str


@pytest.fixture
def fastapi_route() -> Iterator[Callable[..., InProcessServer]]:
    """A chatsse app with one more route, ``POST /echo``, declared on FastAPI the ordinary way
    (chatsse's own JSON fronts are direct endpoints that FastAPI's routing never sees)."""
    servers: list[InProcessServer] = []

    def start(**overrides: Any) -> InProcessServer:
        app = create_app(Settings(_env_file=None, **{**FAST, **overrides}))  # type: ignore[call-arg]

        @app.post("/echo")
        async def echo(body: Echo) -> dict[str, str]:
            return {"text": body.text}

        servers.append(InProcessServer(app).start())
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


# --- 1. a slow or silent body ------------------------------------------------------------------


@pytest.mark.parametrize("path", [*FRONTS, "/echo"])
def test_a_body_trickled_byte_by_byte_is_answered_408_in_time_and_the_connection_closed(
    serve: Serve, fastapi_route: Callable[..., InProcessServer], path: str
) -> None:
    timeout = 0.5
    server = fastapi_route(body_timeout=timeout) if path == "/echo" else serve(body_timeout=timeout)
    with connect(server) as sock:
        sock.sendall(head("POST", path, length=200))
        took = trickle(sock, b"x" * 200)  # 40 s at this pace
        status, headers, body = parse(read_to_close(sock))  # the server closed the connection
    assert status == 408
    assert headers["connection"] == "close"
    assert error_type(path, json.loads(body)) == "request_timeout"
    assert timeout <= took < timeout + SLACK
    assert httpx.get(f"{server.url}/health").status_code == 200


@pytest.mark.parametrize("path", ["/chat", "/v1/responses", "/echo"])
def test_a_body_that_stops_coming_is_answered_408_in_time(
    serve: Serve, fastapi_route: Callable[..., InProcessServer], path: str
) -> None:
    timeout = 0.5
    server = fastapi_route(body_timeout=timeout) if path == "/echo" else serve(body_timeout=timeout)
    with connect(server) as sock:
        started = time.monotonic()
        sock.sendall(head("POST", path, length=200) + b'{"mess')  # and nothing more
        status, _, body = parse(read_to_close(sock))
        took = time.monotonic() - started
    assert status == 408
    assert error_type(path, json.loads(body)) == "request_timeout"
    assert timeout <= took < timeout + SLACK
    text = httpx.get(f"{server.url}/metrics").text
    assert metric_value(text, "chatsse_http_requests_total", method="POST", route=path, status="408") == 1


def test_a_body_that_arrives_in_time_is_served(serve: Serve) -> None:
    server = serve(body_timeout=0.5)
    body = json.dumps({"message": "slow but in time", "max_tokens": 2}).encode()
    with connect(server) as sock:
        sock.sendall(head("POST", "/chat", b"Connection: close", length=len(body)))
        for i in range(0, len(body), 20):  # in parts, 0.1 s apart: 0.3 s in all
            sock.sendall(body[i : i + 20])
            time.sleep(0.1)
        raw = read_to_close(sock)
    assert raw.startswith(b"HTTP/1.1 200")
    assert b"event: completed" in raw


# --- 1. slow or incomplete headers --------------------------------------------------------------


@pytest.mark.parametrize("path", ["/health", "/v1/models"])  # chatsse's error shape, OpenAI's
def test_headers_that_never_finish_are_answered_408_and_the_connection_closed(
    serve: Serve, path: str
) -> None:
    timeout = 0.5
    server = serve(header_timeout=timeout)
    with connect(server) as sock:
        started = time.monotonic()
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nX-Slow: ".encode())  # never ends
        raw = read_to_close(sock)
        took = time.monotonic() - started
    status, headers, body = parse(raw)
    assert status == 408
    assert headers["connection"] == "close"
    assert error_type(path, json.loads(body)) == "request_timeout"
    assert timeout <= took < timeout + SLACK
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_headers_sent_a_line_at_a_time_are_cut_at_the_header_timeout(serve: Serve) -> None:
    timeout = 0.5
    server = serve(header_timeout=timeout)
    lines = b"".join(b"X-Drip-%d: 1\r\n" % i for i in range(100))
    with connect(server) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\n")
        took = trickle(sock, lines, every=0.05)  # each byte keeps the connection busy
        status, _, _ = parse(read_to_close(sock))
    assert status == 408
    assert timeout <= took < timeout + SLACK


def test_a_connection_that_sends_nothing_is_closed_at_the_header_timeout(serve: Serve) -> None:
    timeout = 0.5
    server = serve(header_timeout=timeout, keepalive=60)  # the keep-alive bound is not the one at work
    with connect(server) as sock:
        started = time.monotonic()
        assert read_to_close(sock) == b""  # closed, without an answer to a request never made
        took = time.monotonic() - started
    assert timeout <= took < timeout + SLACK


def test_an_idle_keep_alive_connection_is_left_to_the_keepalive_setting(serve: Serve) -> None:
    server = serve(header_timeout=0.3, keepalive=3)
    with connect(server) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(1.0)  # answered, then idle for three header timeouts: still open
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert read_to_close(sock).count(b"HTTP/1.1 200 OK\r\n") == 2


def test_a_body_the_app_did_not_read_is_dropped_for_the_header_timeout_then_the_connection_closed(
    serve: Serve,
) -> None:
    timeout = 0.5
    server = serve(header_timeout=timeout)
    with connect(server) as sock:
        sock.sendall(head("POST", "/conversations", length=200))  # a route that reads no body
        started = time.monotonic()
        sock.sendall(b"x")
        assert read_response(sock).startswith(b"HTTP/1.1 201")
        for _ in range(30):  # 6 s of body at this pace, keeping the connection busy
            with contextlib.suppress(OSError):
                sock.sendall(b"x")
            readable, _, _ = select.select([sock], [], [], 0.2)
            if readable:
                break
        assert read_to_close(sock) == b""
        took = time.monotonic() - started
    assert timeout <= took < timeout + SLACK


def test_a_connection_idle_after_an_unread_body_ended_is_closed_at_the_header_timeout(serve: Serve) -> None:
    # The body's bytes cancel uvicorn's keep-alive timeout, and nothing arms it again: uvicorn
    # 0.54 alone keeps this connection open for ever.
    timeout = 0.5
    server = serve(header_timeout=timeout, keepalive=60)
    with connect(server) as sock:
        sock.sendall(head("POST", "/conversations", length=5))
        assert read_response(sock).startswith(b"HTTP/1.1 201")
        sock.sendall(b"abcde")  # the body the route did not read ends; then nothing
        started = time.monotonic()
        assert read_to_close(sock) == b""
        took = time.monotonic() - started
    assert took < timeout + SLACK


# --- 3. header and body sizes --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "lines"),
    [
        ("one 64 KiB header", [b"X-Big: " + b"a" * 65536]),
        ("one 1 MiB header", [b"X-Big: " + b"a" * (1 << 20)]),
        ("200 headers", [b"X-H%d: v" % i for i in range(200)]),
        ("20 KiB of 1 KiB headers", [b"X-H%d: " % i + b"a" * 1024 for i in range(20)]),
    ],
)
@pytest.mark.parametrize("path", ["/chat", "/v1/chat/completions"])
def test_oversized_headers_are_refused_431_and_the_server_keeps_serving(
    shared: InProcessServer, name: str, lines: list[bytes], path: str
) -> None:
    server = shared
    body = json.dumps(FRONTS[path]).encode()
    with connect(server) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # refused before its end
            sock.sendall(head("POST", path, *lines, length=len(body)) + body)
        status, headers, raw = parse(read_to_close(sock))
    assert status == 431
    assert headers["connection"] == "close"
    assert error_type(path, json.loads(raw)) == "headers_too_large"
    with httpx.Client(base_url=server.url) as client:
        assert client.get("/health").status_code == 200
        assert client.post(path, json={**FRONTS[path], "max_tokens": 2}).status_code == 200


def test_headers_within_the_limits_and_a_large_body_read_with_them_are_served(serve: Serve) -> None:
    server = serve(max_header_size=16384, max_headers=100)
    lines = [b"X-H%d: " % i + b"a" * 100 for i in range(90)]  # 90 fields, about 10 KiB
    body = json.dumps({"message": "m" * 16000, "max_tokens": 2}).encode()  # read in one go with the head
    with connect(server) as sock:
        sock.sendall(head("POST", "/chat", *lines, b"Connection: close", length=len(body)) + body)
        raw = read_to_close(sock)
    assert raw.startswith(b"HTTP/1.1 200"), raw[:200]


def test_the_header_limits_are_settings(serve: Serve) -> None:
    server = serve(max_header_size=2048, max_headers=20)
    with httpx.Client(base_url=server.url) as client:
        assert client.get("/health", headers={"X-Pad": "a" * 3000}).status_code == 431
        assert client.get("/health", headers={f"X-H{i}": "v" for i in range(25)}).status_code == 431
        assert client.get("/health", headers={f"X-H{i}": "v" for i in range(10)}).status_code == 200


def test_gunicorn_workers_apply_the_same_limits() -> None:
    env = {
        "CHATSSE_LOG_LEVEL": "warning",
        "CHATSSE_HEADER_TIMEOUT": "0.5",
        "CHATSSE_MAX_HEADER_SIZE": "8192",
    }
    with GunicornServer(workers=1, store="memory", env=env) as server:
        with connect(server) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 10_000 + b"\r\n\r\n")
            assert parse(read_to_close(sock))[0] == 431
        with connect(server) as sock:
            started = time.monotonic()
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
            assert parse(read_to_close(sock))[0] == 408
            assert 0.5 <= time.monotonic() - started < 0.5 + SLACK
        assert httpx.get(f"{server.url}/health").status_code == 200


def _chunks(total: int, size: int = 1000) -> Iterator[bytes]:
    for _ in range(total // size):
        yield b"x" * size


@pytest.mark.parametrize("path", ["/v1/responses", "/conversations"])
def test_a_declared_length_over_the_body_limit_is_413_before_it_is_read(serve: Serve, path: str) -> None:
    server = serve(max_message_size=100)  # the body limit is 6 x that plus 4 KiB: 4696 bytes
    with connect(server) as sock:
        sock.sendall(head("POST", path, length=10_000_000))  # and no body
        status, _, body = parse(read_response(sock))
    assert status == 413
    assert error_type(path, json.loads(body)) == "request_too_large"


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/responses"])
def test_a_chunked_body_over_the_body_limit_is_413(serve: Serve, path: str) -> None:
    server = serve(max_message_size=100)
    response = httpx.post(
        f"{server.url}{path}", content=_chunks(100_000), headers={"content-type": "application/json"}
    )
    assert response.status_code == 413
    assert error_type(path, response.json()) == "request_too_large"


def test_a_chunked_body_to_a_route_that_takes_none_is_never_buffered(serve: Serve) -> None:
    server = serve(max_message_size=100)
    response = httpx.post(f"{server.url}/conversations", content=_chunks(100_000))
    assert response.status_code == 201  # answered without reading it; uvicorn drops what follows
    assert httpx.get(f"{server.url}/conversations").json()["total"] == 1


# --- 4. pathological JSON ------------------------------------------------------------------------

DEEP = 50_000  # levels: 100 KB of brackets, within the default body limit (100 KiB)
NUMBER = {"/chat": "max_tokens", "/v1/chat/completions": "max_tokens", "/v1/responses": "max_output_tokens"}
TEXT = {"/chat": "message", "/v1/chat/completions": "model", "/v1/responses": "input"}


def bad_json(path: str, case: str) -> bytes:
    """A body for ``path`` with one pathology (the rest of it valid)."""
    valid = json.dumps(FRONTS[path])[:-1]  # without its closing brace
    if case == "deep array":
        return b"[" * DEEP + b"]" * DEEP
    if case == "deep field":
        return f'{valid}, "x": '.encode() + b"[" * DEEP + b"]" * DEEP + b"}"
    if case == "1e999999":
        return f'{valid}, "{NUMBER[path]}": 1e999999}}'.encode()
    if case == "5000-digit integer":
        return f'{valid}, "{NUMBER[path]}": {"9" * 5000}}}'.encode()
    assert case == "90 KB string"
    return json.dumps({**FRONTS[path], TEXT[path]: "m" * 90_000}).encode()


def refusal(path: str, case: str) -> tuple[int, str]:
    """The status and error type each front answers a pathology with."""
    if case == "90 KB string":  # a message over CHATSSE_MAX_MESSAGE_SIZE; a model nobody serves
        return (404, "model_not_found") if path == "/v1/chat/completions" else (413, "message_too_large")
    return (422, "invalid_request") if path == "/chat" else (400, "invalid_parameter")


CASES = ["deep array", "deep field", "1e999999", "5000-digit integer", "90 KB string"]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("path", list(FRONTS))
def test_pathological_json_is_refused_cheaply_in_the_fronts_shape(
    shared: InProcessServer, path: str, case: str
) -> None:
    body = bad_json(path, case)
    assert len(body) <= 6 * 16_384 + 4096  # within the default body limit
    started = time.monotonic()
    response = httpx.post(f"{shared.url}{path}", content=body, headers={"content-type": "application/json"})
    took = time.monotonic() - started
    status, kind = refusal(path, case)
    assert response.status_code == status, response.text[:300]
    assert error_type(path, response.json()) == kind
    if case == "1e999999":  # parsed (as infinity), then refused as the field it is
        assert NUMBER[path] in response.text
    assert took < 5  # parsing stops at the first problem; nothing is quadratic
    assert httpx.get(f"{shared.url}/health").status_code == 200


@pytest.mark.parametrize(
    "body",
    [
        b'{"text": ' + b"[" * DEEP + b"]" * DEEP + b"}",
        b'{"text": 1e999999}',
        b'{"text": ' + b"9" * 5000 + b"}",
        b"[" * DEEP,
    ],
    ids=["deep", "1e999999", "5000 digits", "unclosed"],
)
def test_pathological_json_on_an_ordinary_fastapi_route_is_a_4xx(
    fastapi_route: Callable[..., InProcessServer], body: bytes
) -> None:
    server = fastapi_route()
    response = httpx.post(f"{server.url}/echo", content=body, headers={"content-type": "application/json"})
    assert response.status_code in (400, 422), response.text[:300]
    assert set(response.json()["error"]) >= {"type", "message"}


# --- 2. a reader that stops reading ------------------------------------------------------------


class _BigTokens:
    """An engine whose replies are 2000 tokens of 16 KiB, as fast as they can be written."""

    name = MODEL

    def generate(self, messages: Sequence[Message], *, max_tokens: int, options: Any = None) -> Any:
        return _Generation(min(2000, max_tokens))

    async def aclose(self) -> None:
        return None


class _Generation:
    def __init__(self, tokens: int) -> None:
        self.tokens = tokens
        self.prompt_tokens = 1
        self.completion_tokens = 0
        self.finish_reason: CompletionReason | None = None

    async def start(self) -> None:
        return None

    def __aiter__(self) -> _Generation:
        return self

    async def __anext__(self) -> list[str]:
        if self.completion_tokens == self.tokens:
            self.finish_reason = "stop"
            raise StopAsyncIteration
        self.completion_tokens += 1
        await asyncio.sleep(0)
        return ["x" * 16384]

    async def aclose(self) -> None:
        return None


@pytest.mark.parametrize("path", ["/v1/responses", "/v1/chat/completions"])
def test_a_stalled_reader_is_cut_within_the_write_timeout_with_its_buffer_bounded(
    serve: Serve, path: str
) -> None:
    write_timeout = 0.6
    # A 10 s resume window (the /v1/responses stream is recorded and resumable): a stalled
    # writer is no client that left, and is cut at the write timeout all the same.
    server = serve(engine=_BigTokens(), write_timeout=write_timeout, resume_window=10, max_reply_tokens=2000)
    body = json.dumps({**FRONTS[path], "stream": True}).encode()
    with connect(server, rcvbuf=4096) as sock:
        sock.sendall(head("POST", path, length=len(body)) + body)
        assert sock.recv(1024).startswith(b"HTTP/1.1 200")
        started = time.monotonic()
        peak = 0

        def cut() -> bool:
            nonlocal peak
            peak = max([peak, *server.write_buffers()])
            return open_streams(server.url) == 0

        # The client reads nothing more: the kernel's buffers fill, the transport's buffer
        # reaches its high-water mark and each send waits; the watchdog closes the connection.
        assert wait_for(cut, write_timeout + 2 + SLACK, interval=0.05)
        took = time.monotonic() - started
        sock.settimeout(5)
        read_to_close(sock)  # the server closed the connection
    assert took < write_timeout + 2 + SLACK
    # Flow control: at most the 64 KiB high-water mark and the one event that crossed it.
    assert 0 < peak <= 64 * 1024 + 17 * 1024 + 1024
    text = httpx.get(f"{server.url}/metrics").text
    assert metric_value(text, "chatsse_streams_total", outcome="write_timeout") == 1
    if path == "/v1/responses":  # stored, as what was sent before the cut
        (listed,) = httpx.get(f"{server.url}/conversations").json()["conversations"]
        messages = httpx.get(f"{server.url}/conversations/{listed['id']}").json()["messages"]
        assert messages[-1]["finish_reason"] == "interrupted"


# --- 5. CORS denies by default ------------------------------------------------------------------

PREFLIGHT = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}


def test_without_cors_origins_no_origin_is_allowed(serve: Serve) -> None:
    server = serve()
    with httpx.Client(base_url=server.url) as client:
        preflight = client.options("/chat", headers={"Origin": "https://evil.example", **PREFLIGHT})
        assert "access-control-allow-origin" not in preflight.headers
        assert preflight.status_code == 405  # no CORS middleware: OPTIONS is no method of /chat
        simple = client.get("/conversations", headers={"Origin": "https://evil.example"})
        assert simple.status_code == 200
        assert not [h for h in simple.headers if h.startswith("access-control-")]


def test_with_a_cors_origin_only_that_origin_is_allowed(serve: Serve) -> None:
    server = serve(cors_origins=["https://app.example"])
    with httpx.Client(base_url=server.url) as client:
        allowed = client.options("/chat", headers={"Origin": "https://app.example", **PREFLIGHT})
        assert allowed.headers["access-control-allow-origin"] == "https://app.example"
        other = client.options("/chat", headers={"Origin": "https://evil.example", **PREFLIGHT})
        assert other.status_code == 400  # Starlette's CORS middleware: "Disallowed CORS origin"
        assert "access-control-allow-origin" not in other.headers
        simple = client.get("/conversations", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in simple.headers
