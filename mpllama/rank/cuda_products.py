"""The quantized weights' products on CUDA GPUs, through torch's own kernels, each weight
laid out for its kernel once, at load (``quant.Int8Weight.pack``, ``quant.Int4Weight.pack``).

* int8: the integer product of per-token int8 activations and the int8 weight, as on the
  CPU, through ``torch._int_mm`` (cuBLASLt's int8 GEMM, int32 sums). The integers are
  the CPU's, and the float steps after them the same ops in the same order, so an int8
  rank on a GPU gives the CPU's ``int_mm`` results. cuBLASLt takes more than 16 rows
  and widths in multiples of 8: a decode step's few rows are padded with zero rows
  (``int_mm``), the weight's rows to a multiple of 8 (``INT_MM_ROWS``).
  torch's own ``_weight_int8pack_mm`` on CUDA is one thread per output, its weight reads
  uncoalesced; not used.
* int4: weight-only, torch's tinygemm (``_weight_int4pack_mm``, tensor cores: compute
  capability 8.0 or later, bf16 activations), which dequantizes as mpllama's int4 does,
  w = (q - 8) * scale + zero per group of 32, 64, 128 or 256 inputs. Each weight is
  checked at load on a probe against its dequantized product; a weight the kernel cannot
  take, or gets wrong, stays on the dequantizing fallback, with a warning.

Not yet run on a GPU (no session has had one): the GPU-marked tests in
tests/test_quant.py check the kernels chosen and their results against the CPU's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

INT_MM_ROWS = 8  # cuBLASLt's int8 GEMM: widths (the weight's rows, the inputs) in 8s
_INT_MM_LEAST_ROWS = 17  # ... and more than 16 activation rows
TINYGEMM_GROUPS = (32, 64, 128, 256)
_TINYGEMM_ROWS = 8  # the weight's rows in tiles of 8
_K_TILE = 16
_warned: set[str] = set()


def int_mm_fits(inputs: int) -> bool:
    """Whether ``int_mm`` takes a weight of ``inputs`` inputs a group."""
    return inputs > 0 and inputs % INT_MM_ROWS == 0


def int_mm(xq: torch.Tensor, w_t: torch.Tensor) -> torch.Tensor:
    """xq int8 [M, K] @ w_t int8 [K, N] (a [N, K] weight's transpose, column-major as
    cuBLASLt takes it) -> int32 [M, N]; rows beyond ``M`` padded in and dropped."""
    rows = xq.shape[0]
    if rows < _INT_MM_LEAST_ROWS:
        xq = torch.cat([xq, xq.new_zeros(_INT_MM_LEAST_ROWS - rows, xq.shape[1])])
    return torch._int_mm(xq, w_t)[:rows]


@dataclass
class Int4TinyGemm:
    """x @ w.T for bf16 rows x [..., in] and a group-wise int4 weight on a CUDA GPU,
    through tinygemm: the weight in its tensor-core layout, and scales and zeros
    [in / group_size, padded rows, 2] in bf16."""

    packed: torch.Tensor = field(repr=False)  # int32 [padded / 8, in / (16 * tiles), 32, tiles / 2]
    sz: torch.Tensor = field(repr=False)
    rows: int
    group_size: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = torch.ops.aten._weight_int4pack_mm(
            x.reshape(-1, x.shape[-1]).contiguous(), self.packed, self.group_size, self.sz
        )
        if y.shape[1] != self.rows:  # rows the layout added
            y = y[:, : self.rows]
        return y.reshape(*lead, self.rows)

    def nbytes(self) -> int:
        return self.packed.numel() * 4 + self.sz.numel() * 2


def tinygemm_unsupported(
    device: torch.device, dtype: torch.dtype, inputs: int, group_size: int
) -> str | None:
    """Why tinygemm cannot run an int4 weight of ``inputs`` inputs here, or None."""
    if device.type != "cuda":
        return f"tinygemm runs on CUDA GPUs, not {device.type}"
    if dtype != torch.bfloat16:
        return f"tinygemm takes bf16 activations, not {dtype}"
    if group_size not in TINYGEMM_GROUPS:
        return f"tinygemm takes groups of {TINYGEMM_GROUPS}, not {group_size}"
    if inputs % (2 * _K_TILE):
        return f"tinygemm takes inputs in multiples of {2 * _K_TILE}, not {inputs}"
    if torch.cuda.get_device_capability(device) < (8, 0):
        return "tinygemm needs compute capability 8.0 or later"
    return None


def inner_k_tiles(inputs: int) -> int:
    """The most k-tiles of 16 inputs (8, 4 or 2) that the inputs divide into."""
    return next(t for t in (8, 4, 2) if inputs % (t * _K_TILE) == 0)


def tinygemm_layout(
    packed: torch.Tensor, scales: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """An int4 weight in ``quantize.quantize_int4``'s form (uint8 [out, in/2], the even input
    in the low nibble; bf16 scales and zeros [out, in/group, 2]) in tinygemm's: the packed
    weight, the scales and zeros [in/group, padded, 2], and the rows. tinygemm reads the
    even input from a byte's high nibble (gpt-fast and torchao pack it so); the rows are
    padded to whole tiles of 8 with zero weights."""
    rows, inputs = packed.shape[0], packed.shape[1] * 2
    pad = -rows % _TINYGEMM_ROWS
    swapped = ((packed & 0xF) << 4) | (packed >> 4)
    sz = scales.to(torch.bfloat16)
    if pad:
        swapped = torch.cat([swapped, swapped.new_full((pad, swapped.shape[1]), 0x88)])
        sz = torch.cat([sz, sz.new_zeros(pad, *sz.shape[1:])])
    weight = torch.ops.aten._convert_weight_to_int4pack(swapped.contiguous(), inner_k_tiles(inputs))
    return weight, sz.transpose(0, 1).contiguous(), rows


def int4_tinygemm(
    packed: torch.Tensor,
    scales: torch.Tensor,
    dtype: torch.dtype,
    dequantize: Callable[[], torch.Tensor],
) -> Int4TinyGemm | None:
    """``Int4TinyGemm`` for an int4 weight on a CUDA GPU, where tinygemm takes it and gives
    its dequantized product (``dequantize()``, float32 [out, in]) on a probe; else None."""
    inputs = packed.shape[1] * 2
    group_size = inputs // scales.shape[1]
    why = tinygemm_unsupported(packed.device, dtype, inputs, group_size)
    if why is None:
        try:
            product = Int4TinyGemm(*tinygemm_layout(packed, scales), group_size)
            probe = torch.randn(3, inputs, generator=torch.Generator().manual_seed(0)).to(
                packed.device, dtype
            )
            want = F.linear(probe.float(), dequantize())
            err = (product(probe).float() - want).norm() / want.norm().clamp(min=1e-12)
            if err < 1e-2:
                return product
            why = f"its product is off by {err:.3g} of the dequantized weight's"
        except RuntimeError as e:  # a build without tinygemm, a shape it refuses
            why = str(e).splitlines()[0]
    if why not in _warned:  # once a reason, not once a weight
        _warned.add(why)
        log.warning("int4 weights on %s: %s; dequantized at each product", packed.device, why)
    return None
