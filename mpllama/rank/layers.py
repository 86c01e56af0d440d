"""fairscale's tensor-parallel layers, built for inference: meta weights (assigned at
load, never allocated twice), forwards without bias or autograd, each able to run on a
oneDNN-prepacked weight, and every collective through ``mpllama.rank.dist`` (shared memory
between ranks on one machine, the process group otherwise).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from fairscale.nn.model_parallel.initialize import (
    get_model_parallel_rank,
    get_model_parallel_world_size,
)
from fairscale.nn.model_parallel.layers import (
    ColumnParallelLinear,
    ParallelEmbedding,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from torch import nn

from .cpu_products import OneRowProduct
from .dist import all_gather, all_reduce
from .quant import Int4Weight, Int8Weight
from .vocab_tables import Int4Table, Int8Table

# fairscale 0.4.13 allocates each parallel layer's weight with the legacy torch.Tensor()
# constructor (which ignores the meta device) and, with more than one rank, initialises
# a full-size master weight to copy this rank's slice from. Loading a 70B shard that way
# would allocate and randomise the whole model first. These builders set the attributes
# the layers' forward() reads and give them meta weights instead; fairscale is pinned
# and no longer released, so its attribute names are stable.


def meta_weight(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, device="meta"), requires_grad=False)


def _bare(cls: type[nn.Module], **attrs: object) -> nn.Module:
    layer = cls.__new__(cls)
    nn.Module.__init__(layer)
    for name, value in attrs.items():
        setattr(layer, name, value)
    return layer


def linear(
    x: torch.Tensor,
    weight: torch.Tensor | Int8Weight | Int4Weight,
    one_row: OneRowProduct | None = None,
) -> torch.Tensor:
    """x @ weight.T, with a weight plain, prepacked by ``pack_linears`` or quantized
    (``quant.materialize_quantized``: an object that runs its own kernel). ``one_row``:
    the packed weight's one-row kernel (``cpu_kernels``), for an input of one row, and
    for bf16 of a decode step's few rows."""
    if isinstance(weight, (Int8Weight, Int4Weight)):
        return weight(x)
    if weight.layout == torch._mkldnn:
        if one_row is not None and x.numel() == one_row.inner:
            return one_row(x)
        if one_row is not None and one_row.batches(x):
            return one_row.batched(x)
        return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")
    return F.linear(x, weight)


# fairscale's layers, with forwards for inference only (no bias, no autograd): each may
# run on a prepacked weight, and each collective goes through mpllama.rank.dist, which takes
# shared memory between ranks on one machine and the process group otherwise.


class ColumnLinear(ColumnParallelLinear):
    one_row: OneRowProduct | None = None  # set by Transformer.pack_linears

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = linear(x, self.weight, self.one_row)
        return all_gather(y) if self.gather_output else y


class RowLinear(RowParallelLinear):
    one_row: OneRowProduct | None = None  # set by Transformer.pack_linears

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return all_reduce(linear(x, self.weight, self.one_row))


