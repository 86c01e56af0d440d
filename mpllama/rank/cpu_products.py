"""mpllama's products on weights in oneDNN's packed layouts and its own int4 one, through
the C kernels ``cpu_kernels`` builds: one row (a decode step's single request) and a
decode step's few rows, each row's result the same alone as in any batch.

- ``OneRowProduct``: bf16 and float32 weights as oneDNN packs them for ``F.linear``,
  read in that layout (checked on each weight against oneDNN's own product);
- ``Float32Product``: bf16 rows and weights into float32 sums, for the logits;
- ``Int8OneRow``: int8 weights as oneDNN's ``qlinear_prepack`` packs them, bit for bit
  oneDNN's dynamically quantized product;
- ``Int4Product``: group-wise int4 weights, in a layout of its own.

On a CPU with AMX the bf16 products, int8's batched ones and int4's run on its tiles
(``cpu_kernels.amx_on``); elsewhere on AVX-512.
"""

from __future__ import annotations

import ctypes
import logging
from dataclasses import dataclass, field

import torch

from .cpu_kernels import kernel, library

log = logging.getLogger(__name__)

BLOCK = 64  # output rows per block of oneDNN's packed layout (cpu_kernels.h's NB)
# oneDNN's bf16 blocks on a CPU with AMX (its default packing there): 32 rows. The bf16
# and float32 kernels read either (``OneRowProduct.block``); int8 is in blocks of 64.
BLOCKS = (BLOCK, 32)
# mpllama's bf16 product of several rows (OneRowProduct.batched): up to this many rows,
# on weights whose block of 64 rows fits this share of a core's L2 (1 MB on this EPYC).
BATCH_ROWS, BLOCK_BYTES = 64, 512 << 10


@dataclass
class OneRowProduct:
    """x @ w.T for an input of one row, on a weight in oneDNN's packed layout: w's
    blocks of ``block`` output rows streamed once, front to back (``gemv_*`` in the C
    file). Holds the packed tensor, whose memory the kernel reads at ``address``."""

    packed: torch.Tensor = field(repr=False)
    address: int
    rows: int  # the weight's output rows
    padded: int  # rounded up to whole blocks, as oneDNN lays them out
    inner: int
    dtype: torch.dtype
    block: int = BLOCK  # rows a block: 64, or 32 where oneDNN packs bf16 for AMX

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        y = torch.empty(*x.shape[:-1], self.padded, dtype=self.dtype)
        kernel("gemv", self.dtype)(
            self.address, x.data_ptr(), y.data_ptr(), self.padded, self.inner, self.block
        )
        return y if self.padded == self.rows else y[..., : self.rows]

    @property
    def most_rows(self) -> int:
        """The most rows ``batched`` takes: a decode step's few (``BATCH_ROWS``; prefill
        chunks keep oneDNN, which blocks for caches) for a bf16 weight whose block of rows
        is small enough to stay in L2 while every group of four input rows reads it again
        (``BLOCK_BYTES``); 1 (none) otherwise."""
        fits = self.dtype == torch.bfloat16 and self.block * self.inner * 2 <= BLOCK_BYTES
        return BATCH_ROWS if fits else 1

    def batches(self, x: torch.Tensor) -> bool:
        """Whether ``batched`` takes x's rows (see ``most_rows``)."""
        return 1 < x.numel() // self.inner <= self.most_rows

    def batched(self, x: torch.Tensor) -> torch.Tensor:
        """x @ w.T for a few rows of bf16 x (``gemm_bf16_bf16``): each row's sums are
        the one-row kernel's, in the same order, so a row's result does not depend on
        the batch it ran in; and it runs faster than oneDNN's product here (benchmarks/
        RESULTS.md, "Figures behind the code")."""
        return _gemm("gemm_bf16_bf16", self.dtype, self, x)


