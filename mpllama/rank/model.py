"""The LLaMA transformer (Meta's architecture) on fairscale's tensor-parallel layers.

Pure model code: no device strings, no files, no Ray, no sampling. The model is built on
the meta device and its weights are assigned from a loaded state dict (``materialize``),
so a rank never allocates a weight it is about to overwrite.

Shapes in comments: B batch rows, T new tokens this call, S cached positions, H local
heads, K local key/value heads, D head size, V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..model_args import ModelArgs
from . import cpu_kernels
from .attention import Attention
from .cpu_kernels import (
    Segments,
    add_rmsnorm,
    decode_attention_fits,
    silu_mul,
)
from .cpu_products import Float32Product, float32_product, one_row_product
from .dist import gather_to_lead
from .kv_layout import CacheIndex, decode_positions
from .layers import (
    ColumnLinear,
    Fused,
    RowLinear,
    column_parallel,
    meta_weight,
    parallel_embedding,
    row_parallel,
)
from .quant import Int4Weight, Int8Weight, quantized_bytes
from .rope import rope_table
from .row_decode import RowDecoder
from .vocab_tables import Int8Table, shared_table

# A call per row (CPU attention reading each row on its own) costs about what reading
# this many bytes of KV cache does; see Transformer.forward.
ROW_CALL_BYTES = 256 << 10


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = meta_weight(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: the float32 residual stream (Transformer.forward); out in the weights' type,
        the normalised row rounded to it before the scale, as Meta's RMSNorm rounds."""
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.to(self.weight.dtype) * self.weight


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.w1 = column_parallel(args.dim, args.ffn_dim, gather_output=False)
        self.w2 = row_parallel(args.ffn_dim, args.dim)
        self.w3 = column_parallel(args.dim, args.ffn_dim, gather_output=False)
        self.w13: Fused | None = None  # w1 and w3 as one product (``fuse``)

    def fuse(self) -> None:
        self.w13 = Fused([self.w1, self.w3])

    def forward(self, x: torch.Tensor, fused: bool = False) -> torch.Tensor:
        if fused and self.w13 is not None:  # see TransformerBlock.fused
            return self.w2(silu_mul(self.w13.product(x)))
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

    def fused(
        self, x: torch.Tensor, delta: torch.Tensor | None, at: CacheIndex, cis: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``forward`` on a CPU with mpllama's kernels (bf16 or float32; see
        ``Transformer.fused_layers``): the norms with the residual adds before them and
        the FFN's activation each one call of mpllama's kernels (cpu_kernels), where torch
        takes several ops each. ``delta``, the previous layer's feed-forward output, is
        added into x by this layer's first norm; returns (h, this layer's feed-forward
        output), whose sum is the layer's output, without a torch add a layer."""
        norm1, norm2 = self.attention_norm, self.ffn_norm
        x, normed = add_rmsnorm(x, delta, norm1.weight, norm1.eps)
        h, normed = add_rmsnorm(x, self.attention(normed, at, cis), norm2.weight, norm2.eps)
        return h, self.feed_forward(normed, fused=True)


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
        self.num_blocks = self.block_size = self.max_seq_len = self.slots = self.per_slot = 0
        # The bf16 output layer's product with float32 logits, where mpllama's CPU
        # kernels run (``pack_linears``): bf16 logits would leave near-ties to rounding.
        self.logits32: Float32Product | None = None
        # Layers on mpllama's fused CPU kernels (``_fused_layers``, set once the weights
        # are packed), and a decode step's rows as two C calls a layer (row_decode,
        # made once they are packed and the caches set up), where they can run.
        self.fused_layers = False
        self.row_decoder: RowDecoder | None = None

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The model's dtype: its norms', which any quantization leaves as they are."""
        return self.norm.weight.dtype

    def setup_caches(self, num_blocks: int, block_size: int, max_seq_len: int) -> None:
        """Allocate a KV cache of ``num_blocks`` blocks of ``block_size`` positions (plus
        one spare block that takes padding writes) and the RoPE tables for positions up to
        ``max_seq_len``, on the weights' device and dtype."""
        weight = self.norm.weight
        if weight.is_meta:
            raise RuntimeError("materialize() the weights before setup_caches()")
        for layer in self.layers:
            attn = layer.attention
            shape = ((num_blocks + 1) * block_size, attn.n_local_kv_heads, attn.head_dim)
            # Zeros, not empty: a batched read spans other rows' positions (masked), and
            # garbage there could be NaN, which a mask does not cancel.
            attn.cache_k = torch.zeros(shape, device=weight.device, dtype=weight.dtype)
            attn.cache_v = torch.zeros(shape, device=weight.device, dtype=weight.dtype)
        args = self.args
        self.rope = rope_table(
            args.head_dim, max_seq_len, args.rope_theta, weight.device, args.rope_scaling_factor
        )
        self.num_blocks, self.block_size, self.max_seq_len = num_blocks, block_size, max_seq_len
        self.slots = 0  # see setup_slots
        self.row_decoder = RowDecoder.build(self)

    def setup_slots(self, slots: int, max_seq_len: int, block_size: int = 16) -> None:
        """A cache of ``slots`` fixed regions of ``max_seq_len`` positions, for callers
        without a block manager (one-off generation, tests, benchmarks): row i of a
        forward passes ``slot_runs`` of its slot."""
        per_slot = -(-max_seq_len // block_size)
        self.setup_caches(slots * per_slot, block_size, max_seq_len)
        self.slots, self.per_slot = slots, per_slot

    def slot_runs(self, slots: torch.Tensor | list[int]) -> list[list[tuple[int, int]]]:
        """The runs of each slot's region (see ``setup_slots``)."""
        ids = slots.tolist() if isinstance(slots, torch.Tensor) else slots
        return [[(s * self.per_slot, self.per_slot)] for s in ids]

    def pack_linears(self, onednn: bool = True) -> None:
        """Stack the products that read one input (q, k, v; w1, w3) into one weight each,
        then re-lay every linear weight once in oneDNN's blocked layout, so each product
        runs oneDNN's kernel on a ready weight (CPU only; see ``onednn_unsupported``).
        Where measured, torch's default CPU product (MKL sgemm, even with MKL's own packed
        weights) runs several times slower at every batch size (benchmarks/RESULTS.md,
        "Figures behind the code"). The packed copies replace the weights: no memory grows.

        Quantized weights (``quant.materialize_quantized``) are laid out for their own
        kernel; ``onednn=False`` leaves the float weights (embedding aside, the output
        layer) as they are, for a quantized rank whose dtype oneDNN cannot run."""
        for layer in self.layers:
            layer.attention.fuse()
            layer.feed_forward.fuse()
        dtype = self.dtype
        for module in self.modules():
            quantized = module.__dict__.get("weight")
            if isinstance(quantized, (Int8Weight, Int4Weight)):
                quantized.pack(dtype)
            # The layers fused into a ``Fused`` hold no weight of their own any more.
            elif (
                onednn
                and isinstance(module, (ColumnLinear, RowLinear, Fused))
                and "weight" in module._parameters
            ):
                weight = module._parameters.pop("weight")
                packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach())
                module.register_buffer("weight", packed)
                module.one_row = one_row_product(packed)
        self.share_vocabulary()
        self.logits32 = float32_product(self.output.one_row)
        self.fused_layers = self._fused_layers()
        self.row_decoder = RowDecoder.build(self)

    def share_vocabulary(self) -> None:
        """A tied embedding (Llama 3.2 1B and 3B: the checkpoint stores the output
        layer's matrix again as the embedding) in int8 reads its rows from the output
        layer's packed weight instead of holding its own (``vocab_tables.shared_table``)."""
        table, output = self.tok_embeddings.weight, self.output.weight
        if isinstance(table, Int8Table) and isinstance(output, Int8Weight):
            shared = shared_table(table, output)
            if shared is not None:
                self.tok_embeddings.weight = shared

    def _fused_layers(self) -> bool:
        """Whether every forward runs its layers through ``TransformerBlock.fused``:
        mpllama's CPU kernels built, bf16 or float32 weights on the CPU, the products
        fused (``pack_linears``)."""
        return (
            self.device.type == "cpu"
            and self.dtype in (torch.bfloat16, torch.float32)
            and cpu_kernels.library() is not None
            and all(layer.feed_forward.w13 is not None for layer in self.layers)
        )

    def batched_read_pays(self, ends: list[int]) -> bool:
        """Whether rows that could be read as one strided view should be: one batched
        attention reads every row up to the longest, and on a CPU attention is bound by
        the bytes it reads; reading each row up to its own end saves the padding for the
        cost of a call per row, which costs about what reading ``ROW_CALL_BYTES`` does
        (benchmarks/RESULTS.md, "Figures behind the code"). GPUs keep the one batched call."""
        if self.device.type != "cpu" or len(ends) == 1:
            return True
        wasted = (max(ends) * len(ends) - sum(ends)) * self._kv_position_bytes()
        return wasted <= len(ends) * ROW_CALL_BYTES

    def gather_pays(self, S: int) -> bool:
        """Whether copying every row's KV up to S into one batch (written, then read
        again) costs less than a call per row on views: on a CPU, only for short rows
        of small models; a GPU always gathers."""
        if self.device.type != "cpu":
            return True
        return 2 * S * self._kv_position_bytes() <= ROW_CALL_BYTES

    def _decode_kernel_fits(self) -> bool:
        attn = self.layers[0].attention
        assert attn.cache_k is not None
        return decode_attention_fits(attn.n_local_heads, attn.cache_k)

    def weight_bytes(self) -> int:
        """Bytes of every weight this rank holds: quantized ones at their stored size
        (scales included), packed ones as packed, the KV cache and RoPE tables aside."""
        total = quantized_bytes(self)
        for t in (*self.parameters(), *self.buffers()):
            mkldnn = t.layout == torch._mkldnn
            total += torch.ops.mkldnn._nbytes(t) if mkldnn else t.numel() * t.element_size()
        return total

    def kv_cache_bytes(self) -> int:
        """Bytes of this rank's KV cache (0 before ``setup_caches``)."""
        caches = [(a.cache_k, a.cache_v) for a in (layer.attention for layer in self.layers)]
        return sum(c.numel() * c.element_size() for kv in caches for c in kv if c is not None)

    def _kv_position_bytes(self) -> int:
        """Bytes of K and V one position holds in one layer of this rank's cache."""
        attn = self.layers[0].attention
        assert attn.cache_k is not None
        return 2 * attn.n_local_kv_heads * attn.head_dim * attn.cache_k.element_size()

    @torch.inference_mode()
    def forward(
        self,
        tokens: torch.Tensor,
        start_pos: torch.Tensor,
        runs: list[list[tuple[int, int]]],
        lengths: torch.Tensor | None = None,
        logits_at: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """Run up to T new tokens per row against that row's KV blocks; float32 logits on
        the lead rank (rank 0), None on the others.

        tokens [B,T]; start_pos [B], each row's first new position (what its blocks
        already hold); runs, per row, its blocks in logical order as (first physical
        block, count) runs of consecutive blocks, covering at least every position it
        reads or writes this call; lengths [B] (optional), how many of the T tokens are
        real, the rest padding (default: all T); logits_at [B] (optional), the one index
        in 0..T-1 per row whose logits are wanted. Returns [B,T,V], or [B,V] with
        ``logits_at``.
        """
        B, T = tokens.shape
        if T == 1 and lengths is None and self._decodes(B):
            logits = self._decode_rows(tokens[:, 0].tolist(), start_pos.tolist(), runs)
            return logits if logits is None or logits_at is not None else logits[:, None]
        device = tokens.device
        steps = torch.arange(T, device=device)
        positions = start_pos[:, None] + steps  # [B,T]
        real = None if lengths is None else steps < lengths[:, None]  # [B,T]
        if real is not None:
            positions = torch.where(real, positions, 0)
        starts = start_pos.tolist()
        news = [T] * B if lengths is None else lengths.tolist()
        ends = [s + n for s, n in zip(starts, news, strict=True)]
        S = max(ends)
        if S > self.max_seq_len:
            raise ValueError(f"a row reaches position {S - 1}, past max_seq_len {self.max_seq_len}")
        packed = None
        if real is not None and not bool(real.all()):
            packed = real.view(-1).nonzero().squeeze(1)
        at = CacheIndex.build(
            (B, T),
            packed,
            runs,
            starts,
            ends,
            positions,
            real,
            self.block_size,
            self.num_blocks,
            device,
        )
        if T == 1 and packed is None and self._decode_kernel_fits():
            # One new token per row on a CPU (bf16 or float32): every row's segments in
            # one call per layer (cpu_kernels.attend_decode), whatever blocks they sit in.
            at.decode = Segments.of(at.segments)
        else:
            if T > 1 and device.type == "cpu":
                # Prompts on a CPU: each row's attention the call it makes alone, so its
                # result does not depend on the prompts beside it (``own_pieces``).
                at.own = at.own_pieces()
            else:
                # Evenly spaced rows read as one view where the padding costs less than a
                # call per row; rows that are not, at lengths close enough, are gathered
                # into one batch where that costs less than a call per row (always, on a
                # GPU).
                at.pieces = at.read_pieces(self.batched_read_pays)
                if len(at.pieces) > 1 and self.batched_read_pays(ends) and self.gather_pays(S):
                    at.gather = at.gather_index(S, device)
            if len(at.pieces) < B or at.gather is not None or T > 1:
                # A query at position p sees keys at positions <= p of its row: [B,1,T,S].
                at.mask = (torch.arange(S, device=device) <= positions[:, :, None])[:, None]
        cis = self.rope[positions]  # [B,T,D/2]
        # The residual stream is float32 whatever the weights' type (as llama.cpp keeps
        # it): the layers' products and the KV cache take bf16, but summing each layer's
        # output into a bf16 stream rounds it 2 x n_layers times, and on the demo model
        # that alone parted bf16's greedy tokens from float32's at 90.7%, against 96.6%
        # with the stream in float32 (benchmarks/RESULTS.md, "Figures behind the code").
        h = at.pack(self.tok_embeddings(tokens)).float()
        fused = at.decode is not None or self.fused_layers  # mpllama's CPU kernels run
        if fused:
            delta = None  # each layer's feed-forward output, added in by the next layer
            for layer in self.layers:
                h, delta = layer.fused(h, delta, at, cis)
            h = h + delta
        else:
            for layer in self.layers:
                h = layer(h, at, cis)
        h = at.unpack(h)  # [B,T,dim]
        if logits_at is not None:
            h = h[torch.arange(B, device=h.device), logits_at]  # [B,dim]
        if fused:  # the final norm in one C call too, not six torch ops (about 0.1 ms)
            _, h = add_rmsnorm(h, None, self.norm.weight, self.norm.eps)
        else:
            h = self.norm(h)
        return self._logits(h)

    def _decodes(self, B: int) -> bool:
        """Whether a step of one new token for each of B rows runs ``decode``'s path: the
        row decoder, which ``setup_caches`` builds only where its kernels take the caches
        (``_decode_kernel_fits``), takes B rows."""
        decoder = self.row_decoder
        return decoder is not None and B <= decoder.most_rows

    @torch.inference_mode()
    def decode(
        self, tokens: list[int], starts: list[int], runs: list[list[tuple[int, int]]]
    ) -> torch.Tensor | None:
        """One new token per row, ``tokens[i]`` at position ``starts[i]`` of row i (its
        blocks ``runs[i]``, as ``forward`` takes them): float32 logits [B, V] on the lead
        rank, None on the others, bit for bit ``forward``'s at ``logits_at`` 0.

        Where the row decoder runs (``_decodes``): each layer two C calls, the final norm
        one more, and no more Python around them than the step needs: forward's general
        plan (the cache index's tensors, padding, masks, the logits' row) measured about
        25 us of a 4 ms batch-1 int8 step of the bench model. Elsewhere, ``forward``."""
        B = len(tokens)
        if not self._decodes(B):
            return self(
                torch.tensor(tokens, device=self.device)[:, None],
                torch.tensor(starts, device=self.device),
                runs,
                logits_at=torch.zeros(B, dtype=torch.long, device=self.device),
            )
        return self._decode_rows(tokens, starts, runs)

    def _decode_rows(
        self, tokens: list[int], starts: list[int], runs: list[list[tuple[int, int]]]
    ) -> torch.Tensor | None:
        """``decode`` through the row decoder (``_decodes`` already said it runs)."""
        if max(starts) >= self.max_seq_len:
            raise ValueError(
                f"a row reaches position {max(starts)}, past max_seq_len {self.max_seq_len}"
            )
        segments, writes = decode_positions(runs, starts, self.block_size)
        assert self.row_decoder is not None
        h = self.row_decoder(
            self.tok_embeddings(torch.tensor(tokens)).float(),
            self.rope[torch.tensor(starts)],
            torch.tensor(writes),
            Segments.of(segments),
            self.norm,
        )
        return self._logits(h)

    def _logits(self, h: torch.Tensor) -> torch.Tensor | None:
        """Float32 logits of the normed rows h [..., dim], gathered on the lead."""
        if self.logits32 is not None:
            logits = self.logits32(h)
        elif isinstance(self.output.weight, Int8Weight):
            # float32 logits, as logits32 gives: bf16's rounding would decide near-ties.
            # The rows quantize the same from float32 (their values are bf16's).
            logits = self.output(h.float())
        else:
            logits = self.output(h)
        logits = gather_to_lead(logits)
        return None if logits is None else logits.float()


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