class Fused(nn.Module):
    """Column-parallel layers that read the same input (q, k and v; w1 and w3) as one
    product: each rank's slices stacked into one weight, the output split back. One
    kernel instead of two or three, on a bigger matrix: at one row a CPU's product is
    bound by reading the weight, and one call reads it closer to the memory's speed."""

    one_row: OneRowProduct | None = None  # set by Transformer.pack_linears

    def __init__(self, parts: list[nn.Module]) -> None:
        super().__init__()
        quantized = [part.__dict__.pop("weight", None) for part in parts]
        if all(isinstance(w, (Int8Weight, Int4Weight)) for w in quantized):
            self.sizes = [w.shape[0] for w in quantized]
            self.weight = type(quantized[0]).cat(quantized)
            return
        weights = [part._parameters.pop("weight") for part in parts]
        self.sizes = [w.shape[0] for w in weights]
        self.weight = nn.Parameter(torch.cat(weights), requires_grad=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.product(x).split(self.sizes, dim=-1)

    def product(self, x: torch.Tensor) -> torch.Tensor:
        """The stacked product, not split: [..., sum(sizes)]."""
        return linear(x, self.weight, self.one_row)


def lookup(tokens: torch.Tensor, table: torch.Tensor | Int8Table | Int4Table) -> torch.Tensor:
    """An embedding's rows for ``tokens``: the table's own type, or float32 from a
    quantized table (``vocab_tables``)."""
    if isinstance(table, (Int8Table, Int4Table)):
        return table.lookup(tokens)
    return F.embedding(tokens, table)


class Embedding(ParallelEmbedding):
    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return all_gather(lookup(tokens, self.weight))


class VocabEmbedding(VocabParallelEmbedding):
    """Each rank holds the rows of its own vocabulary range (a Llama 3 shard's layout):
    it looks up the tokens in its range, zeros the others, and the sum over ranks is
    every token's row (one all-reduce, as one all-gather is for ``Embedding``)."""

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.num_embeddings_per_partition == self.num_embeddings:
            return lookup(tokens, self.weight)
        local = tokens - self.vocab_start_index
        outside = (local < 0) | (local >= self.num_embeddings_per_partition)
        rows = lookup(local.masked_fill(outside, 0), self.weight)
        return all_reduce(rows.masked_fill_(outside[..., None], 0.0))


def onednn_unsupported(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why oneDNN cannot run this rank's linear layers, or None when it can."""
    if device.type != "cpu":
        return f"oneDNN linear layers are for CPU ranks; this one is on {device.type}"
    if not torch.backends.mkldnn.is_available() or not hasattr(
        torch.ops.mkldnn, "_reorder_linear_weight"
    ):
        return "this torch build has no oneDNN (mkldnn) linear kernels"
    if dtype == torch.float32:
        return None
    if dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return None
    return f"oneDNN has no {str(dtype).split('.')[-1]} linear kernel for this CPU"


def column_parallel(in_features: int, out_features: int, gather_output: bool) -> nn.Module:
    per_rank = out_features // get_model_parallel_world_size()
    return _bare(
        ColumnLinear,
        in_features=in_features,
        out_features=out_features,
        gather_output=gather_output,
        output_size_per_partition=per_rank,
        master_weight=None,
        weight=meta_weight(per_rank, in_features),
        bias=None,
    )


def row_parallel(in_features: int, out_features: int) -> nn.Module:
    per_rank = in_features // get_model_parallel_world_size()
    return _bare(
        RowLinear,
        in_features=in_features,
        out_features=out_features,
        input_is_parallel=True,
        input_size_per_partition=per_rank,
        master_weight=None,
        weight=meta_weight(out_features, per_rank),
        bias=None,
    )


def parallel_embedding(num_embeddings: int, embedding_dim: int, axis: int = 1) -> nn.Module:
    """The embedding split on ``axis``: 1, by model dimension (Llama 1/2 shards), or 0, by
    vocabulary (Llama 3 shards), so a rank's slice is its shard's as stored."""
    world = get_model_parallel_world_size()
    common = {
        "num_embeddings": num_embeddings,
        "embedding_dim": embedding_dim,
        "padding_idx": None,
        "max_norm": None,
        "norm_type": 2.0,
        "scale_grad_by_freq": False,
        "sparse": False,
        "_weight": None,
    }
    if axis == 0:
        per_rank = num_embeddings // world
        start = get_model_parallel_rank() * per_rank
        return _bare(
            VocabEmbedding,
            **common,
            vocab_start_index=start,
            vocab_end_index=start + per_rank,
            num_embeddings_per_partition=per_rank,
            weight=meta_weight(per_rank, embedding_dim),
        )
    per_rank = embedding_dim // world
    return _bare(
        Embedding,
        **common,
        embedding_dim_per_partition=per_rank,
        weight=meta_weight(num_embeddings, per_rank),
    )
