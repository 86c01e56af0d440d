"""mpllama's CPU kernels (mpllama/rank/cpu_kernels*.c) against torch's float32 results:
one-query attention over scattered segments of the block pool and a decode layer's small
steps; and how the library is built where the compiler or CPU lacks a part. The products
are tested in test_cpu_products.py, a model's decode steps in test_row_decode.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import blocked, randn

from mpllama.rank import cpu_kernels, rope
from mpllama.rank import model as model_module

pytestmark = pytest.mark.skipif(
    cpu_kernels.unavailable() is not None,
    reason=f"mpllama's CPU kernels cannot run here: {cpu_kernels.unavailable()}",
)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("kv", "heads", "dim"), [(4, 4, 64), (2, 8, 128), (1, 4, 32)])
def test_decode_attention_over_scattered_segments(
    kv: int, heads: int, dim: int, dtype: torch.dtype
) -> None:
    """Rows of one segment, of several out of order, of one position, and longer than a
    chunk of 64: each equals float32 SDPA over its positions gathered in order (to bf16's
    output rounding, or float32's). A row alone, whose heads the kernel splits over
    tasks to keep both threads busy, gets the same bits as in the batch."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the kernel splits a row's heads only for idle threads
    try:
        check_decode_attention(kv, heads, dim, dtype)
    finally:
        torch.set_num_threads(threads)


def check_decode_attention(kv: int, heads: int, dim: int, dtype: torch.dtype) -> None:
    P = 512
    cache_k, cache_v = randn(P, kv, dim).to(dtype), randn(P, kv, dim, seed=1).to(dtype)
    rows = [[(0, 200)], [(300, 5), (100, 70), (17, 1)], [(511, 1)], [(256, 64), (400, 65)]]
    q = randn(len(rows), heads, dim, seed=2).to(dtype)
    assert cpu_kernels.decode_attention_fits(heads, cache_k)
    got = cpu_kernels.attend_decode(q, cache_k, cache_v, cpu_kernels.Segments.of(rows))
    for b, row in enumerate(rows):
        pos = torch.cat([torch.arange(first, first + n) for first, n in row])
        k, v = cache_k[pos].transpose(0, 1).float(), cache_v[pos].transpose(0, 1).float()
        want = F.scaled_dot_product_attention(q[b].float()[:, None], k, v, enable_gqa=heads != kv)[
            :, 0
        ]
        atol = 1e-2 if dtype == torch.bfloat16 else 1e-5
        torch.testing.assert_close(got[b].float(), want, atol=atol, rtol=0)
        alone = cpu_kernels.attend_decode(
            q[b : b + 1], cache_k, cache_v, cpu_kernels.Segments.of([row])
        )
        assert torch.equal(alone[0], got[b])


def test_decode_attention_refuses_what_it_cannot_run() -> None:
    assert not cpu_kernels.decode_attention_fits(8, torch.zeros(16, 4, 16).bfloat16())  # D=16
    assert not cpu_kernels.decode_attention_fits(8, torch.zeros(16, 4, 64).half())  # float16
    assert not cpu_kernels.decode_attention_fits(256, torch.zeros(16, 8, 64).bfloat16())


def test_kernels_off_without_a_compiler(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_kernels.shutil, "which", lambda name: None)
    assert "compiler" in (cpu_kernels.unavailable() or "")
    assert cpu_kernels.path() == "off: no C compiler (cc or gcc) on PATH"


def test_the_path_a_rank_reports_follows_the_tiles() -> None:
    """A rank reports which kernels it runs (``rank_info``'s "cpu_kernels"): "amx" while
    the products run on the tiles, "avx512" once they do not."""
    default = cpu_kernels.amx_on()
    try:
        assert cpu_kernels.path() == ("amx" if default else "avx512")
        cpu_kernels.set_amx(False)
        assert cpu_kernels.path() == "avx512"
    finally:
        cpu_kernels.set_amx(default)


def test_a_compiler_without_amx_builds_the_kernels_without_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Where the compiler rejects AMX's flags, the library is built without them: its
    products stay on AVX-512 whatever the CPU has, and the log says why."""
    monkeypatch.setattr(cpu_kernels.Path, "home", lambda: tmp_path)  # a cache of its own
    monkeypatch.setattr(cpu_kernels, "AMX_FLAGS", ["-mno-such-flag"])
    lib = cpu_kernels._load(cpu_kernels._build())
    assert lib.amx_request() == 0 and lib.set_amx(1) == 0 and lib.amx_on() == 0
    w, x = randn(64, 64).bfloat16(), randn(1, 64, seed=1).bfloat16()
    packed = blocked(w, 64)
    y = torch.empty(1, 64, dtype=torch.bfloat16)
    lib.gemv_bf16(packed.data_ptr(), x.data_ptr(), y.data_ptr(), 64, 64, 64)
    torch.testing.assert_close(y.float(), x.float() @ w.float().t(), atol=0.05, rtol=1e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_decode_layers_small_steps_match_torchs(dtype: torch.dtype) -> None:
    """The fused norm (with and without the residual add, the residual stream float32
    in both types), RoPE with the cache writes, and silu(gate) * up, each against the
    torch ops it replaces, in bf16 and float32."""
    # bf16: within its rounding; float32: to float32's own
    bf16 = dtype == torch.bfloat16
    close = dict(atol=0.02, rtol=0.01) if bf16 else dict(atol=1e-5, rtol=1e-5)
    normed = dict(atol=0.05, rtol=0.01) if bf16 else close  # rounded twice in bf16
    B, H, K, D, dim = 3, 8, 2, 64, 256
    x, delta = randn(B, dim), randn(B, dim, seed=1).to(dtype)
    norm = model_module.RMSNorm(dim, 1e-5)
    norm.weight = torch.nn.Parameter(randn(dim, seed=2).to(dtype), requires_grad=False)
    h, out = cpu_kernels.add_rmsnorm(x, delta, norm.weight, norm.eps)
    assert h.dtype == torch.float32 and out.dtype == dtype
    torch.testing.assert_close(h, x + delta, atol=0, rtol=0)  # the sum not rounded
    torch.testing.assert_close(out.float(), norm(x + delta).float(), **normed)
    same, out = cpu_kernels.add_rmsnorm(x, None, norm.weight, norm.eps)
    assert same is x or torch.equal(same, x)
    torch.testing.assert_close(out.float(), norm(x).float(), **normed)

    qkv = randn(B, (H + 2 * K) * D, seed=3).to(dtype)
    positions = torch.tensor([5, 0, 63])
    cis = rope.rope_table(D, 64, 10000.0, torch.device("cpu"))[positions]  # [B,D/2]
    cache_k, cache_v = torch.zeros(64, K, D).to(dtype), torch.zeros(64, K, D).to(dtype)
    q = cpu_kernels.rope_write(qkv, cis, positions, cache_k, cache_v, H)
    xq, xk, xv = qkv.view(B, 1, H + 2 * K, D).split([H, K, K], dim=2)
    want_q = rope.apply_rope(xq, cis[:, None])[:, 0]
    want_k = rope.apply_rope(xk, cis[:, None])[:, 0]
    torch.testing.assert_close(q.float(), want_q.float(), **close)
    torch.testing.assert_close(cache_k[positions].float(), want_k.float(), **close)
    assert torch.equal(cache_v[positions], xv[:, 0])
    untouched = torch.ones(64, dtype=torch.bool)
    untouched[positions] = False
    assert not cache_k[untouched].any() and not cache_v[untouched].any()

    gate_up = randn(B, 2 * 200, seed=4).to(dtype)  # 200: not a multiple of 16
    gate, up = gate_up.split(200, dim=-1)
    torch.testing.assert_close(
        cpu_kernels.silu_mul(gate_up).float(), (F.silu(gate) * up).float(), **close
    )
