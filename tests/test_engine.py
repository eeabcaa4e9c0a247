"""Tests for chatsse.engine: the tokenizer, the timing model and the simulated engine."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Coroutine, Iterator, Sequence
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import chatsse.engine as engine_module
from chatsse.engine import (
    Generation,
    SimulatedEngine,
    SimulatedGeneration,
    TimingModel,
    count_prompt_tokens,
    tokenize,
)
from chatsse.models import Message, Role
from chatsse.settings import Settings

UNPACED = TimingModel(ttft=0.0, prefill_per_token=0.0, token_interval=0.0, jitter=0.0)
QUESTION = "How do I tune the latency of my streaming server?"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def msg(role: Role, content: str, i: int = 0) -> Message:
    return Message(f"m{i}", role, content, float(i))


def history(*texts: str) -> list[Message]:
    """Alternating user/assistant messages, starting (and, for odd counts, ending) with user."""
    roles: tuple[Role, Role] = ("user", "assistant")
    return [msg(roles[i % 2], text, i) for i, text in enumerate(texts)]


def step(coro: Coroutine[Any, Any, list[str]]) -> list[str]:
    """Run one ``__anext__`` to completion without an event loop; fail if it suspends."""
    try:
        coro.send(None)
    except StopIteration as done:
        batch: list[str] = done.value
        assert batch, "a step yields at least one token"
        return batch
    coro.close()
    pytest.fail("the generation suspended (it would have slept)")


def drain(gen: SimulatedGeneration) -> list[str]:
    """All tokens of an unpaced generation, with no event loop at all."""
    out: list[str] = []
    while True:
        try:
            out += step(gen.__anext__())
        except StopAsyncIteration:
            return out


def reply(engine: SimulatedEngine, messages: Sequence[Message]) -> str:
    return "".join(drain(engine.generate(messages, max_tokens=10**6)))


def unpaced_engine(seed: int = 0, reply_tokens: tuple[int, int] = (20, 80)) -> SimulatedEngine:
    return SimulatedEngine(UNPACED, reply_tokens=reply_tokens, seed=seed)


# --- tokenizer -------------------------------------------------------------


@given(st.text())
def test_tokenize_concatenation_is_exactly_the_input(text: str) -> None:
    tokens = tokenize(text)
    assert "".join(tokens) == text
    assert all(tokens)  # no empty tokens


def test_tokenize_splits_words_punctuation_and_long_words() -> None:
    assert tokenize("hello, world") == ["hello", ",", " world"]
    assert tokenize("internationalization") == ["internat", "ionaliza", "tion"]
    assert tokenize("") == []
    assert tokenize("  ") == ["  "]


def test_count_prompt_tokens_adds_per_message_overhead() -> None:
    messages = [msg("user", "hello world", 0), msg("assistant", "hi!", 1), msg("user", "", 2)]
    per_message_overhead = 4
    expected = sum(len(tokenize(m.content)) + per_message_overhead for m in messages)
    assert expected == 2 + 2 + 0 + 3 * per_message_overhead
    assert count_prompt_tokens(messages) == expected
    assert count_prompt_tokens([]) == 0


# --- timing model ----------------------------------------------------------


def test_time_to_first_token_grows_with_prompt_length() -> None:
    timing = TimingModel(ttft=0.1, prefill_per_token=0.002, token_interval=0.03, jitter=0.0)
    assert timing.time_to_first_token(0) == pytest.approx(0.1)
    assert timing.time_to_first_token(50) == pytest.approx(0.1 + 0.002 * 50)
    ttfts = [timing.time_to_first_token(n) for n in range(0, 1000, 100)]
    assert ttfts == sorted(ttfts)
    assert len(set(ttfts)) == len(ttfts)


def test_generation_first_token_due_later_for_longer_history() -> None:
    timing = TimingModel(ttft=0.1, prefill_per_token=0.01, token_interval=0.0, jitter=0.0)
    engine = SimulatedEngine(timing)
    short = engine.generate(history("hi"), max_tokens=5)
    long = engine.generate(history("hi " * 200), max_tokens=5)
    assert long.prompt_tokens > short.prompt_tokens
    assert timing.time_to_first_token(long.prompt_tokens) > timing.time_to_first_token(short.prompt_tokens)


@given(
    interval=st.floats(min_value=0.0, max_value=10.0),
    jitter=st.floats(min_value=0.0, max_value=1.0),
    seed=st.integers(),
)
def test_gap_with_jitter_stays_within_bounds(interval: float, jitter: float, seed: int) -> None:
    timing = TimingModel(ttft=0.0, prefill_per_token=0.0, token_interval=interval, jitter=jitter)
    rng = random.Random(seed)
    low, high = interval * (1 - jitter), interval * (1 + jitter)
    for _ in range(20):
        gap = timing.gap(rng)
        assert low - 1e-12 <= gap <= high + 1e-12


def test_gap_without_jitter_is_the_interval() -> None:
    timing = TimingModel(ttft=0.0, prefill_per_token=0.0, token_interval=0.03, jitter=0.0)
    rng = random.Random(1)
    assert {timing.gap(rng) for _ in range(10)} == {0.03}


def test_gap_with_jitter_varies() -> None:
    timing = TimingModel(ttft=0.0, prefill_per_token=0.0, token_interval=0.03, jitter=0.5)
    rng = random.Random(1)
    assert len({timing.gap(rng) for _ in range(10)}) > 1


def test_zero_timings_are_not_paced() -> None:
    assert TimingModel(0.0, 0.0, 0.0, 0.0).paced is False
    assert TimingModel(0.0, 0.0, 0.0, 0.7).paced is False  # jitter of nothing is nothing
    assert TimingModel(0.001, 0.0, 0.0, 0.0).paced is True
    assert TimingModel(0.0, 0.001, 0.0, 0.0).paced is True
    assert TimingModel(0.0, 0.0, 0.001, 0.0).paced is True


def test_timing_model_from_settings_converts_milliseconds() -> None:
    settings = Settings(
        _env_file=None,
        sim_ttft_ms=250.0,
        sim_prefill_ms_per_token=2.0,
        sim_token_interval_ms=40.0,
        sim_jitter=0.1,
    )
    timing = TimingModel.from_settings(settings)
    assert timing.ttft == pytest.approx(0.25)
    assert timing.prefill_per_token == pytest.approx(0.002)
    assert timing.token_interval == pytest.approx(0.04)
    assert timing.jitter == pytest.approx(0.1)


def test_engine_from_settings() -> None:
    settings = Settings(_env_file=None, sim_reply_tokens_min=5, sim_reply_tokens_max=9, sim_seed=42)
    engine = SimulatedEngine.from_settings(settings)
    assert engine.reply_tokens == (5, 9)
    assert engine.seed == 42
    assert engine.timing == TimingModel.from_settings(settings)


@pytest.mark.parametrize("reply_tokens", [(0, 5), (10, 5), (-1, 1)])
def test_engine_rejects_bad_reply_token_range(reply_tokens: tuple[int, int]) -> None:
    with pytest.raises(ValueError, match="reply_tokens"):
        SimulatedEngine(reply_tokens=reply_tokens)


# --- the computed schedule (a fake loop clock; nothing really sleeps) ----------


class _Done:
    """A future the fake loop's timer has completed: awaiting it does not suspend."""

    def __init__(self) -> None:
        self.finished = False

    def done(self) -> bool:
        return self.finished

    def set_result(self, value: object) -> None:
        self.finished = True

    def __await__(self) -> Iterator[None]:
        assert self.finished, "awaited a timer that was never set"
        return iter(())


