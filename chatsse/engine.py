"""Response engines: what turns a message history into a stream of text deltas.

Routes see only the :class:`Engine` protocol. The simulated engine here is the default;
a real LLM backend implements the same two methods. A :class:`Generation` yields, at each
step, the deltas it has at that moment (one or more): a real model's server sends several
tokens in one network chunk when it is ahead, and the simulated engine hands over a whole
sentence when it runs unpaced. Each delta is still its own event on the wire.

Simulated timing model (all settings in milliseconds)::

    ttft        = SIM_TTFT_MS + SIM_PREFILL_MS_PER_TOKEN * prompt_tokens
    gap(token)  = SIM_TOKEN_INTERVAL_MS * (1 + SIM_JITTER * uniform(-1, 1))

Token ``i`` is due at ``start + ttft + sum(gaps)``: deadlines are absolute, as on a real
server whose decode loop runs at its own pace, so a late event loop catches up rather
than drifting. All-zero timings produce tokens with no sleeping at all (for benchmarks).

Options: a client's sampling options (:class:`GenerationOptions`) go to the engine, which
uses what it supports: an upstream model all of them (chatsse/upstream.py); the simulated engine
``seed`` (another seed, another reply) and ``stop``; ``temperature`` and ``top_p`` do not change
a simulated reply.

Capacity: with ``SIM_MAX_CONCURRENCY`` = N > 0, at most N replies are generated at once
per engine (per worker process), like the batch slots of a GPU server; a further request
waits for a slot before its prefill starts, so its time to first token includes the wait.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Final, Literal, Protocol, runtime_checkable

from chatsse.models import Message
from chatsse.settings import Settings

CompletionReason = Literal["stop", "length"]

__all__ = [
    "DEFAULT_OPTIONS",
    "CompletionReason",
    "Draws",
    "Engine",
    "Generation",
    "GenerationOptions",
    "SimulatedEngine",
    "SimulatedGeneration",
    "StopSequences",
    "TimingModel",
    "count_prompt_tokens",
    "tokenize",
]

_WORD = re.compile(r"[A-Za-z][A-Za-z0-9'-]*")
_TOKEN = re.compile(r"\s*\w{1,8}|\s*[^\w\s]|\s+")
_MESSAGE_OVERHEAD_TOKENS = 4  # role and separators, as chat templates add


def tokenize(text: str) -> list[str]:
    """Split text into word-piece-like tokens whose concatenation is exactly ``text``."""
    return _TOKEN.findall(text)


def count_prompt_tokens(messages: Sequence[Message]) -> int:
    return sum(len(tokenize(m.content)) + _MESSAGE_OVERHEAD_TOKENS for m in messages)


class Uniform(Protocol):
    """What the timing model draws jitter from (``Draws``, or a ``random.Random``)."""

    def uniform(self, a: float, b: float) -> float: ...


_MASK64 = (1 << 64) - 1
_NO_LIMIT = 1 << 62


class Draws:
    """A small deterministic random source (splitmix64) for the simulated engine: a few
    draws per reply and one per jittered token. It holds one integer, where a
    ``random.Random`` holds 2.5 KiB of Mersenne Twister state in every open stream."""

    __slots__ = ("_state",)

    def __init__(self, seed: int) -> None:
        self._state = seed & _MASK64

    @classmethod
    def from_text(cls, text: str) -> Draws:
        return cls(int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big"))

    def next64(self) -> int:
        self._state = state = (self._state + 0x9E3779B97F4A7C15) & _MASK64
        z = ((state ^ (state >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        return z ^ (z >> 31)

    def below(self, n: int) -> int:
        """An integer in ``[0, n)`` (the bias for n far below 2**64 is negligible)."""
        return self.next64() % n

    def uniform(self, a: float, b: float) -> float:
        return a + (b - a) * (self.next64() >> 11) / (1 << 53)


@dataclass(frozen=True, slots=True)
class GenerationOptions:
    """What a client asked of one reply besides its messages and length (module docstring)."""

    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    user: str | None = None  # the end user, for an upstream's own accounting


DEFAULT_OPTIONS: Final = GenerationOptions()


@runtime_checkable
class Generation(Protocol):
    """One reply being generated: an async iterator of batches of text deltas, each batch the
    deltas ready at that step (never empty).

    ``start`` runs before the response starts: an engine that must reach a model first does it
    there, and raises :class:`~chatsse.errors.ApiError` if the model refuses (the client then
    gets an HTTP error and the turn is undone). ``finish_reason`` is set once iteration ends
    normally; token counts are live.
    """

    @property
    def prompt_tokens(self) -> int: ...

    @property
    def completion_tokens(self) -> int: ...

    @property
    def finish_reason(self) -> CompletionReason | None: ...

    async def start(self) -> None: ...

    def __aiter__(self) -> Generation: ...

    async def __anext__(self) -> Sequence[str]: ...

    async def aclose(self) -> None: ...


class Engine(Protocol):
    """What a response engine provides. ``generate`` must not block; iteration may sleep."""

    name: str

    def generate(
        self, messages: Sequence[Message], *, max_tokens: int, options: GenerationOptions = DEFAULT_OPTIONS
    ) -> Generation: ...

    async def aclose(self) -> None: ...


@dataclass(frozen=True, slots=True)
class TimingModel:
    ttft: float = 0.15
    prefill_per_token: float = 0.0005
    token_interval: float = 0.03
    jitter: float = 0.2

    @classmethod
    def from_settings(cls, settings: Settings) -> TimingModel:
        return cls(
            ttft=settings.sim_ttft_ms / 1000,
            prefill_per_token=settings.sim_prefill_ms_per_token / 1000,
            token_interval=settings.sim_token_interval_ms / 1000,
            jitter=settings.sim_jitter,
        )

    @property
    def paced(self) -> bool:
        return self.ttft > 0 or self.prefill_per_token > 0 or self.token_interval > 0

    def time_to_first_token(self, prompt_tokens: int) -> float:
        return self.ttft + self.prefill_per_token * prompt_tokens

    def gap(self, rng: Uniform) -> float:
        if self.jitter == 0:
            return self.token_interval
        return self.token_interval * (1 + self.jitter * rng.uniform(-1.0, 1.0))


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class SimulatedGeneration:
    """A reply's tokens, released on the timing model's schedule.

    ``parts`` are the reply's tokens a part (a sentence) at a time, and may be lazy: the
    simulated engine tokenizes a sentence when it reaches it, so an open stream holds the text
    it has sent, not the whole reply to come. A step yields the tokens due: unpaced, the rest
    of the current part; paced, the next token once its deadline comes, with any others whose
    deadline has passed meanwhile (a late loop catches up). With ``max_tokens``, iteration
    stops there, and ``finish_reason`` is ``"length"`` if the reply had more.
    """

    __slots__ = (
        "_done",
        "_due",
        "_loop",
        "_max",
        "_paced",
        "_part",
        "_parts",
        "_pos",
        "_rng",
        "_slot",
        "_slots",
        "_timing",
        "_ttft",
        "completion_tokens",
        "finish_reason",
        "prompt_tokens",
    )

    def __init__(
        self,
        parts: Iterable[Sequence[str]],
        *,
        prompt_tokens: int,
        timing: TimingModel,
        rng: Uniform,
        max_tokens: int | None = None,
        slots: asyncio.Semaphore | None = None,
    ) -> None:
        self._slots = slots
        self._slot = False
        self._parts: Iterator[Sequence[str]] = iter(parts)
        self._part: Sequence[str] = ()
        self._pos = 0
        self._max = max_tokens
        self._done = False
        self._timing = timing
        self._rng = rng
        self._ttft = timing.time_to_first_token(prompt_tokens)
        self._paced = timing.paced
        self._due: float | None = None  # when the next token is due (loop time)
        self._loop: asyncio.AbstractEventLoop | None = None
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0
        self.finish_reason: CompletionReason | None = None

    async def start(self) -> None:
        return None

    def __aiter__(self) -> SimulatedGeneration:
        return self

    def _take(self, limit: int) -> list[str]:
        """Up to ``limit`` tokens of the current part (reaching the next part if this one is
        used up); empty at the end of the reply."""
        while self._pos >= len(self._part):
            part = next(self._parts, None)
            if part is None:
                return []
            self._part, self._pos = part, 0
        start = self._pos
        self._pos = end = min(len(self._part), start + limit)
        return list(self._part[start:end])

    def _stop(self, reason: CompletionReason) -> StopAsyncIteration:
        self._done = True
        self.finish_reason = reason
        self._release()
        return StopAsyncIteration()

    async def __anext__(self) -> list[str]:
        if self._done:
            raise StopAsyncIteration
        n = self.completion_tokens
        room = _NO_LIMIT if self._max is None else self._max - n
        if room <= 0:
            raise self._stop("length" if self._take(1) else "stop")
        if not self._paced:
            batch = self._take(room)
            if not batch:
                raise self._stop("stop")
            if n == 0 and self._slots is not None and not self._slot:
                await self._acquire()
            self.completion_tokens = n + len(batch)
            return batch
        part, pos = self._part, self._pos
        if pos < len(part):  # the common case, inline: the next token of this part
            batch = [part[pos]]
            self._pos = pos + 1
        else:
            batch = self._take(1)
            if not batch:
                raise self._stop("stop")
        if n == 0 and self._slots is not None and not self._slot:
            await self._acquire()
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        now = loop.time()
        if self._due is None:
            self._due = now + self._ttft
        if self._due > now:
            # asyncio.sleep without its coroutine: a future the loop's timer completes. A
            # cancel cancels the future; the timer then finds it done and does nothing.
            wake = loop.create_future()
            loop.call_at(self._due, _wake, wake)
            await wake
            now = loop.time()
        timing, rng = self._timing, self._rng
        self._due += timing.gap(rng)
        while len(batch) < room and self._due <= now:  # due already: the loop was late
            more = self._take(1)
            if not more:
                break
            batch += more
            self._due += timing.gap(rng)
        self.completion_tokens = n + len(batch)
        return batch

    async def _acquire(self) -> None:
        assert self._slots is not None
        await self._slots.acquire()
        self._slot = True

    async def aclose(self) -> None:
        """Stop early: iteration ends and ``finish_reason`` stays None."""
        self._done = True
        self._release()

    def _release(self) -> None:
        if self._slot and self._slots is not None:
            self._slot = False
            self._slots.release()


class StopSequences:
    """A generation that ends at the first of ``stop`` in its text, which is not sent (OpenAI's
    ``stop``), for engines that cannot stop by themselves. Text that could still be the start
    of a stop sequence is held back until it cannot; other text goes out a token at a time."""

    __slots__ = ("_done", "_held", "_inner", "_stop", "finish_reason")

    def __init__(self, inner: Generation, stop: Sequence[str]) -> None:
        self._inner = inner
        self._stop = tuple(s for s in stop if s)
        self._held = ""
        self._done = False
        self.finish_reason: CompletionReason | None = None

    @property
    def prompt_tokens(self) -> int:
        return self._inner.prompt_tokens

    @property
    def completion_tokens(self) -> int:
        return self._inner.completion_tokens

    async def start(self) -> None:
        await self._inner.start()

    def __aiter__(self) -> StopSequences:
        return self

    def _held_back(self, text: str) -> int:
        """How many characters at the end of ``text`` begin some stop sequence."""
        longest = 0
        for stop in self._stop:
            for n in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:n]):
                    longest = n
                    break
        return longest

    async def __anext__(self) -> list[str]:
        while not self._done:
            try:
                batch = await self._inner.__anext__()
            except StopAsyncIteration:
                self._done = True
                self.finish_reason = self._inner.finish_reason
                if self._held:
                    held, self._held = self._held, ""
                    return [held]
                raise
            out: list[str] = []
            for token in batch:
                text = self._held + token
                at = min((i for i in (text.find(s) for s in self._stop) if i >= 0), default=-1)
                if at >= 0:
                    if at:
                        out.append(text[:at])
                    self._held = ""
                    self._done = True
                    self.finish_reason = "stop"
                    await self._inner.aclose()
                    break
                keep = self._held_back(text)
                if len(text) > keep:
                    out.append(text[: len(text) - keep])
                self._held = text[len(text) - keep :]
            if out:
                return out
        raise StopAsyncIteration

    async def aclose(self) -> None:
        self._done = True
        await self._inner.aclose()


_OPENINGS = (
    'You asked: "{quote}".',
    'Good question about "{quote}".',
    'Let me think about "{quote}".',
    'On "{quote}" - here is how I see it.',
)
_FOLLOW_UPS = (
    "Building on what we said earlier about {earlier}, let me add a little more.",
    "Coming back to {earlier} from before: most of it still applies here.",
    "Since we already covered {earlier}, I will build on that.",
)
_SENTENCES = (
    "The short answer is that {topic} depends on what you measure and when you measure it.",
    "A useful way to approach {topic} is to start from the behaviour you want and work back.",
    "Most of the cost in {topic} comes from a few places, so profile before you optimise.",
    "When {topic} runs under load, the tail latency tells you more than the average.",
    "It helps to write down the trade-offs of {topic} before picking an approach.",
    "A small experiment with {topic} will teach you more than a long argument.",
    "Keep the fast path for {topic} short and move everything else out of it.",
    "If {topic} has to stream, send each piece as soon as it is ready.",
    "The details of {topic} matter less than a clear way to check that it works.",
    "For {topic}, a simple model first and a refined one later usually wins.",
    "Watch what happens to {topic} when two things happen at the same time.",
    "There is rarely one right answer for {topic}, but there are many wrong ones.",
)
_STOPWORDS = frozenset(
    """a an and are about at be but can could did do does for from have how i if in into is it its
    me my of on or our please should so tell than that the them then there these they this to
    under was we were what when where which while who why will with would you your""".split()
)


def _quote(text: str, limit: int = 60) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3].rstrip() + "..."


def _topic(text: str) -> str:
    """A guess at what a message is about: its longest run of consecutive content words
    (at most two of them), e.g. "SSE streams" in "How do SSE streams behave under load?"."""
    runs: list[list[str]] = [[]]
    for word in _WORD.findall(text):
        if word.lower() in _STOPWORDS or len(word) < 2:
            runs.append([])
        else:
            runs[-1].append(word)
    best = max(runs, key=lambda run: sum(map(len, run)))
    return " ".join(best[:2]) if best else "this"


def _split_template(template: str) -> tuple[list[str], list[str]]:
    """The tokens of ``" " + template`` before and after ``{topic}``, which every template has
    after a space. A token never spans a space that follows a non-space, nor a punctuation
    mark that follows a word (``tokenize``'s pattern), so the tokens of the formatted sentence
    are these around the tokens of ``" " + topic`` (tests/test_engine.py checks)."""
    text = " " + template
    at = text.index("{topic}")
    if text[at - 1] != " ":
        raise ValueError(f"{{topic}} must follow a space: {template!r}")
    return tokenize(text[: at - 1]), tokenize(text[at + len("{topic}") :])


_SENTENCE_TOKENS = tuple(_split_template(sentence) for sentence in _SENTENCES)
_STEPS = tuple(step for step in range(1, len(_SENTENCES)) if math.gcd(step, len(_SENTENCES)) == 1)


def _parts(
    opening: list[str], follow_up: list[str] | None, target: int, order: tuple[int, int], topic: str
) -> Iterator[list[str]]:
    # Parts are joined by single spaces; tokenizing " " + part gives exactly the tokens of
    # that part within the joined text (a token carries its leading whitespace). Sentences
    # come from the pool in the order ``(first, step)`` gives: a step coprime to the pool's
    # size visits every sentence before one repeats.
    yield opening
    count = len(opening)
    if follow_up is not None:
        yield follow_up
        count += len(follow_up)
    topic_tokens = tokenize(" " + topic)
    index, step = order
    while count < target:
        before, after = _SENTENCE_TOKENS[index]
        sentence = [*before, *topic_tokens, *after]
        yield sentence
        count += len(sentence)
        index = (index + step) % len(_SENTENCES)


class SimulatedEngine:
    """A deterministic stand-in for an LLM: same seed and history, same reply and pacing."""

    name = "simulated"

    def __init__(
        self,
        timing: TimingModel | None = None,
        *,
        reply_tokens: tuple[int, int] = (20, 80),
        seed: int = 0,
        max_concurrency: int = 0,
    ) -> None:
        low, high = reply_tokens
        if not 1 <= low <= high:
            raise ValueError(f"reply_tokens must satisfy 1 <= min <= max, got {reply_tokens}")
        self.timing = timing or TimingModel()
        self.reply_tokens = reply_tokens
        self.seed = seed
        self.max_concurrency = max_concurrency
        self._slots: asyncio.Semaphore | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> SimulatedEngine:
        return cls(
            TimingModel.from_settings(settings),
            reply_tokens=(settings.sim_reply_tokens_min, settings.sim_reply_tokens_max),
            seed=settings.sim_seed,
            max_concurrency=settings.sim_max_concurrency,
        )

    def compose(self, messages: Sequence[Message]) -> str:
        """The full reply text for a history (whose last user message it answers)."""
        return "".join(chain.from_iterable(self._reply_parts(messages, self._draws(messages))))

    def _draws(self, messages: Sequence[Message], seed: int | None = None) -> Draws:
        history = "\x1e".join(f"{m.role}:{m.content}" for m in messages)
        return Draws.from_text(f"{self.seed if seed is None else seed}\x1f{history}")

    def _reply_parts(self, messages: Sequence[Message], draws: Draws) -> Iterator[list[str]]:
        """The reply's tokens, a part (sentence) at a time. Every random choice is made here,
        before the first token, so the pacing that follows draws the same numbers however
        far the reply is read; the sentences are tokenized as they are reached."""
        users = [m.content for m in messages if m.role == "user"]
        last = users[-1] if users else ""
        topic = _topic(last)
        opening = tokenize(_OPENINGS[draws.below(len(_OPENINGS))].format(quote=_quote(last)))
        follow_up = None
        if len(users) > 1:
            earlier = _FOLLOW_UPS[draws.below(len(_FOLLOW_UPS))].format(earlier=_topic(users[-2]))
            follow_up = tokenize(" " + earlier)
        low, high = self.reply_tokens
        target = low + draws.below(high - low + 1)
        order = (draws.below(len(_SENTENCES)), _STEPS[draws.below(len(_STEPS))])
        return _parts(opening, follow_up, target, order, topic)

    def generate(
        self, messages: Sequence[Message], *, max_tokens: int, options: GenerationOptions = DEFAULT_OPTIONS
    ) -> SimulatedGeneration | StopSequences:
        draws = self._draws(messages, options.seed)
        parts = self._reply_parts(messages, draws)
        if self.max_concurrency and self._slots is None:
            self._slots = asyncio.Semaphore(self.max_concurrency)
        generation = SimulatedGeneration(
            parts,
            prompt_tokens=count_prompt_tokens(messages),
            max_tokens=max_tokens,
            timing=self.timing,
            rng=draws,
            slots=self._slots,
        )
        return StopSequences(generation, options.stop) if options.stop else generation

    async def aclose(self) -> None:
        return None