def one_row_product(packed: torch.Tensor) -> OneRowProduct | None:
    """The one-row kernel for a weight packed by oneDNN (``_reorder_linear_weight``), or
    None where it cannot read it: kernels off, another dtype, or a layout other than
    blocks of 64 or 32 rows (``BLOCKS``) by pairs (bf16) or single (float32) inputs.
    The layout is told by the weight itself: the kernel's product of a probe row must
    match oneDNN's, read in blocks of 64 rows, else of 32."""
    if library() is None or packed.dtype not in (torch.bfloat16, torch.float32):
        return None
    rows, inner = packed.shape
    if inner % 32:
        return None
    address = torch.ops.mkldnn.data_ptr(packed)
    probe = torch.randn(1, inner, generator=torch.Generator().manual_seed(0)).to(packed.dtype)
    theirs = torch.ops.mkldnn._linear_pointwise(probe, packed, None, "none", [], "").float()
    # Sums in another order: float32 agrees to rounding, bf16 to its output's rounding.
    tol = 1e-4 if packed.dtype == torch.float32 else 2e-2
    for block in BLOCKS:
        padded = -(-rows // block) * block
        if torch.ops.mkldnn._nbytes(packed) != padded * inner * packed.element_size():
            continue
        product = OneRowProduct(packed, address, rows, padded, inner, packed.dtype, block)
        ours = product(probe).float()
        if torch.allclose(ours, theirs, rtol=tol, atol=tol * float(theirs.abs().max()) + 1e-6):
            return product
    log.warning(
        "oneDNN packed a %s weight [%d, %d] in a layout mpllama's kernel does not read; "
        "its one-row products stay with oneDNN",
        str(packed.dtype).split(".")[-1],
        rows,
        inner,
    )
    return None


@dataclass
class Float32Product:
    """x @ w.T with a float32 result for bf16 x [..., in] and a bf16 weight packed by
    oneDNN (whose own product returns bf16): for the logits, where bf16's rounding
    (steps of 1/16 around 10) would decide near-ties. ``gemm_bf16_f32`` in the C file, on
    the weight its one-row kernel reads (the same layout, checked by ``one_row_product``)."""

    one_row: OneRowProduct

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return _gemm("gemm_bf16_f32", torch.float32, self.one_row, x)


def _gemm(name: str, out: torch.dtype, w: OneRowProduct, x: torch.Tensor) -> torch.Tensor:
    """x [..., in] bf16 @ w's packed weight [rows (padded), in]^T, by the C kernel
    ``name`` (``gemm_bf16_*``), into a tensor of ``out``."""
    lead, inner = x.shape[:-1], x.shape[-1]
    x = x.reshape(-1, inner).contiguous()
    y = torch.empty(x.shape[0], w.rows, dtype=out)
    fn = getattr(library(), name)
    fn(w.address, x.data_ptr(), y.data_ptr(), x.shape[0], w.rows, w.padded, inner, w.block)
    return y.view(*lead, w.rows)


def float32_product(one_row: OneRowProduct | None) -> Float32Product | None:
    """``Float32Product`` for a bf16 weight whose one-row kernel was made; else None."""
    if one_row is None or one_row.dtype != torch.bfloat16:
        return None
    return Float32Product(one_row)


@dataclass
class Int8OneRow:
    """An int8 weight's product for an input of one row, reading the weight packed by
    oneDNN's ``qlinear_prepack`` (one packed tensor per input group), bit for bit what
    ``quant.Int8Weight`` computes through oneDNN (``gemv_int8`` in the C file): its
    activations quantized per group as ``quant.quantize_rows`` does, the integer sums
    exact. ``batched`` takes a decode step's few rows the same way, each row's result
    what it gives alone. Holds the packed tensors and scales the kernel reads."""

    packed: list[torch.Tensor] = field(repr=False)
    scales: torch.Tensor = field(repr=False)  # [G, N] float32
    pointers: ctypes.Array = field(repr=False)
    rows: int
    inner: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x, 1)

    @property
    def most_rows(self) -> int:
        """The most rows ``batched`` takes: as ``OneRowProduct.most_rows``, a decode
        step's few rows (``BATCH_ROWS``) on a weight whose block of 64 rows stays in L2
        while each group of four input rows reads it again (``BLOCK_BYTES``), and at most
        ``BATCH_ROWS`` input groups (the kernel's scales table)."""
        fits = BLOCK * self.inner <= BLOCK_BYTES and len(self.packed) <= BATCH_ROWS
        return BATCH_ROWS if fits else 1

    def batches(self, x: torch.Tensor) -> bool:
        """Whether ``batched`` takes x's rows (see ``most_rows``)."""
        return 1 < x.numel() // self.inner <= self.most_rows

    def batched(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, in] (2 <= M <= ``most_rows``) through ``gemm_int8``: each row's
        result bit for bit its one-row product's, and oneDNN's."""
        return self._run(x, x.numel() // self.inner)

    def _run(self, x: torch.Tensor, M: int) -> torch.Tensor:
        x = x.contiguous()
        y = torch.empty(*x.shape[:-1], self.rows, dtype=x.dtype)
        work = torch.empty(M * self.inner, dtype=torch.uint8)
        args = [self.pointers, self.scales.data_ptr(), x.data_ptr(), int(x.dtype == torch.bfloat16)]
        lib = library()
        assert lib is not None
        if M == 1:
            lib.gemv_int8(
                *args, y.data_ptr(), self.rows, self.inner, len(self.packed), work.data_ptr()
            )
        else:
            lib.gemm_int8(
                *args, y.data_ptr(), M, self.rows, self.inner, len(self.packed), work.data_ptr()
            )
        return y


def int8_one_row(packed: list[torch.Tensor], scales: list[torch.Tensor]) -> Int8OneRow | None:
    """``Int8OneRow`` for an int8 weight packed by oneDNN per input group (with each
    group's float32 weight scales), where the kernel reads that layout: whole blocks of
    64 output rows, groups of a multiple of 16 inputs, each packed tensor its int8 values
    then one int32 per row. None otherwise (the caller keeps oneDNN)."""
    if library() is None:
        return None
    inner_g, rows = packed[0].shape  # qlinear_prepack's [in, out]
    if rows % BLOCK or inner_g % 16:
        return None
    if any(torch.ops.mkldnn._nbytes(p) != rows * inner_g + 4 * rows for p in packed):
        return None
    pointers = (ctypes.c_void_p * len(packed))(*(torch.ops.mkldnn.data_ptr(p) for p in packed))
    table = torch.stack(scales).float().contiguous()
    return Int8OneRow(packed, table, pointers, rows, inner_g * len(packed))


@dataclass
class Int4Product:
    """x @ w.T for bf16 rows x [..., in] (any number) and a group-wise int4 weight
    (``quant.Int4Weight``'s), on AMX tiles where the bf16 products run on them, else on
    AVX-512 (``int4_product``, cpu_kernels_int4.c): each row's result the same alone as in
    any batch, bf16 out. Holds the weight in the kernel's
    layout (see ``int4_product``): its 4-bit values, then per block of 32 output rows and
    group, 32 scales and 32 zeros in bf16."""

    packed: torch.Tensor = field(repr=False)  # uint8 [padded / 32, 16 * inner]
    sz: torch.Tensor = field(repr=False)  # bf16 [padded / 32, groups, 2, 32]
    rows: int
    padded: int
    inner: int
    group_size: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x = x.reshape(-1, self.inner).contiguous()
        y = torch.empty(x.shape[0], self.rows, dtype=torch.bfloat16)
        library().int4_product(  # type: ignore[union-attr]
            self.packed.data_ptr(),
            self.sz.data_ptr(),
            x.data_ptr(),
            y.data_ptr(),
            x.shape[0],
            self.rows,
            self.padded,
            self.inner,
            self.group_size,
            1,
        )
        return y.view(*lead, self.rows)

    def nbytes(self) -> int:
        return self.packed.numel() + self.sz.numel() * 2


def int4_product(q: torch.Tensor, scales: torch.Tensor) -> Int4Product | None:
    """``Int4Product`` for an int4 weight: its values q [out, in], 0..15
    (``quantize.unpack_int4``'s), and bf16 scales [out, in/group, 2], scale and zero
    (``quantize.quantize_int4``'s), where mpllama's kernels run and the inputs come in whole
    steps of 32 (the tiles') and whole groups of them. None otherwise: torch's int4 kernel
    runs."""
    rows, inner = q.shape
    groups = scales.shape[1]
    group_size = inner // groups
    if library() is None or inner % 32 or group_size % 32:
        return None
    pad = -rows % 32
    q = q.to(torch.uint8)  # every step below in bytes (a no-op for quant.Int4Weight's)
    if pad:
        q = torch.cat([q, q.new_full((pad, inner), 8)])  # q - 8 = 0: zero rows
    blocks = (rows + pad) // 32
    # Each block's values in the tiles' order ([in/2][32 rows][2]), 128 (four runs of 32)
    # in 64 bytes: value j of run i in bits 4i..4i+3 of little-endian 16-bit word j, so
    # byte 2j holds runs 0 and 1, byte 2j + 1 runs 2 and 3 (the kernels' unpack4).
    runs = q.reshape(blocks, 32, inner // 2, 2).permute(0, 2, 1, 3).reshape(blocks, -1, 4, 32)
    low = runs[:, :, 0] | (runs[:, :, 1] << 4)
    high = runs[:, :, 2] | (runs[:, :, 3] << 4)
    ours = torch.stack([low, high], dim=-1).reshape(blocks, -1)
    sz = torch.cat([scales, scales.new_zeros(pad, groups, 2)])
    sz = sz.reshape(blocks, 32, groups, 2).permute(0, 2, 3, 1).contiguous()
    return Int4Product(ours, sz, rows, rows + pad, inner, group_size)
