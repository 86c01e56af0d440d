"""The paged KV cache: blocks, the prefix cache over them, and preemption when they run
out. Every output is checked against the same request run alone on a cold cache, so
sharing, eviction and recomputation can never change a request's tokens or log-probs."""

from __future__ import annotations

import copy
import random
import threading
import time
from pathlib import Path

import pytest
import torch
from helpers import wait_for
from test_runner import GREEDY, PROMPTS, Done, assert_same, load, req, run

from mpllama import LLM, SamplingParams
from mpllama.protocol import Request
from mpllama.rank.blocks import BlockManager, BlockTable
from mpllama.rank.model import Transformer
from mpllama.rank.runner import Runner
from mpllama.rank.step_plan import follow
from mpllama.tokenizer import Tokenizer

LONG = "The quick brown fox jumps over the lazy dog while the cat sleeps on the warm mat. "


@pytest.fixture(scope="module")
def tok(tiny_ckpt: Path) -> Tokenizer:
    from mpllama import checkpoint

    return Tokenizer(checkpoint.find_tokenizer(tiny_ckpt))


@pytest.fixture(scope="module")
def model(tiny_ckpt: Path, single_rank: None) -> Transformer:
    return load(tiny_ckpt)


def pool(model: Transformer, blocks: int = 64, block_size: int = 4, seq: int = 128) -> None:
    model.setup_caches(blocks, block_size, seq)


def cold(model: Transformer, tok: Tokenizer, requests: list[Request]) -> list[Done]:
    """Each request alone on a fresh runner with the prefix cache off."""
    out = []
    for r in requests:
        runner = Runner(model, tok, 256, max_running=4, prefix_caching=False)
        out += run(model, tok, [copy.copy(r)], runner=runner)
    return out


def assert_no_block_leaked(runner: Runner) -> None:
    """Idle: every block is empty or named and evictable, none referenced."""
    blocks = runner.blocks
    assert not any(blocks.refs)
    assert blocks.used == 0 and blocks.empties + len(blocks.evictable) == blocks.num_blocks
    assert set(blocks.named.values()) == set(blocks.evictable)
    assert bytes(blocks.empty) == bytes(blocks.open)  # no reservation outlived its sequence


# ------------------------------------------------------------------ the block manager


def admit(m: BlockManager, table: BlockTable, tokens: list[int], reserve: int) -> int | None:
    return m.admit(table, lambda lo, hi: tokens[lo:hi], len(tokens), reserve)


def test_blocks_are_named_by_their_prefix_shared_and_evicted_least_recently_used() -> None:
    m = BlockManager(num_blocks=8, block_size=2)
    a, b = BlockTable(), BlockTable()
    tokens = [1, 2, 3, 4, 5]
    assert admit(m, a, tokens, 4) == 0  # nothing cached yet
    assert a.blocks == [0, 1, 2] and a.reserved == (0, 4)  # placed in a run of 4
    m.name_full_blocks(a, lambda lo, hi: tokens[lo:hi], 5)
    assert len(m.named) == 2  # [1, 2] and [1, 2, 3, 4]; [5] is not full
    # A prompt with the same first four tokens shares those two blocks.
    assert admit(m, b, [1, 2, 3, 4, 9, 9], 3) == 4
    assert b.blocks[:2] == [0, 1] and m.refs[:2] == [2, 2]
    assert b.blocks[2] == 4  # past a's reservation
    m.release(a)
    m.release(b)
    assert m.used == 0 and list(m.evictable) == [1, 0]  # tails go first
    # The same first block but a different second one: a different name.
    c = BlockTable()
    assert admit(m, c, [1, 2, 7, 7, 7], 3) == 2
    m.release(c)
    # A prompt cached whole still recomputes its last block (it needs the logits).
    d = BlockTable()
    assert admit(m, d, [1, 2, 3, 4], 2) == 2
    m.release(d)
    # Running out of empty blocks evicts named ones, least recently used first.
    e = BlockTable()
    assert admit(m, e, list(range(100, 116)), 8) == 0
    assert m.free == 0 and not m.named  # all 8 taken: 6 empty, then both named
    assert admit(m, BlockTable(), [1], 1) is None  # nothing left: takes nothing
    assert not m.grow(e, 17)
    m.release(e)
    assert m.free == 8 and m.hit_tokens == 4 + 2 + 2


# ------------------------------------------------------------------ exact reuse


