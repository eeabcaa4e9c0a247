"""Chaos runs (``make chaos``): the soak's mixed traffic (chatsse/traffic.py) against a
4-worker gunicorn while faults are injected one after another, each measured on its own.

The faults, and the store each runs on:

- ``kill_worker`` (SQLite, Redis): ``kill -9`` of a worker serving streams of the traffic
  (found by their connections; stopped with SIGSTOP 0.2 s before, so that they are still open
  when it dies); gunicorn starts a replacement.
- ``redis_restart`` (Redis): ``redis-server`` stopped (SIGTERM: it writes its append-only file
  and exits), left down for ``redis_down`` seconds, started again on the same port and data
  directory.
- ``disk_full`` (SQLite): the database lives on a small tmpfs of its own (``mount -t tmpfs``;
  the fault is skipped, with the reason, where mounting is not allowed); a dummy file fills it
  until the store's writes fail, stays ``disk_hold`` seconds, and is deleted.

For each fault the report gives the streams open when it hit and how each ended (``completed``,
``error:<type>`` such as ``storage_error`` or ``stream_lost``, or ``closed``: the connection
closed without a last event, with how the resume a client would try then ended), the requests
that failed during it, and the time to recover, measured: from the fault, one short ``/chat``
turn on a fresh connection every ``probe_every`` seconds, until ``probes_in_a_row`` in a row
complete that were sent once the repair began (the worker killed, Redis started again, the
dummy file deleted): recovered when the first of those completed. After the traffic stops
every completed turn is read back from its conversation; turns lost (completed, and not in
the store) are counted per fault and must be 0. A fault
fails when it lost a turn, never recovered within ``recovery_timeout``, or (``disk_full``) the
writes never failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Final

import aiohttp

from chatsse.processes import GunicornServer
from chatsse.soak import (
    SERVER_ENV,
    Log,
    StoreKind,
    StoreUnderTest,
    event_loop,
    log_digest,
    log_errors,
    machine,
    served,
    sqlite_bytes,
    wait_idle,
    worker_tasks,
)
from chatsse.traffic import PROBE, Exchange, MissingTurn, Mix, Traffic, TrafficRecord, missing_turns

__all__ = [
    "FAULTS",
    "PLANS",
    "QUICK",
    "ChaosConfig",
    "Probing",
    "fill_disk",
    "mount_tmpfs",
    "run_chaos",
    "summary_text",
    "unmount",
]

KILL_WORKER: Final = "kill_worker"
REDIS_RESTART: Final = "redis_restart"
DISK_FULL: Final = "disk_full"
FAULTS: Final = (KILL_WORKER, REDIS_RESTART, DISK_FULL)
PLANS: Final[dict[StoreKind, tuple[str, ...]]] = {
    "sqlite": (KILL_WORKER, DISK_FULL),
    "redis": (KILL_WORKER, REDIS_RESTART),
}
"""The faults run on each store, in order (one server per store)."""


@dataclass(frozen=True)
class ChaosConfig:
    concurrency: int = 50
    before: float = 20.0  # seconds of traffic before the first fault
    between: float = 20.0  # seconds of traffic after a fault has recovered, before the next
    redis_down: float = 5.0
    disk_hold: float = 5.0  # seconds the disk stays full once the writes fail
    fill_timeout: float = 30.0  # seconds to wait for the writes to fail on the full disk
    recovery_timeout: float = 60.0
    probe_every: float = 0.1
    probe_timeout: float = 5.0
    probes_in_a_row: int = 5
    tmpfs_mib: int = 1024
    workers: int = 4
    seed: int = 0
    request_timeout: float = 30.0
    faults: tuple[str, ...] = FAULTS
    stores: tuple[StoreKind, ...] = ("sqlite", "redis")
    mix: Mix = field(default_factory=Mix)
    env: dict[str, str] = field(default_factory=lambda: dict(SERVER_ENV))

    @property
    def max_message_size(self) -> int:
        return int(self.env.get("CHATSSE_MAX_MESSAGE_SIZE", "16384"))


QUICK = ChaosConfig(
    concurrency=6,
    before=1.5,
    between=1.0,
    redis_down=1.5,
    disk_hold=1.5,
    tmpfs_mib=64,
    workers=2,
    # Replies of 0.2 to 0.6 s: with 2 ms tokens a reply is sent whole in 0.1 s, and on a busy
    # machine a client slow to read could find no worker still holding a stream to kill it with.
    env={**SERVER_ENV, "CHATSSE_SIM_TOKEN_INTERVAL_MS": "10"},
)
"""Every fault, briefly: tests and CI (about a minute)."""


# --- the tmpfs of the disk_full fault ---


def mount_tmpfs(path: Path, mib: int) -> str | None:
    """Mount a tmpfs of ``mib`` MiB at ``path``; None, or why it could not be mounted."""
    if os.geteuid() != 0:
        return "mounting a tmpfs needs root"
    if shutil.which("mount") is None:
        return "no mount command"
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={mib}m", "tmpfs", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if done.returncode != 0:
        return f"mount -t tmpfs failed: {(done.stderr or done.stdout).strip() or done.returncode}"
    return None


def unmount(path: Path) -> None:
    """Unmount ``path`` (lazily, if it is still busy)."""
    if subprocess.run(["umount", str(path)], capture_output=True, timeout=30, check=False).returncode:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30, check=False)


def fill_disk(path: Path) -> int:
    """Write ``path`` until its file system has no byte left; the bytes written."""
    written = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for size in (1 << 20, 1 << 16, 1 << 12, 1):
            chunk = b"\0" * size
            while True:
                try:
                    written += os.write(fd, chunk)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
    finally:
        os.close(fd)
    return written


# --- recovery, measured ---


@dataclass
class Probing:
    """Probes from the fault on, until ``in_a_row`` sent after the repair began (``repaired_at``:
    the worker killed, the restart of Redis begun, the filler deleted) complete in a row;
    ``recovered_at`` is when the first of them completed (it may have waited for the store)."""

    began: float
    probes: list[Exchange] = field(default_factory=list)
    repaired_at: float | None = None
    recovered_at: float | None = None

    @property
    def failures(self) -> list[Exchange]:
        return [p for p in self.probes if p.problem is not None]

    def report(self) -> dict[str, Any]:
        failures = self.failures

        def after(at: float | None) -> float | None:
            return None if at is None else round(at - self.began, 3)

        return {
            "sent": len(self.probes),
            "failed": len(failures),
            "failures": dict(Counter(p.ending for p in failures)),
            "first_failure_after_s": after(failures[0].started if failures else None),
            "last_failure_after_s": after(failures[-1].started if failures else None),
            "repaired_after_s": after(self.repaired_at),
            "recovered_after_s": after(self.recovered_at),
            # Every probe: when it was sent (s after the fault), how long it took, how it ended.
            "timeline": [[after(p.started), round(p.ended - p.started, 3), p.ending] for p in self.probes],
            "recovered_after_repair_s": (
                None
                if self.recovered_at is None or self.repaired_at is None
                else round(max(0.0, self.recovered_at - self.repaired_at), 3)
            ),
        }


async def _probe(traffic: Traffic, probing: Probing, config: ChaosConfig, repaired: asyncio.Event) -> None:
    streak: list[Exchange] = []
    deadline = probing.began + config.recovery_timeout
    while time.monotonic() < deadline:
        sent = time.monotonic()
        probe = await traffic.probe(within=config.probe_timeout)
        probing.probes.append(probe)
        if probe.problem is None and repaired.is_set() and probe.started >= (probing.repaired_at or 0):
            streak.append(probe)
            if len(streak) >= config.probes_in_a_row:
                probing.recovered_at = streak[0].ended  # a request succeeded again
                return
        else:
            streak = []
        await asyncio.sleep(max(0.0, config.probe_every - (time.monotonic() - sent)))


@dataclass
class _Run:
    """One server under chaos: what the faults need."""

    server: GunicornServer
    store: StoreUnderTest
    traffic: Traffic
    config: ChaosConfig
    log: Log
    began: float
    disk: Path | None = None

    def at(self, moment: float) -> float:
        return round(moment - self.began, 3)


async def _measure(
    run: _Run, fault: str, inject: Callable[[Probing, asyncio.Event], Awaitable[dict[str, Any]]]
) -> dict[str, Any]:
    """Probe from now on while ``inject`` makes the fault and repairs it (setting the event)."""
    repaired = asyncio.Event()
    probing = Probing(time.monotonic())
    probes = asyncio.ensure_future(_probe(run.traffic, probing, run.config, repaired))
    try:
        details = await inject(probing, repaired)
        await probes
    finally:
        repaired.set()
        probes.cancel()
        await asyncio.gather(probes, return_exceptions=True)
    recovery = probing.report()
    run.log(
        f"{fault}: recovered after {recovery['recovered_after_s']} s ({recovery['failed']} probes failed)"
    )
    over = probing.recovered_at
    serving = details.get("replacement_serving_after_s")
    if over is not None and serving is not None:
        over = max(over, probing.began + serving)
    return {
        "fault": fault,
        "store": run.store.kind,
        "at": probing.began,
        "at_s": run.at(probing.began),
        "recovered_at": probing.recovered_at,
        "over_at": over,
        "over_after_s": None if over is None else round(over - probing.began, 3),
        "recovery": recovery,
        **details,
    }


def client_ports(pids: Sequence[int], port: int) -> dict[int, set[int]]:
    """Each process's established TCP connections whose local port is ``port``, by the
    client's port: the clients it is serving now (Linux ``/proc``: its socket descriptors,
    matched by inode to ``/proc/net/tcp`` and ``tcp6``)."""
    peers: dict[str, int] = {}  # socket inode -> the client's port
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if int(fields[1].rpartition(":")[2], 16) == port and fields[3] == "01":  # ESTABLISHED
                    peers[fields[9]] = int(fields[2].rpartition(":")[2], 16)
    found: dict[int, set[int]] = {}
    for pid in pids:
        ports = found.setdefault(pid, set())
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if target.startswith("socket:[") and target[8:-1] in peers:
                        ports.add(peers[target[8:-1]])
    return found


async def _victim(run: _Run, pids: Sequence[int]) -> tuple[int, int]:
    """A worker holding open streams of the traffic, stopped (SIGSTOP), and how many it holds.

    A stream is matched to its worker by its connection: the client's port, seen from the
    worker's sockets in ``/proc`` (a scrape of a metric would be older than a short stream).
    A stream the client still reads may have been sent whole already, its end waiting in the
    client's socket; so the worker is stopped, the client given ``_SETTLE`` seconds to read what
    was sent, and the streams still open then are the ones the worker holds. Killing a worker
    that holds none would test nothing: it is let go (SIGCONT) and another tried, for up to 15 s."""
    port = int(run.server.url.rpartition(":")[2])
    deadline = time.monotonic() + 15.0
    while True:
        streams = run.traffic.open_stream_ports()
        serving = {pid: len(ports & streams) for pid, ports in client_ports(pids, port).items()}
        pid = max(pids, key=lambda p: serving.get(p, 0))
        if serving.get(pid, 0) or time.monotonic() >= deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
            await asyncio.sleep(_SETTLE)
            held = len(client_ports([pid], port)[pid] & run.traffic.open_stream_ports())
            if held or time.monotonic() >= deadline:
                return pid, held
            os.kill(pid, signal.SIGCONT)
        await asyncio.sleep(0.005)


_SETTLE: Final = 0.2


async def _kill_worker(run: _Run) -> dict[str, Any]:
    async def inject(probing: Probing, repaired: asyncio.Event) -> dict[str, Any]:
        pids = run.server.worker_pids()
        victim, held = await _victim(run, pids)
        os.kill(victim, signal.SIGKILL)
        probing.began = time.monotonic()
        probing.repaired_at = probing.began  # nothing to repair: the other workers serve on
        repaired.set()
        run.log(f"kill_worker: SIGKILL to worker {victim} at {run.at(probing.began)} s")
        replaced = serving = None
        async with aiohttp.ClientSession() as http:
            while time.monotonic() - probing.began < run.config.recovery_timeout:
                now = run.server.worker_pids()
                new = [pid for pid in now if pid not in pids]
                if new and replaced is None and len(now) >= run.config.workers:
                    replaced = time.monotonic() - probing.began
                if new:
                    with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError, ValueError):
                        if new[0] in await worker_tasks(http, run.server.url):  # its app is up
                            serving = time.monotonic() - probing.began
                            break
                await asyncio.sleep(0.05)
        return {
            "victim_pid": victim,
            "victim_streams": held,
            "replaced_after_s": None if replaced is None else round(replaced, 3),
            "replacement_serving_after_s": None if serving is None else round(serving, 3),
        }

    return await _measure(run, KILL_WORKER, inject)


async def _redis_restart(run: _Run) -> dict[str, Any]:
    redis = run.store.redis
    assert redis is not None

    async def inject(probing: Probing, repaired: asyncio.Event) -> dict[str, Any]:
        run.log(f"redis_restart: stopping redis-server at {run.at(probing.began)} s")
        code = await asyncio.to_thread(redis.stop)
        stopped = time.monotonic() - probing.began
        await asyncio.sleep(run.config.redis_down)
        aof = sum(f.stat().st_size for f in redis.directory.rglob("*") if f.is_file())
        probing.repaired_at = time.monotonic()
        repaired.set()
        await asyncio.to_thread(redis.start)  # it answers PING once it has loaded its data
        answering = time.monotonic()
        run.log(f"redis_restart: redis-server answers again at {run.at(answering)} s")
        return {
            "redis_exit_code": code,
            "stopped_after_s": round(stopped, 3),
            "restart_began_after_s": round(probing.repaired_at - probing.began, 3),
            "answering_after_s": round(answering - probing.began, 3),
            "restart_took_s": round(answering - probing.repaired_at, 3),
            "data_dir_bytes": aof,
        }

    return await _measure(run, REDIS_RESTART, inject)


async def _disk_full(run: _Run) -> dict[str, Any]:
    disk, path = run.disk, run.store.path
    assert disk is not None
    assert path is not None
    filler = disk / "filler"

    async def inject(probing: Probing, repaired: asyncio.Event) -> dict[str, Any]:
        before = sqlite_bytes(path)
        written = await asyncio.to_thread(fill_disk, filler)
        full = time.monotonic()
        run.log(f"disk_full: {written >> 20} MiB of filler, the disk is full at {run.at(full)} s")
        failed_after = None
        while time.monotonic() - full < run.config.fill_timeout:
            if probing.failures:
                failed_after = probing.failures[0].started - probing.began
                break
            await asyncio.sleep(0.05)
        if failed_after is not None:
            run.log(f"disk_full: writes fail from {failed_after:.2f} s after the fill began")
            await asyncio.sleep(run.config.disk_hold)
        else:
            run.log(f"disk_full: writes still succeed {run.config.fill_timeout:g} s after the disk filled")
        at_full = sqlite_bytes(path)
        filler.unlink()
        probing.repaired_at = time.monotonic()
        repaired.set()
        run.log(f"disk_full: filler deleted at {run.at(probing.repaired_at)} s")
        free = shutil.disk_usage(disk).free
        return {
            "filler_bytes": written,
            "fill_took_s": round(full - probing.began, 3),
            "writes_failed_after_s": None if failed_after is None else round(failed_after, 3),
            "full_for_s": round(probing.repaired_at - full, 3),
            "sqlite_bytes_before": before,
            "sqlite_bytes_at_full": at_full,
            "free_bytes_after": free,
        }

    return await _measure(run, DISK_FULL, inject)


_INJECT: Final[dict[str, Callable[[_Run], Awaitable[dict[str, Any]]]]] = {
    KILL_WORKER: _kill_worker,
    REDIS_RESTART: _redis_restart,
    DISK_FULL: _disk_full,
}


# --- what each fault did ---


def _ending(exchange: Exchange) -> str:
    return exchange.ending + (f", resumed: {exchange.resumed}" if exchange.resumed else "")


def _effects(record: TrafficRecord, fault: dict[str, Any], until: float) -> dict[str, Any]:
    """The streams open when the fault hit and how they ended; the requests that failed while
    it lasted (to ``over_at``: its recovery, and for a killed worker its replacement serving)
    and after it (sent after that, ended before ``until``: the next fault or the run's end)."""
    at, over = fault["at"], fault["over_at"]
    traffic = [e for e in record.exchanges if e.kind != PROBE]
    streams = [e for e in traffic if e.opened is not None and e.opened <= at < e.ended]
    pending = [e for e in traffic if e.opened is None and e.started <= at < e.ended]
    end_of_fault = over if over is not None else until
    # A resume of a stream the fault cut is told with that stream (its ending's "resumed").
    counted = [e for e in traffic if not e.after_cut]
    during = [e for e in counted if e.ended >= at and e.started <= end_of_fault]
    after = [e for e in counted if end_of_fault < e.started and e.ended < until]  # not the next fault's
    return {
        "streams_open": len(streams),
        "stream_endings": dict(sorted(Counter(_ending(e) for e in streams).items())),
        "requests_pending": len(pending),
        "pending_endings": dict(sorted(Counter(_ending(e) for e in pending).items())),
        "failed_during": record.problems(during),
        "requests_during": len(during),
        "failed_after_recovery": record.problems(after),
        "requests_after_recovery": len(after),
        "failed_after_examples": [
            {**e.as_dict(), "started_s": round(e.started - at, 3)} for e in after if e.problem is not None
        ][:10],
    }


def _lost(missing: Sequence[MissingTurn], start: float, end: float) -> list[dict[str, Any]]:
    return [m.as_dict() for m in missing if start <= m.turn.completed_at < end]


async def _chaos(run: _Run, faults: Sequence[str]) -> dict[str, Any]:
    config = run.config
    stopping = asyncio.Event()
    sending = asyncio.ensure_future(run.traffic.run(until=stopping))
    try:
        await asyncio.sleep(config.before)
        reports = []
        for fault in faults:
            reports.append(await _INJECT[fault](run))
            await asyncio.sleep(config.between)
    finally:
        stopping.set()
        record = await sending
    async with aiohttp.ClientSession() as http:
        with contextlib.suppress(TimeoutError):
            await wait_idle(http, run.server.url)
    checking = time.monotonic()
    missing = await missing_turns(run.server.url, record.turns)
    took = time.monotonic() - checking
    run.log(f"read back {len(record.turns)} completed turns in {took:.1f} s: {len(missing)} lost")
    bounds = [r["at"] for r in reports] + [record.ended + 1]
    for index, report in enumerate(reports):
        report.update(_effects(record, report, bounds[index + 1]))
        lost = _lost(missing, report["at"], bounds[index + 1])
        report["turns_completed"] = sum(
            report["at"] <= t.completed_at < bounds[index + 1] for t in record.turns
        )
        report["turns_lost"] = len(lost)
        report["lost_examples"] = lost[:20]
        problems = []
        if lost:
            problems.append(f"{len(lost)} completed turns not in the store")
        if report["recovered_at"] is None:
            problems.append(f"no recovery within {config.recovery_timeout:g} s")
        if report["fault"] == DISK_FULL and report["writes_failed_after_s"] is None:
            problems.append("the writes never failed: the fault did not happen")
        report["problems"] = problems
        report["ok"] = not problems
        del report["at"], report["recovered_at"], report["over_at"]
    before = _lost(missing, 0.0, bounds[0])
    return {
        "store": run.store.kind,
        "sqlite_on_tmpfs": run.disk is not None,
        "seconds": round(record.ended - record.started, 1),
        "requests": record.by_kind(),
        "expected_refusals": record.expected_refusals(),
        "turns": {"completed": len(record.turns), "lost": len(missing), "lost_before_faults": before},
        "faults": reports,
        "server_log": log_digest(run.server.logs()),
        "server_log_errors": log_errors(run.server.logs()),
        "ok": not missing and all(r["ok"] for r in reports),
    }


@contextlib.contextmanager
def _disk(
    directory: Path, config: ChaosConfig, faults: list[str], skipped: list[dict[str, str]]
) -> Iterator[Path | None]:
    """The tmpfs for SQLite when ``disk_full`` is planned (None, the fault skipped, if it cannot
    be mounted)."""
    if DISK_FULL not in faults:
        yield None
        return
    disk = directory / "disk"
    reason = mount_tmpfs(disk, config.tmpfs_mib)
    if reason is not None:
        faults.remove(DISK_FULL)
        skipped.append({"fault": DISK_FULL, "store": "sqlite", "reason": reason})
        yield None
        return
    try:
        yield disk
    finally:
        unmount(disk)


def run_chaos(config: ChaosConfig, *, log: Log = print) -> dict[str, Any]:
    """Every planned fault on every store (:data:`PLANS`); the report."""
    runs, skipped = [], []
    load_before = os.getloadavg()
    for kind in config.stores:
        faults = [f for f in PLANS[kind] if f in config.faults]
        if not faults:
            continue
        if kind == "redis" and shutil.which("redis-server") is None:
            skipped += [{"fault": f, "store": kind, "reason": "redis-server not installed"} for f in faults]
            continue
        with (
            tempfile.TemporaryDirectory(prefix="chatsse-chaos-") as tmp,
            _disk(Path(tmp), config, faults, skipped) as disk,
        ):
            if not faults:
                continue
            log(f"{kind}: starting a {config.workers}-worker gunicorn; faults {', '.join(faults)}")
            with served(kind, Path(tmp), workers=config.workers, env=config.env, sqlite_dir=disk) as (
                server,
                store,
            ):
                traffic = Traffic(
                    server.url,
                    config.mix,
                    concurrency=config.concurrency,
                    seed=config.seed,
                    max_message_size=config.max_message_size,
                    request_timeout=config.request_timeout,
                )
                run = _Run(server, store, traffic, config, log, time.monotonic(), disk)
                with event_loop() as runner:
                    runs.append(runner.run(_chaos(run, faults)))
    for skip in skipped:
        log(f"skipped {skip['fault']} on {skip['store']}: {skip['reason']}")
    return {
        "config": {**asdict(replace(config, env={})), "env": config.env},
        "machine": machine(load_before),
        "runs": runs,
        "skipped": skipped,
        "ok": bool(runs) and all(r["ok"] for r in runs),
    }


def summary_text(report: dict[str, Any]) -> str:
    """The report for people: per fault, what it hit, how those ended, recovery, turns lost."""
    lines = []
    for run in report["runs"]:
        place = " (SQLite on a tmpfs)" if run["sqlite_on_tmpfs"] else ""
        turns, requests = run["turns"], sum(run["requests"].values())
        lines.append(
            f"{run['store']}{place}: {run['seconds']:.0f} s of traffic, {requests} requests, "
            f"{turns['completed']} completed turns, {turns['lost']} lost"
        )
        for fault in run["faults"]:
            lines += _fault_lines(fault)
        lines.append(f"  server log, warnings and errors: {run['server_log'] or 'none'}")
    for skip in report["skipped"]:
        lines.append(f"skipped {skip['fault']} on {skip['store']}: {skip['reason']}")
    lines.append("PASSED" if report["ok"] else "FAILED")
    return "\n".join(lines)


def _fault_lines(fault: dict[str, Any]) -> list[str]:
    recovery, during, after = fault["recovery"], fault["failed_during"], fault["failed_after_recovery"]
    lines = [f"  {fault['fault']} at {fault['at_s']:.1f} s: {'ok' if fault['ok'] else 'FAILED'}"]
    extra = {k: v for k, v in fault.items() if k != "at_s" and k.endswith(("_s", "_pid", "_code", "_bytes"))}
    if extra:
        lines.append("    " + ", ".join(f"{k} {v}" for k, v in extra.items()))
    lines.append(f"    streams open when it hit: {fault['streams_open']}, ended: {fault['stream_endings']}")
    if fault["requests_pending"]:
        pending = fault["pending_endings"]
        lines.append(f"    requests sent, not yet answered: {fault['requests_pending']}, ended: {pending}")
    lines.append(
        f"    recovered {recovery['recovered_after_s']} s after the fault, "
        f"{recovery['recovered_after_repair_s']} s after its repair; probes: {recovery['sent']} sent, "
        f"{recovery['failed']} failed {recovery['failures'] or ''}"
    )
    lines.append(
        f"    failed while it lasted: {sum(during.values())} of {fault['requests_during']} {during or ''}"
    )
    lines.append(
        f"    failed after it: {sum(after.values())} of {fault['requests_after_recovery']} {after or ''}"
    )
    lines.append(
        f"    turns completed from it to the next: {fault['turns_completed']}, lost {fault['turns_lost']}"
    )
    lines += [f"    FAIL: {problem}" for problem in fault["problems"]]
    return lines
