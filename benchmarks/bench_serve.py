"""`mpllama serve` against `transformers serve --continuous-batching` over HTTP.

Both servers run as subprocesses on 127.0.0.1 and serve the same seeded random ~110M Llama
(benchmarks/bench_workloads.py: BENCH_MODEL): mpllama its Meta shards at MP=1 using every
core, transformers the Hugging Face folder `mpllama convert --to hf` makes of them, fp32 on
CPU. Each is warmed up, then driven by the real `openai` AsyncOpenAI client: streaming
completions arriving at a seeded Poisson rate, at two or three load levels, prompts of
varied length, greedy, a fixed max_tokens with EOS ignored (mpllama: `ignore_eos`;
transformers: a per-request `generation_config` with eos_token_id=-1), so both generate
the same number of tokens; the tokens counted are those each server's usage reports.

Per server and load level it prints achieved throughput (completion tokens/s from the
first arrival to the last finish), time to first token (TTFT, from the scheduled arrival,
so queueing counts) and inter-token latency (ITL, the gaps between streamed chunks that
carry text) at p50 and p99, then the ratios mpllama / transformers and whether the target
(higher throughput and lower p99 TTFT at every level) is met. Nothing is asserted; the
exit status is 0 unless a server cannot start.

    python benchmarks/bench_serve.py [--quick] [--rates 0.5,1,2] [--requests 32]

transformers serve needs `accelerate` (it always passes a device_map) besides fastapi,
uvicorn and openai.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib.util
import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from bench_workloads import (
    BENCH_MODEL,
    FIRST_PLAIN_ID,
    QUICK_MODEL,
    VOCAB_SIZE,
    make_checkpoint,
    poisson_arrivals,
)

VENV_BIN = Path(sys.executable).parent
BLOCK_SIZE = 32  # transformers' KV-cache page, in tokens
PREFILL_TOKENS = 512  # most prompt tokens per step, on both servers
START_TIMEOUT_S = 600  # loading the model; mpllama also starts a local Ray and Serve
STOP_TIMEOUT_S = 60  # after SIGTERM, before SIGKILL


@dataclass(frozen=True)
class Sizes:
    name: str
    model: object
    rates: tuple[float, ...]  # requests per second, one load level each
    requests: int  # per load level
    max_tokens: int
    prompt_lens: tuple[int, int]  # tokens, inclusive
    slots: int  # sequences decoded at once (mpllama) / KV cache for as many (transformers)


# On 2 cores transformers serve decodes this model at ~40 tokens/s, mpllama at ~60-100:
# 0.5 req/s x 32 tokens loads both lightly, 2 req/s overloads transformers. About five
# minutes in all.
FULL = Sizes("bench", BENCH_MODEL, (0.5, 1.0, 2.0), 24, 32, (16, 192), 16)
QUICK = Sizes("quick", QUICK_MODEL, (2.0, 8.0), 8, 16, (8, 48), 4)


@dataclass
class Record:
    """One streamed request, times in seconds from the level's start."""

    sent: float
    chunks: list[float] = field(default_factory=list)  # arrival of each chunk with text
    tokens: int = 0  # completion tokens, as the server's usage says
    done: float = math.nan
    error: str | None = None


# ---------------------------------------------------------------------- the model


def prepare(root: Path, sizes: Sizes) -> tuple[Path, Path]:
    """The Meta shards (MP=1) and their Hugging Face conversion, reused when present."""
    from mpllama.offline.convert import convert_meta_to_hf

    meta = make_checkpoint(root, sizes.name, sizes.model, parts=1)
    hf = root / f"{sizes.name}-hf"
    if not (hf / "config.json").exists():
        convert_meta_to_hf(meta, hf)
    if not (hf / "tokenizer_config.json").exists():
        # convert copies tokenizer.model alone; transformers loads it without BOS, while
        # mpllama prompts start with BOS. A saved LlamaTokenizer that adds BOS makes both
        # servers see the same prompt ids.
        from transformers import LlamaTokenizer

        LlamaTokenizer.from_pretrained(hf, add_bos_token=True, legacy=False).save_pretrained(hf)
        # A random model emits byte pieces (<0xE2>...) in orders that are not UTF-8, and
        # transformers serve's streaming decoder (tokenizers' DecodeStream) then fails the
        # request ("Invalid prefix encountered"). Without the ByteFallback decoder step a
        # byte piece streams as its literal name: the same token ids, only other text.
        # LlamaTokenizer rebuilds its decoder on load, so the folder names the generic
        # class, which takes tokenizer.json as it is (BOS included).
        path = hf / "tokenizer.json"
        spec = json.loads(path.read_text())
        steps = spec["decoder"]["decoders"]
        spec["decoder"]["decoders"] = [d for d in steps if d["type"] != "ByteFallback"]
        path.write_text(json.dumps(spec))
        path = hf / "tokenizer_config.json"
        config = json.loads(path.read_text())
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        path.write_text(json.dumps(config, indent=2))
    return meta, hf


