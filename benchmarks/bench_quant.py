"""Quantization (runtime.quantization): kernels, quality and speed.

* kernels: GFLOP/s of every candidate product on one 2048x8192 layer (x [rows, 2048] @
  w.T, w [8192, 2048]) at 1, 16 and 32 rows, 2 threads, A/B interleaved in rounds (the
  machine is shared and noisy): median and best of the rounds. Whether each keeps a
  row's result independent of the rest of the batch (the engine's promise) is checked
  bit for bit.
* quality: the trained demo model (demo/model) on its held-out text, the 5% of documents
  demo/train.py set aside (same split: its ``documents`` and ``split``, seed 0; the
  text comes from this Python's standard library, so it matches the model's own split
  only on the Python it was trained with, which train.py prints): perplexity per
  precision and its ratio to float32, and greedy agreement with float32 (the 299 prompts
  of demo/agreement_prompts.json x 32 tokens: tokens before each prompt's first
  divergence); and, where `make bench-env` built llama.cpp, the same of llama.cpp's f32,
  bf16, q8_0 and q4_0 GGUFs of the same weights, for scale.
* steps: ms per decode step of the bench model in-process, bf16, int8 and int4
  interleaved in rounds (the ratios the engine's figures blur on a busy machine).
* speed: the bench model through the engine (MP=1, batches of 1, 16 and 32 requests of
  32-token prompts x 64 new tokens): bf16, int8 and int4 against each other and, where
  `make bench-env` built it, llama.cpp q8_0 on the same weights.

    python benchmarks/bench_quant.py [kernels] [quality] [steps] [speed] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from unittest import mock

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from mpllama import checkpoint  # noqa: E402
from mpllama.quantization import Quantization, int4_group_size  # noqa: E402
from mpllama.rank import cpu_kernels, quant, quantize, weights  # noqa: E402
from mpllama.rank.model import Transformer, materialize  # noqa: E402
from mpllama.tokenizer import Tokenizer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "demo" / "model"
# tests/test_demo.py's bf16 agreement prompts
PROMPTS = json.loads((REPO / "demo" / "agreement_prompts.json").read_text())
NEW_TOKENS = 32
CPU = torch.device("cpu")

# ------------------------------------------------------------------------ kernels


def _seconds(fn: Callable[[], object], budget: float) -> float:
    fn()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < budget:
        fn()
        n += 1
    return (time.perf_counter() - start) / n


def kernels(quick: bool = False, threads: int = 2) -> None:
    torch.set_num_threads(threads)
    N, K = 8192, 2048
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(0)) * 0.02
    lin = torch.ops.mkldnn._linear_pointwise
    w32 = torch.ops.mkldnn._reorder_linear_weight(w)
    wbf = torch.ops.mkldnn._reorder_linear_weight(w.bfloat16())
    int8 = quant.Int8Weight(*quantize.quantize_int8(w))
    int8.pack(torch.bfloat16)
    int8_mm = quant.Int8Weight(*quantize.quantize_int8(w))
    chosen, quant.onednn_int8_supported = quant.onednn_int8_supported, lambda: False
    int8_mm.pack(torch.bfloat16)  # the fallback: torch._int_mm
    quant.onednn_int8_supported = chosen
    q8, s8 = quantize.quantize_int8(w)
    s8b = s8[:, 0].bfloat16()
    int4 = {}
    for g in (32, 128):
        int4[g] = quant.Int4Weight(*quantize.quantize_int4(w, g))
        int4[g].pack(torch.bfloat16)
    int4_torch = quant.Int4Weight(*quantize.quantize_int4(w, 32))
    with torch_int4_kernel():
        int4_torch.pack(torch.bfloat16)  # torch's int4 kernel, where mpllama's was chosen
    int4_deq = quant.Int4Weight(*quantize.quantize_int4(w, 32))  # unpacked: dequantize + F.linear
    candidates: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "fp32 oneDNN (packed)": lambda x: lin(x.float(), w32, None, "none", [], ""),
        "bf16 oneDNN (packed)": lambda x: lin(x, wbf, None, "none", [], ""),
        f"int8 per-token, {int8.kernel} (chosen)": int8,
        "int8 per-token, torch._int_mm (fallback)": int8_mm,
        "int8 weight-only, _weight_int8pack_mm": lambda x: torch.ops.aten._weight_int8pack_mm(
            x, q8, s8b
        ),
        f"int4 g32, {int4[32].kernel}": int4[32],
        f"int4 g128, {int4[128].kernel} (chosen, auto's size)": int4[128],
        f"int4 g32, {int4_torch.kernel}": int4_torch,
        "int4 g32, dequantize + F.linear (fallback)": int4_deq,
    }
    rounds, budget = (3, 0.05) if quick else (7, 0.15)
    print(
        f"\n== quant kernels: x [rows, {K}] @ w.T, w [{N}, {K}], bf16 activations, "
        f"{torch.get_num_threads()} threads, {rounds} interleaved rounds: GFLOP/s median (best)"
    )
    x32 = torch.randn(32, K, generator=torch.Generator().manual_seed(1)).bfloat16()
    invariant = {}
    for name, fn in candidates.items():
        batched = fn(x32)
        invariant[name] = all(torch.equal(fn(x32[i : i + 1]), batched[i : i + 1]) for i in (0, 7))
    rows_list = (1, 16, 32)
    table: dict[str, dict[int, list[float]]] = {n: {r: [] for r in rows_list} for n in candidates}
    for rows in rows_list:
        x = x32[:rows].contiguous()
        for _ in range(rounds):
            for name, fn in candidates.items():
                t = _seconds(lambda fn=fn, x=x: fn(x), budget)
                table[name][rows].append(2 * rows * N * K / t / 1e9)
    print(f"  {'kernel':<44}" + "".join(f"{f'{r} row(s)':>16}" for r in rows_list) + "  rows alone")
    for name in candidates:
        cells = "".join(
            f"{statistics.median(v):9.0f} ({max(v):4.0f})" for v in table[name].values()
        )
        verdict = "= batched" if invariant[name] else "DIFFER"
        print(f"  {name:<44}{cells}  {verdict}")


# ------------------------------------------------------------------------ quality


# The text demo/model was trained on (demo/README.md): a different Python gives other text.
DEMO_TEXT_SHA = "d39bd7888a36"


def held_out_stream(tok: Tokenizer) -> torch.Tensor:
    """demo/train.py's held-out documents (its split: 5%, seed 0) as its token stream:
    each document <s> text </s>. The documents are read in a fresh interpreter, as
    train.py reads them: which docstrings it finds depends on what is imported."""
    code = (
        "import hashlib, json, sys; sys.path.insert(0, sys.argv[1]); import train; "
        "docs = train.documents(); _, held = train.split(docs, 0.05, 0); "
        "print(json.dumps([hashlib.sha256(chr(0).join(docs).encode()).hexdigest()[:12], held]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(REPO / "demo")], capture_output=True, text=True, check=True
    )
    digest, held = json.loads(out.stdout.splitlines()[-1])
    if digest != DEMO_TEXT_SHA:
        print(f"  (text sha256 {digest}, not the model's {DEMO_TEXT_SHA}: another Python)")
    ids: list[int] = []
    for doc in held:
        ids += tok.encode(doc, bos=True, eos=True)
    return torch.tensor(ids, dtype=torch.long)


def load_demo(
    folder: Path,
    dtype: torch.dtype,
    method: str | None,
    group_size: int | str = "auto",
    torch_int4: bool = False,
) -> Transformer:
    """The checkpoint at ``folder`` in ``dtype``, quantized by ``method`` on load and
    packed as a rank packs it; int4 in groups of ``group_size`` (``auto``: what a rank
    takes by default, 128 for Llama's widths); ``torch_int4``: int4 weights packed for
    torch's kernel even where mpllama's runs (for a row that compares the two)."""
    args = checkpoint.read_params(folder)
    shards = checkpoint.find_shards(folder)
    size = demo_group_size(folder, group_size)
    on_load = None if method is None else Quantization(method, size, len(shards))
    state = weights.load_rank_state(shards, args, 0, 1, None, on_load)
    build = quant.materialize_quantized if on_load else materialize
    model = build(Transformer(args), state, CPU, dtype)
    with torch_int4_kernel() if torch_int4 else contextlib.nullcontext():
        model.pack_linears()
    return model


def demo_group_size(folder: Path, requested: int | str = "auto") -> int:
    """The int4 group size a rank loading the checkpoint at ``folder`` whole takes for
    ``requested`` (``auto``: its default)."""
    shards = checkpoint.find_shards(folder)
    return int4_group_size(checkpoint.read_params(folder), requested, len(shards))


def torch_int4_kernel() -> contextlib.AbstractContextManager[object]:
    """Within it, int4 weights pack for torch's kernel even where mpllama's would run."""
    return mock.patch.object(quant, "int4_product", lambda *a: None)


def perplexity(model: Transformer, stream: torch.Tensor, seq_len: int, windows: int) -> float:
    """exp(mean loss per token) over consecutive windows of the stream, as train.py's
    ``evaluate`` cuts it."""
    total, count, rows = 0.0, 0, 8
    model.setup_slots(rows, seq_len)
    n = min(windows, (len(stream) - 1) // seq_len)
    for first in range(0, n, rows):
        idx = range(first, min(first + rows, n))
        x = torch.stack([stream[j * seq_len : (j + 1) * seq_len] for j in idx])
        y = torch.stack([stream[j * seq_len + 1 : (j + 1) * seq_len + 1] for j in idx])
        start = torch.zeros(len(idx), dtype=torch.long)
        logits = model(x, start, model.slot_runs(list(range(len(idx)))))
        total += F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
        count += y.numel()
    return math.exp(total / count)


def greedy(model: Transformer, tok: Tokenizer) -> list[list[int]]:
    """NEW_TOKENS greedy tokens for each of PROMPTS, all rows in one batch."""
    prompts = [tok.encode(p, bos=True, eos=False) for p in PROMPTS]
    B, T = len(prompts), max(map(len, prompts))
    model.setup_slots(B, T + NEW_TOKENS)
    padded = torch.zeros(B, T, dtype=torch.long)
    for i, p in enumerate(prompts):
        padded[i, : len(p)] = torch.tensor(p)
    lengths = torch.tensor([len(p) for p in prompts])
    runs = model.slot_runs(list(range(B)))
    logits = model(padded, torch.zeros(B, dtype=torch.long), runs, lengths, lengths - 1)
    out = [logits.argmax(-1)]
    pos = lengths.clone()
    for _ in range(NEW_TOKENS - 1):
        out.append(model(out[-1][:, None], pos, runs)[:, -1].argmax(-1))
        pos += 1
    return torch.stack(out, 1).tolist()


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Share of tokens before each row's first divergence."""
    agreed = 0
    for x, y in zip(a, b, strict=True):
        agreed += next((i for i, (p, q) in enumerate(zip(x, y, strict=True)) if p != q), len(x))
    return agreed / sum(map(len, a))


def quality(quick: bool = False, tmp: Path | None = None) -> dict[str, tuple[float, float]]:
    """{label: (perplexity / fp32, greedy agreement with fp32)}."""
    torch.set_num_threads(2)
    if not torch.distributed.is_initialized():
        from mpllama.rank import dist

        dist.init_single("gloo")
    tok = Tokenizer(checkpoint.find_tokenizer(DEMO))
    stream = held_out_stream(tok)
    seq_len = 256  # train.py's; every window of the stream, as its evaluate() scores
    windows = min(16 if quick else 1 << 30, (len(stream) - 1) // seq_len)
    configs = [
        ("fp32", DEMO, torch.float32, None, 32),
        ("bf16", DEMO, torch.bfloat16, None, 32),
        ("int8 (fp32 activations in)", DEMO, torch.float32, "int8", 32),
        ("int8, bf16 model", DEMO, torch.bfloat16, "int8", 32),
        ("int4 g32", DEMO, torch.float32, "int4", 32),
        ("int4 g32, bf16 model", DEMO, torch.bfloat16, "int4", 32),
    ]
    if tmp is not None and not quick:
        # One shard: wo's 192 inputs take groups of 64 (96 a shard, as shipped, do not).
        one = one_shard_demo(tmp)
        configs += [
            ("int8, 1 shard (1 scale per row)", one, torch.float32, "int8", 32),
            ("int4 g64, 1 shard", one, torch.float32, "int4", 64),
        ]
    print(
        f"\n== quant quality: demo/model on demo/train.py's held-out documents "
        f"({len(stream)} tokens; {windows} windows of {seq_len} scored), "
        f"{len(PROMPTS)} prompts x {NEW_TOKENS} greedy tokens"
    )
    print(f"  {'precision':<34} {'perplexity':>10} {'/ fp32':>8} {'greedy = fp32':>14}")
    base_ppl, base_tokens, out = 0.0, None, {}
    for label, folder, dtype, method, g in configs:
        model = load_demo(folder, dtype, method, g)
        ppl = perplexity(model, stream, seq_len, windows)
        tokens = greedy(model, tok)
        if base_tokens is None:
            base_ppl, base_tokens = ppl, tokens
        ratio, agreed = ppl / base_ppl, agreement(tokens, base_tokens)
        out[label] = (ratio, agreed)
        print(f"  {label:<34} {ppl:10.3f} {ratio:8.4f} {agreed:13.1%}")
    if tmp is not None:
        assert base_tokens is not None
        one = one_shard_demo(tmp)
        llamacpp_quality(
            one, tmp / "gguf-demo", tok, stream, seq_len, windows, base_ppl, base_tokens
        )
    return out


def one_shard_demo(tmp: Path) -> Path:
    """demo/model resharded to one shard under ``tmp`` (made once)."""
    one = tmp / "demo-1shard"
    if not (one / "params.json").is_file():
        from mpllama.cli import main as cli

        cli(["reshard", str(DEMO), str(one), "--mp", "1"])
    return one


def llamacpp_quality(
    one_shard: Path,
    out: Path,
    tok: Tokenizer,
    stream: torch.Tensor,
    seq_len: int,
    windows: int,
    fp32_ppl: float,
    fp32_tokens: list[list[int]],
) -> dict[str, tuple[float, float]]:
    """The same measures of llama.cpp on the same weights, for scale: its converter's f32,
    bf16 and q8_0 GGUFs of the demo model and its quantizer's q4_0, each at llama.cpp's
    defaults (its f16 KV cache among them), fed mpllama's token ids. Perplexity against
    llama.cpp's own f32 and mpllama's float32; greedy agreement with both. Returns
    {type: (perplexity / its f32, greedy agreement with its f32)}; {} where llama.cpp is
    not built here (said so)."""
    try:
        import bench_llamacpp as cpp

        cpp.installed_version()
        ggufs = cpp.make_ggufs(one_shard, out, kinds=("f32", "bf16", "q8_0", "q4_0"))
    except Exception as exc:  # noqa: BLE001  (llama.cpp is optional: say why and go on)
        print(f"  (llama.cpp's quality skipped: {str(exc).splitlines()[0]})")
        return {}
    threads = os.cpu_count() or 1
    scored = [stream[j * seq_len : (j + 1) * seq_len + 1].tolist() for j in range(windows)]
    prompts = [tok.encode(p, bos=True, eos=False) for p in PROMPTS]
    # llama.cpp holds at most 256 sequences in a context: the prompts in runs of 64.
    works = [(prompts[i : i + 64], NEW_TOKENS) for i in range(0, len(prompts), 64)]
    print(
        "  llama.cpp on the same weights (its converter's GGUFs, q4_0 from its quantizer; its "
        "defaults, an f16 KV cache among them), for scale:"
    )
    print(
        f"  {'type':<10} {'perplexity':>10} {'/ its f32':>10} {'/ mpllama fp32':>15} "
        f"{'greedy = its f32':>17} {'= mpllama fp32':>15}"
    )
    base_ppl, base_tokens, result = 0.0, None, {}
    for kind, gguf in ggufs.items():
        nll, count = cpp.score(gguf, scored, threads)
        ppl = math.exp(nll / count)
        tokens = [t for _, run in cpp.run(gguf, works, threads) for t in run]
        if base_tokens is None:
            base_ppl, base_tokens = ppl, tokens
        result[kind] = (ppl / base_ppl, agreement(tokens, base_tokens))
        print(
            f"  {kind:<10} {ppl:10.3f} {ppl / base_ppl:10.4f} {ppl / fp32_ppl:15.4f} "
            f"{result[kind][1]:17.1%} {agreement(tokens, fp32_tokens):15.1%}"
        )
    return result


# ------------------------------------------------------------------------ speed


def decode_steps(
    ckpt: Path, rows_list: tuple[int, ...], quick: bool = False, threads: int = 2
) -> None:
    """ms per decode step of the bench model in-process (no engine), bf16 against int8 and
    int4 (bf16 models), the three interleaved in rounds: their ratio is what the weights'
    precision changes, measured closer together than whole engine runs can be."""
    torch.set_num_threads(threads)
    if not torch.distributed.is_initialized():
        from mpllama.rank import dist

        dist.init_single("gloo")
    models = {
        label: load_demo(ckpt, torch.bfloat16, method)
        for label, method in (("bf16", None), ("int8", "int8"), ("int4", "int4"))
    }
    # On a CPU with AMX the bf16 and int4 products run on its tiles; the same models on
    # AVX-512's dot products beside them, for what the tiles give.
    amx = cpu_kernels.amx_on()
    if amx:
        models["bf16 avx512"] = load_demo(ckpt, torch.bfloat16, None)
        models["int4 avx512"] = load_demo(ckpt, torch.bfloat16, "int4")
    rounds, steps = (3, 4) if quick else (7, 8)
    print(
        f"\n== quant decode step, in-process: the bench model in bf16, {rounds} interleaved rounds "
        f"of {steps} steps after a 32-token prefill, {threads} thread(s): ms per step, "
        "median (best)"
    )
    print(f"  {'rows':>5}" + "".join(f"{k:>16}" for k in models) + "   int8/bf16  int4/bf16")
    gen = torch.Generator().manual_seed(0)
    for rows in rows_list:
        times: dict[str, list[float]] = {k: [] for k in models}
        state = {}
        for label, model in models.items():
            model.setup_slots(rows, 32 + (rounds + 1) * steps + 1)
            runs = model.slot_runs(list(range(rows)))
            prompt = torch.randint(3, model.args.vocab_size, (rows, 32), generator=gen)
            logits = model(prompt, torch.zeros(rows, dtype=torch.long), runs)[:, -1]
            state[label] = (runs, logits.argmax(-1), torch.full((rows,), 32))
        for _ in range(rounds):
            for label, model in models.items():
                runs, tok, pos = state[label]
                cpu_kernels.set_amx(amx and not label.endswith("avx512"))
                start = time.perf_counter()
                for _ in range(steps):
                    tok = model(tok[:, None], pos, runs)[:, -1].argmax(-1)
                    pos = pos + 1
                times[label].append((time.perf_counter() - start) / steps * 1e3)
                state[label] = (runs, tok, pos)
            cpu_kernels.set_amx(amx)
        med = {k: statistics.median(v) for k, v in times.items()}
        cells = "".join(f"{med[k]:9.2f} ({min(v):5.2f})" for k, v in times.items())
        print(
            f"  {rows:>5}{cells}   {med['bf16'] / med['int8']:8.2f}x {med['bf16'] / med['int4']:9.2f}x"
        )


def speed(
    ckpt: Path, batches: tuple[int, ...], seed: int, root: Path
) -> tuple[dict[tuple[str, int], float], dict[str, float]]:
    """tok/s through the engine at MP=1 per (label, batch), and llama.cpp q8_0's and
    q4_0's (int8's and int4's nearest: q4_0 is symmetric, groups of 32 with an fp16 scale,
    its embedding so too and its output layer q6_K; mpllama's int4 asymmetric in groups
    of 128, bf16 scale and zero, its embedding so too and its output layer int8); and per
    precision, what its rank held after the first batch's runs less its KV cache, against
    float32's weights (``print_memory``).

    The two sides take turns, so a ratio compares the same minutes of this shared
    machine, whose memory speed moves by half between minutes: the batched cells in two
    rounds, each side once a round; one request, as the llamacpp part runs it, in three
    rounds within each precision, llama.cpp twice and mpllama twice a round. Each cell
    keeps its fastest pass."""
    from bench_mpllama import open_llm, rank_memory, run_llm
    from bench_workloads import Workload, uniform_workload

    vocab = checkpoint.read_params(ckpt).vocab_size
    works = {n: uniform_workload(n, 32, 64, vocab, seed + 5) for n in batches}
    one, batched = works[batches[0]], {n: w for n, w in works.items() if n != batches[0]}
    rates: dict[tuple[str, int], float] = {}
    memory: dict[str, dict[str, float] | str] = {}
    runs = (
        ("bf16", "bfloat16", "none", None),
        ("int8", "bfloat16", "int8", "q8_0"),
        ("int4", "bfloat16", "int4", "q4_0"),
    )
    print(
        f"\n== quant speed: the bench model, MP=1, batches of {', '.join(map(str, batches))} "
        "requests of 32-token prompts x 64 new tokens (tok/s, prefill included; mpllama and "
        "llama.cpp in turns, each cell its fastest pass)"
    )

    def keep(key: tuple[str, int], rate: float) -> None:
        rates[key] = max(rate, rates.get(key, 0.0))

    ggufs: dict[str, Path] = {}
    threads = os.cpu_count() or 1
    try:
        import bench_llamacpp as cpp

        cpp.installed_version()
        ggufs = cpp.make_ggufs(ckpt, root / "gguf", kinds=("q8_0", "q4_0"))
    except Exception as exc:  # noqa: BLE001  (llama.cpp is optional: say why and go on)
        print(f"  (llama.cpp skipped: {str(exc).splitlines()[0]})")

    def llamacpp(kind: str, cells: dict[int, Workload], copies: int = 1) -> None:
        """llama.cpp ``kind`` on each of ``cells``' workloads, ``copies`` passes each."""
        if kind not in ggufs:
            return
        for n, w in cells.items():
            for seconds, tokens in cpp.run(ggufs[kind], [(w.prompts, 64)] * copies, threads):
                keep((f"llama.cpp {kind}", n), sum(map(len, tokens)) / seconds)

    # No prefix cache: a repeat would hit it, and llama.cpp's side has none across runs.
    for _ in range(2):
        for label, dtype, setting, _kind in runs:
            for n, w in batched.items():
                with open_llm(
                    ckpt, 1, n, None, dtype=dtype, quantization=setting, prefix_caching=False
                ) as llm:
                    keep((label, n), run_llm(llm, w, f"mpllama {label}").tokens_per_s)
        for kind in ("q8_0", "q4_0"):
            llamacpp(kind, batched)
    for label, dtype, setting, kind in runs:
        with open_llm(
            ckpt, 1, batches[0], None, dtype=dtype, quantization=setting, prefix_caching=False
        ) as llm:
            for _ in range(3):
                if kind is not None:
                    llamacpp(kind, {batches[0]: one}, copies=2)
                keep(
                    (label, batches[0]),
                    run_llm(llm, one, f"mpllama {label}", repeats=2).tokens_per_s,
                )
            reports = rank_memory(llm)
            memory[label] = reports if isinstance(reports, str) else reports[0]
    head = f"  {'batch':>5} " + "".join(f"{name:>10}" for name in ("bf16", "int8", "int4"))
    cpp_kinds = [k for k in ("q8_0", "q4_0") if ("llama.cpp " + k, batches[0]) in rates]
    head += "".join(f"{k:>8}" for k in cpp_kinds) + "  int8/bf16"
    head += "".join(f"  {m}/{k}" for m, k in (("int8", "q8_0"), ("int4", "q4_0")) if k in cpp_kinds)
    print(head)
    for n in batches:
        line = f"  {n:>5} " + "".join(f"{rates[k, n]:10.1f}" for k in ("bf16", "int8", "int4"))
        line += "".join(f"{rates['llama.cpp ' + k, n]:8.1f}" for k in cpp_kinds)
        line += f" {rates['int8', n] / rates['bf16', n]:9.2f}x"
        for m, k in (("int8", "q8_0"), ("int4", "q4_0")):
            if k in cpp_kinds:
                line += f" {rates[m, n] / rates['llama.cpp ' + k, n]:9.2f}x"
        print(line)
    return rates, print_memory(memory, ckpt, batches[0])


def print_memory(
    memory: dict[str, dict[str, float] | str], ckpt: Path, batch: int
) -> dict[str, float]:
    """The rank's memory per precision: its resident growth, what of it the weights and
    the KV cache are (counted tensor by tensor), the rest (activations, the heap, the
    kernels' buffers), and the weights against float32's bytes of the same model.
    Returns, per precision, the growth less the KV cache against float32's weights (the
    issue's goal: bf16 about 1/2, int8 1/4, int4 1/8)."""
    shards = checkpoint.find_shards(ckpt)
    fp32_mb = checkpoint.check_shards(shards, checkpoint.read_params(ckpt)) * 4 / 2**20
    print(
        f"  rank memory at batch {batch}, MiB (float32's weights: {fp32_mb:.1f}):\n"
        f"  {'':>6} {'growth':>8} {'weights':>8} {'KV cache':>9} {'rest':>7}  weights/fp32"
        "  (growth - KV cache)/fp32"
    )
    held: dict[str, float] = {}
    for label, m in memory.items():
        if isinstance(m, str) or "weights_mb" not in m:
            print(f"  {label:>6} {m}")
            continue
        growth = m.get("anon_growth_mb", m["growth_mb"])
        rest = growth - m["weights_mb"] - m["kv_cache_mb"]
        held[label] = (growth - m["kv_cache_mb"]) / fp32_mb
        print(
            f"  {label:>6} {growth:8.1f} {m['weights_mb']:8.1f} {m['kv_cache_mb']:9.1f} "
            f"{rest:7.1f}  {m['weights_mb'] / fp32_mb:11.3f}  {held[label]:24.3f}"
        )
    return held


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", nargs="*", default=["kernels", "quality", "steps", "speed"])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=2, help="kernels and steps")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/mpllama-bench-quant"))
    opts = parser.parse_args(argv)
    opts.dir.mkdir(parents=True, exist_ok=True)
    if "kernels" in opts.what:
        kernels(opts.quick, opts.threads)
    if "quality" in opts.what:
        quality(opts.quick, opts.dir)
    if "speed" in opts.what or "steps" in opts.what:
        from bench_workloads import BENCH_MODEL, QUICK_MODEL, make_checkpoint

        model = QUICK_MODEL if opts.quick else BENCH_MODEL
        ckpt = make_checkpoint(opts.dir, "bench", model, 1)
        batches = (1, 4) if opts.quick else (1, 16, 32)
        if "steps" in opts.what:
            decode_steps(ckpt, batches, opts.quick, opts.threads)
        if "speed" in opts.what:
            speed(ckpt, batches, 0, opts.dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
