"""Property-based fuzzing of every route with schemathesis, against the OpenAPI schema a running
server publishes (a real uvicorn on a free port): with a valid API key and without one, every
answer is documented (status, content type, body schema, headers) and none is a 5xx.

``make test`` runs a bounded number of examples per route (``CHATSSE_FUZZ_EXAMPLES``, 15 by
default); ``make fuzz`` runs many more.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from conftest import FAST
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from chatsse import Settings, create_app
from chatsse.inprocess import InProcessServer
from chatsse.keys import create_key

EXAMPLES = int(os.environ.get("CHATSSE_FUZZ_EXAMPLES", "15"))
# A quick engine and small bounds, so thousands of turns stay fast; no limits that a fuzzer
# would trip on purpose (429 is documented, but a full bucket would hide every other answer).
SERVER = {
    **FAST,
    "sim_ttft_ms": 0.0,
    "sim_token_interval_ms": 0.0,
    "sim_reply_tokens_min": 1,
    "sim_reply_tokens_max": 3,
    "resume_window": 0.0,
    "replay_flush_interval": 0.05,
    "max_streams_per_worker": 10_000,
}
# Bodies the schema allows can still break a rule that spans fields, which JSON Schema does not
# state (stream_options without stream; a Responses input whose last message is not the user's;
# a conversation_id that does not exist): chatsse refuses them with 400, 404 or 409, and the
# fuzzer's "schema-valid request rejected" check would call that a bug. Every other check runs.
SEMANTIC = [positive_data_acceptance]
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,  # the same examples every run: a failure here is reproducible
    database=None,
)


# The schema is the app's own, read when the tests are collected; the calls go to a real server
# made from the same settings, on a free port.
_KEYS = tempfile.TemporaryDirectory(prefix="chatsse-fuzz-")
_KEYS_FILE = Path(_KEYS.name) / "keys.json"
_, KEY = create_key(_KEYS_FILE, "fuzzer", admin=True)
CONFIG = Settings(_env_file=None, keys_file=str(_KEYS_FILE), **SERVER)  # type: ignore[call-arg]
schema = schemathesis.openapi.from_dict(create_app(CONFIG).openapi())


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with InProcessServer(create_app(CONFIG)) as running:
        yield running.url


@schema.parametrize()
@FUZZ
def test_every_route_answers_as_documented_with_a_key(case: schemathesis.Case, server: str) -> None:
    headers = {"Authorization": f"Bearer {KEY}"}
    case.call_and_validate(base_url=server, headers=headers, timeout=30, excluded_checks=SEMANTIC)


@schema.parametrize()
@FUZZ
def test_every_route_answers_as_documented_without_a_key(case: schemathesis.Case, server: str) -> None:
    response = case.call_and_validate(base_url=server, timeout=30, excluded_checks=SEMANTIC)
    if case.method.upper() == case.operation.method.upper() and case.path != "/health":
        assert response.status_code == 401  # (a case of another method tests the route's 405)


def test_the_fuzzed_schema_covers_every_api_route() -> None:
    raw = schema.raw_schema
    documented = {(method.upper(), path) for path, item in raw["paths"].items() for method in item}
    expected = {
        ("POST", "/chat"),
        ("GET", "/conversations"),
        ("POST", "/conversations"),
        ("GET", "/conversations/{conversation_id}"),
        ("DELETE", "/conversations/{conversation_id}"),
        ("GET", "/conversations/{conversation_id}/messages/{message_id}/events"),
        ("POST", "/conversations/{conversation_id}/messages/{message_id}/stop"),
        ("POST", "/v1/chat/completions"),
        ("POST", "/v1/responses"),
        ("GET", "/v1/responses/{response_id}"),
        ("DELETE", "/v1/responses/{response_id}"),
        ("POST", "/v1/responses/{response_id}/cancel"),
        ("GET", "/v1/models"),
        ("GET", "/health"),
        ("GET", "/stats"),
    }
    assert expected <= documented
