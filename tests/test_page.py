"""The built-in chat page in a real headless Chromium, against the gunicorn-served app."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
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


@pytest.fixture
def page(server: GunicornServer, tmp_path: Path) -> Iterator[Any]:
    chromium = require_binary("chromium", "apt-get install chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.set_default_timeout(15_000)
            page.goto(server.url)
            yield page
        finally:
            browser.close()


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
