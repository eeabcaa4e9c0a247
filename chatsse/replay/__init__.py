"""Replay logs: what a reply's stream said, kept in the conversation store so a client can
resume the stream from any worker (README, "Resuming a stream").

A log holds a reply's stream as *items*, in order from position 0: the opening event (its
bytes), then one item per token (the delta's text: the compact fact the front encodes again
on replay), then, once the reply has ended, its last event (its bytes). Each front maps item
positions to its event ids. A log lives beside the store it belongs to (``base`` has the
interface, ``memory``, ``sqlite`` and ``redis`` the three kinds); :func:`open_replay_log`
makes the one for a store.
"""

from __future__ import annotations

from chatsse.replay.base import Replay, ReplayLimits, ReplayLog, ReplayMeta, ReplayWrite, append
from chatsse.stores.base import ConversationStore

__all__ = ["Replay", "ReplayLimits", "ReplayLog", "ReplayMeta", "ReplayWrite", "append", "open_replay_log"]


def open_replay_log(store: ConversationStore, limits: ReplayLimits) -> ReplayLog:
    """The replay log that lives where ``store`` keeps its conversations."""
    if store.name == "sqlite":
        from chatsse.replay.sqlite import SQLiteReplayLog
        from chatsse.stores.sqlite import SQLiteStore

        assert isinstance(store, SQLiteStore)
        return SQLiteReplayLog(store, limits)
    if store.name == "redis":
        from chatsse.replay.redis import RedisReplayLog
        from chatsse.stores.redis import RedisStore

        assert isinstance(store, RedisStore)
        return RedisReplayLog(store, limits)
    from chatsse.replay.memory import MemoryReplayLog

    return MemoryReplayLog(limits)
