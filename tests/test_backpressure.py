"""A reader that stops reading (chatsse/backpressure.py): the kernel's queues of its connection,
read from /proc/net/tcp, add up to the bytes the client can still read; a reader stalled long
enough is cut at the write timeout."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest
from conftest import Serve
from support import wait_for

from chatsse.backpressure import QueueSample, StalledReader, tcp_sockets

TABLE = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F40 00000000:0000 0A 00000000:00000003 00:00000000 00000000     0        0 1 1
   1: 0100007F:1F40 0100007F:D431 01 0002A000:00000000 01:00000014 00000000     0        0 2 1
   2: 0100007F:D431 0100007F:1F40 04 00000001:00001200 00:00000000 00000000     0        0 0 1
"""


def test_proc_net_tcp_lines_are_read_into_ports_states_and_queues(tmp_path: Path) -> None:
    table = tmp_path / "tcp"
    table.write_text(TABLE)
    listening, server, client = tcp_sockets((str(table), str(tmp_path / "absent")))
    assert (listening.local_port, listening.state, listening.receive_queue) == (8000, "LISTEN", 3)
    assert (server.local_port, server.remote_port, server.state) == (8000, 54321, "ESTABLISHED")
    assert (server.send_queue, server.receive_queue) == (0x2A000, 0)
    assert (client.state, client.send_queue, client.receive_queue) == ("FIN_WAIT1", 1, 0x1200)


def test_what_the_kernel_queues_is_what_the_stalled_client_reads_later(serve: Serve) -> None:
    # An unpaced reply of 400 tokens (about 30 KiB) is written at once, and fits in the kernel's
    # buffers: the server's stream ends while its client reads nothing.
    server = serve(sim_ttft_ms=0, sim_token_interval_ms=0, sim_reply_tokens_min=400, sim_reply_tokens_max=400)
    reader = StalledReader(server.url, {"message": "Fill the pipe."}, receive_buffer=4096)
    head = reader.stall()
    assert head.startswith(b"HTTP/1.1 200")
    assert wait_for(lambda: httpx.get(f"{server.url}/health").json()["this_worker"]["open_streams"] == 0, 10)

    # Bytes on their way are counted twice for a moment (in the client's queue, not yet acked
    # in the server's): read the queues once they hold still.
    def queues(sample: QueueSample) -> tuple[int, int]:
        return sample.server_send_queue, sample.client_receive_queue

    previous, sample = None, reader.sample()
    deadline = time.monotonic() + 5
    while queues(sample) != previous and time.monotonic() < deadline:
        time.sleep(0.05)
        previous, sample = queues(sample), reader.sample()
    assert sample.server_state == "ESTABLISHED"
    assert sample.client_receive_queue > 0
    assert sample.server_send_queue > 0
    # The connection stays open (keep-alive): read up to the response's last chunk.
    rest = reader.read_rest(until=b"0\r\n\r\n")
    reader.close()
    assert len(rest) == sample.server_send_queue + sample.client_receive_queue
    assert rest.endswith(b"0\r\n\r\n")  # the whole response: its last chunk


def test_a_stalled_reader_fills_the_buffers_and_is_cut_at_the_write_timeout(serve: Serve) -> None:
    # Fast enough to fill the kernel's buffers (megabytes on loopback) within a second or two.
    server = serve(
        sim_ttft_ms=0,
        sim_token_interval_ms=0.05,
        sim_reply_tokens_min=100_000,
        sim_reply_tokens_max=100_000,
        max_reply_tokens=100_000,
        write_timeout=0.4,
    )
    reader = StalledReader(server.url, {"message": "Tell me everything."})
    reader.stall()

    async def watch() -> list[QueueSample]:
        return await reader.watch(20, every=0.1, server=server, until=lambda s: s.open_streams == 0)

    samples = asyncio.run(watch())
    rest = reader.read_rest()
    reader.close()
    states = [s.server_state for s in samples]
    assert "ESTABLISHED" in states
    assert states[-1] != "ESTABLISHED"
    full = [s.server_transport for s in samples if s.server_transport]
    assert full, "uvicorn's buffer never held bytes: the kernel's never filled"
    assert max(full) <= 64 * 1024 + 1024  # its high-water mark, and the event that crossed it
    assert samples[-1].open_streams == 0
    stats = httpx.get(f"{server.url}/stats").json()["all_workers"]
    assert stats["streams_by_outcome"] == {"write_timeout": 1}
    assert b"event: completed" not in rest


def test_a_url_without_a_port_is_refused() -> None:
    with pytest.raises(ValueError, match="host:port"):
        StalledReader("http://localhost", {"message": "hi"})
