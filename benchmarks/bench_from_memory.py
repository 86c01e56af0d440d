"""One request on a model whose weights do not fit the CPU's caches, through the engine,
against llama.cpp at matching precision (not part of ``make bench``: it writes about
10 GB of checkpoints and GGUFs under /tmp/mpllama-bench, and takes a few minutes).

The bench model (111M parameters) fits a large L3 (300 MiB on the Xeon of sessions 8-11),
so its batch-1 figures there say little about a model read from memory at every step.
This one has Llama 3.2 1B's layers (dim 2048, 16 layers, GQA 32/8, FFN 8192: 0.97B
parameters) with the bench's 4000-entry sentencepiece vocabulary: llama.cpp's converter
reads a sentencepiece tokenizer.model, and mpllama's HF conversion writes no
tokenizer.json for Llama 3's tiktoken file. ``bench_decode.py --llama32-1b`` measures the
same layers with Llama 3's vocabulary in-process, against the memory's speed.

mpllama MP=1 (bf16, int8, int4 in a bf16 model) and llama.cpp (bf16, q8_0, q4_0, its own
converter and quantizer) alternate, three runs a side, each keeping its fastest: a 32-token
prompt and 32 new tokens, generated tokens per second of wall time, prefill included (the
issue's measure), 2 threads each.

    python benchmarks/bench_from_memory.py        (needs make bench-env)
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import bench_llamacpp as cpp  # noqa: E402
from bench_decode import LLAMA32_1B_MODEL  # noqa: E402
from bench_mpllama import open_llm, run_llm  # noqa: E402
from bench_workloads import make_checkpoint, uniform_workload  # noqa: E402

from mpllama import checkpoint  # noqa: E402

ROOT = Path("/tmp/mpllama-bench")
MODEL = dataclasses.replace(LLAMA32_1B_MODEL, vocab_size=-1, use_scaled_rope=False)
PAIRS = (  # mpllama's label and settings, the llama.cpp type held against it
    ("bf16", {"dtype": "bfloat16"}, "bf16"),
    ("int8", {"dtype": "bfloat16", "quantization": "int8"}, "q8_0"),
    ("int4", {"dtype": "bfloat16", "quantization": "int4"}, "q4_0"),
)
RUNS = 3
THREADS = 2


def main() -> int:
    try:
        version = cpp.installed_version()
    except cpp.Unavailable as exc:
        print(f"llama.cpp is not available: {exc}")
        return 1
    ckpt = make_checkpoint(ROOT, "l32-layers", MODEL, 1)
    ggufs = cpp.make_ggufs(ckpt, ROOT / "gguf-l32", kinds=tuple(kind for *_, kind in PAIRS))
    work = uniform_workload(1, 32, 32, checkpoint.read_params(ckpt).vocab_size, 5)
    print(
        f"== one request from memory: Llama 3.2 1B's layers, vocabulary 4000, random weights; "
        f"32-token prompt, 32 new tokens, {THREADS} threads; llama.cpp (llama-cpp-python "
        f"{version}) GGUFs: "
        + ", ".join(f"{k} {v.stat().st_size / 1e9:.2f} GB" for k, v in ggufs.items())
    )
    print(f"  {'mpllama':<8} {'tok/s':>7}   {'llama.cpp':<9} {'tok/s':>7}   ratio   (every run)")
    for label, settings, kind in PAIRS:
        ours, theirs = [], []
        with open_llm(ckpt, 1, 1, None, prefix_caching=False, **settings) as llm:
            for _ in range(RUNS):
                ours.append(run_llm(llm, work, label).tokens_per_s)
                ((seconds, _),) = cpp.run(ggufs[kind], [(work.prompts, 32)], THREADS)
                theirs.append(work.useful_tokens / seconds)
        print(
            f"  {label:<8} {max(ours):7.1f}   {kind:<9} {max(theirs):7.1f}   "
            f"{max(ours) / max(theirs):4.2f}x   ({', '.join(f'{x:.1f}' for x in ours)} / "
            f"{', '.join(f'{x:.1f}' for x in theirs)})",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
