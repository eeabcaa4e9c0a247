"""nginx in front of chatsse (chatsse/proxy.py): a real nginx, started on a free port, proxying a
real chatsse server. What a buffering proxy does to a stream is asserted on its shape, measured
in one run (how many reads brought the tokens, how their arrivals spread over the reply's own
duration), never on absolute times.

Without nginx these tests skip, naming it, unless ``CHATSSE_REQUIRE_BINARIES=1`` (CI) makes a
missing binary a failure.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import httpx
import pytest
from conftest import Serve

from chatsse import registry
from chatsse.processes import ServerProcessError
from chatsse.proxy import NGINX_MISSING, NginxServer, NginxSettings, find_nginx
from chatsse.streamclient import StreamView, read_chat

GZIP = ("gzip on", "gzip_types text/event-stream")
# A reply of 60 tokens, 20 ms apart: 1.2 s, long enough for its arrivals to spread.
PACED = {"sim_ttft_ms": 20, "sim_token_interval_ms": 20, "sim_jitter": 0, "sim_reply_tokens_min": 60,
         "sim_reply_tokens_max": 60}  # fmt: skip


def nginx_binary() -> str:
    """The nginx binary; skips the test without one (fails under CHATSSE_REQUIRE_BINARIES=1)."""
    binary = find_nginx()
    if binary is None:
        if os.environ.get("CHATSSE_REQUIRE_BINARIES") == "1":
            pytest.fail(NGINX_MISSING)
        pytest.skip(NGINX_MISSING)
    return binary


def spread(view: StreamView) -> float:
    """The time from the first token's arrival to the last's."""
    times = view.token_times
    return times[-1] - times[0]


# --- the configuration, without nginx ------------------------------------------------------------


def test_the_configuration_has_what_a_stream_needs(tmp_path: Path) -> None:
    settings = NginxSettings(read_timeout=90)
    text = settings.config(directory=tmp_path, listen="127.0.0.1:8080", upstream="127.0.0.1:8000")
    for line in (
        "proxy_http_version 1.1;",
        'proxy_set_header Connection "";',
        "proxy_buffering off;",
        "proxy_read_timeout 90000ms;",
        "server 127.0.0.1:8000;",
        "listen 127.0.0.1:8080;",
        f"pid {tmp_path / 'nginx.pid'};",
        f"proxy_temp_path {tmp_path / 'proxy'};",
    ):
        assert line in text
    assert "proxy_ignore_headers" not in text
    assert "gzip" not in text


def test_buffering_the_ignored_header_and_more_directives_are_rendered(tmp_path: Path) -> None:
    settings = NginxSettings(
        buffering=True,
        ignore_accel_buffering=True,
        http_version="1.0",
        directives=["gzip on;", "gzip_types text/event-stream"],
    )
    text = settings.config(directory=tmp_path, listen="127.0.0.1:8080", upstream="127.0.0.1:8000")
    assert "proxy_buffering on;" in text
    assert "proxy_ignore_headers X-Accel-Buffering;" in text
    assert "proxy_http_version 1.0;" in text
    assert "proxy_set_header Connection" not in text  # no kept-alive upstream connections on 1.0
    assert "gzip on;\n" in text
    assert "gzip_types text/event-stream;\n" in text


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"http_version": "2"}, "http_version"),
        ({"read_timeout": 0}, "positive"),
        ({"read_timeout": float("nan")}, "positive"),
    ],
)
def test_a_bad_setting_is_refused_when_the_server_is_made(options: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        NginxServer("http://127.0.0.1:8000", **options)  # type: ignore[arg-type]


def test_a_setting_nginx_server_does_not_know_is_refused() -> None:
    with pytest.raises(TypeError, match="buffer"):
        NginxServer("http://127.0.0.1:8000", buffer=True)


@pytest.mark.parametrize("upstream", ["127.0.0.1:8000", "https://127.0.0.1:8000", "http://127.0.0.1"])
def test_an_upstream_that_is_not_http_host_port_is_refused(upstream: str) -> None:
    with pytest.raises(ValueError, match="upstream"):
        NginxServer(upstream)


def test_without_nginx_the_start_fails_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("chatsse.proxy.find_nginx", lambda: None)
    proxy = NginxServer("http://127.0.0.1:8000")
    with pytest.raises(ServerProcessError, match="nginx not installed"):
        proxy.start()
    assert proxy not in registry.running()
    proxy.close()


# --- a real nginx ---------------------------------------------------------------------------------


def test_nginx_proxies_every_path_and_stops_clean(serve: Serve) -> None:
    server = serve()
    with NginxServer(server.url, binary=nginx_binary()) as proxy:
        assert proxy in registry.running()
        health = httpx.get(f"{proxy.url}/health").json()
        assert health["status"] == "ok"
        assert httpx.post(f"{proxy.url}/chat", json={"message": ""}).status_code == 422  # chatsse's answer
        directory = proxy.directory
        assert directory is not None
        assert (directory / "nginx.conf").read_text() == proxy.config()
        assert '"GET /health HTTP/1.1" 200' in proxy.access_log()
        proxy.stop()
        assert proxy not in registry.running()
        assert not directory.exists()
        assert proxy.process is not None
        assert proxy.process.returncode is not None


def test_a_named_proxy_replaces_the_one_running_under_its_name(serve: Serve) -> None:
    server = serve()
    binary = nginx_binary()
    with (
        NginxServer(server.url, binary=binary, name="front") as first,
        NginxServer(server.url, binary=binary, name="front") as second,
    ):
        assert first.process is not None
        assert first.process.poll() is not None
        assert httpx.get(f"{second.url}/health").status_code == 200
        assert first not in registry.running()


def test_buffering_with_gzip_bunches_the_tokens_and_chatsse_header_or_buffering_off_keeps_them_live(
    serve: Serve,
) -> None:
    server = serve(**PACED)
    binary = nginx_binary()
    proxies = {
        "off": NginxServer(server.url, binary=binary, ignore_accel_buffering=True, directives=GZIP),
        "on": NginxServer(
            server.url, binary=binary, buffering=True, ignore_accel_buffering=True, directives=GZIP
        ),
        "header": NginxServer(server.url, binary=binary, buffering=True, directives=GZIP),
    }
    try:
        urls = {"direct": server.url} | {name: proxy.start().url for name, proxy in proxies.items()}

        async def read_all() -> list[StreamView]:
            return await asyncio.gather(
                *(read_chat(url, "How do proxies buffer?", max_tokens=60) for url in urls.values())
            )

        views = dict(zip(urls, asyncio.run(read_all()), strict=True))
    finally:
        for proxy in proxies.values():
            proxy.close()
    direct = views["direct"]
    assert len(direct.tokens) == 60
    assert direct.token_reads >= 30
    for name, view in views.items():
        assert view.ending == "completed", name
        assert view.text == direct.text, name
    for name in ("on", "off", "header"):
        assert views[name].headers.get("content-encoding") == "gzip", name
    # Buffering and gzip, the header ignored: nginx holds the compressed reply to its end.
    assert views["on"].token_reads <= 3
    assert spread(views["on"]) < 0.2 * spread(direct)
    # No buffering, or chatsse's X-Accel-Buffering honoured: the tokens arrive as they are made.
    for name in ("off", "header"):
        assert views[name].token_reads >= len(direct.tokens) // 2, name
        assert spread(views[name]) > 0.5 * spread(direct), name


def test_a_silence_longer_than_the_read_timeout_is_cut_unless_keepalive_comments_fill_it(
    serve: Serve,
) -> None:
    slow_start = {"sim_ttft_ms": 1500, "sim_token_interval_ms": 5, "sim_reply_tokens_max": 20}
    quiet = serve(**slow_start)  # keepalive after 15 s
    chatty = serve(sse_keepalive_interval=0.2, **slow_start)
    binary = nginx_binary()
    with (
        NginxServer(quiet.url, binary=binary, read_timeout=0.5) as cut,
        NginxServer(chatty.url, binary=binary, read_timeout=0.5) as kept,
    ):

        async def read_both() -> list[StreamView]:
            return await asyncio.gather(read_chat(cut.url, "hello?"), read_chat(kept.url, "hello?"))

        silent, chatted = asyncio.run(read_both())
        assert silent.ending == "closed"
        assert not silent.tokens
        assert "upstream timed out" in cut.logs()
        assert chatted.ending == "completed"
        assert chatted.tokens
