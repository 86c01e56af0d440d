"""Single-request decode against the machine's memory bandwidth (bench.py's decode part).

One request's decode step reads every weight once (the embedding aside: one row), so its
speed is bounded by how fast the CPU reads memory. This part measures that bound, then
the bench model's batch-1 step in-process (the lead's forward, no engine) at each
precision, with mpllama's CPU kernels (mpllama/rank/cpu_kernels*.c) and, in the same run,
with torch's (oneDNN products, SDPA or two matmuls for attention), and says where the
step's time goes: the products alone, run back to back on one row (of them the output
layer's), and the rest (attention, norms, RoPE, cache writes, Python). Then the same for a
Llama-3-shaped model of the bench model's layers (GQA, Llama 3's 128256-entry vocabulary,
its scaled RoPE, random weights), where the output layer is a third of the bytes.

  stream    GB/s of a pass of plain AVX-512 loads over 256 MiB (on huge pages, as the
            ranks allocate), measured in each round just before its steps: the bound,
            which on this shared machine moves by half between minutes
  steps     ms per step at positions 32..96, interleaved rounds, median (best); weight
            bytes per token; achieved GB/s = bytes / step; share = achieved / stream,
            the median of the rounds' ratios

    python benchmarks/bench_decode.py [--quick] [--llama3]   (--llama3: that model only)
    python benchmarks/bench_decode.py --llama32-1b   (Llama 3.2 1B's shape, from memory)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# As mpllama's ranks allocate (rank.dist.use_huge_pages): read by torch at its first
# allocation, so before anything here allocates.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import torch  # noqa: E402
from bench_quant import demo_group_size, load_demo  # noqa: E402
from bench_workloads import BENCH_MODEL, QUICK_MODEL, make_checkpoint  # noqa: E402
from torch import nn  # noqa: E402

from mpllama.model_args import LLAMA3_VOCAB_SIZE, ModelArgs  # noqa: E402
from mpllama.rank import cpu_kernels, dist, quant  # noqa: E402
from mpllama.rank import model as model_module  # noqa: E402
from mpllama.rank.layers import ColumnLinear, Fused, RowLinear, linear  # noqa: E402
from mpllama.rank.model import Transformer  # noqa: E402

# The bench model's layers with Llama 3's vocabulary, grouped-query attention and scaled
# RoPE: 351M parameters, 262M of them the embedding and the output layer (as in Llama 3.2
# 1B, a fifth of whose parameters the output layer is).
LLAMA3_SHAPE = {
    "n_kv_heads": 4,
    "rope_theta": 500000.0,
    "use_scaled_rope": True,
    "vocab_size": LLAMA3_VOCAB_SIZE,
}
LLAMA3_DECODE_MODEL = dataclasses.replace(BENCH_MODEL, **LLAMA3_SHAPE)
QUICK_LLAMA3_DECODE_MODEL = dataclasses.replace(QUICK_MODEL, **{**LLAMA3_SHAPE, "n_kv_heads": 2})
# Llama 3.2 1B's shape (its output layer untied): 1.5B parameters, 3 GB in bf16, 1.5 GB in
# int8; far past any L3, so every step reads the memory (``--llama32-1b``, not in make bench).
LLAMA32_1B_MODEL = ModelArgs(
    dim=2048,
    n_layers=16,
    n_heads=32,
    n_kv_heads=8,
    multiple_of=256,
    ffn_dim_multiplier=1.5,
    norm_eps=1e-5,
    rope_theta=500000.0,
    use_scaled_rope=True,
    vocab_size=LLAMA3_VOCAB_SIZE,
)

PRECISIONS = {  # label: (dtype, runtime.quantization)
    "fp32": (torch.float32, None),
    "bf16": (torch.bfloat16, None),
    "int8": (torch.bfloat16, "int8"),
    "int4": (torch.bfloat16, "int4"),
}


def read_rate(buffer: torch.Tensor) -> float:
    """GB/s of one pass of reads over ``buffer`` (float32, on huge pages as the ranks
    allocate): a stream of AVX-512 loads (cpu_kernels.stream_sum), or torch's sum where
    mpllama's kernels are off; the better of two passes."""
    read = cpu_kernels.stream_sum if cpu_kernels.library() is not None else torch.sum
    best = 0.0
    for _ in range(2):
        start = time.perf_counter()
        read(buffer)
        best = max(best, buffer.nbytes / (time.perf_counter() - start) / 1e9)
    return best


