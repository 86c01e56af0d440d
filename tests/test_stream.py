"""The public streaming API through real Ray actors (local Ray, Gloo, the tiny checkpoint
at MP=2): ``LLM.stream`` deltas add up to what ``LLM.generate`` returns, a character
spread over byte tokens is shown only whole, stop strings never leak into a delta, a few
hundred requests through four slots come back whole and in order, and ``AsyncLLM``
requests share the batch, keep their seeds, and give their slot back when aborted,
cancelled or closed early."""

from __future__ import annotations

import asyncio
import random
import time
from collections import defaultdict
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest
import torch
from helpers import wait_for

from mpllama import LLM, AsyncLLM, RequestOutput, SamplingParams
from mpllama.tokenizer import Tokenizer

T = TypeVar("T")

SMALL = {"cpus_per_rank": 0.5, "max_seq_len": 64, "max_batch_size": 4}
PROMPTS = ["Hello world", "你好，世界", "🦙 llama", "The quick brown fox jumps"]
GREEDY = SamplingParams(temperature=0, max_tokens=8, logprobs=True, ignore_eos=True)
LONG = SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)
# Long enough that an abandoned request left running would still hold its slot well past
# the one second the tests wait for the engine to drop it (needs max_seq_len=256).
ENDLESS = LONG.replace(max_tokens=200)


@pytest.fixture(scope="module")
def llm(tiny_ckpt: Path, ray_runtime) -> LLM:
    with LLM(tiny_ckpt, **SMALL) as llm:  # MP=2: the checkpoint's two shards
        yield llm


@pytest.fixture(scope="module")
def allm(tiny_ckpt: Path, ray_runtime) -> AsyncLLM:
    with AsyncLLM(tiny_ckpt, **SMALL) as allm:
        yield allm


@pytest.fixture(scope="module")
def allm1(tiny_ckpt: Path, ray_runtime) -> AsyncLLM:
    """One KV-cache slot: a second request waits until the first gives its slot back."""
    with AsyncLLM(tiny_ckpt, **{**SMALL, "max_batch_size": 1, "max_seq_len": 256}) as allm:
        yield allm


@pytest.fixture(scope="module")
def reference(llm: LLM) -> list[RequestOutput]:
    """PROMPTS under GREEDY through the sync client: what every other path must match."""
    return llm.generate(PROMPTS, GREEDY)


def by_request(outputs: list[RequestOutput], key: Callable = lambda o: o.index) -> dict:
    groups: dict = defaultdict(list)
    for o in outputs:
        groups[key(o)].append(o)
    return groups


def assert_stream_adds_up(outputs: list[RequestOutput]) -> RequestOutput:
    """One request's outputs: each is the previous one plus its delta, only the last is
    finished; returns the last."""
    text, tokens = "", []
    for n, o in enumerate(outputs):
        text += o.delta_text
        tokens += o.delta_token_ids
        assert (o.text, o.token_ids) == (text, tokens), f"output {n} is not the sum of deltas"
        last = n == len(outputs) - 1
        assert o.finished is last and (o.finish_reason is not None) is last, (n, o)
    return outputs[-1]


def assert_same_result(got: RequestOutput, want: RequestOutput) -> None:
    assert got.text == want.text
    assert got.token_ids == want.token_ids
    assert got.finish_reason == want.finish_reason
    assert got.prompt_token_ids == want.prompt_token_ids
    if want.logprobs is None:
        assert got.logprobs is None
    else:
        torch.testing.assert_close(
            torch.tensor(got.logprobs), torch.tensor(want.logprobs), atol=1e-5, rtol=0
        )


