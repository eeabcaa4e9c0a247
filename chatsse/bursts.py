"""A burst of ``/chat`` streams under one API key, every attempt as its client saw it: what a
per-key limit (chatsse/limits/) admits and what it refuses with 429.

``clients`` clients start together and each sends its next stream as soon as its last one has
ended, or, when refused, after ``pause`` seconds (None: the ``Retry-After`` the refusal gave),
until ``duration`` seconds have passed; streams still open then are read to their end. Every
request goes on a new connection, so any worker of a gunicorn may answer it.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import httpx

__all__ = ["Attempt", "Burst", "burst", "limit_headers"]

LIMIT_HEADERS = ("retry-after", "x-ratelimit-")


def limit_headers(headers: httpx.Headers) -> dict[str, str]:
    """A response's ``Retry-After`` and ``x-ratelimit-*`` headers."""
    return {name: value for name, value in headers.items() if name.startswith(LIMIT_HEADERS)}


@dataclass(frozen=True, slots=True)
class Attempt:
    """One request of a burst. Times are seconds after the burst began."""

    client: int
    sent: float
    ended: float  # the stream's last byte, or the refusal's
    status: int  # 0: no HTTP answer (the connection failed)
    opened: float | None = None  # the response's headers, for an admitted stream
    headers: dict[str, str] = field(default_factory=dict)  # retry-after and x-ratelimit-*

    @property
    def admitted(self) -> bool:
        return self.status == 200

    @property
    def refused(self) -> bool:
        return self.status == 429


@dataclass
class Burst:
    """Every attempt of one burst, in the order they were sent."""

    attempts: list[Attempt]
    clients: int
    duration: float

    @property
    def first_wave(self) -> list[Attempt]:
        """Each client's first attempt: the ``clients`` requests sent at the same moment."""
        firsts: dict[int, Attempt] = {}
        for attempt in self.attempts:
            firsts.setdefault(attempt.client, attempt)
        return [firsts[client] for client in sorted(firsts)]

    @property
    def admitted(self) -> list[Attempt]:
        return [a for a in self.attempts if a.admitted]

    @property
    def refused(self) -> list[Attempt]:
        return [a for a in self.attempts if a.refused]

    def open_streams(self) -> list[tuple[float, int]]:
        """The admitted streams open at once as the clients saw them (headers to last byte),
        as ``(time, count)`` steps: the count from that time to the next step's."""
        edges = sorted(
            [(a.opened, 1) for a in self.admitted if a.opened is not None]
            + [(a.ended, -1) for a in self.admitted if a.opened is not None]
        )
        steps, count = [(0.0, 0)], 0
        for at, step in edges:
            count += step
            steps.append((at, count))
        return steps

    def most_open(self) -> int:
        return max(count for _, count in self.open_streams())


async def burst(
    url: str,
    key: str,
    *,
    clients: int = 12,
    duration: float = 2.0,
    pause: float | None = 0.1,
    message: str = "a burst",
    max_tokens: int | None = None,
    request_timeout: float = 30.0,
) -> Burst:
    """Send the burst (module docstring) to ``url``'s ``/chat`` with ``key``; every attempt."""
    if clients < 1 or duration < 0 or (pause is not None and pause < 0):
        raise ValueError("a burst needs clients >= 1, duration >= 0 and pause >= 0 (or None)")
    body: dict[str, object] = {"message": message}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    attempts: list[Attempt] = []
    began = time.monotonic()

    def now() -> float:
        return time.monotonic() - began

    async def one(http: httpx.AsyncClient, client: int) -> float:
        """One attempt; the seconds to wait before the next."""
        sent, opened, status, headers = now(), None, 0, {}
        try:
            async with http.stream("POST", "/chat", json=body) as response:
                status, headers = response.status_code, limit_headers(response.headers)
                if status == 200:
                    opened = now()
                    async for _ in response.aiter_raw():
                        pass
                else:
                    await response.aread()
        except httpx.TransportError:
            status = 0
        attempts.append(Attempt(client, sent, now(), status, opened, headers))
        if status == 200:
            return 0.0
        if pause is None and "retry-after" in headers:
            return float(headers["retry-after"])
        return pause or 0.0

    async def run(http: httpx.AsyncClient, client: int) -> None:
        while True:  # the first attempt whatever the duration: the burst itself
            wait = await one(http, client)
            if now() + wait >= duration:
                return
            await asyncio.sleep(wait)

    limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)  # a new connection each
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(
        base_url=url, headers=headers, limits=limits, timeout=request_timeout
    ) as http:
        await asyncio.gather(*(run(http, client) for client in range(clients)))
    attempts.sort(key=lambda a: a.sent)
    return Burst(attempts, clients, duration)
