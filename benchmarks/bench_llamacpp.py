"""llama.cpp on the bench model's own weights, for the ``llamacpp`` part of bench.py.

The weights take the path a user's would: mpllama's Hugging Face conversion of the bench
checkpoint (``convert_meta_to_hf``: config.json, model.safetensors and the sentencepiece
tokenizer.model), then llama.cpp's own converter (convert_hf_to_gguf.py) to GGUF at f32,
bf16 and q8_0, and llama.cpp's own quantizer (``llama_model_quantize``, what its
llama-quantize tool runs, with its defaults) from the f32 GGUF to q4_0.

llama.cpp lives in an environment of its own, ``.bench-venv`` (``make bench-env``; see
llamacpp_env.sh): llama-cpp-python built from source with native CPU flags, and the
converter from the same sdist. The converter imports torch, which the bench env leaves
out, so it runs on this process's interpreter (the project's) from the files kept in the
bench env. llama.cpp itself runs in a child process on the bench env's interpreter: this
file, run as a script. That child decodes the way llama.cpp's batched-bench does: every request is a
sequence of its own in one ``llama_batch``, all prompts prefilled in one ``llama_decode``,
then one token per sequence per ``llama_decode``; greedy (argmax of the logits), EOS
ignored. The clock runs from the prefill to the last token, after a warm-up.

Only the standard library is imported at the top: the bench env has neither torch nor
mpllama.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BENCH_ENV = Path(os.environ.get("MPLLAMA_BENCH_ENV", REPO / ".bench-venv"))
# llama.cpp's other settings stay at its defaults, as its batched-bench runs them: flash
# attention "auto" and an f16 KV cache for every weight type. (A KV cache of the weights'
# own type is slower here: f32 weights with an f32 cache made 217 tok/s at batch 32 where
# the f16 cache made 383, RESULTS.md; the faster of the two is the baseline.)
GGUF_TYPES = ("f32", "bf16", "q8_0")
# Types the converter does not write: llama.cpp's quantizer makes them from the f32 GGUF
# (its ftype numbers, llama.h's LLAMA_FTYPE_MOSTLY_*).
QUANTIZED_TYPES = {"q4_0": 2}
RUN_TIMEOUT_S = 1800.0


class Unavailable(RuntimeError):
    """llama.cpp cannot run on this machine; the message says why, in one line."""


def installed_version(env: Path = BENCH_ENV) -> str:
    """The llama-cpp-python version in the bench env, e.g. '0.3.36', once it imports."""
    if not (env / ".built").is_file():
        if (env / ".failed").is_file():
            why = (env / ".failed").read_text().strip()
            raise Unavailable(f"{why} here (see {env}/build.log; `make bench-env` retries)")
        raise Unavailable(f"no {env} (`make bench-env` builds it, about 5 minutes on 2 cores)")
    code = "import llama_cpp; print(llama_cpp.__version__)"
    out = subprocess.run(
        [str(env / "bin/python"), "-c", code], capture_output=True, text=True, check=False
    )
    if out.returncode != 0:  # e.g. an env copied from another machine
        last = (out.stderr.strip().splitlines() or ["no output"])[-1]
        raise Unavailable(f"llama_cpp does not import from {env}: {last}")
    return out.stdout.strip()


def make_ggufs(
    ckpt: Path, out: Path, env: Path = BENCH_ENV, kinds: tuple[str, ...] = GGUF_TYPES
) -> dict[str, Path]:
    """GGUFs of a one-shard mpllama checkpoint at every type of ``kinds``, through
    mpllama's HF conversion and llama.cpp's converter; reused when already there."""
    from mpllama.offline.convert import convert_meta_to_hf

    hf = out / "hf"
    if not (hf / "model.safetensors").is_file():
        convert_meta_to_hf(ckpt, hf)
    ggufs = {}
    for kind in kinds:
        gguf = out / f"{ckpt.name}-{kind}.gguf"
        if kind in QUANTIZED_TYPES and not gguf.is_file():
            source = make_ggufs(ckpt, out, env, ("f32",))["f32"]
            part = gguf.with_suffix(".part")
            _child(env, {"quantize": [str(source), str(part), QUANTIZED_TYPES[kind]]})
            part.rename(gguf)
        if not gguf.is_file():
            # Written under another name first: an interrupted run leaves no half file.
            part = gguf.with_suffix(".part")
            converter = env / "llama.cpp" / "convert_hf_to_gguf.py"
            cmd = [sys.executable, str(converter), str(hf), "--outtype", kind]
            done = subprocess.run(
                [*cmd, "--outfile", str(part)], capture_output=True, text=True, check=False
            )
            if done.returncode != 0:
                tail = " | ".join(done.stderr.strip().splitlines()[-3:])
                raise RuntimeError(f"convert_hf_to_gguf.py --outtype {kind} failed: {tail}")
            part.rename(gguf)
        ggufs[kind] = gguf
    return ggufs


def run(
    gguf: Path,
    works: list[tuple[list[list[int]], int | list[int]]],
    threads: int,
    env: Path = BENCH_ENV,
    slots: int | None = None,
) -> list[tuple[float, list[list[int]]]]:
    """Each of ``works`` (prompts as token ids, new tokens for all or per prompt) through
    llama.cpp in the bench env; (seconds, tokens) for each. Without ``slots``, every
    prompt at once, one batch of that many sequences (as batched-bench runs them); with
    ``slots``, continuous batching over that many sequences (as llama.cpp's server runs
    its parallel slots): a finished sequence's slot takes the next prompt."""
    request = {"gguf": str(gguf), "threads": threads, "works": works, "slots": slots}
    out = _child(env, request)
    return [(r["seconds"], r["tokens"]) for r in json.loads(out.splitlines()[-1])]


