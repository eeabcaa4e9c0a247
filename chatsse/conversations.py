"""The conversation manager: what routes and fronts call, over any store, with deadlines.

Each store call runs under ``CHATSSE_STORE_TIMEOUT`` (``asyncio.timeout``; a store whose calls
never wait on I/O, memory, needs none); a store that fails
or does not answer in time raises :class:`~chatsse.errors.StorageUnavailable` (503 before a
stream, ``event: error`` of type ``storage_error`` during one). A turn is two store calls:
:meth:`ConversationManager.begin_turn` and :meth:`ConversationManager.finish_turn`.

A call cut short (its deadline, a failure of the store, or a forced cancellation) may still
happen in the store, late. Both turn calls are idempotent for the turn's token, so the manager
makes them good in the background, until the store answers or the turn's lock would have
expired (``repair_window``): a ``begin_turn`` whose answer was lost is undone
(``cancel_turn``: the client was told it failed), and a ``finish_turn`` that did not answer is
made again (the reply the client saw is stored once the store is back, and the lock released).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import TypeVar

from chatsse.errors import StorageUnavailable, TurnLost
from chatsse.ids import new_id
from chatsse.logs import get_logger
from chatsse.models import ConversationInfo, Message
from chatsse.protocol import FinishReason
from chatsse.stores.base import ConversationStore

__all__ = ["ConversationManager", "Turn"]

T = TypeVar("T")
Clock = Callable[[], float]
log = get_logger("chatsse.conversations")

MAX_REPAIRS = 1000  # background repairs at once; under a long outage, later ones are skipped
MAX_BACKOFF = 5.0  # seconds between two attempts of a repair, at most


@dataclass(slots=True)
class Turn:
    """A user message accepted into a conversation, its reply to come."""

    conversation_id: str
    user_message: Message
    reply_id: str
    prompt: list[Message]
    new: bool  # the turn created the conversation
    token: str  # the fence: the store refuses this turn's reply once another turn holds the lock
    owner: str = ""  # whose conversation it is (chatsse/keys.py; "" on a server without keys)


class ConversationManager:
    """Conversation operations over one store, each call bounded by ``timeout`` seconds."""

    def __init__(
        self,
        store: ConversationStore,
        *,
        max_history: int,
        timeout: float,
        repair_window: float | None = None,
        clock: Clock = time.time,
    ) -> None:
        self.store = store
        self.max_history = max_history
        self.timeout = timeout
        self.repair_window = repair_window if repair_window is not None else store.limits.lock_ttl
        self._clock = clock
        self._repairs: set[asyncio.Task[None]] = set()

    async def _bounded(self, call: Awaitable[T], what: str) -> T:
        if self.store.local:  # it never waits, so it cannot outlast a deadline
            return await call
        try:
            async with asyncio.timeout(self.timeout):
                return await call
        except TimeoutError:
            limit = f"{self.timeout:g} s (CHATSSE_STORE_TIMEOUT)"
            raise StorageUnavailable(f"the {self.store.name} store did not {what} within {limit}") from None

    async def begin_turn(self, conversation_id: str | None, text: str, *, owner: str) -> Turn:
        """Store the user's message and lock the conversation for the turn (creating the
        conversation, ``owner``'s, if ``conversation_id`` is None; another owner's is not
        found). The caller must end the turn with :meth:`finish_turn` (or :meth:`cancel_turn`)."""
        new = conversation_id is None
        turn = Turn(
            conversation_id=new_id() if conversation_id is None else conversation_id,
            user_message=Message(new_id("msg_"), "user", text, self._clock()),
            reply_id=new_id("msg_"),
            prompt=[],
            new=new,
            token=new_id("turn_"),
            owner=owner,
        )
        call = self.store.begin_turn(
            turn.conversation_id,
            turn.user_message,
            token=turn.token,
            new=new,
            history=self.max_history,
            owner=owner,
        )
        try:
            turn.prompt = await self._bounded(call, "begin the turn")
        except (StorageUnavailable, asyncio.CancelledError):
            self._repair(self._undo(turn))
            raise
        return turn

    async def finish_turn(self, turn: Turn, content: str, finish_reason: FinishReason) -> Message:
        """Store the reply (complete or partial) and release the lock; ``TurnLost`` if the turn
        no longer holds it. On ``StorageUnavailable`` the reply is stored later, in the
        background, if the store answers within the repair window."""
        reply = Message(turn.reply_id, "assistant", content, self._clock(), finish_reason)
        try:
            await self._bounded(
                self.store.finish_turn(turn.conversation_id, reply, token=turn.token), "store the reply"
            )
        except (StorageUnavailable, asyncio.CancelledError):
            self._repair(self._retry_finish(turn, reply))
            raise
        return reply

    async def cancel_turn(self, turn: Turn) -> None:
        """Undo a begun turn that will not stream (its user message goes, the lock is released)."""
        await self._bounded(self._undo_begin(turn), "cancel the turn")

    async def abandon(self, turn: Turn) -> None:
        """Undo a begun turn that will not stream, never raising: if the store does not answer
        now, the undo goes on in the background (as for a ``begin_turn`` whose answer was lost)."""
        try:
            await self.cancel_turn(turn)
        except (StorageUnavailable, asyncio.CancelledError):
            self._repair(self._undo(turn))
        except Exception as exc:
            log.warning("turn_not_undone", conversation_id=turn.conversation_id, error=repr(exc))

    def _store_reply(self, turn: Turn, reply: Message) -> Coroutine[None, None, None]:
        return self.store.finish_turn(turn.conversation_id, reply, token=turn.token)

    def _undo_begin(self, turn: Turn) -> Coroutine[None, None, bool]:
        user_message_id = turn.user_message.id
        return self.store.cancel_turn(
            turn.conversation_id, token=turn.token, user_message_id=user_message_id, new=turn.new
        )

    # --- repairs in the background ---

    def _repair(self, work: Coroutine[None, None, None]) -> None:
        if len(self._repairs) >= MAX_REPAIRS:
            work.close()
            log.warning("repair_skipped", pending=len(self._repairs))
            return
        task = asyncio.ensure_future(work)
        self._repairs.add(task)
        task.add_done_callback(self._repairs.discard)

    async def _attempts(self) -> AsyncIterator[None]:
        """Yield at each attempt of a repair: at once, then with backoff, within the window."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self.repair_window
        delay = self.timeout
        while True:
            yield
            if loop.time() + delay > give_up:
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, MAX_BACKOFF)

    async def _undo(self, turn: Turn) -> None:
        """Undo a ``begin_turn`` whose answer was lost. A call that reached the store late could
        still run after a first "nothing to undo", so look twice before believing it."""
        nothing = 0
        async for _ in self._attempts():
            try:
                async with asyncio.timeout(self.timeout):
                    undone = await self.store.cancel_turn(
                        turn.conversation_id,
                        token=turn.token,
                        user_message_id=turn.user_message.id,
                        new=turn.new,
                    )
            except (StorageUnavailable, TimeoutError):
                continue
            if undone:
                return
            nothing += 1
            if nothing == 2:
                return
        log.warning("turn_not_undone", conversation_id=turn.conversation_id)

    async def _retry_finish(self, turn: Turn, reply: Message) -> None:
        async for _ in self._attempts():
            try:
                async with asyncio.timeout(self.timeout):
                    await self._store_reply(turn, reply)
            except (StorageUnavailable, TimeoutError):
                continue
            except TurnLost:
                pass
            return
        log.warning("reply_not_stored", conversation_id=turn.conversation_id, message_id=reply.id)

    async def settle(self, within: float | None = None) -> None:
        """Wait for the background repairs (at most ``within`` seconds, by default one store
        deadline: the app is stopping); cancel any still running after."""
        if self._repairs:
            await asyncio.wait(list(self._repairs), timeout=self.timeout if within is None else within)
        for task in list(self._repairs):
            task.cancel()

    async def aclose(self) -> None:
        await self.settle()
        await self.store.close()

    # --- reads and management: each of one owner's conversations (another's is not found) ---

    async def create(self, *, owner: str) -> ConversationInfo:
        return await self._bounded(self.store.create(new_id(), owner=owner), "create a conversation")

    async def get(self, conversation_id: str, *, owner: str) -> ConversationInfo | None:
        return await self._bounded(self.store.info(conversation_id, owner=owner), "read the conversation")

    async def messages(self, conversation_id: str, limit: int | None = None, *, owner: str) -> list[Message]:
        call = self.store.messages(conversation_id, limit, owner=owner)
        return await self._bounded(call, "read the messages")

    async def list(self, limit: int = 100, *, owner: str) -> list[ConversationInfo]:
        return await self._bounded(self.store.list(limit, owner=owner), "list conversations")

    async def delete(self, conversation_id: str, *, owner: str) -> bool:
        return await self._bounded(self.store.delete(conversation_id, owner=owner), "delete the conversation")

    async def count(self, *, owner: str | None) -> int:
        """One owner's conversations, or (None) every owner's."""
        return await self._bounded(self.store.count(owner=owner), "count conversations")
