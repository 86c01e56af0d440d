"""mpllama's CPU kernels (mpllama/rank/cpu_kernels*.c) against torch's float32 results: the
one-row products and the float32 logits on oneDNN-packed weights, and one-query attention
over scattered segments of the block pool; then a bf16 model whose decode steps run them
against the same model on torch's kernels."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mpllama import checkpoint, hardware
from mpllama.rank import cpu_kernels, layers, quant, weights
from mpllama.rank import model as model_module
from mpllama.rank.model import Transformer, materialize

pytestmark = pytest.mark.skipif(
    cpu_kernels.unavailable() is not None,
    reason=f"mpllama's CPU kernels cannot run here: {cpu_kernels.unavailable()}",
)


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def pack(w: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(w)


@pytest.fixture(params=["avx512", "amx"])
def products_on(request: pytest.FixtureRequest) -> Iterator[str]:
    """A product test on each path the bf16 and int8 kernels have: AVX-512's dot products,
    and AMX's tiles where the CPU has them (``library()`` runs them on the tiles there)."""
    default = cpu_kernels.amx_on()
    on = request.param == "amx"
    if cpu_kernels.set_amx(on) != on:
        cpu_kernels.set_amx(default)
        pytest.skip("this CPU has no AMX tiles mpllama can use")
    try:
        yield request.param
    finally:
        cpu_kernels.set_amx(default)


def test_bf16_products_run_on_amx_where_the_cpu_has_it() -> None:
    assert cpu_kernels.amx_on() == (cpu_kernels.AMX_CPU_FLAGS <= hardware.cpu_flags())


# (output rows, input size): whole blocks of 64 rows, and rows that oneDNN pads.
SHAPES = [(256, 1024), (100, 64), (4000, 96)]


def blocked(w: torch.Tensor, block: int) -> torch.Tensor:
    """w [rows, in] in oneDNN's one-row layout, built by hand: blocks of ``block`` rows
    (zero rows pad the last), each [in / pair][block][pair], pair 2 for bf16, 1 float32."""
    pair = 2 if w.dtype == torch.bfloat16 else 1
    rows, inner = w.shape
    padded = torch.cat([w, w.new_zeros(-rows % block, inner)])
    return padded.reshape(-1, block, inner // pair, pair).permute(0, 2, 1, 3).contiguous()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block", cpu_kernels.BLOCKS)
def test_the_kernels_read_blocks_of_64_rows_and_of_32(
    dtype: torch.dtype, block: int, products_on: str
) -> None:
    """Both layouts oneDNN packs one-row weights in (64 rows a block; bf16 in 32 on CPUs
    with AMX), on any CPU: the one-row product, rows batched (each bit for bit its row
    alone) and the float32 logits, against float32 sums of the same values."""
    rows, inner = 100, 96
    w = randn(rows, inner).to(dtype)
    packed = blocked(w, block)
    padded = packed.numel() // inner
    product = cpu_kernels.OneRowProduct(
        packed, packed.data_ptr(), rows, padded, inner, dtype, block
    )
    x = randn(5, inner, seed=1).to(dtype)
    want = x.float() @ w.float().t()
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    one = torch.cat([product(x[i : i + 1]) for i in range(5)])
    torch.testing.assert_close(one.float(), want, atol=tol * float(want.abs().max()), rtol=0)
    if dtype == torch.bfloat16:
        # Asking for every line ahead or two in four (by CPU vendor) reads the same sums.
        lib, every = cpu_kernels.library(), int(hardware.cpu_vendor() == "GenuineIntel")
        try:
            lib.set_bf16_every_line(1 - every)
            assert torch.equal(torch.cat([product(x[i : i + 1]) for i in range(5)]), one)
        finally:
            lib.set_bf16_every_line(every)
        assert torch.equal(product.batched(x), one)
        logits = cpu_kernels.float32_product(product)
        assert logits is not None
        torch.testing.assert_close(logits(x), want, atol=1e-4, rtol=1e-4)
        assert torch.equal(logits(x).bfloat16(), one)  # the same sums, before rounding


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("rows", "inner"), SHAPES)
def test_one_row_product_reads_onednns_packed_weight(
    dtype: torch.dtype, rows: int, inner: int, products_on: str
) -> None:
    w, x = randn(rows, inner).to(dtype), randn(1, inner, seed=1).to(dtype)
    product = cpu_kernels.one_row_product(pack(w))
    assert product is not None
    want = F.linear(x.float(), w.float())
    got = product(x)
    assert got.shape == (1, rows) and got.dtype == dtype
    # float32 sums in another order; bf16 rounds the result (8 bits of mantissa).
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.float(), want, atol=tol * float(want.abs().max()), rtol=0)


