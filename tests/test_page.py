"""The built-in chat page in a real headless Chromium, against the gunicorn-served app."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import Serve
from support import require_binary

from chatsse.processes import GunicornServer

CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]  # fmt: skip
ENV = {
    "CHATSSE_SIM_TTFT_MS": "50",
    "CHATSSE_SIM_TOKEN_INTERVAL_MS": "25",
    "CHATSSE_SIM_JITTER": "0",
    "CHATSSE_SIM_REPLY_TOKENS_MIN": "30",
    "CHATSSE_SIM_REPLY_TOKENS_MAX": "40",
    "CHATSSE_LOG_LEVEL": "warning",
}
XSS = "<img src=x onerror=alert(1)>"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GunicornServer]:
    store = f"sqlite:///{tmp_path_factory.mktemp('page') / 'c.db'}"
    with GunicornServer(workers=2, store=store, env=ENV) as s:
        yield s


@contextlib.contextmanager
def browser_page(url: str, timeout_ms: int = 15_000) -> Iterator[Any]:
    """A page of a real headless Chromium, opened at ``url``."""
    chromium = require_binary("chromium", "apt-get install chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.set_default_timeout(timeout_ms)
            page.goto(url)
            yield page
        finally:
            browser.close()


@pytest.fixture
def page(server: GunicornServer, tmp_path: Path) -> Iterator[Any]:
    with browser_page(server.url) as page:
        yield page


def _send(page: Any, text: str) -> list[int]:
    """Send a message; returns the reply's text lengths seen while it streamed."""
    before = page.locator(".message.assistant").count()
    page.fill("#input", text)
    page.click("#send")
    reply = page.locator(".message.assistant").nth(before)
    lengths = []
    while reply.get_attribute("data-state") in (None, "streaming"):
        lengths.append(len(reply.locator(".content").text_content() or ""))
        page.wait_for_timeout(15)
    assert reply.get_attribute("data-state") == "complete"
    return lengths


def test_reply_streams_into_the_page_and_turns_continue(page: Any, server: GunicornServer) -> None:
    lengths = _send(page, "Hello, how does streaming work?")
    assert len({n for n in lengths if n > 0}) >= 3  # the text grew while it streamed
    assert page.text_content("#status") == "idle"
    conversation_id = page.text_content("#conversation-id")
    assert conversation_id

    _send(page, "And a second turn?")
    assert page.text_content("#conversation-id") == conversation_id
    stored = httpx.get(f"{server.url}/conversations/{conversation_id}").json()["messages"]
    assert [m["role"] for m in stored] == ["user", "assistant"] * 2
    shown = page.locator(".message.assistant .content").all_text_contents()
    assert shown == [m["content"] for m in stored if m["role"] == "assistant"]


def test_markup_in_messages_is_shown_as_text(page: Any) -> None:
    dialogs: list[str] = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    _send(page, XSS)
    user_bubble = page.locator(".message.user .content").last
    assert user_bubble.text_content() == XSS
    assert page.locator("#messages img").count() == 0
    assert XSS in (page.locator(".message.assistant .content").last.text_content() or "")
    page.wait_for_timeout(200)
    assert dialogs == []


def test_unknown_conversation_error_is_shown(page: Any, server: GunicornServer) -> None:
    _send(page, "first")
    conversation_id = page.text_content("#conversation-id")
    assert httpx.delete(f"{server.url}/conversations/{conversation_id}").status_code == 204
    page.fill("#input", "after delete")
    page.click("#send")
    page.wait_for_function("document.querySelector('#messages').innerText.includes('404')")
    assert page.text_content("#conversation-id") == ""


def _expected_reply(history: list[str]) -> str:
    """What the simulated engine answers to this user/assistant alternation (server settings)."""
    from chatsse.engine import SimulatedEngine
    from chatsse.models import Message

    roles = ["user", "assistant"]
    messages = [Message("", roles[i % 2], text, 0.0) for i, text in enumerate(history)]  # type: ignore[arg-type]
    engine = SimulatedEngine(
        reply_tokens=(int(ENV["CHATSSE_SIM_REPLY_TOKENS_MIN"]), int(ENV["CHATSSE_SIM_REPLY_TOKENS_MAX"]))
    )
    return engine.compose(messages)


