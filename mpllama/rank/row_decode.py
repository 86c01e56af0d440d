"""A decode step's rows through mpllama's CPU kernels, two C calls a layer.

A decode step on a CPU is bound by reading the weights (one row) or by the products'
arithmetic (a batch); what it spends beyond that is mostly Python: a layer on torch's
path with mpllama's kernels makes about a dozen calls (norms, the products, RoPE with the
cache writes, attention, the FFN's activation), each with its module call, tensor
allocations and ctypes conversion, about 1.3 ms of a 32-row bf16 step on the bench model.
Here each layer is ``row_attention_step`` then ``row_feed_forward_step``
(cpu_kernels_layer.c): the same kernels in the same order, so the same roundings and the
same logits bit for bit, with the layer's weights, norms, caches and workspace described
once, in C structs, when the model's caches are set up. Between the two calls, and after
the second, the caller sums the row-parallel product over the ranks (the one collective
each half needs).

One row applies where every product of every layer has a one-row kernel (bf16 or float32
weights packed by oneDNN, int8 weights with ``Int8OneRow``, or int4 weights in a bf16
model with ``Int4Product``); several rows, up to ``BATCH_ROWS``, where every
product batches them (``OneRowProduct.batched`` for bf16, ``Int8OneRow.batched`` for
int8 weights, ``Int4Product`` for int4); attention runs ``attend_decode`` (bf16 or
float32 on a CPU). The model keeps its layer-by-layer path otherwise (int4 weights on
torch's kernel in a float32 model, batched float32 steps, prefill, GPUs).
"""

from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING

import torch
from fairscale.nn.model_parallel.initialize import get_model_parallel_world_size

from . import cpu_kernels
from .cpu_kernels import Segments
from .cpu_products import BATCH_ROWS, BLOCK, Int4Product, Int8OneRow, OneRowProduct
from .dist import all_reduce

if TYPE_CHECKING:
    from .model import RMSNorm, Transformer

_P = ctypes.c_void_p
BF16, INT8, F32, INT4 = 0, 1, 2, 3  # product_t's kinds
MAX_GROUPS = 64  # int8 input groups gemv_int8 takes


class Product(ctypes.Structure):
    _fields_ = [
        ("kind", ctypes.c_int64),  # BF16, INT8, F32 or INT4
        ("w", _P),
        ("scales", _P),
        ("N", ctypes.c_int64),
        ("K", ctypes.c_int64),
        ("groups", ctypes.c_int64),  # int8: input groups; int4: inputs a group
        ("rows", ctypes.c_int64),
        ("nb", ctypes.c_int64),  # bf16, float32: rows a packed block (64, or 32: AMX)
    ]


class Layer(ctypes.Structure):
    _fields_ = [
        ("wqkv", Product),
        ("wo", Product),
        ("w13", Product),
        ("w2", Product),
        ("attn_norm", _P),
        ("ffn_norm", _P),
        ("cache_k", _P),
        ("cache_v", _P),
    ]


class Shape(ctypes.Structure):
    _fields_ = [
        *((name, ctypes.c_int64) for name in ("dim", "H", "KV", "D", "F", "bf16")),
        ("eps", ctypes.c_float),
        ("scale", ctypes.c_float),
        *((name, _P) for name in ("normed", "qkv", "q", "attn", "gu", "act", "u8")),
    ]


def _product(module: torch.nn.Module) -> tuple[Product, int] | None:
    """The C description of a layer's product and the most rows it takes (its kernel's
    ``most_rows``), or None where it has no one-row kernel."""
    one_row = module.one_row
    if isinstance(one_row, OneRowProduct):
        kind = BF16 if one_row.dtype == torch.bfloat16 else F32
        padded, inner = one_row.padded, one_row.inner
        product = Product(
            kind, one_row.address, None, padded, inner, 1, one_row.rows, one_row.block
        )
        return product, one_row.most_rows
    weight = module.__dict__.get("weight")
    int8 = getattr(weight, "one_row", None)
    if isinstance(int8, Int8OneRow) and len(int8.packed) <= MAX_GROUPS:
        address = ctypes.addressof(int8.pointers)
        scales = int8.scales.data_ptr()
        groups = len(int8.packed)
        product = Product(INT8, address, scales, int8.rows, int8.inner, groups, int8.rows, BLOCK)
        return product, int8.most_rows
    int4 = getattr(weight, "product", None)
    if isinstance(int4, Int4Product):
        product = Product(
            INT4,
            int4.packed.data_ptr(),
            int4.sz.data_ptr(),
            int4.padded,
            int4.inner,
            int4.group_size,
            int4.rows,
            32,
        )
        return product, BATCH_ROWS
    return None


