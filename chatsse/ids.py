"""Unique, unguessable ids for conversations, messages, turns and requests."""

from __future__ import annotations

import os
import threading

__all__ = ["new_id"]


class _RandomBlocks:
    """Bytes from ``os.urandom``, read 4 KiB at a time: one system call per 340 ids instead of
    one per id. A forked child drops the block it inherited, so two workers never hand out
    the same bytes."""

    def __init__(self, size: int = 4096) -> None:
        self._size = size
        self._lock = threading.Lock()
        self._block = b""
        self._pos = 0
        os.register_at_fork(after_in_child=self._drop)

    def _drop(self) -> None:
        self._block, self._pos = b"", 0

    def hex(self, n: int) -> str:
        with self._lock:
            pos = self._pos
            if pos + n > len(self._block):
                self._block, pos = os.urandom(self._size), 0
            self._pos = pos + n
            return self._block[pos : pos + n].hex()


_random = _RandomBlocks()


def new_id(prefix: str = "") -> str:
    """``prefix`` and 96 random bits in hex (a conversation id is all a client needs to read the
    conversation, so ids must not be guessable)."""
    return prefix + _random.hex(12)
