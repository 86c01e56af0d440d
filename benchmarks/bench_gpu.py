"""The gpu part of bench.py: the mixed workload on a CUDA GPU, where there is one.

transformers ``generate`` in static batches and transformers' continuous batching, and
mpllama MP=1 (one rank, one GPU, through Ray as always) on the same weights, in bf16 and
float32; then mpllama's int8 and int4 weights (cuda_products: cuBLASLt's int8 GEMM and
tinygemm) in bf16. Each row's tok/s against the baselines of its dtype. No goal in any
issue: reported. Where there is no CUDA GPU, one line says so.

    python benchmarks/bench.py --only gpu [--quick]
"""

from __future__ import annotations

import time

import torch
from bench_hf import load_model, run_continuous_batching, run_generate
from bench_mpllama import open_llm, run_llm
from bench_workloads import RunResult, mixed_workload

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
DEVICE = "cuda"


def part(b) -> None:  # b: bench.Bench
    from bench import print_agreement, print_rates

    if not torch.cuda.is_available():
        print("\n== gpu: skipped, no CUDA GPU here")
        return
    s = b.sizes
    work = mixed_workload(s.mixed_requests, b.vocab_size(), b.seed)
    print(
        f"\n== gpu: the mixed workload ({len(work)} requests, {work.useful_tokens} new tokens) "
        f"on {_device_name()} (torch {torch.__version__}); transformers and "
        f"mpllama MP=1 ({s.slots} slots), greedy, EOS ignored"
    )
    ckpt = b.checkpoint(1)
    for name, dtype in DTYPES.items():
        model = load_model(ckpt).to(DEVICE, dtype)
        gen = run_generate(model, work, s.static_batch, f"transformers generate {name}")
        rows: list[RunResult] = [gen]
        baselines = {"generate": gen}
        try:
            cb = run_continuous_batching(model, work, s.slots, f"transformers CB {name}")
            rows.append(cb)
            baselines["CB"] = cb
        except Exception as exc:  # a transformers version whose CB fails on this GPU
            print(f"  (transformers CB {name} failed: {type(exc).__name__}: {exc})")
        del model
        torch.cuda.empty_cache()
        if b.with_mpllama:
            methods = ("none", "int8", "int4") if dtype == torch.bfloat16 else ("none",)
            for method in methods:
                label = f"mpllama MP=1 {name}" + ("" if method == "none" else f" {method}")
                rows.append(_mpllama(b, ckpt, work, label, name, method))
        print_rates(rows, baselines)
        if b.with_mpllama:
            print_agreement(rows[-len(methods)].name, rows[-len(methods)], gen.name, gen)


def _mpllama(b, ckpt, work, label: str, dtype: str, method: str) -> RunResult:
    start = time.perf_counter()
    with open_llm(
        ckpt,
        1,
        b.sizes.slots,
        None,
        device=DEVICE,
        dtype=dtype,
        quantization=method,
    ) as llm:
        loaded = time.perf_counter() - start
        result = run_llm(llm, work, label)
        info = llm.engine.rank_info[0]
    print(f"  ({label}: rank on {info['device']}, {info['backend']}, loaded in {loaded:.1f} s)")
    return result


def _device_name() -> str:
    return torch.cuda.get_device_name() if DEVICE == "cuda" else DEVICE