def make_prompts(meta: Path, n: int, lens: tuple[int, int], seed: int) -> list[str]:
    """``n`` texts decoded from seeded random ids of lengths in ``lens``, drawn from the
    pieces that are text (no control or byte pieces), so each text re-encodes cleanly."""
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor(model_file=str(meta / "tokenizer.model"))
    rng = random.Random(seed)
    text_ids = [i for i in range(FIRST_PLAIN_ID, sp.vocab_size()) if not sp.is_byte(i)]
    return [sp.decode(rng.choices(text_ids, k=rng.randint(*lens))) for _ in range(n)]


# ---------------------------------------------------------------------- the servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A server subprocess in its own session, its output in ``log``; stopped with SIGTERM,
    then SIGKILL to its whole process group if it does not exit in time."""

    def __init__(
        self, name: str, cmd: list[str], port: int, env: dict[str, str], log: Path
    ) -> None:
        self.name, self.port, self.log = name, port, log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

    def wait_ready(self, url: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.proc.returncode}:\n{self.tail()}"
                )
            try:
                with urllib.request.urlopen(url, timeout=5) as reply:
                    if reply.status == 200:
                        return
            except OSError:
                pass
            time.sleep(1.0)
        raise RuntimeError(f"{self.name} not answering {url} after {timeout_s}s:\n{self.tail()}")

    def stop(self) -> str:
        """How it went, in words."""
        how = f"had already exited ({self.proc.returncode})"
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                # uvicorn re-raises SIGTERM after its clean shutdown: -15 is a clean exit.
                code = self.proc.wait(timeout=STOP_TIMEOUT_S)
                how = f"stopped by SIGTERM (exit {code})"
            except subprocess.TimeoutExpired:
                how = f"still running {STOP_TIMEOUT_S}s after SIGTERM: killed"
        try:  # whatever is left in the group it leads (it was started as its own session)
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        return how

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def child_env() -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("RAY_ADDRESS", None)  # mpllama starts a private local Ray
    env.pop("MPLLAMA_API_KEY", None)
    return env


def start_mpllama(meta: Path, sizes: Sizes, max_seq_len: int, root: Path) -> ServerProcess:
    cores = os.cpu_count() or 1
    port = free_port()
    job = {
        "model": {"checkpoint_dir": str(meta)},
        "parallel": {"model_parallel_size": 1, "backend": "gloo", "cpus_per_rank": cores},
        "runtime": {
            "device": "cpu",
            "dtype": "float32",
            "max_batch_size": sizes.slots,
            "max_seq_len": max_seq_len,
            "prefill_chunk_tokens": PREFILL_TOKENS,
        },
        # A queue no load level fills: every request is served, none answered 429.
        "serve": {"host": "127.0.0.1", "port": port, "max_queued_requests": 4096},
    }
    yaml_path = root / "serve-bench.yaml"
    yaml_path.write_text(json.dumps(job, indent=2))  # JSON is YAML
    cmd = [str(VENV_BIN / "mpllama"), "serve", str(yaml_path)]
    return ServerProcess("mpllama", cmd, port, child_env(), root / "mpllama-serve.log")


def start_transformers(hf: Path, sizes: Sizes, max_seq_len: int, root: Path) -> ServerProcess:
    blocks = sizes.slots * math.ceil(max_seq_len / BLOCK_SIZE)
    port = free_port()
    cmd = [
        str(VENV_BIN / "transformers"),
        "serve",
        str(hf),  # --force-model: a local folder, loaded at start
        "--continuous-batching",
        "--device=cpu",
        "--dtype=float32",
        "--host=127.0.0.1",
        # Its cache would otherwise be sized from the machine's total RAM (psutil): give it
        # the KV room of mpllama's slots instead.
        f"--cb-block-size={BLOCK_SIZE}",
        f"--cb-num-blocks={blocks}",
        f"--cb-max-batch-tokens={PREFILL_TOKENS}",
        f"--port={port}",
    ]
    return ServerProcess("transformers", cmd, port, child_env(), root / "transformers-serve.log")


# ---------------------------------------------------------------------- the load


def extra_body(server: str, max_tokens: int) -> dict[str, object]:
    """What makes each server greedy and deaf to EOS for exactly ``max_tokens`` tokens."""
    if server == "mpllama":
        return {"ignore_eos": True, "top_k": 0}
    config = {"do_sample": False, "max_new_tokens": max_tokens, "eos_token_id": -1}
    return {"generation_config": json.dumps(config)}


async def one_request(client, model: str, prompt: str, max_tokens: int, extra, rec: Record, t0):
    try:
        stream = await client.completions.create(
            model=model,
            prompt=prompt,
            max_tokens=max_tokens,
            temperature=0.0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=extra,
        )
        async for chunk in stream:
            now = time.perf_counter() - t0
            if chunk.choices and chunk.choices[0].text:
                rec.chunks.append(now)
            if chunk.usage is not None:
                rec.tokens = chunk.usage.completion_tokens
    except Exception as exc:  # reported, never fatal: one failure must not end the run
        body = getattr(exc, "body", None)  # an SSE error event's payload, when there is one
        rec.error = f"{type(exc).__name__}: {exc}" + (f" {body}" if body else "")
    rec.done = time.perf_counter() - t0


async def drive(base_url: str, server: str, model: str, prompts, arrivals, max_tokens):
    """Send request i at arrivals[i] (seconds), streaming; the records in input order."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=900.0)
    extra = extra_body(server, max_tokens)
    t0 = time.perf_counter()
    records, tasks = [], []
    for prompt, at in zip(prompts, arrivals, strict=True):
        delay = at - (time.perf_counter() - t0)
        if delay > 0:
            await asyncio.sleep(delay)
        rec = Record(sent=time.perf_counter() - t0)
        records.append(rec)
        tasks.append(
            asyncio.create_task(one_request(client, model, prompt, max_tokens, extra, rec, t0))
        )
    await asyncio.gather(*tasks)
    await client.close()
    return records


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def summarise(records: list[Record]) -> dict[str, float]:
    ok = [r for r in records if r.error is None and r.chunks]
    ttft = [r.chunks[0] - r.sent for r in ok]
    itl = [b - a for r in ok for a, b in zip(r.chunks, r.chunks[1:], strict=False)]
    # Time per output token, per request: insensitive to how a server groups tokens into
    # chunks (transformers may send several chunks at once, which ITL sees as 0 gaps).
    tpot = [(r.chunks[-1] - r.chunks[0]) / (r.tokens - 1) for r in ok if r.tokens > 1]
    tokens = sum(r.tokens for r in ok)
    span = max((r.done for r in ok), default=math.nan) - min(r.sent for r in records)
    return {
        "ok": len(ok),
        "failed": len(records) - len(ok),
        "tokens": tokens,
        "tok_s": tokens / span if ok else 0.0,
        "ttft_p50": percentile(ttft, 50),
        "ttft_p99": percentile(ttft, 99),
        "itl_p50": percentile(itl, 50),
        "itl_p99": percentile(itl, 99),
        "tpot_p50": percentile(tpot, 50),
    }


