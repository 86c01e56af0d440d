"""mpllama's products (mpllama/rank/cpu_products.py) against torch's float32 results and
oneDNN's own: the one-row and batched products on oneDNN-packed bf16 and float32 weights,
int8's bit for bit oneDNN's, int4's on AMX tiles, and the float32 logits; each on
AVX-512 and, where the CPU has them, on AMX tiles (``products_on``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import blocked, randn

from mpllama import hardware
from mpllama.rank import cpu_kernels, cpu_products, layers, quant, quantize

pytestmark = pytest.mark.skipif(
    cpu_kernels.unavailable() is not None,
    reason=f"mpllama's CPU kernels cannot run here: {cpu_kernels.unavailable()}",
)


def pack(w: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(w)


def test_bf16_products_run_on_amx_where_the_cpu_has_it() -> None:
    assert cpu_kernels.amx_on() == (cpu_kernels.AMX_CPU_FLAGS <= hardware.cpu_flags())


# (output rows, input size): whole blocks of 64 rows, and rows that oneDNN pads.
SHAPES = [(256, 1024), (100, 64), (4000, 96)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block", cpu_products.BLOCKS)
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
    product = cpu_products.OneRowProduct(
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
        logits = cpu_products.float32_product(product)
        assert logits is not None
        torch.testing.assert_close(logits(x), want, atol=1e-4, rtol=1e-4)
        assert torch.equal(logits(x).bfloat16(), one)  # the same sums, before rounding


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("rows", "inner"), SHAPES)
def test_one_row_product_reads_onednns_packed_weight(
    dtype: torch.dtype, rows: int, inner: int, products_on: str
) -> None:
    w, x = randn(rows, inner).to(dtype), randn(1, inner, seed=1).to(dtype)
    product = cpu_products.one_row_product(pack(w))
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
    product = cpu_products.one_row_product(packed)
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
    fp32 = cpu_products.one_row_product(pack(randn(rows, inner)))
    assert fp32 is not None and not fp32.batches(randn(4, inner))
    wide = cpu_products.one_row_product(pack(randn(64, 16384).bfloat16()))
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
    q, scales = quantize.quantize_int8(randn(256, 512), groups=groups)
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
def test_int4_gives_each_row_its_own_result(
    rows: int, inner: int, group: int, products_on: str
) -> None:
    """mpllama's int4 kernel (bf16 models), on AMX tiles and on AVX-512, takes any number
    of rows, and each row's result is bit for bit what it gives alone (prefill, decode
    steps and one row alike: AVX-512 takes rows in eights, a four, then the last one to three),
    within bf16's rounding of the float64 product with the dequantized weight; rows
    padded to a whole block are never written."""
    packed, scales = quantize.quantize_int4(randn(rows, inner), group)
    product = cpu_products.int4_product(quantize.unpack_int4(packed), scales)
    assert product is not None and product.padded == -(-rows // 32) * 32
    x = randn(40, inner, seed=1).bfloat16()
    got = product(x)
    assert got.shape == (40, rows) and got.dtype == torch.bfloat16
    want = x.double() @ quant.Int4Weight(packed, scales).dequantize().double().t()
    torch.testing.assert_close(got.double(), want, rtol=2**-8, atol=1e-3 * float(want.abs().max()))
    for m in (1, 2, 3, 6, 13, 17):  # AMX: runs of 16 and the rest; AVX-512: 8s, a 4, the rest
        assert torch.equal(product(x[:m]), got[:m])
    for i in range(40):
        assert torch.equal(product(x[i : i + 1]), got[i : i + 1])
    # an int4 weight without whole steps of 32 inputs keeps torch's kernel
    packed, scales = quantize.quantize_int4(randn(64, 48), 16)
    assert cpu_products.int4_product(quantize.unpack_int4(packed), scales) is None


def test_int4_packs_the_same_from_bytes() -> None:
    """A rank unpacks int4 values to one byte each before laying them out (its
    temporaries a quarter of int32's): the same layout as from int32 values, bit for bit."""
    packed, scales = quantize.quantize_int4(randn(70, 256), 64)
    q8 = quantize.unpack_int4(packed)
    assert q8.dtype == torch.uint8
    ours, theirs = (
        cpu_products.int4_product(q8, scales),
        cpu_products.int4_product(q8.int(), scales),
    )
    assert ours is not None and theirs is not None
    assert torch.equal(ours.packed, theirs.packed) and torch.equal(ours.sz, theirs.sz)


def test_one_row_product_refuses_what_it_cannot_read() -> None:
    assert cpu_products.one_row_product(pack(randn(64, 48))) is None  # inputs not 32-aligned
    assert cpu_products.one_row_product(randn(64, 64).half()) is None  # no fp16 kernel
    fp32 = cpu_products.one_row_product(pack(randn(64, 64)))
    assert fp32 is not None and cpu_products.float32_product(fp32) is None  # bf16 weights only


@pytest.mark.parametrize("m", [1, 3, 4, 9])
def test_float32_logits_of_bf16_rows(m: int, products_on: str) -> None:
    """Any number of rows, four at a time and the rest; the padded rows never written;
    each row's logits the same alone as in the batch."""
    rows, inner = 4000, 128
    w, x = randn(rows, inner).bfloat16(), randn(m, inner, seed=1).bfloat16()
    product = cpu_products.float32_product(cpu_products.one_row_product(pack(w)))
    assert product is not None
    got = product(x)
    assert got.shape == (m, rows) and got.dtype == torch.float32
    # Products of bf16 values summed in float32: only the order of the sums differs.
    torch.testing.assert_close(got, x.float() @ w.float().t(), atol=1e-4, rtol=1e-5)
    for i in range(m):  # a row alone (the one-row loop) gets its bits in the batch
        assert torch.equal(product(x[i : i + 1]), got[i : i + 1])
