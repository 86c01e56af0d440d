"""mpllama benchmarks: decode speed at MP=1 and MP=2 against transformers' generate on
the same weights, prompts and lengths, and per-rank memory at MP=1 and MP=2.

Everything is measured in this one run and printed as ratios against a baseline from the
same run (these machines are shared and noisy; absolute numbers mean little).

    python benchmarks/bench.py [--preset small] [--batch 8] [--new-tokens 64]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import torch  # noqa: E402

from mpllama import LLM, SamplingParams, checkpoint  # noqa: E402
from mpllama.tokenizer import Tokenizer  # noqa: E402

PROMPTS = [
    "The history of the printing press",
    "Write a short poem about the sea",
    "Explain how a hash table works, step by step:",
    "Once upon a time",
    "def fibonacci(n):",
    "Translate to French: good morning",
    "List three prime numbers",
    "In a distant galaxy, far away from any star,",
]


def make_checkpoint(root: Path, preset: str, parts: int) -> Path:
    out = root / f"{preset}-{parts}"
    if not (out / "params.json").exists():
        checkpoint.init_checkpoint(out, preset, parts=parts, seed=0)
    return out


def bench_mpllama(
    ckpt: Path, mp: int, prompts: list[str], new_tokens: int, cpus: float
) -> tuple[float, list[list[int]], list[float]]:
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    with LLM(
        ckpt,
        model_parallel_size=mp,
        cpus_per_rank=cpus,
        max_batch_size=len(prompts),
        max_seq_len=256,
    ) as llm:
        llm.generate(prompts[:1], params.replace(max_tokens=2))  # warm up
        start = time.perf_counter()
        outputs = llm.generate(prompts, params)
        elapsed = time.perf_counter() - start
        growth = [m["growth_mb"] for m in llm.engine.call_all("memory")]
    tokens = sum(len(o.token_ids) for o in outputs)
    return tokens / elapsed, [o.token_ids for o in outputs], growth


def bench_transformers(
    ckpt: Path, prompts: list[str], new_tokens: int
) -> tuple[float, list[list[int]]]:
    from transformers import LlamaForCausalLM

    from mpllama.convert import hf_config, meta_to_hf

    args = checkpoint.read_params(ckpt)
    state = checkpoint.load_rank_state(checkpoint.find_shards(ckpt), args, 0, 1)
    model = LlamaForCausalLM(hf_config(args))
    model.load_state_dict(meta_to_hf(state, args))
    model = model.float().eval()
    tok = Tokenizer(ckpt / "tokenizer.model")
    ids = [tok.encode(p, bos=True, eos=False) for p in prompts]
    width = max(map(len, ids))
    # Left padding, as transformers expects for batched decoder-only generation.
    input_ids = torch.tensor([[0] * (width - len(i)) + i for i in ids])
    mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids])
    kwargs = dict(
        attention_mask=mask,
        do_sample=False,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        pad_token_id=0,
    )
    with torch.inference_mode():
        model.generate(
            input_ids[:1],
            **{**kwargs, "attention_mask": mask[:1], "max_new_tokens": 2, "min_new_tokens": 2},
        )
        start = time.perf_counter()
        out = model.generate(input_ids, **kwargs)
        elapsed = time.perf_counter() - start
    generated = out[:, width:].tolist()
    return sum(map(len, generated)) / elapsed, generated


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small", choices=sorted(checkpoint.PRESETS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--dir", default=None, help="where to keep the bench checkpoints")
    opts = parser.parse_args()
    prompts = (PROMPTS * (opts.batch // len(PROMPTS) + 1))[: opts.batch]
    cores = os.cpu_count() or 1
    torch.set_num_threads(cores)
    root = Path(opts.dir or tempfile.mkdtemp(prefix="mpllama-bench-"))
    one = make_checkpoint(root, opts.preset, 1)
    two = make_checkpoint(root, opts.preset, 2)
    args = checkpoint.read_params(one)
    full_mb = sum(torch.Size(s).numel() for s in checkpoint.full_shapes(args).values()) * 4
    full_mb /= 2**20
    print(
        f"preset {opts.preset}: {full_mb:.0f} MiB fp32, batch {opts.batch}, "
        f"{opts.new_tokens} new tokens per prompt, {cores} cores"
    )

    hf_tps, hf_tokens = bench_transformers(one, prompts, opts.new_tokens)
    mp1_tps, mp1_tokens, mp1_mem = bench_mpllama(one, 1, prompts, opts.new_tokens, cores)
    mp2_tps, mp2_tokens, mp2_mem = bench_mpllama(
        two, 2, prompts, opts.new_tokens, max(1, cores // 2)
    )
    print("\ndecode throughput (higher is better; baseline: transformers generate)")
    print(f"  transformers generate  {hf_tps:8.1f} tok/s   1.00x")
    print(f"  mpllama MP=1           {mp1_tps:8.1f} tok/s   {mp1_tps / hf_tps:.2f}x")
    print(f"  mpllama MP=2           {mp2_tps:8.1f} tok/s   {mp2_tps / hf_tps:.2f}x")
    same = mp1_tokens == mp2_tokens
    pairs = zip(mp1_tokens, hf_tokens, strict=True)
    agree = sum(a == b for x, y in pairs for a, b in zip(x, y, strict=True))
    print(f"  MP=1 and MP=2 greedy tokens identical: {same}")
    # transformers' left-padded batch shifts the numerics of padded rows slightly, so a
    # near-tie can flip late in a row; unpadded, it matches token for token (tests).
    print(f"  tokens equal to transformers' batched generate: {agree}/{sum(map(len, hf_tokens))}")
    print("\nper-rank resident-memory growth after load + generate (baseline: the fp32 model size)")
    print(f"  MP=1 rank  {mp1_mem[0]:8.1f} MiB   {mp1_mem[0] / full_mb:.2f}x of the model")
    for rank, mb in enumerate(mp2_mem):
        print(
            f"  MP=2 rank {rank} {mb:7.1f} MiB   {mb / full_mb:.2f}x of the model, "
            f"{mb / mp1_mem[0]:.2f}x of the MP=1 rank"
        )
    print("  (growth includes the KV cache and fixed allocator overhead besides weights)")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