def run_server(server: ServerProcess, name: str, model: str, sizes: Sizes, prompts, seed: int):
    base = f"http://127.0.0.1:{server.port}/v1"
    start = time.perf_counter()
    server.wait_ready(f"{base}/models", START_TIMEOUT_S)
    print(f"  {name}: ready in {time.perf_counter() - start:.0f}s")
    # Warm-up: a few concurrent requests (transformers builds its batching manager on the
    # first request; both servers touch every code path once).
    warm = prompts[: sizes.slots]
    asyncio.run(drive(base, name, model, warm, [0.0] * len(warm), sizes.max_tokens))
    results = {}
    for level, rate in enumerate(sizes.rates):
        arrivals = poisson_arrivals(sizes.requests, rate, seed + level)
        chosen = prompts[level * sizes.requests : (level + 1) * sizes.requests]
        records = asyncio.run(drive(base, name, model, chosen, arrivals, sizes.max_tokens))
        results[rate] = summary = summarise(records)
        short = [r.tokens for r in records if r.error is None and r.tokens != sizes.max_tokens]
        print(
            f"  {name} @ {rate:g} req/s: {summary['tok_s']:7.1f} tok/s  "
            f"TTFT p50 {summary['ttft_p50'] * 1e3:7.0f} p99 {summary['ttft_p99'] * 1e3:7.0f} ms  "
            f"ITL p50 {summary['itl_p50'] * 1e3:5.0f} p99 {summary['itl_p99'] * 1e3:5.0f} ms  "
            f"TPOT p50 {summary['tpot_p50'] * 1e3:5.0f} ms  "
            f"({summary['ok']} ok, {summary['failed']} failed, {summary['tokens']} tokens)"
        )
        if short:
            print(f"    {len(short)} request(s) got other than {sizes.max_tokens} tokens: {short}")
        for r in records:
            if r.error is not None:
                print(f"    error: {r.error[:200]}")
                break
    return results


# ---------------------------------------------------------------------- report