def score(
    gguf: Path, windows: list[list[int]], threads: int, env: Path = BENCH_ENV
) -> tuple[float, int]:
    """llama.cpp's loss on ``windows`` (token ids), each scored on its own from position 0
    as mpllama's perplexity scores them: every token of a window but its last is read, and
    the next one predicted. (Summed negative log-likelihood, tokens scored.)"""
    request = {"gguf": str(gguf), "threads": threads, "score": windows}
    out = json.loads(_child(env, request).splitlines()[-1])
    return out["nll"], out["count"]


def _child(env: Path, request: dict[str, Any]) -> str:
    """This file run as a script on the bench env's interpreter with ``request``; its
    output. A failure (a crash in llama.cpp, e.g. an env built for another CPU) raises
    with the last lines it wrote."""
    done = subprocess.run(
        [str(env / "bin/python"), __file__],
        input=json.dumps(request),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        check=False,
    )
    if done.returncode != 0:
        tail = " | ".join(done.stderr.strip().splitlines()[-3:])
        what = f"on {Path(request['gguf']).name}" if "gguf" in request else "quantizing"
        raise RuntimeError(f"llama.cpp {what} exited {done.returncode}: {tail}")
    return done.stdout


# ------------------------------------------------------------------------ in the bench env


def _decode(llama: Any, ctx: Any, batch: Any, tokens: list[tuple[int, int, int, bool]]) -> None:
    """One ``llama_decode`` of (token, position, sequence, wants logits) entries."""
    batch.n_tokens = len(tokens)
    for i, (token, pos, seq, logits) in enumerate(tokens):
        batch.token[i] = token
        batch.pos[i] = pos
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = seq
        batch.logits[i] = logits
    status = llama.llama_decode(ctx, batch)
    if status != 0:
        raise RuntimeError(f"llama_decode returned {status}")


