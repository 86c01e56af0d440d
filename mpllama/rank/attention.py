"""A layer's attention over the paged KV cache: the q/k/v projections (fused into one
product once packed), RoPE, the cache writes, and attention itself, on whichever path the
step's plan (``kv_layout.CacheIndex``, made by ``Transformer.forward``) chose: mpllama's
CPU kernels for one new token a row, or SDPA over rows read as views or gathered.

Shapes in comments: B batch rows, T new tokens this call, S cached positions, P pool
positions, H local heads, K local key/value heads, D head size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from fairscale.nn.model_parallel.initialize import get_model_parallel_world_size
from torch import nn

from ..model_args import ModelArgs
from .cpu_kernels import attend_decode, rope_write
from .kv_layout import CacheIndex
from .layers import Fused, column_parallel, row_parallel
from .rope import apply_rope


class Attention(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        world = get_model_parallel_world_size()
        self.n_local_heads = args.n_heads // world
        # More ranks than KV heads: each rank holds a copy of the one KV head its query
        # heads use (rank r: head r // (world / n_kv_heads)), as Meta's reshard_mp does.
        self.n_local_kv_heads = max(args.kv_heads // world, 1)
        self.head_dim = args.head_dim
        kv_rows = self.n_local_kv_heads * world * args.head_dim  # copies counted
        self.wq = column_parallel(args.dim, args.n_heads * args.head_dim, gather_output=False)
        self.wk = column_parallel(args.dim, kv_rows, gather_output=False)
        self.wv = column_parallel(args.dim, kv_rows, gather_output=False)
        self.wo = row_parallel(args.n_heads * args.head_dim, args.dim)
        # [P, K, D]: every position of the block pool (blocks of ``block_size`` positions,
        # plus one spare block that takes padding writes), a position's heads together:
        # a row's keys are one run of memory per block run, which a CPU streams at close
        # to the memory's speed (cpu_kernels.attend_decode), and the layout vLLM's paged
        # cache has on GPUs. A sequence whose blocks are consecutive reads its keys as a
        # (strided) view in the shape attention wants.
        self.cache_k: torch.Tensor | None = None
        self.cache_v: torch.Tensor | None = None
        self.wqkv: Fused | None = None  # wq, wk and wv as one product (``fuse``)

    def fuse(self) -> None:
        self.wqkv = Fused([self.wq, self.wk, self.wv])

    def forward(self, x: torch.Tensor, at: CacheIndex, cis: torch.Tensor) -> torch.Tensor:
        """x: the new tokens' hidden states, packed (see CacheIndex.pack); same shape out."""
        assert self.cache_k is not None and self.cache_v is not None, "call setup_caches first"
        B, T = at.shape
        if at.decode is not None and self.wqkv is not None:
            # One new token per row on a CPU (bf16 or float32): the fused projection,
            # then mpllama's kernels for RoPE with the cache writes, and for attention.
            qkv = self.wqkv.product(x.view(B, -1))
            q = rope_write(
                qkv,
                cis.view(B, -1),
                at.write_index.view(B),
                self.cache_k,
                self.cache_v,
                self.n_local_heads,
            )
            out = attend_decode(q, self.cache_k, self.cache_v, at.decode)
            return self.wo(out.view(B, T, -1))
        # The projections run on the real tokens only; attention wants [B,T,...] rows.
        if self.wqkv is not None:
            xq, xk, xv = self.wqkv(x)
        else:
            xq, xk, xv = self.wq(x), self.wk(x), self.wv(x)
        q = at.unpack(xq).view(B, T, self.n_local_heads, self.head_dim)
        k = at.unpack(xk).view(B, T, self.n_local_kv_heads, self.head_dim)
        v = at.unpack(xv).view(B, T, self.n_local_kv_heads, self.head_dim)
        q, k = apply_rope(q, cis), apply_rope(k, cis)

        # Each row writes its own positions in its own blocks, so rows can sit at different
        # lengths; padding tokens write to the spare block, which no row ever reads.
        # (Indexing [P,K,D] by [B,T] gives [B,T,K,D].)
        self.cache_k[at.write_index] = k
        self.cache_v[at.write_index] = v
        if at.decode is not None:  # one new token per row, mpllama's CPU kernel (unfused)
            out = attend_decode(q.view(B, -1, self.head_dim), self.cache_k, self.cache_v, at.decode)
            return self.wo(at.pack(out.view(B, T, -1)))
        # Grouped-query attention: each K/V head serves n_heads / n_kv_heads query heads;
        # enable_gqa shares them without materialising repeated copies of the cache.
        gqa = self.n_local_heads != self.n_local_kv_heads
        q = q.transpose(1, 2)  # [B,H,T,D]
        if at.own:  # prompts on a CPU: each row (or rows of one shape) as it runs alone
            assert at.mask is not None
            out = q.new_zeros(q.shape)  # the padding's queries stay zero
            for lo, hi, n, S in at.own:
                k_rows, v_rows = at.view(self.cache_k, lo, hi, S), at.view(self.cache_v, lo, hi, S)
                mask = at.mask[lo:hi, :, :n, :S]
                out[lo:hi, :, :n] = attend(q[lo:hi, :, :n], k_rows, v_rows, mask, gqa)
        elif at.gather is not None:  # every row's positions gathered, one call
            k_rows = self.cache_k[at.gather].transpose(1, 2)  # [B,S,K,D] -> [B,K,S,D]
            v_rows = self.cache_v[at.gather].transpose(1, 2)
            out = attend(q, k_rows, v_rows, at.mask, gqa)
        else:  # evenly spaced rows as one strided view each group, the others one by one
            outs = []
            for lo, hi, S in at.pieces:
                k_rows, v_rows = at.view(self.cache_k, lo, hi, S), at.view(self.cache_v, lo, hi, S)
                # One new token of a row read on its own sees every position it holds.
                mask = None if T == 1 and hi - lo == 1 else at.mask[lo:hi, :, :, :S]
                outs.append(attend(q[lo:hi], k_rows, v_rows, mask, gqa))
            out = outs[0] if len(outs) == 1 else torch.cat(outs)
        return self.wo(at.pack(out.transpose(1, 2).reshape(B, T, -1)))


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, gqa: bool
) -> torch.Tensor:
    """Attention of q [B,H,T,D] over k, v [B,K,S,D] (mask [B,1,T,S], True = may attend).

    SDPA, except for one new token per row in bf16 or fp16 on a CPU: there oneDNN's flash
    kernel runs a single query several times slower than it does in float32 (it is built
    for blocks of queries), while two matrix products with a float32 softmax between them,
    as transformers' eager attention computes it, run faster than either. Float32, GPUs
    and prefill keep SDPA."""
    if q.shape[2] != 1 or q.dtype == torch.float32 or q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    B, H, _, D = q.shape
    K = k.shape[1]
    # Query head h reads KV head h // (H / K), as enable_gqa has it: group them per KV head.
    grouped = q.reshape(B, K, H // K, D)
    scores = torch.matmul(grouped, k.transpose(-1, -2)).float().mul_(D**-0.5)  # [B,K,G,S]
    if mask is not None:
        scores.masked_fill_(~mask[:, :, 0, None, :], float("-inf"))  # [B,1,1,S]
    probs = torch.softmax(scores, dim=-1).to(q.dtype)
    return torch.matmul(probs, v).view(B, H, 1, D)