def products(model: Transformer) -> list[nn.Module]:
    """The linear layers a decode step runs, in order (the fused ones as one)."""
    kinds = (ColumnLinear, RowLinear, Fused)
    return [
        m
        for m in model.modules()
        if isinstance(m, kinds) and ("weight" in m._buffers or "weight" in m.__dict__)
    ]


def weight_bytes(model: Transformer) -> int:
    """Bytes a decode step reads of the weights: every product's (quantized ones at their
    stored size, scales included), the norms'; the embedding's one row is left out."""
    total = 0
    for m in products(model):
        w = m.weight
        if isinstance(w, (quant.Int8Weight, quant.Int4Weight)):
            total += w.nbytes()
        else:
            total += w.shape[0] * w.shape[1] * w.element_size()
    return total + sum(p.nbytes for n, p in model.named_parameters() if "norm" in n)


@contextmanager
def torch_kernels(model: Transformer) -> Iterator[None]:
    """The model on torch's kernels alone: mpllama's one-row products, float32 logits and
    decode attention off for the duration."""
    saved = [(m, m.one_row) for m in products(model)]
    saved_q = [
        (m.weight, m.weight.one_row)
        for m in products(model)
        if isinstance(m.weight, quant.Int8Weight)
    ]
    fits, logits32 = model_module.decode_attention_fits, model.logits32
    try:
        for m, _ in saved:
            m.one_row = None
        for w, _ in saved_q:
            w.one_row = None
        model_module.decode_attention_fits = lambda *a: False
        model.logits32 = None
        yield
    finally:
        for m, one_row in saved:
            m.one_row = one_row
        for w, one_row in saved_q:
            w.one_row = one_row
        model_module.decode_attention_fits, model.logits32 = fits, logits32


class Decoder:
    """One request decoding on ``model``: a 32-token prompt, then steps from position 32
    (the cache rewound to 32 before each round, so every round reads the same lengths)."""

    def __init__(self, model: Transformer, seed: int) -> None:
        self.model = model
        model.setup_slots(1, 256)
        self.runs = model.slot_runs([0])
        gen = torch.Generator().manual_seed(seed)
        prompt = torch.randint(3, model.args.vocab_size, (1, 32), generator=gen)
        self.first = model(prompt, torch.zeros(1, dtype=torch.long), self.runs)[:, -1].argmax(-1)

    def round(self, steps: int) -> float:
        """ms per step over ``steps`` steps from position 32."""
        tok, pos = self.first, torch.tensor([32])
        start = time.perf_counter()
        for _ in range(steps):
            tok = self.model(tok[:, None], pos, self.runs)[:, -1].argmax(-1)
            pos = pos + 1
        return (time.perf_counter() - start) / steps * 1e3


def products_ms(model: Transformer, repeats: int) -> tuple[float, float]:
    """ms for one row through every product of a step, back to back, and of that the
    output layer's (medians of ``repeats`` passes after a first)."""
    dtype = model.dtype
    rows = [torch.randn(1, m.weight.shape[1]).to(dtype) for m in products(model)]
    pairs = list(zip(products(model), rows, strict=True))

    def once() -> float:
        """The pass's seconds in the output layer."""
        output = 0.0
        for m, x in pairs:
            start = time.perf_counter()
            linear(x, m.weight, m.one_row)
            if m is model.output:
                output = time.perf_counter() - start
        return output

    once()
    times, outputs = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        outputs.append(once() * 1e3)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), statistics.median(outputs)


