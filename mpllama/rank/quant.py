"""Quantized linear weights (``runtime.quantization: int8 | int4``) at run time: how a
weight is stored and multiplied, and the load-time swap of a model's linear weights for
their quantized twins (gpt-fast's shape: build, then replace each weight while loading).
How full-precision weights are quantized is rank/quantize.py's.

The seven linear weights of every layer (wq, wk, wv, wo, w1, w2, w3) are quantized to
the method's type; the output layer to int8 per row whatever the method, and the
embedding to the method's type (``Quantization.vocab`` and ``embedding``; llama.cpp's
q8_0 keeps both int8, its q4_0 the embedding in 4 bits and the output layer in 6). A
tied embedding stays int8, read from the output layer (``vocab_tables``). The two
tables are a fifth of Llama 3.2 1B's weights; in full precision they kept an int8 rank
of the bench model at 0.27 of float32's weight bytes instead of a quarter (RESULTS.md,
session 7).

* int8: symmetric int8 weights, one float32 scale per output row and input group (a
  column-parallel weight has one group; a row-parallel weight one per shard it was
  quantized from, so a shard's scales never depend on the other shards). Activations are
  quantized per token (and group) at each product, the product runs in integers (exact,
  whatever the batch: a row's result never depends on the rows beside it) and is scaled
  back to float. On the CPU: oneDNN's int8 kernel (VNNI); elsewhere ``torch._int_mm``
  (the same integers); on CUDA GPUs cuBLASLt's through it (``cuda_products``), or a
  float product of the same integers where the weight's shape does not fit it.
* int4: weight-only, asymmetric, group-wise along the input (``group_size`` weights per
  bf16 scale and zero; by default 128 where the shards and ranks take it,
  ``quantization.int4_group_size``); activations stay in the model's dtype. On the CPU:
  mpllama's own kernel in bf16 models (``cpu_products.Int4Product``: AMX tiles or
  AVX-512), torch's ``_weight_int4pack_mm_for_cpu`` in float32 ones and where mpllama's
  kernels cannot run; on CUDA GPUs torch's tinygemm in bf16 models (``cuda_products``);
  elsewhere the weight is dequantized at each product.

Measured on a 2-core AMD EPYC (AVX-512 bf16 + VNNI), 2048x8192 layer: benchmarks/RESULTS.md.
A quantized checkpoint (``mpllama quantize``) holds each quantized ``X.weight`` (int8
[out, in]; int4 packed two to a byte, uint8 [out, in/2], the even column in the low
nibble) and ``X.scales`` (int8: float32 [out, groups]; int4: bf16 [out, in/group_size, 2],
scale then zero, w = (q - 8) * scale + zero); the embedding's rows are its ``out``.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from ..hardware import cpu_flags
from ..shard_axes import scales_key
from . import cuda_products
from .cpu_products import BLOCK, Int4Product, Int8OneRow, int4_product, int8_one_row
from .quantize import dequantize_int4, unpack_int4
from .vocab_tables import Int4Table, Int8Table

log = logging.getLogger(__name__)

# CPUs whose int8 dot products oneDNN runs without saturating 16-bit intermediates.
_VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})


# ------------------------------------------------------------------------ activations


def quantize_rows(x: torch.Tensor, unsigned: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (int8 [M, K], float32 [M, 1]): symmetric, one scale per row, so a row's
    values never depend on the other rows of the batch. ``unsigned``: the same values
    plus 128, as uint8 (oneDNN's fast kernels take unsigned activations: with signed
    ones it falls back to a reference loop, over 1000x slower here)."""
    xf = x.float()
    scale = xf.abs().amax(-1, keepdim=True).clamp_(min=1e-12).div_(127)
    q = torch.div(xf, scale).round_()  # within -127..127: the scale is the row's max / 127
    if unsigned:
        return q.add_(128).to(torch.uint8), scale
    return q.to(torch.int8), scale


# ------------------------------------------------------------------------ weights