class FakeLoop:
    """Stands in for the event loop inside chatsse.engine: a clock that each timer advances
    to its deadline (plus ``late``), at once."""

    def __init__(self, start: float = 100.0, late: float = 0.0) -> None:
        self.now = start
        self.late = late  # how much every wait oversleeps
        self.sleeps: list[float] = []

    def time(self) -> float:
        return self.now

    def create_future(self) -> _Done:
        return _Done()

    def call_at(self, when: float, callback: Any, future: _Done) -> None:
        self.sleeps.append(when - self.now)
        self.now = when + self.late
        callback(future)


def install(monkeypatch: pytest.MonkeyPatch, loop: FakeLoop) -> FakeLoop:
    fake_asyncio = SimpleNamespace(get_running_loop=lambda: loop)
    monkeypatch.setattr(engine_module, "asyncio", fake_asyncio)
    return loop


@pytest.fixture
def fake_loop(monkeypatch: pytest.MonkeyPatch) -> FakeLoop:
    return install(monkeypatch, FakeLoop())


def release_times(gen: SimulatedGeneration, loop: FakeLoop) -> list[float]:
    """Iterate ``gen`` on the fake loop; the fake clock reading when each token is released."""
    times: list[float] = []
    while True:
        try:
            batch = step(gen.__anext__())
        except StopAsyncIteration:
            return times
        times += [loop.now] * len(batch)


