"""mpllama's own CPU kernels (``cpu_kernels*.c``), built and loaded: the products on
packed weights (wrapped in ``cpu_products``), one-query attention over the block pool
(``attend_decode``) and a decode layer's small steps (``add_rmsnorm``, ``rope_write``,
``silu_mul``), for the decode steps a CPU rank runs a few rows at a time.

Built on first use with the machine's C compiler (about a second) into
``~/.cache/mpllama``, keyed by the source and flags, and loaded with ctypes; the loops
run on the OpenMP threads torch already has (the library links libgomp, which resolves
to the one torch loaded). Where they cannot run (no AVX-512 bf16 in the CPU flags, no
compiler, a failed build), ``library()`` is None and every caller keeps torch's kernels:
the figures are in benchmarks/RESULTS.md, "Figures behind the code".

On a CPU with AMX (Intel Sapphire Rapids on) the bf16 products, int8's batched ones and
int4's run on its tiles (``amx_on``, ``set_amx``); elsewhere on AVX-512.
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
from dataclasses import dataclass
from pathlib import Path

import torch

from ..hardware import cpu_flags, cpu_vendor

log = logging.getLogger(__name__)

# The C files built into one library, and the header they share.
SOURCES = tuple(
    Path(__file__).with_name(f"cpu_kernels{part}.c")
    for part in ("", "_amx", "_int4", "_attention", "_layer")
)
HEADER = Path(__file__).with_name("cpu_kernels.h")
FLAGS = (
    "-O3 -ffp-contract=off -mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx512bf16 -mavx512vnni -mfma "
    "-fopenmp -shared -fPIC"
).split()
# AMX's tiles, where the compiler knows them: the bf16 and int4 products and int8's
# batched ones run on them on a CPU that has them (cpu_kernels_amx.c). A compiler that
# does not builds the rest without them.
AMX_FLAGS = "-mamx-tile -mamx-bf16 -mamx-int8".split()
AMX_CPU_FLAGS = frozenset({"amx_tile", "amx_bf16", "amx_int8"})
CPU_FLAGS = frozenset(
    {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16", "avx512_vnni", "fma"}
)
MAX_H, MAX_HD = 128, 16384  # a rank's query heads, and times the head size (the C limits)

_P, _I = ctypes.c_void_p, ctypes.c_int64
_SIGNATURES = {
    "gemv_int8": [_P, _P, _P, ctypes.c_int, _P, _I, _I, _I, _P],
    "gemm_int8": [_P, _P, _P, ctypes.c_int, _P, _I, _I, _I, _I, _P],
    "gemm_bf16_f32": [_P, _P, _P, _I, _I, _I, _I, _I],
    "gemm_bf16_bf16": [_P, _P, _P, _I, _I, _I, _I, _I],
    "stream_sum": [_P, _I],
    "lookup_int8": [_P, _P, _P, _I, _I, _I, _P],
    "lookup_int4": [_P, _P, _P, _I, _I, _I, _P],
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


def path() -> str:
    """Which of mpllama's CPU kernels run in this process, for a rank's report: "amx" (the
    bf16 and int4 products and int8's batched ones on AMX tiles, the rest AVX-512),
    "avx512", or "off: " and why (torch's kernels run). A row's bf16 sums differ in the
    last bits between "amx" and "avx512" ranks (cpu_kernels_amx.c)."""
    why = unavailable()
    if why is None and library() is None:
        why = "the build failed (the log says why)"
    if why is not None:
        return f"off: {why}"
    return "amx" if amx_on() else "avx512"


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