def report(results: dict[str, dict[float, dict[str, float]]], sizes: Sizes) -> None:
    if len(results) < 2:
        return
    mp, tf = results["mpllama"], results["transformers"]
    print("\n== mpllama / transformers (throughput: higher is better; latency: lower)")
    met = True
    for rate in sizes.rates:
        a, b = mp[rate], tf[rate]

        def ratio(key: str, a=a, b=b) -> float:
            return a[key] / b[key] if b[key] and not math.isnan(b[key]) else math.nan

        better = a["failed"] == 0 and a["tok_s"] > b["tok_s"] and a["ttft_p99"] < b["ttft_p99"]
        met = met and better
        # Below either server's capacity both deliver the offered load: a throughput
        # ratio near 1 there is noise, and the level is decided by latency.
        print(
            f"  @ {rate:g} req/s (offers {rate * sizes.max_tokens:g} tok/s): "
            f"throughput x{ratio('tok_s'):.2f}  "
            f"TTFT p50 x{ratio('ttft_p50'):.2f} p99 x{ratio('ttft_p99'):.2f}  "
            f"ITL p50 x{ratio('itl_p50'):.2f} p99 x{ratio('itl_p99'):.2f}  "
            f"{'better' if better else 'NOT better'}"
        )
    print("\n== target (reported, never asserted)")
    print(
        "  higher throughput and lower p99 TTFT than transformers serve at every level: "
        + ("met" if met else "NOT met")
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, few requests")
    parser.add_argument("--rates", default=None, help="requests/s per load level, e.g. 0.5,1,2")
    parser.add_argument("--requests", type=int, default=None, help="requests per load level")
    parser.add_argument("--max-tokens", type=int, default=None, help="tokens per request")
    parser.add_argument("--seed", type=int, default=0, help="seed of prompts and arrivals")
    parser.add_argument(
        "--servers", default="mpllama,transformers", help="which to run, comma-separated"
    )
    parser.add_argument("--dir", default=None, help="keep checkpoints and logs here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    sizes = QUICK if opts.quick else FULL
    if opts.rates:
        sizes = dataclasses.replace(sizes, rates=tuple(float(r) for r in opts.rates.split(",")))
    if opts.requests:
        sizes = dataclasses.replace(sizes, requests=opts.requests)
    if opts.max_tokens:
        sizes = dataclasses.replace(sizes, max_tokens=opts.max_tokens)
    names = [s.strip() for s in opts.servers.split(",") if s.strip()]
    unknown = set(names) - {"mpllama", "transformers"}
    if unknown:
        raise SystemExit(f"unknown server(s) {sorted(unknown)}; choose mpllama, transformers")
    if "transformers" in names and importlib.util.find_spec("accelerate") is None:
        raise SystemExit(
            "transformers serve needs accelerate (it always passes a device_map): "
            "pip install accelerate, or pip install -e '.[test]'"
        )
    # Room for the longest prompt (re-encoding decoded text may add a few pieces) + output.
    max_seq_len = 2 * sizes.prompt_lens[1] + sizes.max_tokens + 8
    args = sizes.model
    print(
        f"mpllama bench-serve: model dim={args.dim} n_layers={args.n_layers} "
        f"n_heads={args.n_heads} vocab {VOCAB_SIZE}, fp32 on CPU, {os.cpu_count()} cores; "
        f"{sizes.requests} streaming requests per level at {', '.join(map(str, sizes.rates))} "
        f"req/s (Poisson, seed {opts.seed}), prompts of {sizes.prompt_lens[0]}-"
        f"{sizes.prompt_lens[1]} tokens, {sizes.max_tokens} tokens each, greedy, EOS ignored"
        f"{'; quick' if opts.quick else ''}"
    )
    print(f"  load before starting: {os.getloadavg()[0]:.2f} (1-min average)")
    with tempfile.TemporaryDirectory(prefix="mpllama-bench-serve-") as tmp:
        root = Path(opts.dir or tmp)
        root.mkdir(parents=True, exist_ok=True)
        meta, hf = prepare(root, sizes)
        total = sizes.requests * len(sizes.rates)
        prompts = make_prompts(meta, max(total, sizes.slots), sizes.prompt_lens, opts.seed)
        results = {}
        for name in names:
            if name == "mpllama":
                server = start_mpllama(meta, sizes, max_seq_len, root)
                model = meta.name  # the checkpoint folder's name
            else:
                server = start_transformers(hf, sizes, max_seq_len, root)
                model = str(hf)  # the pinned model's id is its path
            try:
                results[name] = run_server(server, name, model, sizes, prompts, opts.seed)
            except RuntimeError as exc:
                print(f"  {name}: {exc}")
                return 1
            finally:
                print(f"  {name}: {server.stop()}")
        report(results, sizes)
    print(f"  load at the end: {os.getloadavg()[0]:.2f} (1-min average)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