def test_schedule_without_jitter(fake_loop: FakeLoop) -> None:
    timing = TimingModel(ttft=0.05, prefill_per_token=0.001, token_interval=0.02, jitter=0.0)
    gen = SimulatedGeneration(
        [["a", "b"], ["c", "d"]],
        prompt_tokens=30,
        timing=timing,
        rng=random.Random(0),
    )
    start = fake_loop.now
    times = release_times(gen, fake_loop)
    ttft = 0.05 + 0.001 * 30
    assert times == pytest.approx([start + ttft + 0.02 * i for i in range(4)])
    assert fake_loop.sleeps == pytest.approx([ttft, 0.02, 0.02, 0.02])


def test_schedule_with_seeded_jitter_follows_the_formula(fake_loop: FakeLoop) -> None:
    interval, jitter, seed = 0.02, 0.5, 7
    timing = TimingModel(ttft=0.1, prefill_per_token=0.0, token_interval=interval, jitter=jitter)
    gen = SimulatedGeneration(
        [list("abc"), list("def")],
        prompt_tokens=3,
        timing=timing,
        rng=random.Random(seed),
    )
    expected_rng = random.Random(seed)
    gaps = [interval * (1 + jitter * expected_rng.uniform(-1.0, 1.0)) for _ in range(5)]
    start = fake_loop.now
    times = release_times(gen, fake_loop)
    expected = [start + 0.1]
    for gap in gaps:
        expected.append(expected[-1] + gap)
    assert times == pytest.approx(expected)
    assert len(set(fake_loop.sleeps)) > 1


def test_late_loop_catches_up_instead_of_drifting(fake_loop: FakeLoop) -> None:
    # Every sleep oversleeps by 2.5 token intervals: deadlines are absolute, so tokens
    # whose deadline has passed are released at once and lateness does not accumulate.
    fake_loop.late = 0.05
    timing = TimingModel(ttft=0.1, prefill_per_token=0.0, token_interval=0.02, jitter=0.0)
    gen = SimulatedGeneration([list("abcdefgh")], prompt_tokens=0, timing=timing, rng=random.Random())
    start = fake_loop.now
    times = release_times(gen, fake_loop)
    deadlines = [start + 0.1 + 0.02 * i for i in range(8)]
    assert len(times) == 8
    for released, due in zip(times, deadlines, strict=True):
        assert due - 1e-9 <= released <= due + fake_loop.late + 1e-9
    assert len(fake_loop.sleeps) < 8  # some tokens were already due: no sleep for them


def test_zero_timings_generate_without_sleeping() -> None:
    # ``step`` drives each __anext__ with no event loop: any sleep would suspend and fail.
    gen = unpaced_engine().generate(history(QUESTION), max_tokens=10**6)
    tokens = drain(gen)
    assert tokens
    assert gen.finish_reason == "stop"


def test_zero_timings_never_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_loop() -> None:
        raise AssertionError("asked for the event loop: it would have waited")

    fake_asyncio = SimpleNamespace(get_running_loop=no_loop)
    monkeypatch.setattr(engine_module, "asyncio", fake_asyncio)
    gen = unpaced_engine().generate(history(QUESTION), max_tokens=10**6)
    assert drain(gen)