def _greedy(
    prompts: list[list[int]], new_tokens: int, llama: Any, ctx: Any, n_vocab: int
) -> list[list[int]]:
    """Every prompt as its own sequence: one prefill for all, then one decode per step
    with one token per sequence; returns each sequence's ``new_tokens`` argmax tokens."""
    import numpy as np

    n = len(prompts)
    batch = llama.llama_batch_init(max(n, sum(map(len, prompts))), 0, 1)
    try:
        # Only each prompt's last position needs logits: its first new token.
        prefill = [
            (t, pos, seq, pos == len(p) - 1)
            for seq, p in enumerate(prompts)
            for pos, t in enumerate(p)
        ]
        _decode(llama, ctx, batch, prefill)
        out: list[list[int]] = [[] for _ in range(n)]
        for step in range(new_tokens):
            # One logits row per sequence, in batch order (= sequence order).
            rows = np.ctypeslib.as_array(llama.llama_get_logits(ctx), shape=(n, n_vocab))
            for seq, token in enumerate(rows.argmax(axis=1).tolist()):
                out[seq].append(token)
            if step + 1 < new_tokens:
                last = [
                    (o[-1], len(p) + step, s, True)
                    for s, (p, o) in enumerate(zip(prompts, out, strict=True))
                ]
                _decode(llama, ctx, batch, last)
        return out
    finally:
        llama.llama_batch_free(batch)


def _continuous(
    prompts: list[list[int]],
    new_tokens: list[int],
    slots: int,
    llama: Any,
    ctx: Any,
    n_vocab: int,
) -> list[list[int]]:
    """Up to ``slots`` sequences at a time, in order of the prompts: each step one
    ``llama_decode`` holding one token of every running sequence and the whole prompt of
    each one starting in a free slot; a sequence ends after its ``new_tokens`` and its
    slot's KV cells are freed for the next prompt. Returns each prompt's argmax tokens."""
    import numpy as np

    memory = llama.llama_get_memory(ctx)
    waiting = list(range(len(prompts)))[::-1]  # popped from the end: the first prompt first
    free = list(range(slots))[::-1]
    running: dict[int, int] = {}  # sequence (slot) -> prompt index
    out: list[list[int]] = [[] for _ in prompts]
    batch = llama.llama_batch_init(_most_tokens(prompts, slots), 0, 1)
    try:
        while waiting or running:
            entries, rows = [], []  # rows: the prompt each logits row belongs to
            for seq, i in running.items():
                entries.append((out[i][-1], len(prompts[i]) + len(out[i]) - 1, seq, True))
                rows.append(i)
            while waiting and free:
                i, seq = waiting.pop(), free.pop()
                running[seq] = i
                p = prompts[i]
                entries += [(t, pos, seq, pos == len(p) - 1) for pos, t in enumerate(p)]
                rows.append(i)
            _decode(llama, ctx, batch, entries)
            logits = np.ctypeslib.as_array(llama.llama_get_logits(ctx), shape=(len(rows), n_vocab))
            for i, token in zip(rows, logits.argmax(axis=1).tolist(), strict=True):
                out[i].append(token)
            for seq, i in list(running.items()):
                if len(out[i]) == new_tokens[i]:
                    del running[seq]
                    free.append(seq)
                    llama.llama_memory_seq_rm(memory, seq, -1, -1)
        return out
    finally:
        llama.llama_batch_free(batch)


def _most_tokens(prompts: list[list[int]], sequences: int) -> int:
    """The most tokens one ``llama_decode`` of ``_continuous`` holds: a token of each
    running sequence and the longest prompts starting."""
    return sequences + sum(sorted(map(len, prompts))[-sequences:])


def _load(llama: Any, gguf: str) -> tuple[Any, int]:
    """llama.cpp's model of ``gguf`` and its vocabulary's size."""
    llama.llama_backend_init()
    model = llama.llama_model_load_from_file(gguf.encode(), llama.llama_model_default_params())
    if not model:
        raise RuntimeError(f"llama.cpp could not load {gguf}")
    return model, llama.llama_vocab_n_tokens(llama.llama_model_get_vocab(model))


