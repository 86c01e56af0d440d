"""The vocabulary's embedding table in a quantized rank (``Quantization.vocab`` and
``embedding``): int8 rows with a scale per row and group (``Int8Table``), int4 rows as
the layers' weights store them (``Int4Table``), and a tied table read from the output
layer's packed int8 weight (``SharedInt8Table``, ``shared_table``). Each is looked up,
never multiplied: rows by token id, in float32, by one C call on the CPU. The quantized
linear weights and the load-time swap that builds these are rank/quant.py's."""

from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .cpu_kernels import library
from .cpu_products import BLOCK, Int8OneRow
from .quantize import dequantize_int4

if TYPE_CHECKING:
    from .quant import Int8Weight


def _lookup_in_c(
    kernel: str, table: torch.Tensor, scales: torch.Tensor, ids: torch.Tensor, dim: int, group: int
) -> torch.Tensor | None:
    """Rows ``ids`` of a quantized table by mpllama's C ``kernel`` (``lookup_int8``: group
    = scale groups a row; ``lookup_int4``: group = values a group): [..., dim] float32, or
    None where the kernels cannot run."""
    lib = library()
    if lib is None:
        return None
    ids = ids.contiguous()
    out = torch.empty(*ids.shape, dim)
    getattr(lib, kernel)(
        table.data_ptr(), scales.data_ptr(), ids.data_ptr(), ids.numel(), dim, group, out.data_ptr()
    )
    return out


class Int8Table:
    """An embedding table in int8 (``Quantization.vocab``): q [rows, dim] with float32
    scales [rows, G], one per row and each of G equal runs of its dim (an embedding split
    by model dimension is quantized per shard). Looked up row by row, in float32."""

    def __init__(self, q: torch.Tensor, scales: torch.Tensor) -> None:
        assert q.dtype == torch.int8 and q.shape[1] % scales.shape[1] == 0
        self.q, self.scales = q.contiguous(), scales.float().contiguous()
        self.shape = tuple(q.shape)

    @property
    def device(self) -> torch.device:
        return self.q.device

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """The rows ``ids`` [...] name, dequantized: [..., dim] float32. On the CPU one C
        call (``lookup_int8``): the torch form's five ops cost about 0.1 ms of a batch-1
        int8 step, cold after the weights' stream. The same values either way."""
        groups = self.scales.shape[1]
        if self.device.type == "cpu":
            out = _lookup_in_c("lookup_int8", self.q, self.scales, ids, self.shape[1], groups)
            if out is not None:
                return out
        q = F.embedding(ids, self.q).float().unflatten(-1, (groups, -1))
        return (q * F.embedding(ids, self.scales)[..., None]).flatten(-2)

    def nbytes(self) -> int:
        return self.q.numel() + self.scales.numel() * 4


class Int4Table:
    """An embedding table in int4 (``Quantization.embedding``), stored as the layers'
    weights are (``quantize_int4``): packed uint8 [rows, dim/2] and bf16 scale and zero
    [rows, dim/group_size, 2]. Looked up row by row, in float32: the values
    ``Int4Weight.dequantize`` gives those rows."""

    def __init__(self, packed: torch.Tensor, scales: torch.Tensor) -> None:
        assert packed.dtype == torch.uint8 and scales.dtype == torch.bfloat16
        self.packed, self.scales = packed.contiguous(), scales.contiguous()
        self.shape = (packed.shape[0], packed.shape[1] * 2)
        self.group_size = self.shape[1] // scales.shape[1]

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """The rows ``ids`` [...] name, dequantized: [..., dim] float32. On the CPU one C
        call (``lookup_int4``): the torch form's ten ops took 36 us for one row of Llama
        3's table, the C call 3.5 (RESULTS.md, session 14). The same values either way."""
        if self.device.type == "cpu":
            out = _lookup_in_c(
                "lookup_int4", self.packed, self.scales, ids, self.shape[1], self.group_size
            )
            if out is not None:
                return out
        flat = ids.reshape(-1)
        rows = dequantize_int4(F.embedding(flat, self.packed), self.scales[flat])
        return rows.reshape(*ids.shape, self.shape[1])

    def nbytes(self) -> int:
        return self.packed.numel() + self.scales.numel() * self.scales.element_size()


class SharedInt8Table(Int8Table):
    """A tied vocabulary table read from the output layer (``shared_table``): Llama 3.2
    1B and 3B store one matrix twice, as ``tok_embeddings`` and ``output``, and their int8
    tables are the same bytes, so the embedding looks its rows up in the weight the output
    layer's one-row kernel reads (``Int8OneRow``: oneDNN's [N/64][K/4][64][4] int8,
    ``cpu_kernels.c``'s ``gemv_int8``) instead of holding its own copy: 263 MB less on
    each rank of Llama 3.2 1B, 394 on 3B. The same values as the table it replaces
    (checked row for row when made)."""

    def __init__(self, one_row: Int8OneRow, rows: int) -> None:
        padded, inner = one_row.rows, one_row.inner
        buffer = (ctypes.c_int8 * (padded * inner)).from_address(one_row.pointers[0])
        self._one_row = one_row  # holds the packed weight the view reads
        self._buffer = buffer
        self._blocks = torch.frombuffer(buffer, dtype=torch.int8).view(
            padded // BLOCK, inner // 4, BLOCK, 4
        )
        self.scales = one_row.scales[0, :rows, None]  # a view: [rows, 1] float32
        self.shape = (rows, inner)

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """The int8 rows ``ids`` [n] name: [n, dim]."""
        return self._blocks[ids // BLOCK, :, ids % BLOCK].reshape(len(ids), self.shape[1])

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        return (self.rows(flat).float() * self.scales[flat]).reshape(*ids.shape, self.shape[1])

    def nbytes(self) -> int:
        return 0  # the output layer's weight, counted there


def shared_table(table: Int8Table, output: Int8Weight) -> SharedInt8Table | None:
    """``table`` read from ``output``'s packed weight where the two hold the same int8
    rows and scales (a tied embedding, on a rank that holds the same vocabulary rows of
    both) and ``output``'s one-row kernel reads it in one input group; else None."""
    one_row = output.one_row
    if one_row is None or len(one_row.packed) != 1 or table.scales.shape[1] != 1:
        return None
    if table.shape != output.shape:
        return None
    if not torch.equal(table.scales[:, 0], one_row.scales[0, : table.shape[0]]):
        return None  # not tied (the cheap check first)
    shared = SharedInt8Table(one_row, table.shape[0])
    for first in range(0, table.shape[0], 4096):  # row for row, a few MB at a time
        rows = torch.arange(first, min(first + 4096, table.shape[0]))
        if not torch.equal(shared.rows(rows), table.q[first : first + len(rows)]):
            return None
    return shared