# --- the simulated engine's replies ------------------------------------------


def test_same_seed_and_history_give_the_same_reply() -> None:
    messages = history("What is backpressure?", "It is flow control.", "And in SSE?")
    first = unpaced_engine(seed=3).generate(messages, max_tokens=10**6)
    second = unpaced_engine(seed=3).generate(messages, max_tokens=10**6)
    assert drain(first) == drain(second)


def test_same_seed_and_history_give_the_same_jittered_schedule(monkeypatch: pytest.MonkeyPatch) -> None:
    timing = TimingModel(ttft=0.05, prefill_per_token=0.001, token_interval=0.02, jitter=0.8)
    schedules = []
    for _ in range(2):
        loop = install(monkeypatch, FakeLoop())
        gen = SimulatedEngine(timing, seed=11).generate(history(QUESTION), max_tokens=10**6)
        release_times(gen, loop)
        schedules.append(loop.sleeps)
    assert schedules[0] == schedules[1]
    assert len(set(schedules[0][1:])) > 1


def test_other_seed_gives_another_reply() -> None:
    messages = history(QUESTION)
    assert reply(unpaced_engine(seed=0), messages) != reply(unpaced_engine(seed=1), messages)


def test_other_history_gives_another_reply() -> None:
    engine = unpaced_engine(seed=0)
    assert reply(engine, history("Tell me about caching")) != reply(engine, history("Tell me about sharding"))


@pytest.mark.parametrize("seed", range(6))
def test_reply_quotes_the_last_user_message(seed: int) -> None:
    messages = history("Explain websockets", "They are sockets.", "  How   do\nI stream\ttokens?  ")
    text = reply(unpaced_engine(seed=seed), messages)
    assert '"How do I stream tokens?"' in text  # whitespace flattened


def test_reply_quotes_a_long_message_truncated() -> None:
    long = "word " * 40
    flat = " ".join(long.split())
    assert len(flat) > 60
    text = reply(unpaced_engine(), history(long))
    assert f'"{flat[:57].rstrip()}..."' in text
    assert flat not in text


@pytest.mark.parametrize("seed", range(6))
def test_multi_turn_reply_refers_back_to_the_previous_topic(seed: int) -> None:
    engine = unpaced_engine(seed=seed)
    earlier = "Tell me about websockets"  # only non-stopword: "websockets"
    last = "What about compression?"
    multi = reply(engine, history(earlier, "Sure.", last))
    single = reply(engine, history(last))
    assert "websockets" in multi
    assert any(phrase in multi for phrase in ("earlier", "from before", "already covered"))
    assert "websockets" not in single


@settings(max_examples=200)
@given(
    seed=st.integers(min_value=0, max_value=10**6),
    low=st.integers(min_value=1, max_value=120),
    extra=st.integers(min_value=0, max_value=60),
)
def test_reply_has_at_least_min_tokens(seed: int, low: int, extra: int) -> None:
    # compose() draws a target in [min, max] and appends sentences until it is reached.
    engine = unpaced_engine(seed=seed, reply_tokens=(low, low + extra))
    tokens = tokenize(reply(engine, history(QUESTION)))
    assert len(tokens) >= low


@settings(max_examples=200)
@given(
    seed=st.integers(min_value=0, max_value=10**6),
    low=st.integers(min_value=1, max_value=120),
    extra=st.integers(min_value=0, max_value=60),
)
def test_reply_exceeds_max_tokens_by_at_most_one_sentence(seed: int, low: int, extra: int) -> None:
    # Without its last sentence the reply is still below the target (<= max): the
    # sentence that reached the target is the only overshoot.
    high = low + extra
    text = reply(unpaced_engine(seed=seed, reply_tokens=(low, high)), history(QUESTION))
    assert text.endswith(".")
    head, _, _last_sentence = text[:-1].rpartition(". ")  # QUESTION holds no ". "
    assert len(tokenize(head + "." if head else "")) < high