def test_the_page_speaks_chat_completions_keeping_the_history_itself(
    page: Any, server: GunicornServer
) -> None:
    total = httpx.get(f"{server.url}/conversations").json()["total"]
    page.select_option("#protocol", "completions")
    _send(page, "First question over chat completions")
    _send(page, "A second one")
    shown = page.locator(".message.assistant .content").all_text_contents()
    assert shown[0] == _expected_reply(["First question over chat completions"])
    assert shown[1] == _expected_reply(["First question over chat completions", shown[0], "A second one"])
    assert page.text_content("#conversation-id") == "4 messages, kept by the page"
    assert "completion" in (page.locator(".message.assistant .meta").last.text_content() or "")
    assert httpx.get(f"{server.url}/conversations").json()["total"] == total  # nothing stored


def test_the_page_speaks_the_responses_api_chaining_previous_response_id(
    page: Any, server: GunicornServer
) -> None:
    page.select_option("#protocol", "responses")
    _send(page, "First question over responses")
    first_id = page.text_content("#conversation-id")
    assert first_id
    assert first_id.startswith("resp_")
    _send(page, "And a follow-up")
    second_id = page.text_content("#conversation-id")
    assert second_id != first_id
    stored = httpx.get(f"{server.url}/v1/responses/{second_id}").json()
    assert stored["previous_response_id"] == first_id
    shown = page.locator(".message.assistant .content").all_text_contents()
    assert stored["output"][0]["content"][0]["text"] == shown[1]
    assert shown[1] == _expected_reply(["First question over responses", shown[0], "And a follow-up"])
    assert "output" in (page.locator(".message.assistant .meta").last.text_content() or "")
    # Switching wires starts over: the next chatsse turn opens a new conversation.
    page.select_option("#protocol", "chat")
    assert page.text_content("#conversation-id") == ""
    assert page.locator(".message").count() == 0


def test_an_openai_error_is_shown_with_its_code(page: Any, server: GunicornServer) -> None:
    page.select_option("#protocol", "responses")
    # A chain the server does not know: the 404 the SDK would raise NotFoundError for.
    page.evaluate(
        """() => { const real = window.fetch; window.fetch = (url, opts) => {
            if (String(url).endsWith('v1/responses')) {
              const body = JSON.parse(opts.body); body.previous_response_id = 'resp_gone.msg_gone';
              opts = {...opts, body: JSON.stringify(body)};
            }
            return real(url, opts); }; }"""
    )
    page.fill("#input", "continue a chain that is gone")
    page.click("#send")
    page.wait_for_function("document.querySelector('#messages').innerText.includes('response_not_found')")
    assert "HTTP 404" in (page.locator(".message.assistant .error").last.text_content() or "")


@pytest.mark.parametrize("wire", ["chat", "responses"])
def test_stop_ends_the_reply_on_the_server_and_it_is_stored_as_stopped(
    page: Any, server: GunicornServer, wire: str
) -> None:
    page.select_option("#protocol", wire)
    page.fill("#input", "A long reply, please")
    page.click("#send")
    reply = page.locator(".message.assistant").last
    last = "document.querySelector('.message.assistant:last-child')"
    page.wait_for_function(f"() => ({last}.querySelector('.content') || {{}}).textContent?.length > 20")
    page.click("#stop")
    page.wait_for_function(
        "() => document.querySelector('.message.assistant:last-child').dataset.state !== 'streaming'"
    )
    assert reply.get_attribute("data-state") == "complete"  # ended by the server, not cut off
    assert "finish: stopped" in (reply.locator(".meta").text_content() or "")
    shown = reply.locator(".content").text_content()
    if wire == "chat":
        conversation_id = page.text_content("#conversation-id")
        stored = httpx.get(f"{server.url}/conversations/{conversation_id}").json()["messages"][-1]
    else:
        conversations = httpx.get(f"{server.url}/conversations").json()["conversations"]
        newest = conversations[0]["id"]
        stored = httpx.get(f"{server.url}/conversations/{newest}").json()["messages"][-1]
    assert stored["finish_reason"] == "stopped"
    assert stored["content"] == shown


# --- resuming: a network drop and a reload mid-reply (a reply long enough to be cut) ---

LONG = {**ENV, "CHATSSE_SIM_TOKEN_INTERVAL_MS": "20", "CHATSSE_SIM_REPLY_TOKENS_MIN": "150",
        "CHATSSE_SIM_REPLY_TOKENS_MAX": "150", "CHATSSE_SSE_RETRY_MS": "300"}  # fmt: skip


