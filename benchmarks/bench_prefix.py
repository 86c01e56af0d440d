"""The paged KV cache's parts of the bench: prefix caching on chat turns and on a shared
system prompt, and how many long-context requests a KV budget holds in blocks rather
than in slots.

  chat    16 conversations x 6 turns, all concurrent, each turn's prompt the whole
          conversation so far (BOS, then every user message and answer, then the new
          user message), each conversation sending its next turn as soon as its previous
          answer ends. Through ``AsyncLLM`` with prefix caching off and on (the same
          weights and conversations; greedy, so both must answer alike), then the same
          pattern over HTTP against `mpllama serve` and `transformers serve
          --continuous-batching` (bench_serve.py's servers; transformers shares prefix
          blocks too, its default). User messages are random text pieces, answers a
          fixed number of tokens with EOS ignored; over HTTP the history is text, so a
          server re-encodes it (answers of byte pieces re-encode longer, see bench_serve).
  prefix  one system prompt shared by many short questions, all given to one
          ``LLM.generate``: throughput with prefix caching off and on.
  kvmem   concurrent requests of 500-2000 prompt tokens + 256 new tokens at
          max_seq_len 8192: what a KV budget per rank holds as blocks (each request only
          the blocks its length fills) against the slot cache this pool replaced (each
          running request reserved max_seq_len positions): worked out at 2 GiB for the
          bench model and a Llama-3-8B shape, then measured on the bench model under a
          small budget (``kv_cache_memory_gb``) by polling the engine while it runs.

Each part prints its rows and returns its ratios for bench.py's targets.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import os
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import bench_serve as serve
from bench_mpllama import engine_settings, greedy
from bench_serve import percentile
from bench_workloads import BENCH_MODEL, FIRST_PLAIN_ID, QUICK_MODEL, agreement, random_prompt

from mpllama import LLM, AsyncLLM
from mpllama.config import RuntimeConfig
from mpllama.memory import kv_pool_blocks, kv_position_bytes
from mpllama.model_args import ModelArgs

GIB = 2**30
BOS_ID = 1
# Llama 3.1 8B's params.json: 32 layers, 8 KV heads of 128; its KV is what matters here.
LLAMA3_8B = ModelArgs(
    dim=4096,
    n_layers=32,
    n_heads=32,
    n_kv_heads=8,
    vocab_size=128256,
    multiple_of=1024,
    ffn_dim_multiplier=1.3,
    norm_eps=1e-5,
    rope_theta=500000.0,
    use_scaled_rope=True,
)


@dataclass(frozen=True)
class ChatSizes:
    conversations: int
    turns: int
    user_lens: tuple[int, int]  # tokens per user message, inclusive
    answer_lens: tuple[int, int]  # tokens per answer, inclusive
    http_timeout_s: float  # a server's whole pass; past it its row says so


CHAT_FULL = ChatSizes(16, 6, (20, 60), (32, 64), 600.0)
CHAT_QUICK = ChatSizes(4, 3, (20, 60), (8, 16), 300.0)
PREFIX_FULL = (1000, 64, (10, 30), 32)  # system prompt, questions, their lengths, new tokens
PREFIX_QUICK = (200, 8, (10, 30), 16)
KV_SEQ = 8192
KV_PROMPTS, KV_NEW = (500, 2000), 256
KV_BUDGET_GIB = 2.0  # per rank, for the worked-out rows
KV_RUN_SEQS = 1.0  # the measured run's budget, in max_seq_len sequences (slots)
KV_RUN_REQUESTS = 8


# ---------------------------------------------------------------------- chat


@dataclass
class Conversation:
    """One conversation's script: its user messages as ids and as text, and how many
    tokens each answer has."""

    user_ids: list[list[int]]
    user_texts: list[str]
    answer_lens: list[int]


@dataclass
class ChatResult:
    name: str
    ttft: list[float] = field(default_factory=list)  # per turn, send to first token
    tokens: int = 0
    seconds: float = 0.0
    prompt_tokens: list[int] = field(default_factory=list)  # per turn
    answers: list[list[list[int]]] = field(default_factory=list)  # [conversation][turn]
    hit_rate: float | None = None
    note: str = ""

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def conversations(meta: Path, sizes: ChatSizes, seed: int) -> list[Conversation]:
    """Seeded scripts; user messages are text pieces only (no byte or control pieces), so
    their text re-encodes to about the same ids on an HTTP server."""
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor(model_file=str(meta / "tokenizer.model"))
    text_ids = [i for i in range(FIRST_PLAIN_ID, sp.vocab_size()) if not sp.is_byte(i)]
    rng = random.Random(seed)
    out = []
    for _ in range(sizes.conversations):
        ids = [rng.choices(text_ids, k=rng.randint(*sizes.user_lens)) for _ in range(sizes.turns)]
        lens = [rng.randint(*sizes.answer_lens) for _ in range(sizes.turns)]
        out.append(Conversation(ids, [sp.decode(u) for u in ids], lens))
    return out


def chat_engine(
    ckpt: Path, convs: list[Conversation], max_seq_len: int, name: str, **settings: object
) -> ChatResult:
    return asyncio.run(_chat_engine(ckpt, convs, max_seq_len, name, settings))


async def _chat_engine(
    ckpt: Path, convs: list[Conversation], max_seq_len: int, name: str, settings: dict
) -> ChatResult:
    base = engine_settings(1, len(convs), None, **settings)
    allm = AsyncLLM(ckpt, **{**base, "max_seq_len": max_seq_len})
    try:
        warm = random_prompt(random.Random(-1), 24, 1000)  # shares no block with the chats
        async for _ in allm.generate(warm, greedy(2)):
            pass
        before = allm.cache_stats()
        result = ChatResult(name)
        start = time.perf_counter()
        result.answers = await asyncio.gather(*(_talk(allm, c, result) for c in convs))
        result.seconds = time.perf_counter() - start
        after = allm.cache_stats()
        queried = after["prefix_query_tokens"] - before["prefix_query_tokens"]
        hits = after["prefix_hit_tokens"] - before["prefix_hit_tokens"]
        result.hit_rate = hits / queried if queried else 0.0
        result.tokens = sum(len(a) for conv in result.answers for a in conv)
    finally:
        closing = allm.close()
        if inspect.isawaitable(closing):
            await closing
    return result


async def _talk(allm: AsyncLLM, conv: Conversation, into: ChatResult) -> list[list[int]]:
    history = [BOS_ID]
    answers = []
    for user, n in zip(conv.user_ids, conv.answer_lens, strict=True):
        prompt = history + user
        into.prompt_tokens.append(len(prompt))
        sent, answer = time.perf_counter(), []
        async for out in allm.generate(prompt, greedy(n)):
            if out.delta_token_ids and not answer:
                into.ttft.append(time.perf_counter() - sent)
            answer.extend(out.delta_token_ids)
        answers.append(answer)
        history = prompt + answer
    return answers


def chat_http(
    server: serve.ServerProcess, name: str, model: str, convs: list[Conversation], timeout: float
) -> ChatResult:
    """The same conversations over a server's streaming completions API; the history is
    text (the prompt so far + the answer's text + a space + the next user message)."""
    base = f"http://127.0.0.1:{server.port}/v1"
    start = time.perf_counter()
    server.wait_ready(f"{base}/models", serve.START_TIMEOUT_S)
    result = ChatResult(name, note=f"ready in {time.perf_counter() - start:.0f}s")
    kind = "mpllama" if name.startswith("mpllama") else "transformers"
    # Warm-up: as many concurrent one-turn chats (transformers builds its manager here).
    warm = [dataclasses.replace(c, user_texts=["warm " + t for t in c.user_texts]) for c in convs]
    asyncio.run(_http_all(base, kind, model, warm, 1, ChatResult("warm-up")))
    try:
        asyncio.run(asyncio.wait_for(_http_all(base, kind, model, convs, None, result), timeout))
    except TimeoutError:
        result.note += f"; NOT finished within {timeout:.0f}s"
    return result


async def _http_all(base, kind, model, convs, turns: int | None, into: ChatResult) -> None:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=base, api_key="unused", max_retries=0, timeout=900.0)
    start = time.perf_counter()
    try:
        await asyncio.gather(*(_http_talk(client, kind, model, c, turns, into) for c in convs))
    finally:
        into.seconds = time.perf_counter() - start
        await client.close()


