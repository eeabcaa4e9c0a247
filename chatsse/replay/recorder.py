"""Writing open streams into their replay logs, off the per-token path: :class:`ReplayRecorder`.

A stream being recorded (a :class:`Recording`) shares its list of sent deltas with the
recorder, which needs nothing else from the per-token loop. Every ``interval`` seconds one
task per app gathers what each recording sent since its last write and makes all the appends
in one store step (``ReplayLog.append_many``): one SQLite transaction or one Redis round trip
for all open streams, however many there are. A stream that begins or ends is written at
once (its log exists, or is complete, without waiting for the tick). A recording with nothing
new is still written
every ``heartbeat`` seconds (an append of no items renews the log's life), so a reader can
tell a stream whose worker is gone from one whose engine is slow (``Replay.age``).

A write the store refuses or does not answer is made again at the next tick: appends are
idempotent, and everything not yet written is still in the stream's own lists.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from chatsse.errors import StorageUnavailable
from chatsse.logs import get_logger
from chatsse.replay.base import ReplayLog, ReplayMeta, ReplayWrite

__all__ = ["FOLLOW_SPAN", "Recording", "ReplayRecorder"]

FOLLOW_SPAN = 5.0  # seconds a reader's signal keeps the recorder writing every follow_interval

log = get_logger("chatsse.replay")


class Recording:
    """One stream's items: ``opening`` at position 0, ``parts[i]`` at ``i + 1``, then ``final``."""

    __slots__ = ("final", "logged", "meta", "opening", "parts", "reply_id", "written_at")

    def __init__(self, reply_id: str, meta: ReplayMeta, opening: str, parts: list[str]) -> None:
        self.reply_id = reply_id
        self.meta = meta
        self.opening = opening
        self.parts = parts
        self.final: str | None = None
        self.logged = 0  # items the log holds
        self.written_at = 0.0

    def pending(self) -> list[str]:
        """The items not yet in the log."""
        logged, parts = self.logged, self.parts
        items = [self.opening, *parts] if logged == 0 else parts[logged - 1 :]
        if self.final is not None:
            items.append(self.final)
        return items


class ReplayRecorder:
    def __init__(
        self, replay_log: ReplayLog, *, interval: float, heartbeat: float = 1.0, follow_interval: float = 0.05
    ) -> None:
        self.log = replay_log
        self.interval = interval
        self.follow_interval = min(interval, follow_interval)
        self._followed_until = 0.0
        self.heartbeat = heartbeat
        self._recordings: set[Recording] = set()
        self._task: asyncio.Task[None] | None = None
        self._soon = asyncio.Event()  # a stream began or ended: write without waiting a tick

    def start(self, reply_id: str, meta: ReplayMeta, opening: str, parts: list[str]) -> Recording:
        recording = Recording(reply_id, meta, opening, parts)
        self._recordings.add(recording)
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())
        self._soon.set()  # its log exists as soon as it can, for a client that resumes at once
        return recording

    def follow(self) -> None:
        """A client is reading a stream's log as it grows: write now, then every
        ``follow_interval`` seconds for the next ``FOLLOW_SPAN`` (readers renew it)."""
        self._followed_until = time.monotonic() + FOLLOW_SPAN
        self._soon.set()

    def finish(self, recording: Recording, final: str) -> None:
        """The stream ended with ``final``: its log is completed at once (the next write)."""
        if recording.final is None:
            recording.final = final
            self._soon.set()

    async def _run(self) -> None:
        try:
            while self._recordings:
                followed = time.monotonic() < self._followed_until
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.follow_interval if followed else self.interval):
                        await self._soon.wait()
                self._soon.clear()
                try:
                    await self.flush()
                except Exception as exc:  # never let one bad write end the recording of every stream
                    log.error("replay_flush_failed", error=f"{type(exc).__name__}: {exc}", exc_info=exc)
        finally:
            self._task = None

    async def flush(self) -> None:
        """Write what every recording has not written yet (one ``append_many``)."""
        now = time.monotonic()
        batch: list[tuple[Recording, int, bool]] = []
        writes: list[ReplayWrite] = []
        for recording in self._recordings:
            items = recording.pending()
            if not items and now - recording.written_at < self.heartbeat:
                continue
            done = recording.final is not None
            writes.append(ReplayWrite(recording.reply_id, recording.logged, items, recording.meta, done))
            batch.append((recording, len(items), done))
        if not writes:
            return
        try:
            refused = await self.log.append_many(writes)
        except StorageUnavailable as exc:
            log.warning("replay_write_failed", streams=len(writes), error=exc.message)
            return
        # A stream may have ended while the write was on its way: only a write that carried its
        # last event completes it.
        for (recording, count, done), problem in zip(batch, refused, strict=True):
            recording.written_at = now
            if problem is not None:  # past max_items: the log keeps what it has
                log.warning("replay_write_refused", reply_id=recording.reply_id, error=str(problem))
                self._recordings.discard(recording)
                continue
            recording.logged += count
            if done:
                self._recordings.discard(recording)

    async def aclose(self, within: float) -> None:
        """The app is stopping: write what is left (bounded by ``within`` seconds), then stop."""
        with contextlib.suppress(TimeoutError, StorageUnavailable):
            async with asyncio.timeout(within):
                await self.flush()
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
