"""A model's decode steps on mpllama's CPU kernels: the trained demo model against itself on
torch's kernels, and row_decode's two C calls a layer (mpllama/rank/row_decode.py) bit for
bit against the layer-by-layer path, at one rank and at two."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mpllama import checkpoint
from mpllama.quantization import Quantization
from mpllama.rank import cpu_kernels, cpu_products, quant, weights
from mpllama.rank import model as model_module
from mpllama.rank.model import Transformer, materialize

pytestmark = pytest.mark.skipif(
    cpu_kernels.unavailable() is not None,
    reason=f"mpllama's CPU kernels cannot run here: {cpu_kernels.unavailable()}",
)


def demo_model(dtype: torch.dtype) -> Transformer:
    demo = Path(__file__).parent.parent / "demo" / "model"
    args = checkpoint.read_params(demo)
    state = weights.load_rank_state(checkpoint.find_shards(demo), args, 0, 1)
    model = materialize(Transformer(args), state, torch.device("cpu"), dtype)
    model.pack_linears()
    return model


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_model_decodes_with_the_kernels_as_with_torchs(
    single_rank: None, monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, products_on: str
) -> None:
    """The trained demo model in bf16 and in float32, packed as a rank runs it: every
    product has its one-row kernel (and bf16's logits their float32 one). Prefill, then
    decode steps of one row and of three rows (one in scattered blocks): the logits are
    within bf16's reach (float32's) of the same model on torch's kernels, and rank the
    same top tokens."""
    model = demo_model(dtype)
    kinds = (model_module.ColumnLinear, model_module.RowLinear, model_module.Fused)
    products = [m for m in model.modules() if isinstance(m, kinds) and "weight" in m._buffers]
    assert products and all(m.one_row is not None for m in products)
    assert (model.logits32 is not None) == (dtype == torch.bfloat16)  # float32 has its own

    def decode(kernels: bool) -> list[torch.Tensor]:
        with monkeypatch.context() as patch:
            if not kernels:
                patch.setattr(model_module, "decode_attention_fits", lambda *a: False)
                for m in products:
                    patch.setattr(m, "one_row", None)
                patch.setattr(model, "logits32", None)
                patch.setattr(model, "fused_layers", False)
            model.setup_caches(40, 16, 256)
            runs = [[(0, 8)], [(30, 2), (10, 3), (20, 3)], [(8, 8)]]
            prompt = torch.randint(3, 1000, (3, 40), generator=torch.Generator().manual_seed(0))
            zero = torch.zeros(3, dtype=torch.long)
            out = [model(prompt, zero, runs)[:, -1]]
            toks, pos = out[-1].argmax(-1), torch.full((3,), 40)
            for _ in range(3):  # all three rows
                out.append(model(toks[:, None], pos, runs)[:, -1])
                toks, pos = out[-1].argmax(-1), pos + 1
            for _ in range(3):  # row 1 alone
                out.append(model(toks[1:2, None], pos[1:2], runs[1:2])[:, -1])
                toks[1], pos[1] = out[-1][0].argmax(), pos[1] + 1
            return out

    ours, torchs = decode(True), decode(False)
    for a, b in zip(ours, torchs, strict=True):
        torch.testing.assert_close(a, b, atol=0.15 if dtype == torch.bfloat16 else 1e-4, rtol=0)
        assert (a.argmax(-1) == b.argmax(-1)).all()


# ------------------------------------------------------------------------ a decode step in C

# Each row's blocks scattered, its new positions in a later run than its first: one row,
# and three rows (prompts of 40, 25 and 33 tokens) whose blocks interleave.
ONE_ROW = [[(30, 1), (10, 2)]]
THREE_ROWS = [[(30, 1), (10, 2)], [(5, 2), (20, 1)], [(0, 1), (25, 2)]]
PROMPTS = [40, 25, 33]


def teacher_forced(model: Transformer, runs: list[list[tuple[int, int]]]) -> list[torch.Tensor]:
    """A prefill of each row's prompt then 6 decode steps of all rows fed fixed tokens (so
    that every rank of a gang feeds the same, whatever its logits), from a fresh cache;
    the logits of each [B, V]."""
    model.setup_caches(40, 16, 256)
    B = len(runs)
    lengths = torch.tensor(PROMPTS[:B])
    gen = torch.Generator().manual_seed(1)
    prompt, steps = (
        torch.randint(3, 1000, (B, 40), generator=gen),
        torch.randint(3, 1000, (6, B, 1), generator=gen),
    )
    start = torch.zeros(B, dtype=torch.long)
    out = [model(prompt, start, runs, lengths=lengths, logits_at=lengths - 1)]
    for i, tokens in enumerate(steps):
        logits = model(tokens, lengths + i, runs)
        out.append(logits if logits is None else logits[:, -1])
    return out


def with_and_without_row_decoder(
    model: Transformer, runs: list[list[tuple[int, int]]]
) -> tuple[int, list, list]:
    """The most rows the model's decoder takes (0: none built), and the logits of
    ``teacher_forced`` with it and on the layer-by-layer path."""
    with_c = teacher_forced(model, runs)
    most_rows = 0 if model.row_decoder is None else model.row_decoder.most_rows
    original = model.setup_caches

    def layer_by_layer(*args: int) -> None:
        original(*args)
        model.row_decoder = None

    model.setup_caches = layer_by_layer  # type: ignore[method-assign]
    try:
        without = teacher_forced(model, runs)
    finally:
        del model.setup_caches
    return most_rows, with_c, without


@pytest.mark.parametrize(
    ("dtype", "method", "rows"),
    [
        (torch.bfloat16, None, ONE_ROW),
        (torch.bfloat16, None, THREE_ROWS),
        (torch.bfloat16, "int8", ONE_ROW),
        (torch.bfloat16, "int8", THREE_ROWS),
        (torch.bfloat16, "int4", ONE_ROW),
        (torch.bfloat16, "int4", THREE_ROWS),
        (torch.float32, None, ONE_ROW),
    ],
)
def test_a_decode_step_in_two_c_calls_a_layer_is_the_layer_path_bit_for_bit(
    single_rank: None, dtype: torch.dtype, method: str | None, rows: list, products_on: str
) -> None:
    """row_decode: a bf16 model, one with int8 weights and one with int4 weights (one row,
    and three at different lengths), and a float32 one decode
    through two C calls a layer, with the logits of the layer-by-layer path exactly.
    Batched steps run it where every product batches (bf16, int8 and int4 weights;
    float32 keeps oneDNN)."""
    demo = Path(__file__).parent.parent / "demo" / "model"
    args = checkpoint.read_params(demo)
    shards = checkpoint.find_shards(demo)
    # int8 scales as for one shard: the kernel reads input groups of a multiple of 64, and
    # the demo's two shards would cut its 192 inputs in groups of 96.
    on_load = None if method is None else Quantization(method, 32, 1)
    state = weights.load_rank_state(shards, args, 0, 1, None, on_load)
    build = quant.materialize_quantized if on_load else materialize
    model = build(Transformer(args), state, torch.device("cpu"), dtype)
    model.pack_linears()
    most_rows, with_c, without = with_and_without_row_decoder(model, rows)
    expected = cpu_products.BATCH_ROWS if dtype == torch.bfloat16 else 1
    assert most_rows == expected
    for a, b in zip(with_c, without, strict=True):
        assert torch.equal(a, b)


def two_rank_decode(port: int, rank: int, world: int, method: str | None, out: object) -> None:
    from mpllama.rank import dist

    torch.set_num_threads(1)
    try:
        dist.init_ranks(
            rank, world, "127.0.0.1", port, "gloo", "127.0.0.1", 60.0, shm_bytes=1 << 20
        )
        demo = Path(__file__).parent.parent / "demo" / "model"
        args = checkpoint.read_params(demo)
        shards = checkpoint.find_shards(demo)
        # int4 in groups of 32: each rank's wo and w2 shards take 96 and 256 inputs
        on_load = None if method is None else Quantization(method, 32, len(shards))
        state = weights.load_rank_state(shards, args, rank, world, None, on_load)
        build = quant.materialize_quantized if on_load else materialize
        model = build(Transformer(args), state, torch.device("cpu"), torch.bfloat16)
        model.pack_linears()
        int4 = [
            w
            for m in model.modules()
            if isinstance(w := m.__dict__.get("weight"), quant.Int4Weight)
        ]
        built, same = all(w.kernel == "mpllama" for w in int4), True
        for runs in (ONE_ROW, THREE_ROWS):
            most_rows, with_c, without = with_and_without_row_decoder(model, runs)
            built = built and most_rows >= len(runs)
            same = same and all(
                a is None and b is None or torch.equal(a, b)
                for a, b in zip(with_c, without, strict=True)
            )
        out.put((rank, built, same, None))  # type: ignore[attr-defined]
    except BaseException as exc:  # the parent reports it
        out.put((rank, False, False, repr(exc)))  # type: ignore[attr-defined]
        raise


@pytest.mark.parametrize("method", [None, "int4"])
def test_two_ranks_decode_steps_in_c_as_layer_by_layer(method: str | None) -> None:
    """At MP=2 (shared-memory collectives between the calls), the same for one row and
    for three: the lead's logits are the layer-by-layer path's exactly, in bf16, and with
    int4 weights (each rank's row-parallel shards on mpllama's int4 kernel)."""
    import multiprocessing as mp

    from mpllama.rank import dist

    store = dist.open_store("127.0.0.1", 2, 60.0)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [
        ctx.Process(target=two_rank_decode, args=(store.port, r, 2, method, queue))
        for r in range(2)
    ]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    assert results == [(0, True, True, None), (1, True, True, None)]
