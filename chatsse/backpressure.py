"""A client that stops reading, and what is held for it on the way: the bytes queued in the
kernel at each end of its connection (``/proc/net/tcp``), and in the server's own transport
(README, "Limits at the edge").

A stream's bytes wait in three places when its reader stalls: uvicorn's transport buffer (it
stops taking more past its 64 KiB high-water mark, and chatsse's next write waits), the
server's socket send queue, and the client's socket receive queue (the TCP window it
advertises closes when that is full). The write that waits is what ``CHATSSE_WRITE_TIMEOUT``
bounds. Linux only (``/proc``).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Final
from urllib.parse import urlsplit

import httpx

from chatsse.inprocess import InProcessServer

__all__ = ["TCP_STATES", "QueueSample", "StalledReader", "TcpSocket", "tcp_sockets"]

# include/net/tcp_states.h
TCP_STATES: Final = {
    1: "ESTABLISHED", 2: "SYN_SENT", 3: "SYN_RECV", 4: "FIN_WAIT1", 5: "FIN_WAIT2", 6: "TIME_WAIT",
    7: "CLOSE", 8: "CLOSE_WAIT", 9: "LAST_ACK", 10: "LISTEN", 11: "CLOSING",
}  # fmt: skip


@dataclass(frozen=True, slots=True)
class TcpSocket:
    """One line of ``/proc/net/tcp``: ``send_queue`` is what the socket has sent but the peer has
    not acknowledged, or not sent yet; ``receive_queue``, what arrived and the program has not
    read."""

    local_port: int
    remote_port: int
    state: str
    send_queue: int
    receive_queue: int


def _port(address: str) -> int:
    return int(address.rsplit(":", 1)[1], 16)


def tcp_sockets(tables: tuple[str, ...] = ("/proc/net/tcp", "/proc/net/tcp6")) -> list[TcpSocket]:
    """Every TCP socket of this network namespace (IPv4 and IPv6)."""
    found = []
    for table in tables:
        with contextlib.suppress(FileNotFoundError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                send_queue, receive_queue = (int(v, 16) for v in fields[4].split(":"))
                state = TCP_STATES.get(int(fields[3], 16), fields[3])
                found.append(TcpSocket(_port(fields[1]), _port(fields[2]), state, send_queue, receive_queue))
    return found


@dataclass(frozen=True, slots=True)
class QueueSample:
    """What was held for a stalled reader at one moment (seconds from ``StalledReader.stall``)."""

    at: float
    server_send_queue: int  # the server's socket: bytes not yet taken by the client's kernel
    client_receive_queue: int  # the client's socket: bytes the client has not read
    server_state: str  # the server end's TCP state ("gone" once the socket is closed)
    open_streams: int | None = None  # the server's count, when asked
    server_transport: int | None = None  # an in-process server's transport buffers, when asked


class StalledReader:
    """A client that sends one request, reads the start of the answer, then nothing more: a
    phone in a tunnel, a frozen tab. Its receive buffer is ``receive_buffer`` bytes (set before
    connecting, so its TCP window is small from the start)::

        reader = StalledReader(server.url, {"message": "hi"})
        reader.stall()      # sends, reads the first bytes, stops reading
        reader.sample()     # what is queued at each end now
    """

    def __init__(
        self, url: str, body: dict[str, object], *, path: str = "/chat", receive_buffer: int = 4096
    ) -> None:
        parts = urlsplit(url)
        if parts.hostname is None or parts.port is None:
            raise ValueError(f"url must be http://host:port, got {url!r}")
        self.url = url
        self.address = (parts.hostname, parts.port)
        self.request = httpx.Request("POST", url + path, json=body)
        self.receive_buffer = receive_buffer
        self.sock: socket.socket | None = None
        self.head = b""
        self.stalled_at = 0.0

    @property
    def local_port(self) -> int:
        if self.sock is None:
            raise RuntimeError("not connected")
        port: int = self.sock.getsockname()[1]
        return port

    def stall(self) -> bytes:
        """Connect, send the request, read one chunk (the status line and headers), then stop
        reading. Returns what was read."""
        family = socket.AF_INET6 if ":" in self.address[0] else socket.AF_INET
        sock = self.sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.receive_buffer)
        sock.settimeout(10)
        sock.connect(self.address)
        head = b"".join(
            [f"{self.request.method} {self.request.url.raw_path.decode()} HTTP/1.1\r\n".encode()]
            + [f"{k}: {v}\r\n".encode() for k, v in self.request.headers.items()]
            + [b"\r\n", self.request.read()]
        )
        sock.sendall(head)
        self.head = sock.recv(1024)
        self.stalled_at = time.perf_counter()
        return self.head

    def sample(self) -> QueueSample:
        """The queues at both ends of the connection, now."""
        client_port, server_port = self.local_port, self.address[1]
        server = client = None
        for s in tcp_sockets():
            if s.local_port == server_port and s.remote_port == client_port:
                server = s
            elif s.local_port == client_port and s.remote_port == server_port:
                client = s
        return QueueSample(
            at=time.perf_counter() - self.stalled_at,
            server_send_queue=server.send_queue if server else 0,
            client_receive_queue=client.receive_queue if client else 0,
            server_state=server.state if server else "gone",
        )

    async def watch(
        self,
        seconds: float,
        *,
        every: float = 0.05,
        server: InProcessServer | None = None,
        until: Callable[[QueueSample], bool] | None = None,
    ) -> list[QueueSample]:
        """Sample the queues and the server's open streams (``/health``) every ``every`` seconds
        for ``seconds``, or until a sample satisfies ``until``; with ``server`` (in-process), its
        transport buffers too."""
        samples = []
        async with httpx.AsyncClient(base_url=self.url, timeout=5) as client:
            deadline = time.perf_counter() + seconds
            while time.perf_counter() < deadline:
                health = (await client.get("/health")).json()
                # The transport first: a connection aborted between the two reads then shows
                # closed in the kernel too, not open with an empty buffer.
                transport = None if server is None else sum(server.write_buffers())
                sample = replace(
                    self.sample(),
                    open_streams=int(health["this_worker"]["open_streams"]),
                    server_transport=transport,
                )
                samples.append(sample)
                if until is not None and until(sample):
                    break
                await asyncio.sleep(every)
        return samples

    def read_rest(self, timeout: float = 5.0, *, until: bytes | None = None) -> bytes:
        """Read everything left, until the server closes the connection, what was read ends
        with ``until``, or nothing comes for ``timeout`` seconds."""
        if self.sock is None:
            return b""
        self.sock.settimeout(timeout)
        data = b""
        with contextlib.suppress(ConnectionResetError, TimeoutError):
            while chunk := self.sock.recv(65536):
                data += chunk
                if until is not None and data.endswith(until):
                    break
        return data

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