def run_async(main: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
    """asyncio.run with a deadline: a lost event fails the test instead of hanging it."""
    return asyncio.run(asyncio.wait_for(main, timeout))


async def collect(
    allm: AsyncLLM, prompt: str, params: SamplingParams, request_id: str | None = None
) -> list[RequestOutput]:
    return [o async for o in allm.generate(prompt, params, request_id)]


# ------------------------------------------------------------------ LLM.stream


def test_stream_deltas_add_up_to_what_generate_returns(
    llm: LLM, reference: list[RequestOutput]
) -> None:
    outputs = list(llm.stream(PROMPTS, GREEDY))
    groups = by_request(outputs)
    assert sorted(groups) == list(range(len(PROMPTS)))
    for i, want in enumerate(reference):
        last = assert_stream_adds_up(groups[i])
        assert last.finish_reason == "length" and len(last.token_ids) == GREEDY.max_tokens
        assert_same_result(last, want)
        assert {o.prompt for o in groups[i]} == {PROMPTS[i]}
        assert len({o.request_id for o in groups[i]}) == 1
        assert_never_splits_a_character(llm.tokenizer, groups[i])
    # Four slots hold all four requests from the first step: every step makes one token
    # for each, so the outputs come four at a time, one per request, never grouped.
    order = [o.index for o in outputs]
    assert order != sorted(order)
    for step in range(GREEDY.max_tokens):
        assert sorted(order[4 * step : 4 * step + 4]) == [0, 1, 2, 3], order


def test_as_completed_yields_each_finished_output_once_and_submits_unstreamed(
    llm: LLM, reference: list[RequestOutput], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``as_completed``: one finished output per request (the same as ``generate``'s),
    in the order they finish, each request submitted with ``stream`` False (the lead
    may then hold its tokens longer); ``stream`` submits them streamed."""
    flags: list[bool] = []
    submit = llm.router.submit

    def spy(requests, sink):  # type: ignore[no-untyped-def]
        flags.extend(r.stream for r in requests)
        return submit(requests, sink)

    monkeypatch.setattr(llm.router, "submit", spy)
    params = [GREEDY.replace(max_tokens=n) for n in (8, 3, 6, 1)]  # finish in this order
    outputs = list(llm.as_completed(PROMPTS, params))
    assert flags == [False] * len(PROMPTS)
    assert [o.index for o in outputs] == [3, 1, 2, 0]
    assert all(o.finished for o in outputs)
    for o in outputs:
        want = reference[o.index]
        assert o.token_ids == want.token_ids[: params[o.index].max_tokens]
        assert want.text.startswith(o.text)
    list(llm.stream(PROMPTS[:1], GREEDY))
    assert flags[-1] is True


def assert_never_splits_a_character(tok: Tokenizer, outputs: list[RequestOutput]) -> None:
    """Every output's text is a prefix of the one-shot decode of the final tokens: a
    delta shows U+FFFD only where the whole text has one, never for a character whose
    bytes are still arriving token by token."""
    whole = tok.decode(outputs[-1].token_ids)
    assert outputs[-1].text == whole
    for n, o in enumerate(outputs):
        assert whole.startswith(o.text), (n, o.text, whole)
        if "\ufffd" not in whole:
            assert "\ufffd" not in o.delta_text, (n, o.delta_text)


def test_stream_holds_back_a_character_until_its_last_byte(llm: LLM) -> None:
    """The random tiny model emits stray byte-fallback tokens, so U+FFFD is often part of
    the true text; what matters is that a character spread over byte tokens is shown
    whole, once its last byte is in, and never as U+FFFD before that."""
    tok = llm.tokenizer
    groups = by_request(list(llm.stream(PROMPTS, GREEDY.replace(max_tokens=24))))
    reassembled = []
    for outputs in groups.values():
        assert_never_splits_a_character(tok, outputs)
        for o in outputs:
            # One token, a byte that is no character by itself, yet a whole character
            # came out: its first bytes were held back in earlier outputs.
            if [tok.decode([t]) for t in o.delta_token_ids] == ["\ufffd"]:
                reassembled += [c for c in o.delta_text if ord(c) > 127 and c != "\ufffd"]
    assert reassembled, "no multi-byte character was streamed; pick other prompts"


def test_stream_echo_hands_out_the_prompt_first(llm: LLM, reference: list[RequestOutput]) -> None:
    groups = by_request(list(llm.stream(PROMPTS, GREEDY.replace(echo=True))))
    for i, want in enumerate(reference):
        assert groups[i][0].delta_text.startswith(PROMPTS[i])
        last = assert_stream_adds_up(groups[i])
        assert last.text == PROMPTS[i] + want.text
        assert last.token_ids == want.token_ids


def boundary_stop(tok: Tokenizer, tokens: list[int]) -> tuple[str, int, str] | None:
    """A 2-character stop string made of the last character of token k and the first of
    token k+1 (as tests/test_runner.py picks it); (stop, tokens generated when it is
    seen, text before it), or None when the output has no such boundary."""
    texts = [tok.decode(tokens[:j]) for j in range(len(tokens) + 1)]
    for k in range(1, len(tokens) - 1):
        before, after = texts[k + 1], texts[k + 2]
        if not (after.startswith(before) and len(after) > len(before) and before):
            continue
        stop = before[-1] + after[len(before)]
        if stop.isascii() and stop.isalnum() and all(stop not in t for t in texts[: k + 2]):
            return stop, k + 2, before[:-1]
    return None


def test_stream_never_shows_any_part_of_a_stop_string(llm: LLM) -> None:
    params = GREEDY.replace(max_tokens=24)
    checked = 0
    for prompt, base in zip(PROMPTS, llm.generate(PROMPTS, params), strict=True):
        found = boundary_stop(llm.tokenizer, base.token_ids)
        if found is None:
            continue
        stop, n_tokens, text = found
        outputs = list(llm.stream(prompt, params.replace(stop=("@@never@@", stop))))
        last = assert_stream_adds_up(outputs)
        assert last.finish_reason == "stop"
        assert last.text == text  # cut right before the stop string
        assert last.token_ids == base.token_ids[:n_tokens]
        # Every output so far is a prefix of the cut text: not even the stop string's
        # first character was shown while the next token could still complete it.
        assert all(text.startswith(o.text) for o in outputs), [o.delta_text for o in outputs]
        checked += 1
    assert checked >= 2, "too few greedy outputs with a stop string across a token boundary"


# ------------------------------------------------------------------ volume


def test_two_hundred_mixed_requests_through_four_slots(llm: LLM) -> None:
    rng = random.Random(1234)
    words = ["the", "llama", "runs", "model", "parallel", "你好", "🦙", "on", "Ray", "42"]
    prompts = [" ".join(rng.choices(words, k=rng.randint(1, 12))) for _ in range(200)]
    params = []
    for i in range(200):
        p = SamplingParams(temperature=0, max_tokens=rng.randint(1, 12), ignore_eos=True)
        if i % 2:
            p = p.replace(temperature=0.8, top_p=0.9, seed=rng.randrange(10**6))
        params.append(p)
    outputs = llm.generate(prompts, params)
    assert len(outputs) == 200
    assert [o.index for o in outputs] == list(range(200))
    assert [o.prompt for o in outputs] == prompts
    assert [len(o.token_ids) for o in outputs] == [p.max_tokens for p in params]
    assert {o.finish_reason for o in outputs} == {"length"}
    # Order is right only if each output is its own prompt's continuation; greedy and
    # seeded rows alike give the same tokens alone as in the crowd.
    for i in (0, 1, 57, 98, 133, 199):
        alone = llm.generate(prompts[i], params[i])[0]
        assert alone.token_ids == outputs[i].token_ids, i
        assert alone.text == outputs[i].text, i


# ------------------------------------------------------------------ AsyncLLM


def test_async_concurrent_requests_match_the_sync_client(
    allm: AsyncLLM, reference: list[RequestOutput]
) -> None:
    async def main() -> list[list[RequestOutput]]:
        return await asyncio.gather(
            *(collect(allm, PROMPTS[i % 4], GREEDY, f"req-{i}") for i in range(8))
        )

    results = run_async(main())
    for i, outputs in enumerate(results):
        last = assert_stream_adds_up(outputs)
        assert_same_result(last, reference[i % 4])
        assert {o.request_id for o in outputs} == {f"req-{i}"}
        assert {o.prompt for o in outputs} == {PROMPTS[i % 4]}


async def refuse_a_duplicate(allm: AsyncLLM) -> list[RequestOutput]:
    """Run a long request "dup"; while it runs, a second "dup" must raise ValueError.
    Returns the first request's outputs."""
    first: list[RequestOutput] = []

    async def run_first() -> None:
        async for o in allm.generate(PROMPTS[0], LONG, request_id="dup"):
            first.append(o)

    task = asyncio.create_task(run_first())
    while not first:
        await asyncio.sleep(0.005)
    with pytest.raises(ValueError, match="dup"):
        await collect(allm, PROMPTS[1], GREEDY, "dup")
    await task
    return first


def test_async_duplicate_in_flight_request_id_is_refused(allm: AsyncLLM) -> None:
    async def main() -> tuple[list[RequestOutput], list[RequestOutput]]:
        first = await refuse_a_duplicate(allm)
        again = await collect(allm, PROMPTS[1], GREEDY, "dup")  # free once finished
        return first, again

    first, again = run_async(main())
    last = assert_stream_adds_up(first)
    assert last.finish_reason == "length" and len(last.token_ids) == LONG.max_tokens
    assert again[-1].finish_reason == "length" and again[-1].request_id == "dup"


def test_async_duplicate_request_id_is_refused_across_replicas(
    tiny_ckpts: dict[int, Path], ray_runtime
) -> None:
    """Two one-rank gangs behind one AsyncLLM: the router sends the second "dup" to the
    idle gang, which must still refuse an id already running on the other."""
    with AsyncLLM(tiny_ckpts[1], replicas=2, **SMALL) as allm:
        assert allm.llm.replicas == 2
        first = run_async(refuse_a_duplicate(allm))
    assert first[-1].finish_reason == "length" and len(first[-1].token_ids) == LONG.max_tokens


def test_async_abort_ends_the_request_and_frees_its_slot(allm1: AsyncLLM) -> None:
    engine = allm1.llm.engine

    async def main():
        log: list[tuple[str, RequestOutput]] = []

        async def follow() -> None:
            async for o in allm1.generate(PROMPTS[3], GREEDY, "next"):
                log.append(("next", o))

        stream = allm1.generate(PROMPTS[0], LONG, "long")
        log.append(("long", await anext(stream)))
        follower = asyncio.create_task(follow())
        await asyncio.sleep(0)  # the follower submits, then waits for the one slot
        in_flight = engine.load
        log += [("long", await anext(stream)), ("long", await anext(stream))]
        await allm1.abort("long")
        steps = engine.steps_seen
        log += [("long", o) async for o in stream]
        await follower
        steps = engine.steps_seen - steps
        full = await collect(allm1, PROMPTS[0], LONG)
        alone = await collect(allm1, PROMPTS[3], GREEDY)
        return in_flight, steps, log, full, alone

    in_flight, steps, log, full, alone = run_async(main())
    assert in_flight == 2
    # The lead gave the slot up at the abort: the follower ran its 8 tokens right after,
    # not after the 50 the aborted request would have made.
    assert steps < 2 * GREEDY.max_tokens, steps
    groups = by_request([o for _, o in log], key=lambda o: o.request_id)
    aborted = assert_stream_adds_up(groups["long"])
    assert aborted.finish_reason == "abort"
    assert 3 <= len(aborted.token_ids) < LONG.max_tokens
    assert full[-1].token_ids[: len(aborted.token_ids)] == aborted.token_ids
    # The follower waited for the one slot: none of its outputs came before the abort.
    rids = [r for r, _ in log]
    assert rids.index("next") > max(i for i, r in enumerate(rids) if r == "long")
    assert_same_result(assert_stream_adds_up(groups["next"]), alone[-1])


def test_async_cancelled_consumer_and_aclose_abort_the_request(allm1: AsyncLLM) -> None:
    engine = allm1.llm.engine

    async def cancel_consumer() -> list[RequestOutput]:
        seen: list[RequestOutput] = []

        async def consume() -> None:
            async for o in allm1.generate(PROMPTS[0], ENDLESS):
                seen.append(o)

        task = asyncio.create_task(consume())
        while len(seen) < 2:
            await asyncio.sleep(0.001)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return seen

    async def close_iterator() -> list[RequestOutput]:
        stream = allm1.generate(PROMPTS[0], ENDLESS)
        seen = [await anext(stream), await anext(stream)]
        await stream.aclose()
        return seen

    async def break_out() -> list[RequestOutput]:
        seen = []
        async for o in allm1.generate(PROMPTS[0], ENDLESS):
            seen.append(o)
            if len(seen) == 2:
                break  # asyncio closes the dropped generator soon after
        assert await asyncio.to_thread(wait_for, lambda: engine.load == 0, 1.0, 0.01)
        return seen

    for stop_early in (cancel_consumer, close_iterator, break_out):
        seen = run_async(stop_early())
        # A cancelled consumer may have taken a few more outputs already queued for it.
        assert len(seen) >= 2 and not seen[-1].finished, stop_early.__name__
        assert wait_for(lambda: engine.load == 0, 1.0, every=0.01), (
            stop_early.__name__,
            engine.load,
        )
        # One slot: the next request runs at once only if the abandoned one gave it back.
        steps = engine.steps_seen
        after = run_async(collect(allm1, PROMPTS[1], GREEDY))
        assert after[-1].finish_reason == "length", stop_early.__name__
        assert len(after[-1].token_ids) == GREEDY.max_tokens
        assert engine.steps_seen - steps < 2 * GREEDY.max_tokens, stop_early.__name__


def test_async_fixed_seed_gives_the_same_tokens_alone_and_in_company(allm: AsyncLLM) -> None:
    seeded = SamplingParams(temperature=0.9, top_p=0.95, seed=7, max_tokens=10, ignore_eos=True)
    company = [
        GREEDY,
        seeded.replace(seed=None),
        seeded.replace(seed=8),
        GREEDY.replace(max_tokens=12),
        seeded.replace(seed=None, temperature=1.3),
    ]

    spans: dict[float, tuple[float, float]] = {}

    async def staggered(at: float, prompt: str, params: SamplingParams) -> list[RequestOutput]:
        await asyncio.sleep(0.02 * at)
        start = time.monotonic()
        outputs = await collect(allm, prompt, params)
        spans[at] = (start, time.monotonic())
        return outputs

    async def main():
        alone = await collect(allm, PROMPTS[2], seeded)
        greedy = await collect(allm, PROMPTS[2], seeded.replace(temperature=0))
        jobs = [staggered(i, PROMPTS[i % 4], p) for i, p in enumerate(company)]
        jobs.insert(2, staggered(2.5, PROMPTS[2], seeded))
        together = await asyncio.gather(*jobs)
        return alone, greedy, together[2]

    alone, greedy, together = run_async(main())
    # It joined a batch already running, and others joined while it ran.
    start, end = spans.pop(2.5)
    assert any(a < start < b for a, b in spans.values()), (start, end, spans)
    assert any(start < a < end for a, _ in spans.values()), (start, end, spans)
    assert alone[-1].token_ids != greedy[-1].token_ids  # it really sampled
    assert together[-1].token_ids == alone[-1].token_ids
    assert together[-1].text == alone[-1].text


# ------------------------------------------------------------------ sync early exit


def test_closing_the_sync_stream_early_aborts_the_rest(
    llm: LLM, reference: list[RequestOutput]
) -> None:
    # Twelve requests for four slots: some 150 steps to run out, running and waiting
    # requests alike must be given up.
    stream = llm.stream(PROMPTS * 3, LONG)
    seen = []
    for o in stream:
        seen.append(o)
        if len(seen) == 6:
            break
    assert llm.engine.load == 12  # nothing has finished yet
    stream.close()
    assert not any(o.finished for o in seen)
    assert wait_for(lambda: llm.engine.load == 0, 1.0, every=0.01), llm.engine.load
    steps = llm.engine.steps_seen
    again = llm.generate(PROMPTS, GREEDY)
    # The lead freed the four slots at once: the new requests did not wait for the
    # abandoned ones to run out their 50 tokens.
    assert llm.engine.steps_seen - steps < 2 * GREEDY.max_tokens
    for got, want in zip(again, reference, strict=True):
        assert_same_result(got, want)