async def _http_talk(client, kind, model, conv: Conversation, turns, into: ChatResult) -> None:
    history = ""
    for user, n in list(zip(conv.user_texts, conv.answer_lens, strict=True))[:turns]:
        prompt = f"{history} {user}" if history else user
        sent, first, pieces = time.perf_counter(), True, []
        stream = await client.completions.create(
            model=model,
            prompt=prompt,
            max_tokens=n,
            temperature=0.0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=serve.extra_body(kind, n),
        )
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].text:
                if first:
                    into.ttft.append(time.perf_counter() - sent)
                    first = False
                pieces.append(chunk.choices[0].text)
            if chunk.usage is not None:
                into.tokens += chunk.usage.completion_tokens
                into.prompt_tokens.append(chunk.usage.prompt_tokens)
        history = prompt + "".join(pieces)


def show_chat(r: ChatResult) -> ChatResult:
    ttft = " ".join(f"{1e3 * percentile(r.ttft, q):7.0f}ms" for q in (50, 99))
    mean_prompt = sum(r.prompt_tokens) / len(r.prompt_tokens) if r.prompt_tokens else 0.0
    hits = f"{r.hit_rate:5.2f}" if r.hit_rate is not None else f"{'-':>5}"
    print(
        f"  {r.name:<34} {ttft} {r.tokens_per_s:7.1f} {r.seconds:7.1f} {mean_prompt:7.0f} {hits}",
        flush=True,
    )
    note = f"{r.note}; 1-min load average after it {os.getloadavg()[0]:.1f}"
    print(f"    ({r.name}: {note.lstrip('; ')})", flush=True)
    return r


