"""The LLaMA transformer (Meta's architecture) on fairscale's tensor-parallel layers.

Pure model code: no device strings, no files, no Ray, no sampling. The model is built on
the meta device and its weights are assigned from a loaded state dict (``materialize``),
so a rank never allocates a weight it is about to overwrite.

Shapes in comments: B batch rows, T new tokens this call, S cached positions, H local
heads, K local key/value heads, D head size, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from fairscale.nn.model_parallel.initialize import get_model_parallel_world_size
from torch import nn

from .dist import gather_to_lead
from .layers import (
    ColumnLinear,
    Fused,
    RowLinear,
    column_parallel,
    meta_weight,
    parallel_embedding,
    row_parallel,
)
from ..model_args import ModelArgs
from .rope import apply_rope, rope_table

# A call per row (CPU attention reading each row on its own) costs about what reading
# this many bytes of KV cache does; see Transformer._row_ends.
ROW_CALL_BYTES = 256 << 10


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = meta_weight(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 whatever the model dtype: fp16 squares overflow.
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


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
        # [slots + 1 spare, K, S_max, D]: a slot's keys up to S are a view in the layout
        # attention wants, so decoding never copies the cache.
        self.cache_k: torch.Tensor | None = None
        self.cache_v: torch.Tensor | None = None
        self.wqkv: Fused | None = None  # wq, wk and wv as one product (``fuse``)

    def fuse(self) -> None:
        self.wqkv = Fused([self.wq, self.wk, self.wv])

    def forward(self, x: torch.Tensor, at: CacheIndex, cis: torch.Tensor) -> torch.Tensor:
        """x: the new tokens' hidden states, packed (see CacheIndex.pack); same shape out."""
        assert self.cache_k is not None and self.cache_v is not None, "call setup_caches first"
        B, T = at.shape
        # The projections run on the real tokens only; attention wants [B,T,...] rows.
        if self.wqkv is not None:
            xq, xk, xv = self.wqkv(x)
        else:
            xq, xk, xv = self.wq(x), self.wk(x), self.wv(x)
        q = at.unpack(xq).view(B, T, self.n_local_heads, self.head_dim)
        k = at.unpack(xk).view(B, T, self.n_local_kv_heads, self.head_dim)
        v = at.unpack(xv).view(B, T, self.n_local_kv_heads, self.head_dim)
        q, k = apply_rope(q, cis), apply_rope(k, cis)

        # Each row writes its own slot at its own positions, so rows can sit at different
        # lengths; padding tokens write to the spare slot, which no row ever reads.
        # (Indexing [B,T] x : x [B,T] puts the indexed dims first: k is [B,T,K,D].)
        self.cache_k[at.write_slots, :, at.write_pos] = k
        self.cache_v[at.write_slots, :, at.write_pos] = v
        # Grouped-query attention: each K/V head serves n_heads / n_kv_heads query heads;
        # enable_gqa shares them without materialising repeated copies of the cache.
        gqa = self.n_local_heads != self.n_local_kv_heads
        q = q.transpose(1, 2)  # [B,H,T,D]
        if at.row_ends is None:
            out = attend(
                q,
                at.read(self.cache_k),  # [B,K,S,D]
                at.read(self.cache_v),
                at.mask,
                gqa,
            )
        else:  # each row reads its own positions only (see CacheIndex.row_ends)
            out = torch.cat(
                [
                    attend(
                        q[i : i + 1],
                        self.cache_k[slot, :, :end].unsqueeze(0),
                        self.cache_v[slot, :, :end].unsqueeze(0),
                        # One new token sees every position its slot holds.
                        None if T == 1 else at.mask[i : i + 1, :, :, :end],
                        gqa,
                    )
                    for i, (slot, end) in enumerate(at.row_ends)
                ]
            )
        return self.wo(at.pack(out.transpose(1, 2).reshape(B, T, -1)))


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.w1 = column_parallel(args.dim, args.ffn_dim, gather_output=False)
        self.w2 = row_parallel(args.ffn_dim, args.dim)
        self.w3 = column_parallel(args.dim, args.ffn_dim, gather_output=False)
        self.w13: Fused | None = None  # w1 and w3 as one product (``fuse``)

    def fuse(self) -> None:
        self.w13 = Fused([self.w1, self.w3])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x) if self.w13 is not None else (self.w1(x), self.w3(x))
        return self.w2(F.silu(gate) * up)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x: torch.Tensor, at: CacheIndex, cis: torch.Tensor) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), at, cis)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """Built on the meta device; ``materialize`` gives it weights, ``setup_caches`` a cache.

    Needs fairscale's model-parallel state to be initialised (world size 1 included).
    ``embed_axis`` is the embedding's split, the checkpoint's
    (``checkpoint.detect_embedding_axis``): 1 by model dimension, 0 by vocabulary.
    """

    def __init__(self, args: ModelArgs, embed_axis: int = 1) -> None:
        super().__init__()
        if args.vocab_size < 1:
            raise ValueError("ModelArgs.vocab_size must be resolved (take the tokenizer's)")
        self.args = args
        self.tok_embeddings = parallel_embedding(args.vocab_size, args.dim, embed_axis)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        # Each rank computes its vocabulary slice; only the lead, which samples, gathers
        # the [B, V] logits (see forward).
        self.output = column_parallel(args.dim, args.vocab_size, gather_output=False)
        self.slots = 0
        self.max_seq_len = 0

    @property
    def device(self) -> torch.device:
        return self.output.weight.device

    def setup_caches(self, slots: int, max_seq_len: int) -> None:
        """Allocate ``slots`` KV-cache slots of ``max_seq_len`` positions each (plus one
        spare slot that takes padding writes) and the RoPE tables, on the weights' device
        and dtype."""
        weight = self.output.weight
        if weight.is_meta:
            raise RuntimeError("materialize() the weights before setup_caches()")
        for layer in self.layers:
            attn = layer.attention
            shape = (slots + 1, attn.n_local_kv_heads, max_seq_len, attn.head_dim)
            attn.cache_k = torch.zeros(shape, device=weight.device, dtype=weight.dtype)
            attn.cache_v = torch.zeros(shape, device=weight.device, dtype=weight.dtype)
        args = self.args
        self.rope = rope_table(
            args.head_dim, max_seq_len, args.rope_theta, weight.device, args.rope_scaling_factor
        )
        self.slots, self.max_seq_len = slots, max_seq_len

    def pack_linears(self) -> None:
        """Stack the products that read one input (q, k, v; w1, w3) into one weight each,
        then re-lay every linear weight once in oneDNN's blocked layout, so each product
        runs oneDNN's kernel on a ready weight (CPU only; see ``onednn_unsupported``).
        On the AMD EPYC this project is measured on, torch's default CPU product (MKL
        sgemm, even with MKL's own packed weights) runs 2.5-3x slower at every batch
        size from 1 to 512 rows. The packed copies replace the weights: no memory grows."""
        for layer in self.layers:
            layer.attention.fuse()
            layer.feed_forward.fuse()
        for module in self.modules():
            # The layers fused into a ``Fused`` hold no weight of their own any more.
            if isinstance(module, (ColumnLinear, RowLinear, Fused)) and "weight" in (
                module._parameters
            ):
                weight = module._parameters.pop("weight")
                module.register_buffer(
                    "weight", torch.ops.mkldnn._reorder_linear_weight(weight.detach())
                )

    def _row_ends(
        self, slots: torch.Tensor, ends: torch.Tensor, S: int
    ) -> list[tuple[int, int]] | None:
        """[(slot, end)] per row when attention should read each row on its own.

        One batched attention reads every row's cache up to the longest row (S); rows
        at different lengths (the rule under continuous batching) make it read padding.
        On a CPU, attention is bound by those bytes, and reading each row up to its own
        end saves them for the cost of a call per row (about 13 us here, on the order of
        reading 256 KiB). Measured on a 2-core EPYC, 32 decode rows at lengths 20-300,
        16 heads of 64: 2.2 ms a layer instead of 3.4. GPUs keep the one batched call.
        """
        if self.device.type != "cpu" or ends.shape[0] == 1:
            return None
        attn = self.layers[0].attention
        per_position = 2 * attn.n_local_kv_heads * attn.head_dim * attn.cache_k.element_size()
        ends_list = ends.tolist()
        wasted = (S * len(ends_list) - sum(ends_list)) * per_position
        if wasted <= len(ends_list) * ROW_CALL_BYTES:
            return None
        return list(zip(slots.tolist(), ends_list, strict=True))

    @torch.inference_mode()
    def forward(
        self,
        tokens: torch.Tensor,
        slots: torch.Tensor,
        start_pos: torch.Tensor,
        lengths: torch.Tensor | None = None,
        logits_at: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """Run up to T new tokens per row against that row's cache slot; float32 logits
        on the lead rank (rank 0), None on the others.

        tokens [B,T]; slots [B], the cache slot of each row (distinct); start_pos [B], each
        row's first new position (what its slot already holds); lengths [B] (optional),
        how many of the T tokens are real, the rest padding (default: all T); logits_at
        [B] (optional), the one index in 0..T-1 per row whose logits are wanted.
        Returns [B,T,V], or [B,V] with ``logits_at``.
        """
        B, T = tokens.shape
        device = tokens.device
        steps = torch.arange(T, device=device)
        positions = start_pos[:, None] + steps  # [B,T]
        real = None if lengths is None else steps < lengths[:, None]  # [B,T]
        if real is not None:
            # Padding never reaches past the cache: park it at position 0 of the spare slot.
            positions = torch.where(real, positions, 0)
        ends = positions.max(dim=1).values + 1  # [B]: positions each row reads
        S = int(ends.max())
        if B > self.slots or S > self.max_seq_len:
            raise ValueError(
                f"{B} row(s) up to position {S - 1} exceed the cache of {self.slots} slot(s) "
                f"x {self.max_seq_len} positions"
            )
        write_slots = slots[:, None].expand(B, T)
        packed = None
        if real is not None:
            write_slots = torch.where(real, write_slots, self.slots)
            if not bool(real.all()):
                packed = real.view(-1).nonzero().squeeze(1)
        at = CacheIndex(
            (B, T),
            packed,
            write_slots,
            positions,
            _slot_range(slots),
            slots,
            S,
            # A query at position p sees keys at positions <= p of its own slot: [B,1,T,S].
            (torch.arange(S, device=device) <= positions[:, :, None])[:, None],
            self._row_ends(slots, ends, S),
        )
        cis = self.rope[positions]  # [B,T,D/2]
        h = at.pack(self.tok_embeddings(tokens))
        for layer in self.layers:
            h = layer(h, at, cis)
        h = at.unpack(h)  # [B,T,dim]
        if logits_at is not None:
            h = h[torch.arange(B, device=h.device), logits_at]  # [B,dim]
        logits = gather_to_lead(self.output(self.norm(h)))
        return None if logits is None else logits.float()


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


@dataclass
class CacheIndex:
    """Where one forward's tokens sit, and where they go in every layer's KV cache."""

    shape: tuple[int, int]  # B rows of T tokens, padding included
    # Flat indices (in B*T) of the real tokens when some are padding: the projections
    # and the FFN, which cost nearly all the FLOPs, run on those alone.
    packed: torch.Tensor | None
    write_slots: torch.Tensor  # [B,T] slot of each new token (the spare slot for padding)
    write_pos: torch.Tensor  # [B,T] position of each new token
    slot_range: tuple[int, int] | None  # (first, end) when the rows' slots are consecutive
    slots: torch.Tensor  # [B]
    S: int  # positions to read: 0..S-1
    mask: torch.Tensor  # [B,1,T,S] True where a query may attend
    # (slot, end) per row when attention reads each row up to its own end, not up to S.
    row_ends: list[tuple[int, int]] | None = None

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """[B,T,F] -> the real tokens, [N,F] (or [B,T,F] as it is when none is padding)."""
        if self.packed is None:
            return x
        return x.reshape(-1, x.shape[-1])[self.packed]

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """The inverse of ``pack``: [N,F] -> [B,T,F], zeros where the padding was."""
        if self.packed is None:
            return x
        B, T = self.shape
        out = x.new_zeros(B * T, x.shape[-1])
        out[self.packed] = x
        return out.view(B, T, -1)

    def read(self, cache: torch.Tensor) -> torch.Tensor:
        """[B,K,S,D]: each row's slot up to S. Consecutive slots (the common case: the
        scheduler hands out the lowest free slots and lists rows in slot order) are a
        view, not a copy."""
        if self.slot_range is not None:
            return cache[self.slot_range[0] : self.slot_range[1], :, : self.S]
        return cache[self.slots, :, : self.S]


def _slot_range(slots: torch.Tensor) -> tuple[int, int] | None:
    first = int(slots[0])
    B = slots.shape[0]
    if torch.equal(slots, torch.arange(first, first + B, device=slots.device)):
        return first, first + B
    return None


def materialize(
    model: Transformer, state: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype
) -> Transformer:
    """Assign loaded weights into a meta-built model, moving only what must move.

    Tensors already on ``device`` in ``dtype`` (e.g. memory-mapped shards) are used as
    they are, so nothing is allocated twice. Keys must match exactly.
    """
    moved = {k: v.to(device=device, dtype=dtype) for k, v in state.items()}
    model.load_state_dict(moved, strict=True, assign=True)
    return model.eval()