class RowDecoder:
    """A model's layers for one new token of each of up to ``most_rows`` rows (see the
    module's docstring). Holds what the C structs point at: the model (its weights and
    caches) and the workspace."""

    def __init__(
        self,
        model: Transformer,
        layers: list[Layer],
        shape: Shape,
        work: dict[str, torch.Tensor],
        most_rows: int,
    ) -> None:
        self.model = model
        self.layers = layers
        self.shape = shape
        self.work = work  # the memory ``shape`` points at
        self.most_rows = most_rows
        self.addresses = [ctypes.addressof(layer) for layer in layers]
        # What each half writes: one row's padded product, or most_rows rows of dim.
        width = max(max(layer.wo.N, layer.w2.N) for layer in layers)
        size = max(width, most_rows * shape.dim)
        dtype = torch.bfloat16 if shape.bf16 else torch.float32
        self.attn_out = torch.empty(size, dtype=dtype)
        self.ffn_out = torch.empty(size, dtype=dtype)
        lib = cpu_kernels.library()
        assert lib is not None
        self.attention, self.feed_forward = lib.row_attention_step, lib.row_feed_forward_step
        self.dtype = dtype
        self.final_norm = cpu_kernels.kernel("add_rmsnorm", dtype)
        self.ranks = get_model_parallel_world_size()  # > 1: sum each half's output

    @staticmethod
    def build(model: Transformer) -> RowDecoder | None:
        """For a bf16 or float32 model on mpllama's kernels with its caches set up, else
        None."""
        lib = cpu_kernels.library()
        first = model.layers[0].attention
        if lib is None or first.cache_k is None or not model._decode_kernel_fits():
            return None
        dtype = first.cache_k.dtype  # the model's: bf16 or float32 (decode_attention_fits)
        layers, most_rows = [], BATCH_ROWS
        for block in model.layers:
            attn, ffn = block.attention, block.feed_forward
            if attn.wqkv is None or ffn.w13 is None:
                return None
            described = [_product(m) for m in (attn.wqkv, attn.wo, ffn.w13, ffn.w2)]
            if any(d is None for d in described):
                return None
            products = [d[0] for d in described if d is not None]
            most_rows = min(most_rows, *(d[1] for d in described if d is not None))
            norms = (block.attention_norm.weight, block.ffn_norm.weight)
            if any(n.dtype != dtype or not n.is_contiguous() for n in norms):
                return None
            if any(
                p.kind in (BF16, F32) and (p.kind == BF16) != (dtype == torch.bfloat16)
                for p in products
            ):
                return None
            layers.append(
                Layer(
                    *products,
                    norms[0].data_ptr(),
                    norms[1].data_ptr(),
                    attn.cache_k.data_ptr(),
                    attn.cache_v.data_ptr(),
                )
            )
        H, D = first.n_local_heads, first.head_dim
        KV = first.n_local_kv_heads
        qkv_rows, gu_rows = layers[0].wqkv.N, layers[0].w13.N
        F = model.layers[0].feed_forward.w13.sizes[0]
        inner = max(p.K for layer in layers for p in (layer.wqkv, layer.wo, layer.w13, layer.w2))
        # Each buffer holds one row's padded product or most_rows rows of its real width.
        sizes = {
            "normed": most_rows * model.args.dim,
            "qkv": max(qkv_rows, most_rows * layers[0].wqkv.rows),
            "q": most_rows * H * D,
            "attn": most_rows * H * D,
            "gu": max(gu_rows, most_rows * layers[0].w13.rows),
            "act": most_rows * F,
        }
        work = {name: torch.empty(n, dtype=dtype) for name, n in sizes.items()}
        work["u8"] = torch.empty(most_rows * inner, dtype=torch.uint8)
        if any(layer.wqkv.N != qkv_rows or layer.w13.N != gu_rows for layer in layers):
            return None
        eps = model.layers[0].attention_norm.eps
        bf16 = int(dtype == torch.bfloat16)
        shape = Shape(
            model.args.dim,
            H,
            KV,
            D,
            F,
            bf16,
            eps,
            D**-0.5,
            *(t.data_ptr() for t in work.values()),
        )
        return RowDecoder(model, layers, shape, work, most_rows)

    def __call__(
        self,
        x: torch.Tensor,
        cis: torch.Tensor,
        positions: torch.Tensor,
        segments: Segments,
        norm: RMSNorm,
    ) -> torch.Tensor:
        """The final norm of the hidden states after every layer, in the model's dtype,
        for one new token of each of M rows (M <= ``most_rows``): x [M, dim] (the
        embeddings, as the float32 residual stream), cis their positions' RoPE factors
        (complex, [M, D/2]), ``positions`` [M] the cache positions they write, ``segments``
        each row's positions (with the new one), ``norm`` the model's final norm."""
        M = x.shape[0]
        assert 0 < M <= self.most_rows and x.dtype == torch.float32
        h = x.reshape(M, -1).clone()
        h_at, cis_at = h.data_ptr(), torch.view_as_real(cis).contiguous()
        positions = positions.contiguous()
        shape_at = ctypes.addressof(self.shape)
        firsts, counts = segments.firsts.data_ptr(), segments.counts.data_ptr()
        offsets = segments.offsets.data_ptr()
        dim = self.shape.dim
        attn_sum = self.attn_out[: M * dim].view(M, dim)
        ffn_sum = self.ffn_out[: M * dim].view(M, dim)
        attn_at, ffn_at = attn_sum.data_ptr(), ffn_sum.data_ptr()
        delta = None  # the previous layer's feed-forward output, added into h first
        for layer in self.addresses:
            self.attention(
                layer,
                shape_at,
                h_at,
                delta,
                cis_at.data_ptr(),
                positions.data_ptr(),
                firsts,
                counts,
                offsets,
                M,
                attn_at,
            )
            if self.ranks > 1:
                all_reduce(attn_sum)
            self.feed_forward(layer, shape_at, h_at, attn_at, M, ffn_at)
            if self.ranks > 1:
                all_reduce(ffn_sum)
            delta = ffn_at
        out = torch.empty(M, dim, dtype=self.dtype)
        # The last layer's output added in and the final norm, in one call.
        self.final_norm(
            h_at, ffn_at, norm.weight.data_ptr(), h_at, out.data_ptr(), M, dim, norm.eps
        )
        return out