class Int8Weight:
    """An int8 weight [out, in] with scales [out, G]; called on x [..., in]. ``pack``
    prepares the device's kernel (oneDNN's on the CPU, cuBLASLt's on CUDA GPUs); before
    it, and where neither runs, the same integer product runs through ``torch._int_mm``
    (CPU) or in float (GPUs)."""

    def __init__(self, q: torch.Tensor, scales: torch.Tensor) -> None:
        assert q.dtype == torch.int8 and q.shape[1] % scales.shape[1] == 0
        self.q, self.scales = q, scales.float()
        self.shape = tuple(q.shape)
        self.kernel = "torch"
        # Per input group, made by ``pack``: the kernel's weight and the weight scales.
        self._packed: list[torch.Tensor] = []
        self._scales: list[torch.Tensor] = []
        self.one_row: Int8OneRow | None = None  # mpllama's kernel for one row (``pack``)

    @property
    def device(self) -> torch.device:
        return self.scales.device

    @staticmethod
    def cat(parts: list[Int8Weight]) -> Int8Weight:
        return Int8Weight(torch.cat([p.q for p in parts]), torch.cat([p.scales for p in parts]))

    def pack(self, dtype: torch.dtype) -> None:
        groups = self.scales.shape[1]
        q, scales = self.q, self.scales
        onednn = self.device.type == "cpu" and onednn_int8_supported()
        cuda = self.device.type == "cuda" and cuda_products.int_mm_fits(self.shape[1] // groups)
        pad = -self.shape[0] % (BLOCK if onednn else cuda_products.INT_MM_ROWS if cuda else 1)
        if pad:
            # mpllama's kernel reads whole blocks of 64 rows, cuBLASLt's rows in 8s (an
            # output layer's vocabulary slice may not be): zero rows fill the last, and
            # products drop them.
            q = torch.cat([q, q.new_zeros(pad, self.shape[1])])
            scales = torch.cat([scales, scales.new_ones(pad, groups)])
        chunks = q.chunk(groups, dim=1)
        # Dense copies: oneDNN reads a view's storage as if it were dense.
        self._scales = [scales[:, g].contiguous() for g in range(groups)]
        if onednn:
            self._packed = [torch.ops.onednn.qlinear_prepack(c.contiguous(), None) for c in chunks]
            self._zero_points = torch.zeros(q.shape[0], dtype=torch.long)
            self.kernel = "onednn"
            self.one_row = self._checked(int8_one_row(self._packed, self._scales), dtype)
        elif self.device.type == "cpu":
            self._packed = [c.t().contiguous() for c in chunks]  # [in/G, out], as _int_mm takes
            self.kernel = "int_mm"
        elif cuda:
            # [in/G, out] column-major, as cuBLASLt takes it (cuda_products.int_mm)
            self._packed = [c.contiguous().t() for c in chunks]
            self.kernel = "int_mm_cuda"
        else:
            return
        self.q = torch.empty(0, dtype=torch.int8)  # the packed copies replace it

    def _checked(self, one_row: Int8OneRow | None, dtype: torch.dtype) -> Int8OneRow | None:
        """``one_row`` where it gives oneDNN's result for a probe row bit for bit: a row's
        product must not depend on whether it ran alone or batched."""
        if one_row is None or dtype not in (torch.float32, torch.bfloat16):
            return None
        # One row, and a few as a decode step batches them (``Int8OneRow.batched``).
        probe = torch.randn(3, self.shape[1], generator=torch.Generator().manual_seed(0))
        probe = probe.to(dtype)
        rows = self.shape[0]
        alone = torch.equal(one_row(probe[:1])[:, :rows], self(probe[:1]))
        if alone and (
            not one_row.batches(probe) or torch.equal(one_row.batched(probe)[:, :rows], self(probe))
        ):
            return one_row
        log.warning("mpllama's int8 kernel differs from oneDNN's here; oneDNN runs every row")
        return None

    def nbytes(self) -> int:
        return self.shape[0] * self.shape[1] + self.scales.numel() * 4

    def dequantize(self) -> torch.Tensor:
        assert self.q.numel(), "dequantize() reads the unpacked weight"
        groups = self.scales.shape[1]
        q = self.q.float().reshape(self.shape[0], groups, -1)
        return (q * self.scales[..., None]).reshape(self.shape)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        lead, x2 = x.shape[:-1], x.reshape(-1, self.shape[1])
        if self.one_row is not None and x2.shape[0] == 1:
            y = self.one_row(x2)
        elif self.one_row is not None and self.one_row.batches(x2):  # a decode step's rows
            y = self.one_row.batched(x2)
        else:
            y = self._products(x2).to(x.dtype)
        if y.shape[1] != self.shape[0]:  # rows ``pack`` added
            y = y[:, : self.shape[0]].contiguous()
        return y.reshape(*lead, self.shape[0])

    def _products(self, x2: torch.Tensor) -> torch.Tensor:
        """x2 [M, in] -> [M, out] float32 through the kernel ``pack`` chose, each row's
        activations quantized per input group."""
        groups = self.scales.shape[1]
        y: torch.Tensor | None = None
        for g, xg in enumerate(x2.chunk(groups, dim=1)):
            xq, sx = quantize_rows(xg, unsigned=self.kernel == "onednn")
            part = self._product(xq, g) * sx  # [M, out] float32
            y = part if y is None else y + part
        assert y is not None
        return y

    def _product(self, xq: torch.Tensor, g: int) -> torch.Tensor:
        """(xq @ q_g.T) * scales[:, g] in float32, q_g the g-th input group."""
        if self.kernel == "onednn":
            # Activation scale 1 and zero point 128: oneDNN returns the integer sums times
            # the weight scales; each row's own scale is applied after.
            return torch.ops.onednn.qlinear_pointwise(
                xq,
                1.0,
                128,
                self._packed[g],
                self._scales[g],
                self._zero_points,
                None,
                1.0,
                0,
                torch.float32,
                "none",
                [],
                "",
            )
        if self.kernel == "int_mm":
            return torch._int_mm(xq, self._packed[g]).float() * self._scales[g]
        if self.kernel == "int_mm_cuda":
            return cuda_products.int_mm(xq, self._packed[g]).float() * self._scales[g]
        qg = self.q.chunk(self.scales.shape[1], dim=1)[g]
        ws = self.scales[:, g]
        if xq.device.type == "cpu":
            return torch._int_mm(xq, qg.t().contiguous()).float() * ws
        # Weights cuBLASLt cannot take (inputs not in 8s), before ``pack``: float32 holds
        # the integer sums exactly up to 2^24.
        return (xq.float() @ qg.float().t()) * ws


class Int4Weight:
    """A group-wise int4 weight (see ``quantize_int4``); called on x [..., in] in the
    model's dtype. ``pack`` lays it out for its device's kernel; where none takes it (and
    before) the weight is dequantized at each product."""

    def __init__(self, packed: torch.Tensor, scales: torch.Tensor) -> None:
        assert packed.dtype == torch.uint8
        self.packed, self.scales = packed, scales
        self.shape = (packed.shape[0], packed.shape[1] * 2)
        self.group_size = self.shape[1] // scales.shape[1]
        self.kernel = "torch"
        self._sz: torch.Tensor | None = None
        # mpllama's CPU kernel or tinygemm on a GPU, where ``pack`` made it
        self.product: Int4Product | cuda_products.Int4TinyGemm | None = None

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @staticmethod
    def cat(parts: list[Int4Weight]) -> Int4Weight:
        return Int4Weight(
            torch.cat([p.packed for p in parts]), torch.cat([p.scales for p in parts])
        )

    def pack(self, dtype: torch.dtype) -> None:
        """Lay the weight out for the fastest kernel that runs it here: in a bf16 model
        where mpllama's CPU kernels run, mpllama's (``cpu_products.Int4Product``; on AMX a
        32-row decode step of the bench model 57 -> 14 ms against torch's kernel, on
        AVX-512 as fast as torch's batched and 1.3x at one row, and the row decoder takes
        it: benchmarks/RESULTS.md); else torch's CPU kernel in bf16 and float32 models;
        on CUDA GPUs torch's tinygemm in bf16 models (``cuda_products.Int4TinyGemm``);
        else none (dequantized at each product)."""
        if self.device.type == "cuda":
            tinygemm = cuda_products.int4_tinygemm(self.packed, self.scales, dtype, self.dequantize)
            self._run_on(tinygemm, "tinygemm")
            return
        if self.device.type != "cpu" or dtype not in (torch.float32, torch.bfloat16):
            return
        q = unpack_int4(self.packed)
        if dtype == torch.bfloat16 and self._run_on(int4_product(q, self.scales), "mpllama"):
            return
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
        self._sz = self.scales.to(dtype).transpose(0, 1).contiguous()  # [in/g, out, 2]
        self.scales = torch.empty(0, dtype=torch.bfloat16)  # the kernel's copy replaces it
        self.kernel = "int4pack"

    def _run_on(
        self, product: Int4Product | cuda_products.Int4TinyGemm | None, kernel: str
    ) -> bool:
        """Take ``product`` (None: no kernel of that kind took the weight) as this weight's
        kernel: its copy of the weight replaces this one's."""
        if product is None:
            return False
        self.product, self.kernel = product, kernel
        self.packed = torch.empty(0, dtype=torch.uint8)
        self.scales = torch.empty(0, dtype=torch.bfloat16)
        return True

    def nbytes(self) -> int:
        if self.product is not None:
            return self.product.nbytes()
        scales = self.scales if self._sz is None else self._sz
        return self.shape[0] * self.shape[1] // 2 + scales.numel() * scales.element_size()

    def dequantize(self) -> torch.Tensor:
        assert self.kernel == "torch", "dequantize() reads the unpacked weight"
        return dequantize_int4(self.packed, self.scales)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.product is not None:
            return self.product(x)
        if self.kernel == "int4pack":
            lead = x.shape[:-1]
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                x.reshape(-1, x.shape[-1]).contiguous(), self.packed, self.group_size, self._sz
            )
            return y.reshape(*lead, self.shape[0])
        return F.linear(x, self.dequantize().to(x.dtype))