def chat(quick: bool, seed: int, root: Path) -> dict[str, float]:
    """Print the chat part; return TTFT p50 with caching / without (and more ratios)."""
    sizes = CHAT_QUICK if quick else CHAT_FULL
    model = QUICK_MODEL if quick else BENCH_MODEL
    # bench.py's bench checkpoint (root/bench-1), with its Hugging Face conversion.
    serve_sizes = dataclasses.replace(
        serve.QUICK if quick else serve.FULL, name="bench", model=model, slots=sizes.conversations
    )
    meta, hf = serve.prepare(root, serve_sizes)
    convs = conversations(meta, sizes, seed)
    longest = 1 + sum(sizes.user_lens[1] + sizes.answer_lens[1] for _ in range(sizes.turns))
    max_seq_len = -(-longest // 256) * 256
    print(
        f"\n== chat: {sizes.conversations} conversations x {sizes.turns} turns, all concurrent, "
        f"each turn's prompt the whole conversation so far; user messages "
        f"{sizes.user_lens[0]}-{sizes.user_lens[1]} tokens, answers {sizes.answer_lens[0]}-"
        f"{sizes.answer_lens[1]} tokens (greedy, EOS ignored); TTFT from each turn's send; "
        f"tok/s = answer tokens / wall time"
    )
    print(
        f"  {'runner':<34} {'TTFT p50':>9} {'p99':>9} {'tok/s':>7} {'seconds':>7} {'prompt':>7} "
        f"{'hits':>5}  (prompt: mean tokens per turn; hits: prefix hit rate)"
    )
    off, on = (
        show_chat(chat_engine(meta, convs, max_seq_len, f"mpllama AsyncLLM, caching {how}", **kw))
        for how, kw in (("off", {"prefix_caching": False}), ("on", {"prefix_caching": True}))
    )
    # Over HTTP the history is re-encoded text (byte pieces of an answer grow): more room.
    http_len = 2 * max_seq_len
    for name in ("mpllama serve", "transformers serve CB"):
        if name.startswith("mpllama"):
            server = serve.start_mpllama(meta, serve_sizes, http_len, root)
            served = meta.name
        else:
            server = serve.start_transformers(hf, serve_sizes, http_len, root)
            served = str(hf)
        try:
            row = chat_http(server, name, served, convs, sizes.http_timeout_s)
        except Exception as exc:  # a server that cannot start costs its row only
            row = ChatResult(name, note=f"failed: {type(exc).__name__}: {exc}"[:300])
        finally:
            how = server.stop()
        row.note += f"; {how}"
        show_chat(row)
    equal, total = agreement(
        [a for conv in on.answers for a in conv], [a for conv in off.answers for a in conv]
    )
    verdict = "identical" if equal == total else f"{equal}/{total} tokens equal"
    print(f"  greedy answers, caching on vs off: {verdict}")
    ratios = {
        "ttft_p50": percentile(on.ttft, 50) / percentile(off.ttft, 50),
        "ttft_p99": percentile(on.ttft, 99) / percentile(off.ttft, 99),
        "tok_s": on.tokens_per_s / off.tokens_per_s,
    }
    print(
        f"  caching on / off: TTFT p50 {ratios['ttft_p50']:.2f}x, p99 {ratios['ttft_p99']:.2f}x, "
        f"throughput {ratios['tok_s']:.2f}x"
    )
    return ratios


# ---------------------------------------------------------------------- shared prefix


def prefix(quick: bool, seed: int, ckpt: Path, slots: int, vocab: int) -> float:
    """Print the shared-prefix part; return throughput with caching / without."""
    system_len, n, qlens, new = PREFIX_QUICK if quick else PREFIX_FULL
    rng = random.Random(seed)
    system = random_prompt(rng, system_len, vocab)
    questions = [random_prompt(rng, rng.randint(*qlens) + 1, vocab)[1:] for _ in range(n)]
    prompts = [system + q for q in questions]
    max_seq_len = -(-(system_len + qlens[1] + new) // 64) * 64
    print(
        f"\n== prefix: a {system_len}-token system prompt + {n} questions of {qlens[0]}-"
        f"{qlens[1]} tokens, {new} new tokens each (greedy, EOS ignored), all in one "
        f"LLM.generate, MP=1, {slots} slots"
    )
    rows = []
    for caching in (False, True):
        settings = {**engine_settings(1, slots, None), "max_seq_len": max_seq_len}
        with LLM(ckpt, prefix_caching=caching, **settings) as llm:
            warm = random_prompt(random.Random(-1), 24, vocab)
            llm.generate(prompt_token_ids=[warm], sampling_params=greedy(2))
            before = llm.cache_stats()
            start = time.perf_counter()
            outs = llm.generate(prompt_token_ids=prompts, sampling_params=greedy(new))
            seconds = time.perf_counter() - start
            after = llm.cache_stats()
        queried = after["prefix_query_tokens"] - before["prefix_query_tokens"]
        hit = (after["prefix_hit_tokens"] - before["prefix_hit_tokens"]) / queried if queried else 0
        tokens = [list(o.token_ids) for o in outs]
        load = f"(1-min load average after it {os.getloadavg()[0]:.1f})"
        rows.append((caching, sum(map(len, tokens)) / seconds, seconds, hit, tokens, load))
    print(f"  {'prefix caching':<16} {'tok/s':>8} {'seconds':>8} {'hit rate':>9}")
    for caching, rate, seconds, hit, _, load in rows:
        print(f"  {'on' if caching else 'off':<16} {rate:8.1f} {seconds:8.2f} {hit:9.2f}  {load}")
    equal, total = agreement(rows[1][4], rows[0][4])
    print(
        f"  greedy tokens, caching on vs off: "
        f"{'identical' if equal == total else f'{equal}/{total} tokens equal'}"
    )
    ratio = rows[1][1] / rows[0][1]
    print(f"  caching on / off: throughput {ratio:.2f}x")
    return ratio


# ---------------------------------------------------------------------- memory


def kv_requests(n: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [random_prompt(rng, rng.randint(*KV_PROMPTS), vocab) for _ in range(n)]


def fit_in_order(lengths: list[int], blocks: int, block_size: int) -> int:
    """How many of the requests, taken in order, fit together: each the blocks of its
    whole length (prompt + new tokens)."""
    used = 0
    for i, length in enumerate(lengths):
        used += -(-length // block_size)
        if used > blocks:
            return i
    return len(lengths)


def pool(args: ModelArgs, world: int, dtype: str, gib: float, slots: int) -> tuple[int, int]:
    """(bytes per position per rank, blocks in the pool) for a budget of ``gib`` per rank."""
    nbytes = {"float32": 4, "bfloat16": 2}[dtype]
    runtime = RuntimeConfig(
        dtype=dtype, max_seq_len=KV_SEQ, max_batch_size=slots, kv_cache_memory_gb=gib
    )
    plenty = 2**50
    return kv_position_bytes(args, world, nbytes), kv_pool_blocks(
        args, world, runtime, nbytes, plenty, "the bench"
    )


def kvmem(quick: bool, seed: int, ckpt: Path, vocab: int) -> dict[str, float]:
    """Print the memory part; return requests held, blocks / slots, per row."""
    bs = RuntimeConfig().kv_block_size
    rng = random.Random(seed)
    lengths = [rng.randint(*KV_PROMPTS) + KV_NEW for _ in range(4096)]
    mean = sum(lengths) / len(lengths)
    print(
        f"\n== kvmem: requests of {KV_PROMPTS[0]}-{KV_PROMPTS[1]} prompt tokens + {KV_NEW} new "
        f"(mean {mean:.0f} positions) at max_seq_len {KV_SEQ}: how many fit in a KV budget "
        f"per rank as blocks of {bs} (each request the blocks of its own length) against "
        f"slots (each running request reserving max_seq_len positions)"
    )
    print(f"  {'model':<34} {'KiB/pos':>8} {'budget':>8} {'slots':>6} {'blocks':>7} {'fit':>5}")
    out: dict[str, float] = {}
    model = QUICK_MODEL if quick else BENCH_MODEL
    rows = [
        ("bench model fp32, MP=1", dataclasses.replace(model, vocab_size=vocab), 1, "float32"),
        ("Llama-3-8B shape bf16, MP=1", LLAMA3_8B, 1, "bfloat16"),
        ("Llama-3-8B shape bf16, MP=2", LLAMA3_8B, 2, "bfloat16"),
    ]
    for name, args, world, dtype in rows:
        per_pos, blocks = pool(args, world, dtype, KV_BUDGET_GIB, 256)
        slots = int(KV_BUDGET_GIB * GIB) // (KV_SEQ * per_pos)
        fit = fit_in_order(lengths, blocks, bs)
        print(
            f"  {name:<34} {per_pos / 1024:8.0f} {KV_BUDGET_GIB:6.1f}Gi {slots:6d} {blocks:7d} "
            f"{fit:5d}  {fit / slots:.1f}x the slots"
        )
        out[name] = fit / slots
    # Measured: the bench model's engine under a budget of KV_RUN_SEQS slots' worth.
    args = dataclasses.replace(model, vocab_size=vocab)
    per_pos = kv_position_bytes(args, 1, 4)
    gib = (KV_RUN_SEQS * KV_SEQ + bs) * per_pos / GIB  # + the pool's spare block
    n = KV_RUN_REQUESTS
    prompts = kv_requests(n, vocab, seed + 7)
    _, blocks = pool(args, 1, "float32", gib, n)
    slots = int(gib * GIB) // (KV_SEQ * per_pos)
    fit = fit_in_order([len(p) + KV_NEW for p in prompts], blocks, bs)
    print(
        f"  measured: {n} such requests in one LLM.generate on the {'quick' if quick else 'bench'} "
        f"model, max_seq_len {KV_SEQ}, max_batch_size {n}, kv_cache_memory_gb={gib:.3f} "
        f"({blocks} blocks; slots would be {slots}; {fit} of these requests fit at full length)"
    )
    settings = {**engine_settings(1, n, None), "max_seq_len": KV_SEQ}
    with LLM(ckpt, kv_cache_memory_gb=gib, **settings) as llm:
        peak = Peak(llm)
        start = time.perf_counter()
        outs = llm.generate(prompt_token_ids=prompts, sampling_params=greedy(KV_NEW))
        seconds = time.perf_counter() - start
        peak.stop()
        stats = llm.cache_stats()
    done = sum(len(o.token_ids) == KV_NEW for o in outs)
    print(
        f"  peak running {peak.running} requests (slots: {slots}), mean {peak.mean:.1f} while "
        f"any ran; peak KV use {peak.usage:.0%} of {int(stats['kv_blocks'])} blocks; "
        f"{int(stats['preemptions'])} preemptions; {done}/{n} finished with {KV_NEW} tokens "
        f"in {seconds:.0f}s (1-min load average after it {os.getloadavg()[0]:.1f})"
    )
    out["measured peak running / slots"] = peak.running / slots
    return out


class Peak:
    """Polls an LLM's running count and KV use from a thread while it generates."""

    def __init__(self, llm: LLM, every_s: float = 0.02) -> None:
        self.llm, self.every_s = llm, every_s
        self.running, self.usage, self.samples = 0, 0.0, []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()

    def _poll(self) -> None:
        while not self.done.wait(self.every_s):
            running, _ = self.llm.counts()
            self.running = max(self.running, running)
            self.usage = max(self.usage, self.llm.cache_stats()["kv_cache_usage"])
            if running:
                self.samples.append(running)

    def stop(self) -> None:
        self.done.set()
        self.thread.join()

    @property
    def mean(self) -> float:
        return sum(self.samples) / len(self.samples) if self.samples else 0.0