@pytest.mark.parametrize(("rows", "inner"), SHAPES)
def test_a_bf16_batch_of_rows_gives_each_row_its_one_row_result(
    rows: int, inner: int, products_on: str
) -> None:
    """The bf16 product of a decode step's rows (``batched``, taken by ``linear`` for 2 to
    64 rows): each row bit for bit its one-row product, so a row's result does not depend
    on its batch, and within bf16's rounding of oneDNN's batched product."""
    packed = pack(randn(rows, inner).bfloat16())
    product = cpu_kernels.one_row_product(packed)
    assert product is not None
    for m in (2, 5, 20, 64):  # 20: a run of 16 rows, then one of 4
        x = randn(m, inner, seed=m).bfloat16()
        assert product.batches(x)
        got = layers.linear(x, packed, product)
        assert got.shape == (m, rows) and got.dtype == torch.bfloat16
        for i in range(m):
            assert torch.equal(got[i : i + 1], product(x[i : i + 1]))
        onednn = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "").float()
        atol = 1e-2 * float(onednn.abs().max())
        torch.testing.assert_close(got.float(), onednn, atol=atol, rtol=0)
    # oneDNN keeps prefill chunks, float32, and weights whose blocks (64 rows, or 32 where
    # oneDNN packs for AMX) outgrow L2
    assert not product.batches(randn(65, inner).bfloat16())
    fp32 = cpu_kernels.one_row_product(pack(randn(rows, inner)))
    assert fp32 is not None and not fp32.batches(randn(4, inner))
    wide = cpu_kernels.one_row_product(pack(randn(64, 16384).bfloat16()))
    assert wide is not None and not wide.batches(randn(4, 16384).bfloat16())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("groups", [1, 2, 4])
def test_int8_one_row_is_onednns_row_bit_for_bit(
    dtype: torch.dtype, groups: int, products_on: str
) -> None:
    """The int8 kernels take every one-row product and a decode step's rows (they are not
    refused here), and each row, alone or in mpllama's batch, equals its row of oneDNN's
    batched product exactly, input groups (one per shard of a row-parallel weight) summed
    in the same order."""
    q, scales = quant.quantize_int8(randn(256, 512), groups=groups)
    weight = quant.Int8Weight(q, scales)
    weight.pack(dtype)
    assert weight.kernel == "onednn" and weight.one_row is not None
    # gemm_int8: passes of 4 rows, then 1, the later ones prefetching; on AMX a run of 16
    # rows, then one of 5
    x = randn(21, 512, seed=1).to(dtype)
    ours = weight(x)
    one_row, weight.one_row = weight.one_row, None
    onednn = weight(x)
    weight.one_row = one_row
    assert one_row.batches(x) and torch.equal(ours, onednn)
    for i in range(21):
        assert torch.equal(weight(x[i : i + 1]), onednn[i : i + 1])