def _serve(request: dict[str, Any]) -> list[dict[str, Any]]:
    """The child's work: load the GGUF once, then per workload a context with one
    sequence per prompt, a warm-up, a cleared cache and the timed pass."""
    import llama_cpp as llama

    model, n_vocab = _load(llama, request["gguf"])
    results = []
    slots = request.get("slots")
    for prompts, new_tokens in request["works"]:
        each = new_tokens if isinstance(new_tokens, list) else [new_tokens] * len(prompts)
        sequences = slots or len(prompts)
        params = llama.llama_context_default_params()
        params.n_seq_max = sequences
        # Each sequence gets n_ctx / n_seq_max positions of the (per-sequence) KV cache.
        longest = max(len(p) + n for p, n in zip(prompts, each, strict=True))
        params.n_ctx = sequences * longest
        # One call takes every prompt starting in it (all of them, without slots).
        params.n_batch = max(params.n_batch, _most_tokens(prompts, sequences))
        params.n_threads = params.n_threads_batch = request["threads"]
        # Continuous batching on one KV buffer for all sequences, as llama.cpp's server
        # can run its slots (--kv-unified): 2x faster here than a stream per sequence,
        # whose decode steps slowed 3x as slots were reused (the mixed workload, bf16:
        # 16.6 s against 33.5); one batch of equal sequences is faster on a stream each
        # (batch 32, bf16: 714 tok/s against 592). Each cell gets its faster setting.
        params.kv_unified = bool(slots)
        ctx = llama.llama_init_from_model(model, params)
        if not ctx:
            raise RuntimeError("llama_init_from_model failed")
        try:
            _greedy(prompts[:2], 2, llama, ctx, n_vocab)  # warm up
            llama.llama_memory_clear(llama.llama_get_memory(ctx), True)
            start = time.perf_counter()
            if slots:
                tokens = _continuous(prompts, each, slots, llama, ctx, n_vocab)
            else:
                tokens = _greedy(prompts, each[0], llama, ctx, n_vocab)
            results.append({"seconds": time.perf_counter() - start, "tokens": tokens})
        finally:
            llama.llama_free(ctx)
    llama.llama_model_free(model)
    return results


def _score(request: dict[str, Any]) -> dict[str, float]:
    """The child's scoring: each window one ``llama_decode`` from an empty cache, every
    position's logits kept; the negative log-likelihood of each next token, in float64."""
    import llama_cpp as llama
    import numpy as np

    model, n_vocab = _load(llama, request["gguf"])
    windows = request["score"]
    longest = max(map(len, windows))
    params = llama.llama_context_default_params()
    params.n_ctx = params.n_batch = params.n_ubatch = longest
    params.n_threads = params.n_threads_batch = request["threads"]
    ctx = llama.llama_init_from_model(model, params)
    if not ctx:
        raise RuntimeError("llama_init_from_model failed")
    batch = llama.llama_batch_init(longest, 0, 1)
    nll, count = 0.0, 0
    try:
        for window in windows:
            llama.llama_memory_clear(llama.llama_get_memory(ctx), True)
            n = len(window) - 1
            _decode(llama, ctx, batch, [(t, pos, 0, True) for pos, t in enumerate(window[:n])])
            rows = np.ctypeslib.as_array(llama.llama_get_logits(ctx), shape=(n, n_vocab))
            logits = rows.astype(np.float64)
            top = logits.max(axis=1, keepdims=True)
            log_z = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
            nll += float((log_z - logits[np.arange(n), window[1:]]).sum())
            count += n
    finally:
        llama.llama_batch_free(batch)
        llama.llama_free(ctx)
        llama.llama_model_free(model)
    return {"nll": nll, "count": count}


def _quantize(source: str, out: str, ftype: int) -> None:
    """The child's other work: llama.cpp's quantizer, as llama-quantize runs it (its default
    parameters: for q4_0 the output layer in q6_K, the rest q4_0)."""
    import llama_cpp as llama

    llama.llama_backend_init()
    params = llama.llama_model_quantize_default_params()
    params.ftype = ftype
    if llama.llama_model_quantize(source.encode(), out.encode(), params) != 0:
        raise RuntimeError(f"llama_model_quantize({source}, ftype {ftype}) failed")


if __name__ == "__main__":
    request = json.load(sys.stdin)
    if "quantize" in request:
        _quantize(*request["quantize"])
    elif "score" in request:
        print(json.dumps(_score(request)))
    else:
        print(json.dumps(_serve(request)))