def test_max_tokens_cuts_the_reply_with_finish_reason_length() -> None:
    engine = unpaced_engine()
    messages = history(QUESTION)
    full = drain(engine.generate(messages, max_tokens=10**6))
    assert len(full) > 5
    cut = engine.generate(messages, max_tokens=5)
    assert drain(cut) == full[:5]
    assert cut.finish_reason == "length"
    assert cut.completion_tokens == 5

    one_short = engine.generate(messages, max_tokens=len(full) - 1)
    assert drain(one_short) == full[:-1]
    assert one_short.finish_reason == "length"


def test_reply_within_max_tokens_has_finish_reason_stop() -> None:
    engine = unpaced_engine()
    messages = history(QUESTION)
    full = drain(engine.generate(messages, max_tokens=10**6))
    exact = engine.generate(messages, max_tokens=len(full))
    assert drain(exact) == full
    assert exact.finish_reason == "stop"


def test_finish_reason_is_none_until_iteration_ends_and_tokens_are_counted() -> None:
    messages = history(QUESTION)
    gen = unpaced_engine().generate(messages, max_tokens=10**6)
    assert isinstance(gen, Generation)
    assert gen.prompt_tokens == count_prompt_tokens(messages)
    assert gen.completion_tokens == 0
    assert gen.finish_reason is None
    yielded = 0
    while True:
        try:
            batch = step(gen.__anext__())
        except StopAsyncIteration:
            break
        yielded += len(batch)
        assert gen.completion_tokens == yielded
        assert gen.finish_reason is None
    assert yielded > 0
    assert gen.finish_reason == "stop"
    assert gen.completion_tokens == yielded
    with pytest.raises(StopAsyncIteration):
        step(gen.__anext__())
    assert gen.completion_tokens == yielded


# --- live (real event loop) ----------------------------------------------------


@pytest.mark.anyio
async def test_live_pacing_takes_at_least_ttft_plus_gaps() -> None:
    timing = TimingModel(ttft=0.05, prefill_per_token=0.0, token_interval=0.02, jitter=0.0)
    gen = SimulatedGeneration([["a", "b", "c"]], prompt_tokens=10, timing=timing, rng=random.Random(0))
    loop = asyncio.get_running_loop()
    started_loop, started_wall = loop.time(), time.monotonic()
    tokens = [token async for batch in gen for token in batch]
    assert tokens == ["a", "b", "c"]
    # ttft + 2 gaps = 0.09 s; only a lower bound (a busy machine may be slower).
    assert loop.time() - started_loop >= 0.09 - 0.002
    assert time.monotonic() - started_wall >= 0.09 - 0.002
    assert gen.finish_reason == "stop"


@pytest.mark.anyio
async def test_aclose_stops_iteration() -> None:
    gen = unpaced_engine().generate(history(QUESTION), max_tokens=10**6)
    first = [await gen.__anext__(), await gen.__anext__()]
    assert all(first)
    await gen.aclose()
    assert [batch async for batch in gen] == []
    with pytest.raises(StopAsyncIteration):
        await gen.__anext__()
    assert gen.completion_tokens == sum(map(len, first))


@pytest.mark.anyio
async def test_aclose_does_not_report_a_normal_finish() -> None:
    # Generation's contract: finish_reason "is set once iteration ends normally".
    # A reply closed after 2 tokens did not stop normally.
    gen = unpaced_engine().generate(history(QUESTION), max_tokens=10**6)
    await gen.__anext__()
    await gen.__anext__()
    await gen.aclose()
    assert [batch async for batch in gen] == []
    assert gen.finish_reason is None


@pytest.mark.anyio
async def test_engine_aclose() -> None:
    engine = unpaced_engine()
    await engine.aclose()
    assert reply(engine, history(QUESTION))  # the simulated engine holds no resources


async def _collect(generation: Any, name: str, order: list[str]) -> None:
    async for batch in generation:
        order += [name] * len(batch)
        await asyncio.sleep(0)


