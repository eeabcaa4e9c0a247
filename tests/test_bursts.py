"""Bursts of streams under one key (chatsse/bursts.py), against a real server that limits it."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import pytest
from conftest import Serve

from chatsse.bursts import Attempt, Burst, burst
from chatsse.keys import KeyLimits, create_key

# Replies of 20 tokens 10 ms apart (about 0.2 s): streams that overlap.
SLOW = {
    "sim_ttft_ms": 5.0,
    "sim_token_interval_ms": 10.0,
    "sim_reply_tokens_min": 20,
    "sim_reply_tokens_max": 20,
}


def _attempt(client: int, opened: float | None, ended: float, status: int = 200) -> Attempt:
    return Attempt(client, sent=0.0, ended=ended, status=status, opened=opened)


def test_open_streams_counts_the_admitted_ones_from_headers_to_end() -> None:
    record = Burst(
        [
            _attempt(0, 0.1, 2.0),
            _attempt(1, 0.5, 1.0),
            _attempt(2, 1.0, 1.5),  # opens as client 1's ends: never three at once
            _attempt(3, None, 0.05, status=429),  # refused: never open
        ],
        clients=4,
        duration=1.0,
    )
    assert record.open_streams() == [(0.0, 0), (0.1, 1), (0.5, 2), (1.0, 1), (1.0, 2), (1.5, 1), (2.0, 0)]
    assert record.most_open() == 2
    assert [a.client for a in record.admitted] == [0, 1, 2]
    assert [a.client for a in record.refused] == [3]


def test_the_first_wave_is_each_clients_first_attempt() -> None:
    attempts = [Attempt(1, 0.0, 0.1, 429), Attempt(0, 0.01, 0.3, 200, 0.05), Attempt(1, 0.4, 0.5, 429)]
    assert Burst(attempts, clients=2, duration=1.0).first_wave == [attempts[1], attempts[0]]


@pytest.mark.parametrize("options", [{"clients": 0}, {"duration": -1.0}, {"pause": -0.1}])
def test_a_burst_that_cannot_run_is_refused(options: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="a burst needs"):
        asyncio.run(burst("http://127.0.0.1:9", "csk_x", **options))  # type: ignore[arg-type]


def test_a_burst_gets_no_more_streams_at_once_than_its_keys_limit(serve: Serve, tmp_path: Path) -> None:
    keys_file = tmp_path / "keys.json"
    _, key = create_key(keys_file, "burst", limits=KeyLimits(max_streams=2, requests_per_minute=600))
    server = serve(keys_file=str(keys_file), **SLOW)
    record = asyncio.run(burst(server.url, key, clients=6, duration=2.0, pause=0.05))
    assert Counter(a.status for a in record.first_wave) == {200: 2, 429: 4}  # sent at once: exactly 2 in
    # (How many were open at once, as the clients saw it, is not asserted: a client reads a
    # stream's end late when its loop is busy, so its view overlaps streams the server never
    # held together. tests/test_limits.py counts the server's own leases.)
    assert len(record.admitted) > 2  # freed slots were taken again
    assert {a.status for a in record.attempts} == {200, 429}
    for refused in record.refused:
        assert refused.opened is None
        assert refused.headers["retry-after"] == "1"
        assert refused.headers["x-ratelimit-limit-requests"] == "600"
    for admitted in record.admitted:
        assert admitted.opened is not None
        assert admitted.sent <= admitted.opened <= admitted.ended
        assert "retry-after" not in admitted.headers
    assert [a.sent for a in record.attempts] == sorted(a.sent for a in record.attempts)


def test_polite_clients_wait_as_long_as_retry_after_says(serve: Serve, tmp_path: Path) -> None:
    keys_file = tmp_path / "keys.json"
    _, key = create_key(keys_file, "burst", limits=KeyLimits(max_streams=1))
    server = serve(keys_file=str(keys_file), **SLOW)
    record = asyncio.run(burst(server.url, key, clients=4, duration=0.8, pause=None))
    refused_first = {a.client for a in record.first_wave if a.refused}
    assert len(refused_first) == 3
    sent = Counter(a.client for a in record.attempts)
    # Told to come back in 1 s, after the burst's 0.8 s: each sent nothing more. (With a pause
    # of 0.05 s they would each have asked again many times.)
    assert all(sent[client] == 1 for client in refused_first)
