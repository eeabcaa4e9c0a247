"""The workbook's upstream: the real model when it can run, else a stand-in that says it is one.
Whether the model extra is installed is outside the tests' control, so it is set here."""

from __future__ import annotations

import httpx
import pytest

from chatsse import Settings, create_app, upstreams
from chatsse.inprocess import InProcessServer
from chatsse.processes import ServerProcessError


def test_a_required_model_that_cannot_run_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(upstreams, "model_missing", lambda: "llama-cpp-python is not installed")
    monkeypatch.setenv(upstreams.REQUIRE_MODEL_ENV, "1")
    with pytest.raises(ServerProcessError, match="llama-cpp-python is not installed"):
        upstreams.start_upstream()


@pytest.mark.parametrize(
    ("missing", "quick", "why"),
    [
        ("llama-cpp-python is not installed", "0", "the real model is not available: llama-cpp-python"),
        (None, "1", "the model is installed, but quick mode runs the stand-in"),
    ],
)
def test_the_stand_in_serves_v1_and_says_it_is_no_model(
    monkeypatch: pytest.MonkeyPatch, missing: str | None, quick: str, why: str
) -> None:
    monkeypatch.setattr(upstreams, "model_missing", lambda: missing)
    monkeypatch.delenv(upstreams.REQUIRE_MODEL_ENV, raising=False)
    monkeypatch.setenv("CHATSSE_QUICK", quick)
    upstream = upstreams.start_upstream()
    try:
        assert not upstream.is_model
        assert str(upstream).startswith("a stand-in, not a model")
        assert why in str(upstream)
        models = httpx.get(f"{upstream.base_url}/models").json()["data"]
        assert [m["id"] for m in models] == [upstream.model]
        # A chatsse front whose upstream engine is the stand-in streams its reply.
        env = upstream.upstream_env()
        settings = Settings(
            _env_file=None,  # type: ignore[call-arg]
            engine=env["CHATSSE_ENGINE"],
            upstream_url=env["CHATSSE_UPSTREAM_URL"],
            upstream_model=env["CHATSSE_UPSTREAM_MODEL"],
            log_level="warning",
        )
        with InProcessServer(create_app(settings)) as front:
            reply = httpx.post(
                f"{front.url}/v1/chat/completions",
                json={
                    "model": upstream.model,
                    "messages": [{"role": "user", "content": "hi"}],
                    "max_tokens": 3,
                },
                timeout=30,
            ).json()
        assert reply["usage"]["completion_tokens"] == 3
    finally:
        upstream.server.stop()
