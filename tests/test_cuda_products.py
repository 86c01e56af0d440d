"""The quantized weights' products on CUDA GPUs (mpllama/rank/cuda_products.py): what runs
here without a GPU (the padding cuBLASLt's int8 GEMM needs, the shapes tinygemm's layout
gives, when tinygemm is refused), and on a GPU (marked gpu): the kernels chosen, int8
giving the CPU's integers, int4 its dequantized product, a quantized model's logits."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from helpers import randn
from torch._subclasses.fake_tensor import FakeTensorMode

from mpllama.model_args import PRESETS
from mpllama.offline.fixtures import random_state
from mpllama.quantization import Quantization
from mpllama.rank import cuda_products, quant, quantize
from mpllama.rank.model import Transformer
from mpllama.rank.quant import Int4Weight, Int8Weight
from mpllama.rank.quantize import quantize_int4, quantize_int8

needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU; this machine has none"
)


def int8_rows(seed: int, *shape: int) -> torch.Tensor:
    return torch.randint(-127, 128, shape, generator=torch.Generator().manual_seed(seed)).to(
        torch.int8
    )


@pytest.mark.parametrize("rows", [1, 5, 16, 17, 40])
def test_int_mm_pads_a_few_rows_and_drops_them(rows: int) -> None:
    """cuBLASLt's int8 GEMM takes more than 16 rows: fewer are padded with zero rows and
    the result is theirs alone, the exact integer product, whatever the count."""
    xq, w = int8_rows(0, rows, 64), int8_rows(1, 24, 64)
    got = cuda_products.int_mm(xq, w.contiguous().t())
    assert got.dtype == torch.int32 and got.shape == (rows, 24)
    assert torch.equal(got, (xq.long() @ w.long().t()).int())


def test_int_mm_takes_inputs_in_eights() -> None:
    assert cuda_products.int_mm_fits(64) and cuda_products.int_mm_fits(8)
    assert not cuda_products.int_mm_fits(96 + 4) and not cuda_products.int_mm_fits(0)


@pytest.mark.parametrize(
    ("device", "dtype", "inputs", "group", "why"),
    [
        ("cpu", torch.bfloat16, 256, 64, "CUDA GPUs"),
        ("cuda", torch.float32, 256, 64, "bf16 activations"),
        ("cuda", torch.bfloat16, 240, 48, "groups of"),
        ("cuda", torch.bfloat16, 48, 32, "multiples of 32"),
    ],
)
def test_tinygemm_says_why_it_cannot_take_a_weight(
    device: str, dtype: torch.dtype, inputs: int, group: int, why: str
) -> None:
    # The device's capability is asked last: only a GPU machine reaches it.
    reason = cuda_products.tinygemm_unsupported(torch.device(device), dtype, inputs, group)
    assert reason is not None and why in reason


@pytest.mark.parametrize(("inputs", "tiles"), [(256, 8), (192, 4), (96, 2)])
def test_tinygemm_takes_the_most_inner_tiles_the_inputs_divide_into(
    inputs: int, tiles: int
) -> None:
    assert cuda_products.inner_k_tiles(inputs) == tiles


@pytest.mark.parametrize(("rows", "inputs", "group"), [(100, 256, 64), (96, 192, 32)])
def test_tinygemm_layout_shapes(rows: int, inputs: int, group: int) -> None:
    """Through torch's own shape rules for the two ops (fake tensors: no GPU needed): the
    rows padded to tiles of 8 in the weight and its scales, the padding dropped from
    the product."""
    packed, scales = quantize_int4(randn(rows, inputs), group)
    with FakeTensorMode() as mode:
        weight, sz, kept = cuda_products.tinygemm_layout(
            mode.from_tensor(packed), mode.from_tensor(scales)
        )
        padded = -(-rows // 8) * 8
        tiles = cuda_products.inner_k_tiles(inputs)
        assert kept == rows and weight.dtype == torch.int32
        assert tuple(weight.shape) == (padded // 8, inputs // (16 * tiles), 32, tiles // 2)
        assert tuple(sz.shape) == (inputs // group, padded, 2) and sz.dtype == torch.bfloat16
        product = cuda_products.Int4TinyGemm(weight, sz, kept, group)
        y = product(torch.empty(2, 3, inputs, dtype=torch.bfloat16))
        assert tuple(y.shape) == (2, 3, rows)


@pytest.mark.parametrize("groups", [1, 2])
def test_int8s_gpu_layout_gives_the_cpus_integer_product_here(
    groups: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The int8 weight packed as for a GPU (its rows padded to 8s, each group's weight a
    column-major view, few rows padded past 16), run by the CPU's ``torch._int_mm``: the
    CPU's own ``int_mm`` kernel's results bit for bit, the padding dropped."""
    w, x = randn(100, 128), randn(40, 128)
    monkeypatch.setattr(quant, "onednn_int8_supported", lambda: False)
    cpu = Int8Weight(*quantize_int8(w, groups))
    cpu.pack(torch.float32)
    as_gpu = Int8Weight(*quantize_int8(w, groups))
    monkeypatch.setattr(Int8Weight, "device", property(lambda self: torch.device("cuda")))
    as_gpu.pack(torch.float32)
    assert as_gpu.kernel == "int_mm_cuda" and len(as_gpu._packed) == groups
    assert all(p.shape == (128 // groups, 104) and p.stride(0) == 1 for p in as_gpu._packed)
    assert all(s.shape == (104,) for s in as_gpu._scales)
    for rows in (slice(0, 1), slice(2, 7), slice(None)):
        assert torch.equal(as_gpu(x[rows]), cpu(x[rows]))


# ---------------------------------------------------------------- on a GPU

GPU = torch.device("cuda")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("groups", [1, 2])
def test_int8_on_a_gpu_gives_the_cpus_integer_product(
    groups: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """cuBLASLt's int8 GEMM: the CPU's ``int_mm`` kernel's results (the same integers,
    the scales applied in the same order), at one row, a decode step's few and a
    prefill's many; the weight's 100 rows padded to 104."""
    w, x = randn(100, 128), randn(70, 128)
    monkeypatch.setattr(quant, "onednn_int8_supported", lambda: False)  # oneDNN scales its way
    cpu = Int8Weight(*quantize_int8(w, groups))
    cpu.pack(torch.float32)
    assert cpu.kernel == "int_mm"
    gpu = Int8Weight(*(t.to(GPU) for t in quantize_int8(w, groups)))
    gpu.pack(torch.float32)
    assert gpu.kernel == "int_mm_cuda"
    for rows in (slice(0, 1), slice(2, 7), slice(None)):
        got = gpu(x[rows].to(GPU)).cpu()
        assert got.shape == (x[rows].shape[0], 100)
        torch.testing.assert_close(got, cpu(x[rows]), rtol=1e-6, atol=1e-6)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize(("rows", "inputs", "group"), [(100, 256, 64), (96, 192, 32)])
def test_int4_on_a_gpu_runs_tinygemm_as_its_dequantized_weight(
    rows: int, inputs: int, group: int
) -> None:
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("tinygemm needs compute capability 8.0 or later")
    packed, scales = quantize_int4(randn(rows, inputs), group)
    weight = Int4Weight(packed.to(GPU), scales.to(GPU))
    want_weight = weight.dequantize()
    weight.pack(torch.bfloat16)
    assert weight.kernel == "tinygemm", "the probe refused it: see the warning"
    x = randn(9, inputs).to(GPU, torch.bfloat16)
    want = x.float() @ want_weight.t()
    for r in (slice(0, 1), slice(None)):
        got = weight(x[r])
        assert got.dtype == torch.bfloat16 and got.shape == (want[r].shape[0], rows)
        torch.testing.assert_close(got.float(), want[r], rtol=2e-2, atol=2e-2)
    assert weight.nbytes() < rows * inputs  # 4 bits a weight and the scales, not 16


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize(("method", "dtype"), [("int8", torch.float32), ("int4", torch.bfloat16)])
def test_a_quantized_model_on_a_gpu_answers_as_on_the_cpu(
    method: str, dtype: torch.dtype, single_rank: None
) -> None:
    """A small random model quantized, on a GPU and on the CPU: the GPU kernels chosen
    for every weight, the last logits near the CPU's."""
    args = replace(PRESETS["tiny"], multiple_of=64, vocab_size=512)  # FFN 384: groups of 128
    state = quantize.quantize_state(random_state(args, 0, torch.float32), Quantization(method, 128))
    ids = torch.tensor([[5, 9, 200, 17, 3, 44, 8]])
    logits = []
    for device in (torch.device("cpu"), GPU):
        model = quant.materialize_quantized(Transformer(args), state, device, dtype)
        model.pack_linears(onednn=device.type == "cpu")
        kernels = {
            (type(w).__name__, w.kernel)
            for m in model.modules()
            if isinstance(w := m.__dict__.get("weight"), (Int8Weight, Int4Weight))
        }
        if device.type == "cuda":
            want = {("Int8Weight", "int_mm_cuda")}  # the layers', or the output layer's
            assert kernels == want | ({("Int4Weight", "tinygemm")} if method == "int4" else set())
        model.setup_slots(1, 32)
        lengths = torch.tensor([ids.shape[1]], device=device)
        out = model(
            ids.to(device),
            torch.zeros(1, dtype=torch.long, device=device),
            model.slot_runs([0]),
            lengths=lengths,
            logits_at=lengths - 1,
        )
        logits.append(out[0].float().cpu())
    cpu, gpu = logits
    err = float((gpu - cpu).norm() / cpu.norm())
    assert err < (1e-4 if dtype == torch.float32 else 3e-2), err