@pytest.mark.parametrize(
    ("rows", "inner", "group"), [(100, 256, 32), (256, 1024, 128), (70, 192, 64)]
)
def test_int4_on_amx_gives_each_row_its_own_result(rows: int, inner: int, group: int) -> None:
    """mpllama's int4 kernel (bf16 models on CPUs with AMX) takes any number of rows, and
    each row's result is bit for bit what it gives alone (prefill, decode steps and one
    row alike), within bf16's rounding of the float64 product with the dequantized
    weight; rows padded to a whole block are never written."""
    if not cpu_kernels.amx_on():
        pytest.skip("int4 weights have mpllama's kernel only on CPUs with AMX")
    packed, scales = quant.quantize_int4(randn(rows, inner), group)
    product = cpu_kernels.int4_product(quant.unpack_int4(packed), scales)
    assert product is not None and product.padded == -(-rows // 32) * 32
    x = randn(40, inner, seed=1).bfloat16()
    got = product(x)
    assert got.shape == (40, rows) and got.dtype == torch.bfloat16
    want = x.double() @ quant.Int4Weight(packed, scales).dequantize().double().t()
    torch.testing.assert_close(got.double(), want, rtol=2**-8, atol=1e-3 * float(want.abs().max()))
    for m in (1, 3, 17):  # a run of 16 rows and one of 1
        assert torch.equal(product(x[:m]), got[:m])
    for i in range(40):
        assert torch.equal(product(x[i : i + 1]), got[i : i + 1])
    # an int4 weight without whole steps of 32 inputs keeps torch's kernel
    packed, scales = quant.quantize_int4(randn(64, 48), 16)
    assert cpu_kernels.int4_product(quant.unpack_int4(packed), scales) is None


def test_one_row_product_refuses_what_it_cannot_read() -> None:
    assert cpu_kernels.one_row_product(pack(randn(64, 48))) is None  # inputs not 32-aligned
    assert cpu_kernels.one_row_product(randn(64, 64).half()) is None  # no fp16 kernel
    fp32 = cpu_kernels.one_row_product(pack(randn(64, 64)))
    assert fp32 is not None and cpu_kernels.float32_product(fp32) is None  # bf16 weights only


@pytest.mark.parametrize("m", [1, 3, 4, 9])
def test_float32_logits_of_bf16_rows(m: int, products_on: str) -> None:
    """Any number of rows, four at a time and the rest; the padded rows never written."""
    rows, inner = 4000, 128
    w, x = randn(rows, inner).bfloat16(), randn(m, inner, seed=1).bfloat16()
    product = cpu_kernels.float32_product(cpu_kernels.one_row_product(pack(w)))
    assert product is not None
    got = product(x)
    assert got.shape == (m, rows) and got.dtype == torch.float32
    # Products of bf16 values summed in float32: only the order of the sums differs.
    torch.testing.assert_close(got, x.float() @ w.float().t(), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("kv", "heads", "dim"), [(4, 4, 64), (2, 8, 128), (1, 4, 32)])
def test_decode_attention_over_scattered_segments(
    kv: int, heads: int, dim: int, dtype: torch.dtype
) -> None:
    """Rows of one segment, of several out of order, of one position, and longer than a
    chunk of 64: each equals float32 SDPA over its positions gathered in order (to bf16's
    output rounding, or float32's). A row alone, whose heads the kernel splits over
    tasks to keep both threads busy, gets the same bits as in the batch."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the kernel splits a row's heads only for idle threads
    try:
        check_decode_attention(kv, heads, dim, dtype)
    finally:
        torch.set_num_threads(threads)


def check_decode_attention(kv: int, heads: int, dim: int, dtype: torch.dtype) -> None:
    P = 512
    cache_k, cache_v = randn(P, kv, dim).to(dtype), randn(P, kv, dim, seed=1).to(dtype)
    rows = [[(0, 200)], [(300, 5), (100, 70), (17, 1)], [(511, 1)], [(256, 64), (400, 65)]]
    q = randn(len(rows), heads, dim, seed=2).to(dtype)
    assert cpu_kernels.decode_attention_fits(heads, cache_k)
    got = cpu_kernels.attend_decode(q, cache_k, cache_v, cpu_kernels.Segments.of(rows))
    for b, row in enumerate(rows):
        pos = torch.cat([torch.arange(first, first + n) for first, n in row])
        k, v = cache_k[pos].transpose(0, 1).float(), cache_v[pos].transpose(0, 1).float()
        want = F.scaled_dot_product_attention(q[b].float()[:, None], k, v, enable_gqa=heads != kv)[
            :, 0
        ]
        atol = 1e-2 if dtype == torch.bfloat16 else 1e-5
        torch.testing.assert_close(got[b].float(), want, atol=atol, rtol=0)
        alone = cpu_kernels.attend_decode(
            q[b : b + 1], cache_k, cache_v, cpu_kernels.Segments.of([row])
        )
        assert torch.equal(alone[0], got[b])


def test_decode_attention_refuses_what_it_cannot_run() -> None:
    assert not cpu_kernels.decode_attention_fits(8, torch.zeros(16, 4, 16).bfloat16())  # D=16
    assert not cpu_kernels.decode_attention_fits(8, torch.zeros(16, 4, 64).half())  # float16
    assert not cpu_kernels.decode_attention_fits(256, torch.zeros(16, 8, 64).bfloat16())


def test_kernels_off_without_a_compiler(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_kernels.shutil, "which", lambda name: None)
    assert "compiler" in (cpu_kernels.unavailable() or "")


def test_a_compiler_without_amx_builds_the_kernels_without_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Where the compiler rejects AMX's flags, the library is built without them: its
    products stay on AVX-512 whatever the CPU has, and the log says why."""
    monkeypatch.setattr(cpu_kernels.Path, "home", lambda: tmp_path)  # a cache of its own
    monkeypatch.setattr(cpu_kernels, "AMX_FLAGS", ["-mno-such-flag"])
    lib = cpu_kernels._load(cpu_kernels._build())
    assert lib.amx_request() == 0 and lib.set_amx(1) == 0 and lib.amx_on() == 0
    w, x = randn(64, 64).bfloat16(), randn(1, 64, seed=1).bfloat16()
    packed = blocked(w, 64)
    y = torch.empty(1, 64, dtype=torch.bfloat16)
    lib.gemv_bf16(packed.data_ptr(), x.data_ptr(), y.data_ptr(), 64, 64, 64)
    torch.testing.assert_close(y.float(), x.float() @ w.float().t(), atol=0.05, rtol=1e-2)


def demo_model(dtype: torch.dtype) -> Transformer:
    demo = Path(__file__).parent.parent / "demo" / "model"
    args = checkpoint.read_params(demo)
    state = weights.load_rank_state(checkpoint.find_shards(demo), args, 0, 1)
    model = materialize(Transformer(args), state, torch.device("cpu"), dtype)
    model.pack_linears()
    return model


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_model_decodes_with_the_kernels_as_with_torchs(
    single_rank: None, monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, products_on: str
) -> None:
    """The trained demo model in bf16 and in float32, packed as a rank runs it: every
    product has its one-row kernel (and bf16's logits their float32 one). Prefill, then
    decode steps of one row and of three rows (one in scattered blocks): the logits are
    within bf16's reach (float32's) of the same model on torch's kernels, and rank the
    same top tokens."""
    model = demo_model(dtype)
    kinds = (model_module.ColumnLinear, model_module.RowLinear, model_module.Fused)
    products = [m for m in model.modules() if isinstance(m, kinds) and "weight" in m._buffers]
    assert products and all(m.one_row is not None for m in products)
    assert (model.logits32 is not None) == (dtype == torch.bfloat16)  # float32 has its own

    def decode(kernels: bool) -> list[torch.Tensor]:
        with monkeypatch.context() as patch:
            if not kernels:
                patch.setattr(model_module, "decode_attention_fits", lambda *a: False)
                for m in products:
                    patch.setattr(m, "one_row", None)
                patch.setattr(model, "logits32", None)
                patch.setattr(model, "fused_layers", False)
            model.setup_caches(40, 16, 256)
            runs = [[(0, 8)], [(30, 2), (10, 3), (20, 3)], [(8, 8)]]
            prompt = torch.randint(3, 1000, (3, 40), generator=torch.Generator().manual_seed(0))
            zero = torch.zeros(3, dtype=torch.long)
            out = [model(prompt, zero, runs)[:, -1]]
            toks, pos = out[-1].argmax(-1), torch.full((3,), 40)
            for _ in range(3):  # all three rows
                out.append(model(toks[:, None], pos, runs)[:, -1])
                toks, pos = out[-1].argmax(-1), pos + 1
            for _ in range(3):  # row 1 alone
                out.append(model(toks[1:2, None], pos[1:2], runs[1:2])[:, -1])
                toks[1], pos[1] = out[-1][0].argmax(), pos[1] + 1
            return out

    ours, torchs = decode(True), decode(False)
    for a, b in zip(ours, torchs, strict=True):
        torch.testing.assert_close(a, b, atol=0.15 if dtype == torch.bfloat16 else 1e-4, rtol=0)
        assert (a.argmax(-1) == b.argmax(-1)).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_decode_layers_small_steps_match_torchs(dtype: torch.dtype) -> None:
    """The fused norm (with and without the residual add, the residual stream float32
    in both types), RoPE with the cache writes, and silu(gate) * up, each against the
    torch ops it replaces, in bf16 and float32."""
    # bf16: within its rounding; float32: to float32's own
    bf16 = dtype == torch.bfloat16
    close = dict(atol=0.02, rtol=0.01) if bf16 else dict(atol=1e-5, rtol=1e-5)
    normed = dict(atol=0.05, rtol=0.01) if bf16 else close  # rounded twice in bf16
    B, H, K, D, dim = 3, 8, 2, 64, 256
    x, delta = randn(B, dim), randn(B, dim, seed=1).to(dtype)
    norm = model_module.RMSNorm(dim, 1e-5)
    norm.weight = torch.nn.Parameter(randn(dim, seed=2).to(dtype), requires_grad=False)
    h, out = cpu_kernels.add_rmsnorm(x, delta, norm.weight, norm.eps)
    assert h.dtype == torch.float32 and out.dtype == dtype
    torch.testing.assert_close(h, x + delta, atol=0, rtol=0)  # the sum not rounded
    torch.testing.assert_close(out.float(), norm(x + delta).float(), **normed)
    same, out = cpu_kernels.add_rmsnorm(x, None, norm.weight, norm.eps)
    assert same is x or torch.equal(same, x)
    torch.testing.assert_close(out.float(), norm(x).float(), **normed)

    qkv = randn(B, (H + 2 * K) * D, seed=3).to(dtype)
    positions = torch.tensor([5, 0, 63])
    cis = model_module.rope_table(D, 64, 10000.0, torch.device("cpu"))[positions]  # [B,D/2]
    cache_k, cache_v = torch.zeros(64, K, D).to(dtype), torch.zeros(64, K, D).to(dtype)
    q = cpu_kernels.rope_write(qkv, cis, positions, cache_k, cache_v, H)
    xq, xk, xv = qkv.view(B, 1, H + 2 * K, D).split([H, K, K], dim=2)
    want_q = model_module.apply_rope(xq, cis[:, None])[:, 0]
    want_k = model_module.apply_rope(xk, cis[:, None])[:, 0]
    torch.testing.assert_close(q.float(), want_q.float(), **close)
    torch.testing.assert_close(cache_k[positions].float(), want_k.float(), **close)
    assert torch.equal(cache_v[positions], xv[:, 0])
    untouched = torch.ones(64, dtype=torch.bool)
    untouched[positions] = False
    assert not cache_k[untouched].any() and not cache_v[untouched].any()

    gate_up = randn(B, 2 * 200, seed=4).to(dtype)  # 200: not a multiple of 16
    gate, up = gate_up.split(200, dim=-1)
    torch.testing.assert_close(
        cpu_kernels.silu_mul(gate_up).float(), (F.silu(gate) * up).float(), **close
    )


# ------------------------------------------------------------------------ a decode step in C

# Each row's blocks scattered, its new positions in a later run than its first: one row,
# and three rows (prompts of 40, 25 and 33 tokens) whose blocks interleave.
ONE_ROW = [[(30, 1), (10, 2)]]
THREE_ROWS = [[(30, 1), (10, 2)], [(5, 2), (20, 1)], [(0, 1), (25, 2)]]
PROMPTS = [40, 25, 33]


def teacher_forced(model: Transformer, runs: list[list[tuple[int, int]]]) -> list[torch.Tensor]:
    """A prefill of each row's prompt then 6 decode steps of all rows fed fixed tokens (so
    that every rank of a gang feeds the same, whatever its logits), from a fresh cache;
    the logits of each [B, V]."""
    model.setup_caches(40, 16, 256)
    B = len(runs)
    lengths = torch.tensor(PROMPTS[:B])
    gen = torch.Generator().manual_seed(1)
    prompt, steps = (
        torch.randint(3, 1000, (B, 40), generator=gen),
        torch.randint(3, 1000, (6, B, 1), generator=gen),
    )
    start = torch.zeros(B, dtype=torch.long)
    out = [model(prompt, start, runs, lengths=lengths, logits_at=lengths - 1)]
    for i, tokens in enumerate(steps):
        logits = model(tokens, lengths + i, runs)
        out.append(logits if logits is None else logits[:, -1])
    return out


def with_and_without_row_decoder(
    model: Transformer, runs: list[list[tuple[int, int]]]
) -> tuple[int, list, list]:
    """The most rows the model's decoder takes (0: none built), and the logits of
    ``teacher_forced`` with it and on the layer-by-layer path."""
    with_c = teacher_forced(model, runs)
    most_rows = 0 if model.row_decoder is None else model.row_decoder.most_rows
    original = model.setup_caches

    def layer_by_layer(*args: int) -> None:
        original(*args)
        model.row_decoder = None

    model.setup_caches = layer_by_layer  # type: ignore[method-assign]
    try:
        without = teacher_forced(model, runs)
    finally:
        del model.setup_caches
    return most_rows, with_c, without


@pytest.mark.parametrize(
    ("dtype", "method", "rows"),
    [
        (torch.bfloat16, None, ONE_ROW),
        (torch.bfloat16, None, THREE_ROWS),
        (torch.bfloat16, "int8", ONE_ROW),
        (torch.bfloat16, "int8", THREE_ROWS),
        (torch.bfloat16, "int4", ONE_ROW),
        (torch.bfloat16, "int4", THREE_ROWS),
        (torch.float32, None, ONE_ROW),
    ],
)
def test_a_decode_step_in_two_c_calls_a_layer_is_the_layer_path_bit_for_bit(
    single_rank: None, dtype: torch.dtype, method: str | None, rows: list, products_on: str
) -> None:
    """row_decode: a bf16 model and one with int8 weights, and on a CPU with AMX one with
    int4 weights (one row, and three at different lengths), and a float32 one decode
    through two C calls a layer, with the logits of the layer-by-layer path exactly.
    Batched steps run it where every product batches (bf16, int8 and int4 weights;
    float32 keeps oneDNN)."""
    if method == "int4" and not cpu_kernels.amx_on():
        pytest.skip("int4 weights have mpllama's kernel only on CPUs with AMX")
    demo = Path(__file__).parent.parent / "demo" / "model"
    args = checkpoint.read_params(demo)
    shards = checkpoint.find_shards(demo)
    # int8 scales as for one shard: the kernel reads input groups of a multiple of 64, and
    # the demo's two shards would cut its 192 inputs in groups of 96.
    on_load = None if method is None else checkpoint.Quantization(method, 32, 1)
    state = weights.load_rank_state(shards, args, 0, 1, None, on_load)
    build = quant.materialize_quantized if on_load else materialize
    model = build(Transformer(args), state, torch.device("cpu"), dtype)
    model.pack_linears()
    most_rows, with_c, without = with_and_without_row_decoder(model, rows)
    expected = cpu_kernels.BATCH_ROWS if dtype == torch.bfloat16 else 1
    assert most_rows == expected
    for a, b in zip(with_c, without, strict=True):
        assert torch.equal(a, b)


def two_rank_decode(port: int, rank: int, world: int, method: str | None, out: object) -> None:
    from mpllama.rank import dist

    torch.set_num_threads(1)
    try:
        dist.init_ranks(
            rank, world, "127.0.0.1", port, "gloo", "127.0.0.1", 60.0, shm_bytes=1 << 20
        )
        demo = Path(__file__).parent.parent / "demo" / "model"
        args = checkpoint.read_params(demo)
        shards = checkpoint.find_shards(demo)
        # int4 in groups of 32: each rank's wo and w2 shards take 96 and 256 inputs
        on_load = None if method is None else checkpoint.Quantization(method, 32, len(shards))
        state = weights.load_rank_state(shards, args, rank, world, None, on_load)
        build = quant.materialize_quantized if on_load else materialize
        model = build(Transformer(args), state, torch.device("cpu"), torch.bfloat16)
        model.pack_linears()
        int4 = [
            w
            for m in model.modules()
            if isinstance(w := m.__dict__.get("weight"), quant.Int4Weight)
        ]
        built, same = all(w.kernel == "amx" for w in int4), True
        for runs in (ONE_ROW, THREE_ROWS):
            most_rows, with_c, without = with_and_without_row_decoder(model, runs)
            built = built and most_rows >= len(runs)
            same = same and all(
                a is None and b is None or torch.equal(a, b)
                for a, b in zip(with_c, without, strict=True)
            )
        out.put((rank, built, same, None))  # type: ignore[attr-defined]
    except BaseException as exc:  # the parent reports it
        out.put((rank, False, False, repr(exc)))  # type: ignore[attr-defined]
        raise


@pytest.mark.parametrize("method", [None, "int4"])
def test_two_ranks_decode_steps_in_c_as_layer_by_layer(method: str | None) -> None:
    """At MP=2 (shared-memory collectives between the calls), the same for one row and
    for three: the lead's logits are the layer-by-layer path's exactly, in bf16, and with
    int4 weights on AMX (each rank's row-parallel shards on mpllama's int4 kernel)."""
    import multiprocessing as mp

    from mpllama.rank import dist

    if method == "int4" and not cpu_kernels.amx_on():
        pytest.skip("int4 weights have mpllama's kernel only on CPUs with AMX")

    store = dist.open_store("127.0.0.1", 2, 60.0)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [
        ctx.Process(target=two_rank_decode, args=(store.port, r, 2, method, queue))
        for r in range(2)
    ]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    assert results == [(0, True, True, None), (1, True, True, None)]