@pytest.mark.anyio
async def test_max_concurrency_makes_a_second_reply_wait_for_a_slot() -> None:
    engine = SimulatedEngine(TimingModel(0, 0, 0.001, 0), reply_tokens=(5, 5), max_concurrency=1)
    first = engine.generate(history("first question"), max_tokens=5)
    second = engine.generate(history("second question"), max_tokens=5)
    order: list[str] = []
    await asyncio.gather(_collect(first, "first", order), _collect(second, "second", order))
    assert order == ["first"] * 5 + ["second"] * 5


@pytest.mark.anyio
async def test_without_a_limit_replies_interleave() -> None:
    engine = SimulatedEngine(TimingModel(0, 0, 0.001, 0), reply_tokens=(5, 5))
    order: list[str] = []
    await asyncio.gather(
        _collect(engine.generate(history("one"), max_tokens=5), "first", order),
        _collect(engine.generate(history("two"), max_tokens=5), "second", order),
    )
    assert order != ["first"] * 5 + ["second"] * 5


@pytest.mark.anyio
async def test_aclose_gives_the_slot_back() -> None:
    engine = SimulatedEngine(TimingModel(0, 0, 0.001, 0), reply_tokens=(5, 5), max_concurrency=1)
    first = engine.generate(history("first question"), max_tokens=5)
    await first.__anext__()
    await first.aclose()
    second = engine.generate(history("second question"), max_tokens=5)
    order: list[str] = []
    await asyncio.wait_for(_collect(second, "second", order), 5)  # waits forever if the slot is kept
    assert order == ["second"] * 5


def test_generation_reads_its_parts_only_as_far_as_it_releases_them() -> None:
    pulled: list[int] = []

    def parts() -> Iterator[list[str]]:
        for i, part in enumerate([["a", "b"], ["c"], ["d", "e"]]):
            pulled.append(i)
            yield part

    gen = SimulatedGeneration(parts(), prompt_tokens=1, timing=UNPACED, rng=random.Random(0))
    assert [step(gen.__anext__()), step(gen.__anext__())] == [["a", "b"], ["c"]]  # a part a step
    assert pulled == [0, 1]  # nothing composed ahead of what was sent


def test_a_late_loop_releases_the_tokens_already_due_in_one_step(fake_loop: FakeLoop) -> None:
    fake_loop.late = 0.05  # each sleep overshoots by 2.5 intervals
    timing = TimingModel(ttft=0.1, prefill_per_token=0.0, token_interval=0.02, jitter=0.0)
    gen = SimulatedGeneration([list("abcdefgh")], prompt_tokens=0, timing=timing, rng=random.Random())
    batches = []
    while True:
        try:
            batches.append(step(gen.__anext__()))
        except StopAsyncIteration:
            break
    assert "".join("".join(b) for b in batches) == "abcdefgh"
    assert max(len(b) for b in batches) > 1
    assert len(batches) == len(fake_loop.sleeps)  # one wait per step, none per token


@pytest.mark.parametrize(("available", "reason"), [(5, "length"), (3, "stop"), (2, "stop")])
def test_max_tokens_cuts_the_reply_and_says_whether_it_was_cut(available: int, reason: str) -> None:
    gen = SimulatedGeneration(
        [list("abcde"[:available])], prompt_tokens=1, timing=UNPACED, rng=random.Random(0),
        max_tokens=3,
    )  # fmt: skip
    assert drain(gen) == list("abcde"[: min(available, 3)])
    assert gen.finish_reason == reason
    assert gen.completion_tokens == min(available, 3)


@given(st.text(max_size=80))
def test_pre_tokenized_sentences_equal_tokenizing_the_formatted_sentence(text: str) -> None:
    """The simulated engine tokenizes each sentence template once, around its ``{topic}``;
    for any topic a message can yield, that is exactly the formatted sentence's tokens."""
    topic = engine_module._topic(text)
    for template, (before, after) in zip(
        engine_module._SENTENCES, engine_module._SENTENCE_TOKENS, strict=True
    ):
        assert [*before, *tokenize(" " + topic), *after] == tokenize(" " + template.format(topic=topic))