QuantizedWeight = Int8Weight | Int4Weight


def onednn_int8_supported() -> bool:
    """Whether oneDNN's int8 product runs here, exactly: an x86 build of torch with
    oneDNN's quantized ops, on a CPU with VNNI (or AMX) dot products."""
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.onednn, "qlinear_pointwise")
        and bool(cpu_flags() & _VNNI_FLAGS)
    )


# ------------------------------------------------------------------------ the model swap


def materialize_quantized(
    model: nn.Module, state: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype
) -> nn.Module:
    """``model.materialize`` for a quantized state (``quantize_state``'s, or a quantized
    checkpoint's): each linear's weight becomes an Int8Weight or Int4Weight, on
    ``device``; every other tensor is assigned as ``materialize`` does."""
    from .model import materialize

    state = dict(state)
    for name, module in model.named_modules():
        key = f"{name}.weight"
        if scales_key(key) not in state:
            continue
        q, scales = state.pop(key).to(device), state.pop(scales_key(key)).to(device)
        module._parameters.pop("weight")
        if name == "tok_embeddings":
            module.weight = Int8Table(q, scales) if q.dtype == torch.int8 else Int4Table(q, scales)
        elif q.dtype == torch.int8:
            module.weight = Int8Weight(q, scales)
        else:
            module.weight = Int4Weight(q, scales)
    return materialize(model, state, device, dtype)


def quantized_bytes(model: nn.Module) -> int:
    """Bytes held by the model's quantized weights and tables (their scales included)."""
    return sum(
        m.weight.nbytes()
        for m in model.modules()
        if isinstance(m.__dict__.get("weight"), (Int8Weight, Int4Weight, Int8Table, Int4Table))
    )