@pytest.fixture(scope="module")
def long_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GunicornServer]:
    store = f"sqlite:///{tmp_path_factory.mktemp('page-resume') / 'c.db'}"
    with GunicornServer(workers=2, store=store, env=LONG) as s:
        yield s


@pytest.fixture
def long_page(long_server: GunicornServer) -> Iterator[Any]:
    with browser_page(long_server.url, 20_000) as page:
        yield page


LAST = "document.querySelector('.message.assistant:last-child')"


def _reply_started(page: Any) -> None:
    page.wait_for_function(f"() => ({LAST}?.querySelector('.content') || {{}}).textContent?.length > 40")


def _one_whole_turn(page: Any, server: GunicornServer) -> None:
    """The page shows one completed reply, the one the server stored, and no second turn."""
    page.wait_for_function(f"() => {LAST}?.dataset.state === 'complete'")
    conversation_id = page.text_content("#conversation-id")
    stored = httpx.get(f"{server.url}/conversations/{conversation_id}").json()["messages"]
    assert [m["role"] for m in stored] == ["user", "assistant"]  # no duplicate turn
    assert stored[1]["finish_reason"] == "stop"
    assert page.locator(".message.assistant").count() == 1
    assert page.locator(".message.assistant .content").text_content() == stored[1]["content"]


class CuttableLink:
    """A TCP relay between the browser and the server that can drop every connection at
    once and refuse new ones for a while: the network going away under an open stream
    (DevTools' offline mode fails new requests but leaves open connections alone)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.down = False
        self._open: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.down:
                client.close()
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            with self._lock:
                self._open += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        """The network goes down: every open connection is reset, new ones are refused."""
        self.down = True
        with self._lock:
            sockets, self._open = self._open, []
        for s in sockets:  # shutdown first: it wakes the relay's threads blocked on them
            with contextlib.suppress(OSError):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def restore(self) -> None:
        self.down = False

    def close(self) -> None:
        self.cut()
        self.listener.close()


def test_after_a_network_drop_the_page_resumes_the_reply(long_server: GunicornServer) -> None:
    link = CuttableLink(int(long_server.url.rsplit(":", 1)[1]))
    try:
        with browser_page(f"http://127.0.0.1:{link.port}", 20_000) as page:
            page.fill("#input", "Tell me a long story")
            page.click("#send")
            _reply_started(page)
            cdp = page.context.new_cdp_session(page)
            cdp.send("Network.enable")
            conditions = {"offline": True, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1}
            cdp.send("Network.emulateNetworkConditions", conditions)  # the browser is offline
            link.cut()  # and its open connections are gone
            page.wait_for_function("() => document.querySelector('#status').textContent === 'reconnecting'")
            page.wait_for_timeout(700)  # offline for a while: reconnecting fails, and is tried again
            link.restore()
            cdp.send("Network.emulateNetworkConditions", {**conditions, "offline": False})
            _one_whole_turn(page, long_server)
    finally:
        link.close()


def test_a_page_reloaded_mid_reply_shows_the_whole_reply(long_page: Any, long_server: GunicornServer) -> None:
    page = long_page
    page.fill("#input", "Another long story")
    page.click("#send")
    _reply_started(page)
    page.reload()
    page.wait_for_function("() => document.querySelectorAll('.message.user').length === 1")
    assert page.locator(".message.user .content").text_content() == "Another long story"
    _one_whole_turn(page, long_server)


def test_a_server_with_keys_asks_for_one_and_the_page_sends_it(serve: Serve, tmp_path: Path) -> None:
    from chatsse.keys import create_key

    keys_file = tmp_path / "keys.json"
    _, key = create_key(keys_file, "alice")
    keyed = serve(keys_file=str(keys_file), sim_reply_tokens_min=5, sim_reply_tokens_max=5)
    with browser_page(keyed.url) as page:
        assert page.is_hidden("#api-key")  # nothing to ask until the server asks
        page.fill("#input", "without a key")
        page.click("#send")
        page.wait_for_function("document.querySelector('#messages').innerText.includes('401')")
        assert page.is_visible("#api-key")
        page.fill("#api-key", key)
        page.dispatch_event("#api-key", "change")
        _send(page, "with the key")
        page.reload()  # the key stays for the tab
        assert page.input_value("#api-key") == key
        _send(page, "after a reload")
    listed = httpx.get(keyed.url + "/conversations", headers={"Authorization": f"Bearer {key}"}, timeout=10)
    assert listed.json()["total"] == 2  # both turns were alice's (a new page starts a new conversation)