def test_conversation_turns_reuse_the_cache_exactly(model: Transformer, tok: Tokenizer) -> None:
    """Each turn's prompt is the whole conversation so far: it finds the previous
    turns (prompt and answer) cached, prefills only the new text, and answers exactly as a
    cold run does."""
    pool(model, blocks=96)
    runner = Runner(model, tok, 256, max_running=4)
    history = tok.encode("User: tell me about foxes.", bos=True, eos=False)
    params = GREEDY.replace(max_tokens=8)
    hits = []
    for turn in range(4):
        request = Request(f"turn{turn}", list(history), params)
        before = runner.blocks.hit_tokens
        (got,) = run(model, tok, [request], runner=runner)
        hits.append(runner.blocks.hit_tokens - before)
        assert_same(got, cold(model, tok, [request])[0])
        history += got.token_ids + tok.encode(f" User: and then {turn}?", bos=False, eos=False)
    assert hits[0] == 0
    # Later turns find every full block of the previous turn's prompt and answer (the last
    # answer token's KV is never written: it only gets fed in this turn).
    for turn in range(1, 4):
        assert hits[turn] >= (hits[turn - 1] + 8) // 4 * 4
    assert_no_block_leaked(runner)


def test_prompts_ending_inside_a_cached_block_or_cached_whole(
    model: Transformer, tok: Tokenizer
) -> None:
    pool(model, blocks=64)
    runner = Runner(model, tok, 256, max_running=4)
    full = tok.encode(LONG, bos=True, eos=False)
    assert len(full) > 16
    cut = len(full) // 4 * 4  # a whole number of blocks
    prompts = [full, full[: cut - 2], full, full[:cut], full[:cut], full[: cut + 1]]
    requests = [Request(f"p{i}", p, GREEDY.replace(max_tokens=6)) for i, p in enumerate(prompts)]
    got = [run(model, tok, [r], runner=runner)[0] for r in requests]
    for g, want in zip(got, cold(model, tok, requests), strict=True):
        assert_same(g, want)
    assert runner.blocks.hit_tokens > 3 * (cut - 4)
    assert_no_block_leaked(runner)


def test_concurrent_requests_share_a_prefix_admitted_in_the_same_step(
    model: Transformer, tok: Tokenizer
) -> None:
    """Six prompts with one long preamble arrive together: the first to be admitted
    names the preamble's blocks as it schedules them, and the others, admitted in the
    same step, read them in the same forward; so the preamble is held once."""
    pool(model, blocks=128)
    texts = [LONG + q for q in ("Why?", "Who is there?", "When", "Where to", "How", "A")]
    requests = [req(tok, t, GREEDY.replace(max_tokens=5)) for t in texts]
    used = {}
    for caching in (True, False):
        runner = Runner(model, tok, 1024, max_running=8, prefix_caching=caching)
        runner.add([copy.copy(r) for r in requests])
        runner.step()  # every prompt prefilled in this one step
        used[caching] = runner.blocks.used
        while runner.has_work:
            runner.step()
    preamble_blocks = len(tok.encode(LONG, bos=True, eos=False)) // 4
    assert used[False] - used[True] >= 5 * (preamble_blocks - 1)
    runner = Runner(model, tok, 1024, max_running=8)
    for got, want in zip(
        run(model, tok, requests, runner=runner), cold(model, tok, requests), strict=True
    ):
        assert_same(got, want)
    assert runner.blocks.hit_tokens >= 5 * (preamble_blocks - 1) * 4
    assert_no_block_leaked(runner)