def steps(
    ckpt: Path,
    quick: bool = False,
    threads: int = 2,
    name: str = "the bench model",
    precisions: tuple[str, ...] = tuple(PRECISIONS),
    rounds_steps: tuple[int, int] | None = None,
) -> dict[str, dict[str, float]]:
    """Per precision and kernel set: ms per step, products ms, bytes per token, and the
    step's achieved bandwidth as a share of what the memory gave a plain stream of
    reads in the same round (this machine's rate moves by half between minutes, with
    its neighbours): the median of the rounds' shares."""
    torch.set_num_threads(threads)
    if not torch.distributed.is_initialized():
        dist.init_single("gloo")
    rounds, n = rounds_steps or ((3, 16) if quick else (7, 64))
    buffer = torch.ones((64 if quick else 256) << 18)  # MiB of float32
    print(
        f"\n== decode: one request on {name}, in-process (the lead's forward, no "
        f"engine), {threads} threads, {rounds} interleaved rounds of {n} steps from "
        f"position 32\n"
        f"  stream = GB/s of a pass of reads over {buffer.nbytes >> 20} MiB in the same round "
        "(the bound); achieved = weight bytes per token / step; share = achieved / stream, "
        "median of the rounds; products = the step's products alone, back to back (output: "
        f"of them the output layer's); int4 in groups of {demo_group_size(ckpt)} (a rank's "
        "default)"
    )
    print(
        f"  {'precision':<9} {'kernels':<8} {'ms/step':>15} {'tok/s':>7} {'MB/token':>9} "
        f"{'GB/s':>6} {'stream':>7} {'share':>6}   {'products ms (GB/s)':>19} {'output':>7} "
        f"{'rest ms':>8}"
    )
    out: dict[str, dict[str, float]] = {}
    for label in precisions:
        dtype, method = PRECISIONS[label]
        model = load_demo(ckpt, dtype, method)
        models = {"mpllama": model, "torch": model}
        if method == "int4" and cpu_kernels.library() is not None:
            # int4 in bf16 is laid out for mpllama's kernel when packed: torch's row gets
            # its own copy, packed for torch's int4 kernel.
            models["torch"] = load_demo(ckpt, dtype, method, torch_int4=True)
        decoders = {k: Decoder(m, seed=0) for k, m in models.items()}
        nbytes = weight_bytes(model)
        runs: dict[str, dict[str, list[float]]] = {
            k: {"ms": [], "stream": [], "products": [], "output": []} for k in ("mpllama", "torch")
        }
        for _ in range(rounds):
            for kernels, run in runs.items():
                with contextlib.ExitStack() as stack:
                    if kernels == "torch":
                        stack.enter_context(torch_kernels(models[kernels]))
                    run["stream"].append(read_rate(buffer))
                    run["ms"].append(decoders[kernels].round(n))
                    prod, output = products_ms(models[kernels], 1)
                    run["products"].append(prod)
                    run["output"].append(output)
        for kernels, run in runs.items():
            med = statistics.median(run["ms"])
            shares = [
                nbytes / ms / 1e6 / bw for ms, bw in zip(run["ms"], run["stream"], strict=True)
            ]
            share, bw = statistics.median(shares), statistics.median(run["stream"])
            prod, output = statistics.median(run["products"]), statistics.median(run["output"])
            print(
                f"  {label:<9} {kernels:<8} {med:7.2f} ({min(run['ms']):5.2f}) {1e3 / med:7.1f} "
                f"{nbytes / 1e6:9.1f} {nbytes / med / 1e6:6.1f} {bw:7.1f} {share:6.0%}   "
                f"{prod:7.2f} ({nbytes / prod / 1e6:5.1f} GB/s) {output:7.2f} {med - prod:8.2f}"
            )
            out[f"{label} {kernels}"] = {"ms": med, "bytes": nbytes, "share": share}
        del model, models, decoders
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--llama3", action="store_true", help="the Llama-3-shaped model only")
    parser.add_argument(
        "--llama32-1b",
        action="store_true",
        help="a model of Llama 3.2 1B's shape only (bf16, int8, int4; 3 rounds of 16 steps)",
    )
    opts = parser.parse_args(argv)
    root = Path("/tmp/mpllama-bench")
    if opts.llama32_1b:
        ckpt = make_checkpoint(root, "llama32-1b", LLAMA32_1B_MODEL, 1)
        name = shape_name(
            "a model of Llama 3.2 1B's shape", LLAMA32_1B_MODEL, "output layer untied"
        )
        steps(ckpt, name=name, precisions=("bf16", "int8", "int4"), rounds_steps=(3, 16))
        return 0
    if not opts.llama3:
        ckpt = make_checkpoint(root, "bench", QUICK_MODEL if opts.quick else BENCH_MODEL, 1)
        steps(ckpt, opts.quick)
    llama3_steps(root, opts.quick)
    return 0


def llama3_steps(root: Path, quick: bool = False) -> dict[str, dict[str, float]]:
    """``steps`` on the Llama-3-shaped model (``LLAMA3_DECODE_MODEL``), its checkpoint
    made under ``root`` once (Meta's tokenizer, random weights)."""
    args = QUICK_LLAMA3_DECODE_MODEL if quick else LLAMA3_DECODE_MODEL
    ckpt = make_checkpoint(root, "llama3-decode", args, 1)
    return steps(ckpt, quick, name=shape_name("a Llama-3-shaped model", args))


def shape_name(what: str, args: ModelArgs, *notes: str) -> str:
    """``what`` with the model's shape, as the steps' heading names it."""
    shape = (
        f"dim={args.dim} n_layers={args.n_layers} n_heads={args.n_heads} "
        f"n_kv_heads={args.n_kv_heads}, vocab {args.vocab_size}"
    )
    return f"{what} ({', '.join([shape, *notes, 'random weights'])})"


if __name__ == "__main__":
    raise SystemExit(main())
