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