def test_n_samples_of_one_prompt_share_it(model: Transformer, tok: Tokenizer) -> None:
    pool(model, blocks=96)
    params = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=10, logprobs=True)
    prompt = tok.encode(LONG, bos=True, eos=False)
    requests = [Request(f"n{i}", prompt, params, seed=i) for i in range(4)]
    runner = Runner(model, tok, 256, max_running=4)
    got = run(model, tok, requests, runner=runner)
    for g, want in zip(got, cold(model, tok, requests), strict=True):
        assert_same(g, want)
    assert len({tuple(g.token_ids) for g in got}) > 1  # really different samples
    assert runner.blocks.hit_tokens >= 3 * (len(prompt) // 4 - 1) * 4


# ------------------------------------------------------------------ running out of blocks


def random_requests(tok: Tokenizer, n: int, seed: int) -> list[Request]:
    """Prompts that often share a beginning (one of three preambles, or none), greedy
    and sampled, with and without log-probs."""
    rng = random.Random(seed)
    preambles = [[1] + [rng.randrange(3, 500) for _ in range(k)] for k in (5, 9, 13)]
    out = []
    for i in range(n):
        head = rng.choice(preambles + [[1]])
        prompt = head + [rng.randrange(3, 500) for _ in range(rng.randrange(1, 12))]
        params = SamplingParams(
            temperature=rng.choice([0.0, 0.8]),
            max_tokens=rng.randrange(1, 16),
            ignore_eos=True,
            logprobs=rng.random() < 0.5,
        )
        out.append(Request(f"v{i}", prompt, params, seed=i))
    return out


def test_preemption_under_a_tiny_pool_keeps_every_request_exact(
    model: Transformer, tok: Tokenizer
) -> None:
    """200 requests with aborts through a pool of 16 four-position blocks (two or three
    sequences' worth) and room for 8 running: sequences are preempted and recomputed,
    yet each finishes once, a stream never sees a token twice (``Done.add``), and every
    request equals its cold run alone. At the end no block is leaked."""
    pool(model, blocks=16, seq=40)
    requests = random_requests(tok, 200, seed=1)
    rng = random.Random(2)
    aborted = {r.id for r in rng.sample(requests, 20)}
    runner = Runner(model, tok, 12, max_running=8)
    runner.add(requests)
    done: dict[str, Done] = {}
    step = 0
    while runner.has_work:
        if step % 7 == 3:
            runner.abort([a for a in aborted if a in runner.live][:2])
        for e in runner.step():
            done.setdefault(e.id, Done()).add(e)
        step += 1
    assert runner.scheduler.preemptions > 20
    assert runner.blocks.hit_tokens > 0
    assert sorted(done) == sorted(r.id for r in requests)  # each finished, once
    kept = [r for r in requests if done[r.id].finish_reason != "abort"]
    assert 180 <= len(kept) < 200
    for r, want in zip(kept, cold(model, tok, kept), strict=True):
        assert_same(done[r.id], want)
    assert_no_block_leaked(runner)


def test_followers_caches_equal_the_leads(
    tiny_ckpt: Path, single_rank: None, tok: Tokenizer
) -> None:
    """A follower fed the lead's broadcasts, through shared prefixes, evictions and
    preemptions, ends with exactly the lead's KV cache."""
    lead_model, follower_model = load(tiny_ckpt), load(tiny_ckpt)
    for m in (lead_model, follower_model):
        pool(m, blocks=16, seq=40)
    sent: list[torch.Tensor] = []
    runner = Runner(lead_model, tok, 12, lambda t: sent.append(t.clone()) or t, max_running=6)
    run(lead_model, tok, random_requests(tok, 40, seed=3), runner=runner)
    runner.stop()
    assert runner.scheduler.preemptions > 0 and runner.blocks.hit_tokens > 0
    replay = iter(sent)
    follow(follower_model, runner.max_running, lambda t: t.copy_(next(replay)))
    assert next(replay, None) is None
    for a, b in zip(lead_model.layers, follower_model.layers, strict=True):
        assert torch.equal(a.attention.cache_k, b.attention.cache_k)
        assert torch.equal(a.attention.cache_v, b.attention.cache_v)


def test_a_long_context_serves_many_short_requests_at_once(
    model: Transformer, tok: Tokenizer
) -> None:
    """max_seq_len 32768 and 64 short requests running together in a pool of 2100
    sixteen-position blocks: 33600 positions, where 64 slots of 32768 would reserve
    2,097,152. One request may still grow to the whole context."""
    model.setup_caches(2100, 16, 32768)
    requests = [req(tok, PROMPTS[i % 4] + f" {i}", GREEDY.replace(max_tokens=4)) for i in range(64)]
    runner = Runner(model, tok, 4096, max_running=64)
    runner.add(requests)
    most = 0
    done: dict[str, Done] = {}
    while runner.has_work:
        for e in runner.step():
            done.setdefault(e.id, Done()).add(e)
        most = max(most, len(runner.running))
    assert most == 64
    for i in (0, 17, 63):
        assert_same(done[requests[i].id], cold(model, tok, [requests[i]])[0])
    assert_no_block_leaked(runner)


# ------------------------------------------------------------------ through the engine


def engine_workloads(llm: LLM, tok: Tokenizer) -> list:
    """A conversation's turns, n=3 samples of one prompt (as the server makes them: one
    request per sample, each seeded), and 40 random requests that share beginnings."""
    out = []
    params = SamplingParams(temperature=0, max_tokens=6, logprobs=True)
    history = "User: tell me about foxes."
    for turn in range(3):
        (answer,) = llm.generate([history], params)
        out.append((answer.token_ids, answer.logprobs))
        history += answer.text + f" User: and {turn}?"
    sampled = [SamplingParams(temperature=1.0, max_tokens=6, seed=s) for s in (5, 6, 7)]
    out.append([o.token_ids for o in llm.generate([LONG] * 3, sampled)])
    requests = random_requests(tok, 40, seed=4)
    outs = llm.generate(
        prompt_token_ids=[r.prompt_token_ids for r in requests],
        sampling_params=[r.params.replace(seed=r.seed) for r in requests],
    )
    out += [(o.token_ids, o.logprobs) for o in outs]
    return out


def assert_same_outputs(got: list, want: list) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        if isinstance(g, tuple):
            assert g[0] == w[0]
            if w[1] is not None:
                torch.testing.assert_close(
                    torch.tensor(g[1]), torch.tensor(w[1]), atol=1e-4, rtol=0
                )
        else:
            assert g == w


def test_through_an_mp2_engine_hits_preemptions_and_long_contexts_stay_exact(
    tiny_ckpt: Path, tok: Tokenizer, ray_runtime
) -> None:
    """Three MP=2 gangs over Gloo on the same weights run the same workloads: a cold one
    (prefix cache off, room to spare); one whose pool is 12 blocks of 16 positions
    (caching on: hits, and preemptions, as 8 running sequences need more); and one at
    max_seq_len 32768 serving the requests all at once from 0.02 GB of KV (64 slots of
    32768 positions would be 1 GiB here). Every output equals the cold gang's; hits and
    preemptions are reported; afterwards no block is in use, and both ranks of a gang
    wrote exactly the same cache positions (the follower ran the lead's plan)."""
    base = dict(model_parallel_size=2, cpus_per_rank=0.5, kv_block_size=16)
    cold_llm = LLM(tiny_ckpt, prefix_caching=False, max_batch_size=8, max_seq_len=128, **base)
    with cold_llm:
        want = engine_workloads(cold_llm, tok)
        assert cold_llm.cache_stats()["prefix_hit_tokens"] == 0
    per_block = 16 * 2 * 2 * 2 * 16 * 4  # 16 positions x layers x K,V x heads x D x fp32
    tight = dict(max_batch_size=8, max_seq_len=128, kv_cache_memory_gb=13 * per_block / 2**30)
    with LLM(tiny_ckpt, **tight, **base) as llm:
        assert_same_outputs(engine_workloads(llm, tok), want)
        stats = llm.cache_stats()
        assert stats["kv_blocks"] == 12
        assert stats["preemptions"] > 0 and stats["prefix_hit_tokens"] > 0
        assert stats["kv_blocks_used"] == 0 and stats["kv_cache_usage"] == 0
        assert llm.engine.rank_info[0]["cache"]["preemptions"] == stats["preemptions"]

        def same_positions() -> bool:
            lead, follower = llm.engine.gang.call_all("kv_written")
            return bool(lead) and lead == follower

        assert wait_for(same_positions, 10)
    wide = dict(max_batch_size=64, max_seq_len=32768, kv_cache_memory_gb=0.02)
    with LLM(tiny_ckpt, **wide, **base) as llm:
        most = [0]
        stop = threading.Event()

        def watch() -> None:
            while not stop.is_set():
                most[0] = max(most[0], llm.counts()[0])
                time.sleep(0.005)

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            got = engine_workloads(llm, tok)
        finally:
            stop.set()
            watcher.join()
        assert_same_outputs(got, want)
        assert most[0] >= 32  # the 40 requests ran together, not one slot's worth at a time
        assert llm.cache_stats()["kv_blocks"] < 64 * 32768 // 16


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; this machine has none")
def test_on_a_gpu_gathered_rows_and_preemption_stay_exact(
    tiny_ckpt: Path, single_rank: None, tok: Tokenizer
) -> None:
    """A CUDA rank reads rows that are not one strided view by gathering them into one
    batched attention: through shared prefixes and preemptions in a tight pool, every
    request still equals its cold run alone on that GPU."""
    from mpllama import checkpoint
    from mpllama.rank import weights
    from mpllama.rank.model import materialize

    args = checkpoint.read_params(tiny_ckpt)
    state = weights.load_rank_state(checkpoint.find_shards(tiny_ckpt), args, 0, 1)
    gpu = materialize(Transformer(args), state, torch.device("cuda"), torch.float32)
    pool(gpu, blocks=16, seq=40)
    requests = random_requests(tok, 60, seed=5)
    runner = Runner(gpu, tok, 12, max_running=8)
    got = run(gpu, tok, requests, runner=runner)
    assert runner.scheduler.preemptions > 0 and runner.blocks.hit_tokens > 0
    assert_no_block_leaked(runner)
    for g, want in zip(got, cold(gpu, tok, requests), strict=True):
        assert_same(g, want)
