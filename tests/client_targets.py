"""Load-client targets that misbehave on purpose, in a module of their own so that the
worker processes of a split run (``processes > 1``) can import them."""

from __future__ import annotations

import time
from typing import Any

from chatsse.loadtargets import ChatsseTarget


class BrokenTarget(ChatsseTarget):
    """Every request raises: a bug in a target."""

    async def request(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("bug in a target")


class BlockingTarget(ChatsseTarget):
    """Blocks the client's event loop for ``block`` seconds before each request, as a
    client with too much work per request would."""

    block = 0.1

    async def request(self, *args: Any, **kwargs: Any) -> None:
        time.sleep(self.block)  # noqa: ASYNC251 - the point: the event loop stalls
        await super().request(*args, **kwargs)
