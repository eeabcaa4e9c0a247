"""One load test in several client processes (``LoadConfig.processes > 1``), merged into one result.

One Python process reads its streams on one core: at a few thousand streams its event
loop falls behind and stamps tokens late (:mod:`chatsse.loadhealth` measures that).
Here the parent process plans the run, starts ``processes`` worker processes and merges
what they return. The workers are fresh interpreters (``python -c``, started with
``subprocess``): not forked, since forking a process that runs an event loop or a
notebook kernel's threads is unsafe, and not multiprocessing's ``spawn``, which re-runs the
caller's ``__main__`` in each worker (a script without a ``__main__`` guard would start
its load test again). Each worker gets the parent's ``sys.path`` and, over a socket pair,
its job, pickled: the target's class must be importable (not defined in ``__main__`` or a
notebook cell). How the work is split:

- **Open loop**: the parent draws the whole seeded arrival schedule once and deals it out
  round robin (:func:`chatsse.loadgen.split_run`): arrival ``i`` goes to process
  ``i % processes``, so every intended start is sent by exactly one process, at its
  offset from the common start. A user's later turns stay in its process.
- **Closed loop**: user ``i`` (of ``concurrency``) runs in process ``i % processes``, with
  its own ramp-up start; its conversations stay there. ``concurrency >= processes``.
- **max_concurrency** is split exactly: process ``k`` gets ``M // N`` slots, one more for
  ``k < M % N``; at most ``M`` requests are in flight over all processes. A request waits
  for a slot of its own process only: when the processes' loads differ it can wait while
  another process has a free slot (the round-robin deal keeps them even).
  ``max_concurrency >= processes``.
- **Bounds and ids**: request ids and user ids come from two counters shared by the
  processes (a small memory-mapped file, updated under ``flock``: two system calls per
  request, none per event). The request counter stops at ``requests``, so the processes
  send exactly that many turns between them, as one process would; ids are unique and in
  send order, and request ``k`` sends ``messages[k % len(messages)]`` as in one process.
  ``duration`` and the drain are measured from the common start by each process.
- **One clock**: records are ``time.perf_counter()`` readings. On Linux that is
  ``clock_gettime(CLOCK_MONOTONIC)``, one clock for every process of the machine, so the
  processes' times compare directly; :func:`check_clock` refuses to split a run on any
  other clock. The parent waits until every process has prepared its target, then sends
  all of them one start time a moment ahead (``START_LEAD``).
- **Results**: records (sorted by request id), the latest end, ``interrupted`` (any),
  ``unsent`` (summed) and one self-check per process go into one ``LoadTestResult``:
  the same JSON, summaries and plots as a one-process run.
- **Progress**: each process sends its counters every ``progress_interval``; the parent
  adds them up for the callback.
- **Ctrl-C**: workers run in their own session, so a terminal's Ctrl-C reaches only the
  parent. The parent's run is cancelled as a one-process run is; it tells every worker to
  stop, and each returns what it recorded, so the merged result keeps every record, with
  ``interrupted=True``. A worker whose parent disappears stops at the end of its socket.
- A worker that raises sends its exception; the parent stops the others and raises it.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import mmap
import os
import pickle
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from multiprocessing.connection import Connection
from time import perf_counter
from typing import Any

from chatsse.loadgen import (
    LoadConfig,
    LoadTest,
    LoadTestResult,
    Progress,
    ProgressCallback,
    RunPart,
    Share,
    runner,
    split_run,
)
from chatsse.loadtargets import Target

__all__ = ["CLOCK", "START_LEAD", "SharedIds", "arun_in_processes", "check_clock", "worker_main"]

CLOCK = "clock_gettime(CLOCK_MONOTONIC)"
START_LEAD = 0.1  # seconds between sending the start time and the start itself
STOP_GRACE = 30.0  # seconds a stopped worker gets to return its records before it is killed
_WORKER = "from chatsse.loadworkers import worker_main; worker_main()"


def check_clock() -> None:
    """Raise unless ``perf_counter`` is the machine-wide monotonic clock (Linux's)."""
    implementation = time.get_clock_info("perf_counter").implementation
    if implementation != CLOCK:
        raise RuntimeError(
            f"several client processes need time.perf_counter() to read {CLOCK}, one clock for "
            f"every process (Linux); here it is {implementation}: use processes=1"
        )


class SharedIds:
    """Ids 0, 1, 2, ... handed out across processes (a :class:`chatsse.loadgen.IdSource`):
    a 64-bit counter at ``slot`` of a memory-mapped file, read and written under ``flock``.
    Pickles as its file's path, so a worker maps the same counter."""

    SLOTS = 2

    def __init__(self, path: str, slot: int, limit: int | None = None) -> None:
        self.path, self.slot, self.limit = path, slot, limit
        self._fd = os.open(path, os.O_RDWR)
        self._map = mmap.mmap(self._fd, 8 * self.SLOTS)
        self._values = memoryview(self._map).cast("q")

    @classmethod
    def create(cls, directory: str) -> str:
        """A new file of zeroed counters; returns its path."""
        fd, path = tempfile.mkstemp(prefix="chatsse-load-ids-", dir=directory)
        os.write(fd, bytes(8 * cls.SLOTS))
        os.close(fd)
        return path

    def __getstate__(self) -> tuple[str, int, int | None]:
        return self.path, self.slot, self.limit

    def __setstate__(self, state: tuple[str, int, int | None]) -> None:
        self.__init__(*state)  # type: ignore[misc]

    def take(self) -> int | None:
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            value: int = self._values[self.slot]
            if self.limit is not None and value >= self.limit:
                return None
            self._values[self.slot] = value + 1
            return value
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    @property
    def exhausted(self) -> bool:
        return self.limit is not None and self._values[self.slot] >= self.limit

    def close(self) -> None:
        self._values.release()
        self._map.close()
        os.close(self._fd)


def _listen(conn: Connection, deliver: Callable[[tuple[str, Any]], None]) -> threading.Thread:
    """Read ``conn``'s messages in a thread and hand each to ``deliver`` in the running
    loop's thread; ``("lost", None)`` last, when the other end closes.

    A thread, not the loop's ``add_reader``: uvloop (libuv) makes a watched descriptor
    non-blocking, and a large pickled result then arrives, or leaves, in pieces that
    ``Connection`` does not reassemble.
    """
    loop = asyncio.get_running_loop()

    def pump() -> None:
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                message = ("lost", None)
            try:
                loop.call_soon_threadsafe(deliver, message)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                return
            if message[0] == "lost":
                return

    thread = threading.Thread(target=pump, name="chatsse-load-listen", daemon=True)
    thread.start()
    return thread


# --- the worker process ---------------------------------------------------------------------


@dataclass(frozen=True)
class _Job:
    """What a worker process gets, pickled over its socket."""

    target: Target
    config: LoadConfig
    share: Share
    request_ids: SharedIds
    user_ids: SharedIds
    progress_interval: float | None


def worker_main() -> None:
    """A worker process's entry point (``python -c``): its socket's descriptor is the last
    argument. Reads its job, runs it, sends the result (or the exception)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    conn = Connection(int(sys.argv[-1]))
    try:
        job: _Job = conn.recv()
        with runner() as loop_runner:
            result = loop_runner.run(_work(conn, job))
        conn.send(("done", result))
    except BaseException as exc:  # every failure goes to the parent
        with contextlib.suppress(OSError):
            try:
                conn.send(("failed", exc))
            except (pickle.PicklingError, TypeError, AttributeError):  # it did not pickle: its text
                conn.send(("failed", RuntimeError("".join(traceback.format_exception(exc)))))
    finally:
        conn.close()


async def _work(conn: Connection, job: _Job) -> LoadTestResult | None:
    """The worker's part of the run; None if it was stopped before the start."""
    go: asyncio.Future[float] = asyncio.get_running_loop().create_future()

    def receive(message: tuple[str, Any]) -> None:
        kind, value = message
        if kind == "go" and not go.done():
            go.set_result(value)
        elif kind in ("stop", "lost"):  # lost: the parent is gone
            if not go.done():
                go.cancel()  # before the start: nothing was sent
            else:
                test.stop()

    async def start(description: dict[str, Any]) -> float:
        conn.send(("ready", description))
        return await go

    def report(progress: Progress) -> None:
        conn.send(("progress", (progress.sent, progress.completed, progress.failed, progress.open_streams)))

    job.target.for_process(job.share.index)
    part = RunPart(job.share, job.request_ids, job.user_ids, start)
    test = LoadTest(
        job.target,
        job.config,
        progress=None if job.progress_interval is None else report,
        progress_interval=job.progress_interval or 0.25,
        part=part,
    )
    _listen(conn, receive)
    try:
        return await test.run()
    except asyncio.CancelledError:  # stopped before the start: nothing was sent
        return None


# --- the parent -----------------------------------------------------------------------------


@dataclass
class _Worker:
    index: int
    process: subprocess.Popen[bytes]
    conn: Connection
    listener: threading.Thread | None = None
    counts: tuple[int, int, int, int] = (0, 0, 0, 0)  # sent, completed, failed, open
    description: dict[str, Any] | None = None
    result: LoadTestResult | None = None
    finished: bool = False
    failure: BaseException | None = None

    def send(self, message: object) -> None:
        with contextlib.suppress(OSError):  # it already ended: its socket says so
            self.conn.send(message)


@dataclass
class _Coordinator:
    workers: list[_Worker]
    inbox: asyncio.Queue[tuple[_Worker, tuple[str, Any]]] = field(default_factory=asyncio.Queue)

    def listen(self) -> None:
        for worker in self.workers:
            worker.listener = _listen(worker.conn, partial(self._deliver, worker))

    def _deliver(self, worker: _Worker, message: tuple[str, Any]) -> None:
        self.inbox.put_nowait((worker, message))

    async def next(self) -> None:
        """Take one message and apply it to its worker."""
        worker, (kind, value) = await self.inbox.get()
        if kind == "ready":
            worker.description = value
        elif kind == "progress":
            worker.counts = value
        elif kind == "done":
            worker.result, worker.finished = value, True
        elif kind == "failed":
            worker.failure, worker.finished = value, True
        elif kind == "lost" and not worker.finished:
            code = worker.process.poll()
            worker.failure = RuntimeError(
                f"client process {worker.index} ended without a result (exit code {code})"
            )
            worker.finished = True

    def failure(self) -> BaseException | None:
        return next((w.failure for w in self.workers if w.failure is not None), None)

    async def until(self, condition: Callable[[], bool]) -> None:
        while not condition() and self.failure() is None:
            await self.next()

    def stop_all(self) -> None:
        for worker in self.workers:
            if not worker.finished:
                worker.send(("stop", None))


def _start_workers(
    target: Target, config: LoadConfig, progress_interval: float | None, ids_path: str
) -> list[_Worker]:
    request_ids, user_ids = SharedIds(ids_path, 0, config.requests), SharedIds(ids_path, 1)
    # The workers find what this process imports, from where it imports it.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p or os.getcwd() for p in sys.path)}
    workers: list[_Worker] = []
    try:
        for share in split_run(config):
            job = pickle.dumps(_Job(target, config, share, request_ids, user_ids, progress_interval))
            ours, theirs = socket.socketpair()
            with ours, theirs:
                process = subprocess.Popen(
                    [sys.executable, "-c", _WORKER, str(theirs.fileno())],
                    pass_fds=(theirs.fileno(),),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    env=env,
                    start_new_session=True,  # a terminal's Ctrl-C reaches the parent only
                )
                conn = Connection(ours.detach())
            workers.append(_Worker(share.index, process, conn))
            conn.send_bytes(job)
    except BaseException:
        for worker in workers:  # none of them will get a start time
            worker.process.kill()
        _end_workers(workers)
        raise
    finally:
        request_ids.close()
        user_ids.close()
    return workers


def _end_workers(workers: list[_Worker]) -> None:
    for worker in workers:
        try:
            worker.process.wait(STOP_GRACE if worker.finished else 1.0)
        except subprocess.TimeoutExpired:
            worker.process.kill()
            worker.process.wait()
        if worker.listener is not None:
            worker.listener.join(5.0)  # the process is gone: its socket has ended
        worker.conn.close()


async def arun_in_processes(
    target: Target,
    config: LoadConfig,
    *,
    progress: ProgressCallback | None = None,
    progress_interval: float = 0.25,
) -> LoadTestResult:
    """Run ``config`` in ``config.processes`` worker processes; one merged result.

    Cancelling it (Ctrl-C in a script, an interrupt in a notebook) stops every worker and
    returns what they recorded, as a one-process run does.
    """
    check_clock()
    if type(target).__module__ == "__main__":
        raise ValueError(
            f"with processes > 1 the target's class must be importable by the worker processes; "
            f"{type(target).__name__} is defined in __main__ (a script or a notebook): move it to a module"
        )
    with tempfile.TemporaryDirectory(prefix="chatsse-load-") as directory:
        return await _run(target, config, progress, progress_interval, SharedIds.create(directory))


async def _run(
    target: Target,
    config: LoadConfig,
    progress: ProgressCallback | None,
    progress_interval: float,
    ids_path: str,
) -> LoadTestResult:
    workers = _start_workers(target, config, None if progress is None else progress_interval, ids_path)
    coordinator = _Coordinator(workers)
    coordinator.listen()
    interrupted = False
    start, wall_start = perf_counter(), time.time()  # the start time sent, once all are ready
    reporter: asyncio.Task[None] | None = None
    try:
        try:
            await coordinator.until(lambda: all(w.description is not None or w.finished for w in workers))
            start = perf_counter() + START_LEAD
            wall_start = time.time() + START_LEAD
            for worker in workers:
                worker.send(("go", start))
            if progress is not None:
                reporter = asyncio.create_task(_report(progress, progress_interval, workers, start))
            await coordinator.until(lambda: all(w.finished for w in workers))
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()  # handled here: the workers stop and return their records
            interrupted = True
            coordinator.stop_all()
            await coordinator.until(lambda: all(w.finished for w in workers))
        failure = coordinator.failure()
        if failure is not None:
            coordinator.stop_all()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(_drain(coordinator, workers), STOP_GRACE)
            raise failure
    finally:
        if reporter is not None:
            reporter.cancel()
            await asyncio.gather(reporter, return_exceptions=True)
        await asyncio.to_thread(_end_workers, workers)
    result = _merge(target, config, workers, start, wall_start, interrupted)
    if progress is not None:
        progress(_total(result))
    return result


async def _drain(coordinator: _Coordinator, workers: list[_Worker]) -> None:
    """Wait for every worker's last message, failures included."""
    while not all(w.finished for w in workers):
        await coordinator.next()


async def _report(callback: ProgressCallback, interval: float, workers: list[_Worker], start: float) -> None:
    while True:
        await asyncio.sleep(interval)
        sent, completed, failed, open_streams = (
            sum(column) for column in zip(*(w.counts for w in workers), strict=True)
        )
        callback(Progress(perf_counter() - start, sent, completed, failed, open_streams))


def _total(result: LoadTestResult) -> Progress:
    completed = sum(1 for r in result.records if r.ok)
    return Progress(
        elapsed=result.duration,
        sent=len(result.records),
        completed=completed,
        failed=len(result.records) - completed,
        open_streams=0,
        finished=True,
    )


def _merge(
    target: Target,
    config: LoadConfig,
    workers: list[_Worker],
    start: float,
    wall_start: float,
    interrupted: bool,
) -> LoadTestResult:
    results = [w.result for w in workers if w.result is not None]
    description = next((w.description for w in workers if w.description is not None), None)
    return LoadTestResult(
        config=config,
        target=results[0].target if results else description or target.describe(),
        records=sorted((r for result in results for r in result.records), key=lambda r: r.request_id),
        start=start,
        end=max((result.end for result in results), default=perf_counter()),
        wall_start=wall_start,
        interrupted=interrupted or any(result.interrupted for result in results),
        unsent=sum(result.unsent for result in results),
        client=tuple(c for result in results for c in result.client),
    )
