"""The registry of running servers: a server whose last reference is gone is still stopped,
and a server started under a name replaces the one running under it (a notebook cell rerun)."""

from __future__ import annotations

import gc
import os

import httpx
import pytest

from chatsse import Settings, create_app, registry
from chatsse.inprocess import InProcessServer
from chatsse.processes import UvicornServer

ENV = {"CHATSSE_SIM_TTFT_MS": "1", "CHATSSE_SIM_TOKEN_INTERVAL_MS": "1", "CHATSSE_LOG_LEVEL": "warning"}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:  # a zombie has exited
        return stat.read().split(")")[-1].split()[0] != "Z"


def test_stop_all_stops_a_child_whose_last_reference_is_gone() -> None:
    server = UvicornServer(env=ENV).start()
    pid, url = server.pid, server.url
    del server
    gc.collect()
    assert _alive(pid)  # its own session: nothing but the registry can stop it now
    assert httpx.get(f"{url}/health").status_code == 200
    (orphan,) = [s for s in registry.running() if isinstance(s, UvicornServer) and s.url == url]
    orphan.stop()
    assert not _alive(pid)
    assert orphan not in registry.running()


def test_stop_all_stops_every_server_still_running() -> None:
    app = create_app(Settings(log_level="warning"))
    servers = [UvicornServer(env=ENV).start(), InProcessServer(app).start()]
    assert registry.stop_all() >= 2  # (and any other a test left running)
    assert registry.running() == []
    process = servers[0].process
    assert process is not None
    assert process.poll() is not None
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{servers[1].url}/health", timeout=2)


def test_starting_a_named_server_stops_the_one_running_under_that_name() -> None:
    first = UvicornServer(env=ENV, name="demo").start()
    other = UvicornServer(env=ENV, name="other").start()
    second = UvicornServer(env=ENV, name="demo").start()
    try:
        assert first.process is not None
        assert first.process.poll() is not None  # stopped
        assert other.process is not None
        assert other.process.poll() is None  # another name: untouched
        assert httpx.get(f"{second.url}/health").status_code == 200
        mine = [s for s in registry.running() if s in (first, other, second)]
        assert mine == [other, second]
    finally:
        other.stop()
        second.stop()
    assert not {first, other, second} & set(registry.running())


def test_in_process_servers_are_registered_too() -> None:
    settings = Settings(log_level="warning")
    first = InProcessServer(create_app(settings), name="demo").start()
    url = first.url
    second = InProcessServer(create_app(settings), name="demo").start()
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{url}/health", timeout=2)  # the first no longer listens
    assert httpx.get(f"{second.url}/health").status_code == 200
    second.stop()
    assert not {first, second} & set(registry.running())
