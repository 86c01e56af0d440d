"""mpllama's own CPU kernels (``cpu_kernels*.c``): one-row products on oneDNN-packed weights
and one-query attention over the block pool, for the decode steps a CPU rank runs one
row or one token at a time.

Built on first use with the machine's C compiler (about a second) into
``~/.cache/mpllama``, keyed by the source and flags, and loaded with ctypes; the loops
run on the OpenMP threads torch already has (the library links libgomp, which resolves
to the one torch loaded). Where they cannot run (no AVX-512 bf16 in the CPU flags, no
compiler, a failed build), ``library()`` is None and every caller keeps torch's kernels:
the figures are in benchmarks/RESULTS.md, "Figures behind the code".

A packed weight is read in oneDNN's own blocked layout; ``one_row_product`` checks that
layout on each weight, against oneDNN's product of that same weight, before using it.

On a CPU with AMX (Intel Sapphire Rapids on) the bf16 products, int8's batched ones and
int4's (``Int4Product``) run on its tiles (``amx_on``, ``set_amx``); elsewhere on AVX-512.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..hardware import cpu_flags, cpu_vendor

log = logging.getLogger(__name__)

# The C files built into one library, and the header they share.
SOURCES = tuple(
    Path(__file__).with_name(f"cpu_kernels{part}.c")
    for part in ("", "_amx", "_attention", "_layer")
)
HEADER = Path(__file__).with_name("cpu_kernels.h")
FLAGS = (
    "-O3 -ffp-contract=off -mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx512bf16 -mavx512vnni -mfma "
    "-fopenmp -shared -fPIC"
).split()
# AMX's tiles, where the compiler knows them: the bf16 products and int8's batched ones
# run on them on a CPU that has them (cpu_kernels_amx.c). A compiler
# that does not builds the rest without them.
AMX_FLAGS = "-mamx-tile -mamx-bf16 -mamx-int8".split()
AMX_CPU_FLAGS = frozenset({"amx_tile", "amx_bf16", "amx_int8"})
CPU_FLAGS = frozenset(
    {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16", "avx512_vnni", "fma"}
)
BLOCK = 64  # output rows per block of oneDNN's packed layout (cpu_kernels.h's NB)
# oneDNN's bf16 blocks on a CPU with AMX (its default packing there): 32 rows. The bf16
# and float32 kernels read either (``OneRowProduct.block``); int8 is in blocks of 64.
BLOCKS = (BLOCK, 32)
# mpllama's bf16 product of several rows (OneRowProduct.batched): up to this many rows,
# on weights whose block of 64 rows fits this share of a core's L2 (1 MB on this EPYC).
BATCH_ROWS, BLOCK_BYTES = 64, 512 << 10
MAX_H, MAX_HD = 128, 16384  # a rank's query heads, and times the head size (the C limits)

_P, _I = ctypes.c_void_p, ctypes.c_int64
_SIGNATURES = {
    "gemv_int8": [_P, _P, _P, ctypes.c_int, _P, _I, _I, _I, _P],
    "gemm_int8": [_P, _P, _P, ctypes.c_int, _P, _I, _I, _I, _I, _P],
    "gemm_bf16_f32": [_P, _P, _P, _I, _I, _I, _I, _I],
    "gemm_bf16_bf16": [_P, _P, _P, _I, _I, _I, _I, _I],
    "stream_sum": [_P, _I],
    "lookup_int8": [_P, _P, _P, _I, _I, _I, _P],
    "int4_product": [_P, _P, _P, _P, _I, _I, _I, _I, _I, ctypes.c_int],
    # a decode step's layer (row_decode.py's structs, then the step's arguments)
    "row_attention_step": [_P, _P, _P, _P, _P, _P, _P, _P, _P, _I, _P],
    "row_feed_forward_step": [_P, _P, _P, _P, _I, _P],
    # bf16 and float32 activations, each a kernel of its own (``_bf16``, ``_f32``)
    **{
        f"{name}_{kind}": args
        for name, args in {
            "gemv": [_P, _P, _P, _I, _I, _I],
            "add_rmsnorm": [_P, _P, _P, _P, _P, _I, _I, ctypes.c_float],
            "rope_write": [_P, _P, _P, _P, _P, _P, _I, _I, _I, _I],
            "silu_mul": [_P, _P, _I, _I],
            "attend_decode": [_P, _P, _P, _P, _P, _P, _P, _I, _I, _I, _I, ctypes.c_float],
        }.items()
        for kind in ("bf16", "f32")
    },
}
SUFFIX = {torch.bfloat16: "bf16", torch.float32: "f32"}


def kernel(name: str, dtype: torch.dtype) -> ctypes._CFuncPtr:
    """The C kernel ``name`` for activations of ``dtype`` (bf16 or float32)."""
    return getattr(library(), f"{name}_{SUFFIX[dtype]}")


def unavailable() -> str | None:
    """Why the kernels cannot run on this machine, or None when they can be built."""
    missing = CPU_FLAGS - cpu_flags()
    if missing:
        return f"the CPU lacks {', '.join(sorted(missing))}"
    if compiler() is None:
        return "no C compiler (cc or gcc) on PATH"
    return None


def compiler() -> str | None:
    return shutil.which("cc") or shutil.which("gcc")


@functools.cache
def library() -> ctypes.CDLL | None:
    """The built kernels, or None (logged once) where they cannot be."""
    why = unavailable()
    if why is None:
        try:
            return _load(_build())
        except (OSError, subprocess.SubprocessError) as e:
            why = f"building {SOURCES[0].name} and the files beside it failed: {e}"
    log.info("mpllama's CPU kernels are off (%s); torch's kernels run instead", why)
    return None


def _build() -> Path:
    cc = compiler()
    assert cc is not None
    source = b"".join(path.read_bytes() for path in (HEADER, *SOURCES))
    digest = hashlib.sha256(source + " ".join([cc, *FLAGS, *AMX_FLAGS]).encode()).hexdigest()[:16]
    out = Path.home() / ".cache" / "mpllama" / f"cpu_kernels-{digest}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # Ranks on one machine may build at once: each into its own file, renamed into place.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        try:
            _compile(cc, [*FLAGS, *AMX_FLAGS], tmp)
        except subprocess.SubprocessError as e:
            log.info(
                "building mpllama's CPU kernels with AMX failed (%s); building them without", e
            )
            _compile(cc, FLAGS, tmp)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _compile(cc: str, flags: list[str], out: str) -> None:
    try:
        subprocess.run(
            [cc, *flags, "-o", out, *map(str, SOURCES), "-lm"],
            check=True,
            capture_output=True,
            text=True,
            timeout=120,
        )
    except subprocess.CalledProcessError as e:
        raise subprocess.SubprocessError(e.stderr.strip()[-2000:]) from None


def _load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    for name, args in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, None
    lib.stream_sum.restype = ctypes.c_float
    lib.set_bf16_every_line.argtypes = [ctypes.c_int]
    lib.set_bf16_every_line(int(cpu_vendor() == "GenuineIntel"))
    lib.amx_request.restype = lib.set_amx.restype = lib.amx_on.restype = ctypes.c_int
    lib.set_amx.argtypes = [ctypes.c_int]
    if AMX_CPU_FLAGS <= cpu_flags():
        if lib.set_amx(lib.amx_request()):
            log.info("mpllama's bf16 products run on AMX tiles")
        else:
            log.info(
                "the CPU has AMX, but this build or Linux does not let mpllama use it: "
                "its bf16 products run on AVX-512"
            )
    return lib


def amx_on() -> bool:
    """Whether the bf16 products run on AMX tiles (see ``set_amx``)."""
    lib = library()
    return lib is not None and bool(lib.amx_on())


def set_amx(on: bool) -> bool:
    """Run the bf16 products on AMX tiles (where the CPU has them and the library could
    ask for them: ``library()`` turns them on there) or on AVX-512; whether they run on
    the tiles now. For tests, which check both paths, and benchmarks."""
    lib = library()
    assert lib is not None
    return bool(lib.set_amx(int(on)))


# ------------------------------------------------------------------------ one-row products


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
    (``quant.Int4Weight``'s), on AMX tiles (``int4_product`` in the C file): each row's
    result the same alone as in any batch, bf16 out. Holds the weight in the kernel's
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
    (``quant.unpack_int4``'s), and bf16 scales [out, in/group, 2], scale and zero
    (``quant.quantize_int4``'s), where the bf16 products run on AMX tiles (``amx_on``) and
    the inputs come in whole steps of 32 (the tiles') and whole groups of them. None
    otherwise: torch's int4 kernel runs."""
    rows, inner = q.shape
    groups = scales.shape[1]
    group_size = inner // groups
    if not amx_on() or inner % 32 or group_size % 32:
        return None
    pad = -rows % 32
    q = torch.cat([q, q.new_full((pad, inner), 8)])  # q - 8 = 0: zero rows
    blocks = (rows + pad) // 32
    # Each block's values in the tiles' order ([in/2][32 rows][2]), in runs of 64: value j
    # of a run in byte j's low half, value 32 + j in its high half.
    runs = q.reshape(blocks, 32, inner // 2, 2).permute(0, 2, 1, 3).reshape(blocks, -1, 2, 32)
    ours = (runs[:, :, 0] | (runs[:, :, 1] << 4)).to(torch.uint8).reshape(blocks, -1).contiguous()
    sz = torch.cat([scales, scales.new_zeros(pad, groups, 2)])
    sz = sz.reshape(blocks, 32, groups, 2).permute(0, 2, 3, 1).contiguous()
    return Int4Product(ours, sz, rows, rows + pad, inner, group_size)


# ------------------------------------------------------------------------ decode attention


def decode_attention_fits(n_heads: int, cache: torch.Tensor) -> bool:
    """Whether ``attend_decode`` runs a layer of ``n_heads`` query heads over ``cache``
    [P,K,D]: a bf16 or float32 cache on the CPU, a head size of a multiple of 32, and few
    enough query heads for one task to hold a row's."""
    if library() is None or cache.device.type != "cpu" or cache.dtype not in SUFFIX:
        return False
    D = cache.shape[2]
    return D % 32 == 0 and n_heads <= MAX_H and n_heads * D <= MAX_HD and cache.is_contiguous()


@dataclass
class Segments:
    """Every row's positions as segments of consecutive cache positions, as the C kernel
    takes them: firsts and counts, row b's being offsets[b] .. offsets[b+1]-1. Built once
    per forward and read by every layer."""

    firsts: torch.Tensor
    counts: torch.Tensor
    offsets: torch.Tensor

    @staticmethod
    def of(rows: list[list[tuple[int, int]]]) -> Segments:
        firsts = [first for row in rows for first, _ in row]
        counts = [n for row in rows for _, n in row]
        offsets = [0]
        for row in rows:
            offsets.append(offsets[-1] + len(row))
        return Segments(torch.tensor(firsts), torch.tensor(counts), torch.tensor(offsets))


def attend_decode(
    q: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, segments: Segments
) -> torch.Tensor:
    """Attention of q [B,H,D] (one new token per row, already in the cache) over each
    row's segments of the caches [P,K,D]; [B,H,D] out (see ``decode_attention_fits``)."""
    B, H, D = q.shape
    K = cache_k.shape[1]
    q = q.contiguous()
    out = torch.empty_like(q)
    kernel("attend_decode", q.dtype)(
        q.data_ptr(),
        cache_k.data_ptr(),
        cache_v.data_ptr(),
        segments.firsts.data_ptr(),
        segments.counts.data_ptr(),
        segments.offsets.data_ptr(),
        out.data_ptr(),
        B,
        K,
        H // K,
        D,
        D**-0.5,
    )
    return out


# ------------------------------------------------------------------------ a decode layer's steps
# Used where ``attend_decode`` runs (one new token per row, bf16 or float32, on a CPU):
# each call replaces several torch ops, whose dispatch costs more than their arithmetic
# at one row.


def add_rmsnorm(
    x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, RMSNorm(h) * weight) for h = x + delta (or x): x and h the float32 residual
    stream [M, D]; delta, weight and the normed rows in the weight's type, bf16 or
    float32, rounded where ``model.RMSNorm`` rounds."""
    x = x.contiguous()
    assert x.dtype == torch.float32, "the residual stream is float32"
    M, D = x.reshape(-1, x.shape[-1]).shape
    h = x if delta is None else torch.empty_like(x)
    out = torch.empty_like(x, dtype=weight.dtype)
    kernel("add_rmsnorm", weight.dtype)(
        x.data_ptr(),
        None if delta is None else delta.contiguous().data_ptr(),
        weight.data_ptr(),
        h.data_ptr(),
        out.data_ptr(),
        M,
        D,
        eps,
    )
    return h, out


def rope_write(
    qkv: torch.Tensor,
    cis: torch.Tensor,
    positions: torch.Tensor,
    cache_k: torch.Tensor,
    cache_v: torch.Tensor,
    n_heads: int,
) -> torch.Tensor:
    """From the fused q/k/v projection of one token per row (qkv [B, (H+2K)*D], bf16 or
    float32): q and k rotated by their rows' ``cis`` [B, D/2] (complex), k and v written
    into the caches [P,K,D] at ``positions`` [B]; q [B,H,D] out."""
    _, K, D = cache_k.shape
    B = qkv.shape[0]
    qkv, cis = qkv.contiguous(), torch.view_as_real(cis).contiguous()
    positions = positions.contiguous()
    q = qkv.new_empty(B, n_heads, D)
    kernel("rope_write", qkv.dtype)(
        qkv.data_ptr(),
        cis.data_ptr(),
        positions.data_ptr(),
        cache_k.data_ptr(),
        cache_v.data_ptr(),
        q.data_ptr(),
        B,
        n_heads,
        K,
        D,
    )
    return q


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for the halves of gate_up [M, 2F] (the fused w1/w3 output), bf16 or
    float32."""
    gate_up = gate_up.contiguous()
    M, F2 = gate_up.reshape(-1, gate_up.shape[-1]).shape
    out = gate_up.new_empty(*gate_up.shape[:-1], F2 // 2)
    kernel("silu_mul", gate_up.dtype)(gate_up.data_ptr(), out.data_ptr(), M, F2 // 2)
    return out


def stream_sum(x: torch.Tensor) -> float:
    """The sum of a float32 tensor (its size a multiple of 64), each thread reading its own
    share once, front to back: how fast this machine streams memory in, the bound of a
    one-row product (benchmarks/bench_decode.py)."""
    assert x.dtype == torch.float32 and x.is_contiguous() and x.numel() % 64 == 0
    return float(library().stream_sum(x.data_ptr(), x.numel()))  # type: ignore[union-attr]
