"""Quantized linear weights (runtime.quantization, `mpllama quantize`): each kernel against
its dequantized reference, rows batched exactly as alone, quantizing on load equal to
loading a quantized checkpoint, resharding, memory, and the errors users can reach."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers import PROMPTS

from mpllama import checkpoint
from mpllama.cli import main
from mpllama.config import RuntimeConfig
from mpllama.errors import CheckpointError, ConfigError
from mpllama.model_args import PRESETS, ModelArgs
from mpllama.quantization import (
    Quantization,
    check_quantization,
    int4_group_size,
    read_quantization,
)
from mpllama.rank import cpu_kernels, quant, quantize, vocab_tables, weights
from mpllama.rank.model import Transformer, materialize
from mpllama.rank.quant import Int4Weight, Int8Weight
from mpllama.rank.quantize import quantize_int4, quantize_int8

CPU = torch.device("cpu")
DEMO = Path(__file__).parent.parent / "demo" / "model"
METHODS = ["int8", "int4"]


def randn(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def quantized(method: str, w: torch.Tensor, groups: int = 1) -> Int8Weight | Int4Weight:
    if method == "int8":
        return Int8Weight(*quantize_int8(w, groups))
    return Int4Weight(*quantize_int4(w, 32))


# ---------------------------------------------------------------- kernels


@pytest.mark.parametrize("groups", [1, 2])
def test_int8_product_is_the_integer_product_scaled(
    groups: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Packed (oneDNN where it runs) and unpacked (torch._int_mm) give the scaled integer
    product of per-token int8 activations, and stay near the float product. 96 rows:
    packing pads them to whole blocks of 64 for mpllama's kernel, which one row and a
    decode step's few rows run, and every product drops the padding."""
    w, x = randn(0, 96, 128), randn(1, 70, 128)
    weight = quantized("int8", w, groups)
    want = torch.zeros(70, 96, dtype=torch.float64)
    for xg, wg in zip(x.chunk(groups, 1), weight.dequantize().chunk(groups, 1), strict=True):
        xq, sx = quant.quantize_rows(xg)
        want += (xq.double() * sx.double()) @ wg.double().t()
    unpacked = weight(x)
    torch.testing.assert_close(unpacked.double(), want, rtol=1e-5, atol=1e-5)
    weight.pack(torch.float32)
    assert weight.kernel == ("onednn" if quant.onednn_int8_supported() else "int_mm")
    if weight.kernel == "onednn" and cpu_kernels.library() is not None:
        assert weight.one_row is not None and weight.one_row.rows == 128
    for rows in (slice(None), slice(0, 1), slice(2, 7)):  # prefill, one row, a few rows
        assert weight(x[rows]).shape == unpacked[rows].shape
        torch.testing.assert_close(weight(x[rows]), unpacked[rows], rtol=1e-6, atol=1e-6)
    err = (weight(x) - x @ w.t()).norm() / (x @ w.t()).norm()
    assert err < 0.02
    # Where oneDNN's int8 kernel cannot run: torch._int_mm on a pre-transposed weight.
    monkeypatch.setattr(quant, "onednn_int8_supported", lambda: False)
    fallback = quantized("int8", w, groups)
    fallback.pack(torch.float32)
    assert fallback.kernel == "int_mm"
    assert torch.equal(fallback(x), unpacked)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_product_matches_its_dequantized_weight(dtype: torch.dtype) -> None:
    w, x = randn(2, 64, 128), randn(3, 4, 128).to(dtype)
    weight = quantized("int4", w)
    want = x.float() @ weight.dequantize().t()
    unpacked = weight(x)
    weight.pack(dtype)
    # bf16 where mpllama's kernels run: its own (tests/test_cpu_products.py); else torch's
    ours = dtype == torch.bfloat16 and cpu_kernels.library() is not None
    assert weight.kernel == ("mpllama" if ours else "int4pack")
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for got in (unpacked, weight(x)):
        assert got.dtype == dtype
        torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol * 4)
    assert (want - x.float() @ w.t()).norm() / (x.float() @ w.t()).norm() < 0.12


@pytest.mark.parametrize("groups", [1, 2])
def test_an_int8_table_looks_up_each_row_times_its_scale(groups: int) -> None:
    """Int8Table.lookup (one C call on the CPU) gives each named row's int8 values times
    its run's scale, in float32, exactly; 40 values a run exercise the kernel's tail."""
    q, scales = quantize_int8(randn(5, 50, 80), groups)
    table = vocab_tables.Int8Table(q, scales)
    ids = torch.tensor([[3, 0, 49], [7, 7, 12]])
    want = (q[ids].float().unflatten(-1, (groups, -1)) * scales[ids][..., None]).flatten(-2)
    got = table.lookup(ids)
    assert got.dtype == torch.float32 and got.shape == (2, 3, 80)
    assert torch.equal(got, want)


@pytest.mark.parametrize("form", ["C", "torch"])
@pytest.mark.parametrize("group_size", [32, 64])
def test_an_int4_table_looks_up_the_rows_its_weight_dequantizes_to(
    form: str, group_size: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Int4Table.lookup (one C call on the CPU, else torch's ops) gives, for ids of any
    shape, repeats and the last row included, exactly the float32 rows
    ``Int4Weight.dequantize`` makes of the same table."""
    if form == "torch":
        monkeypatch.setattr(vocab_tables, "library", lambda: None)
    elif cpu_kernels.library() is None:
        pytest.skip(f"mpllama's CPU kernels do not run here: {cpu_kernels.unavailable()}")
    packed, scales = quantize_int4(randn(6, 50, 192), group_size)
    table = vocab_tables.Int4Table(packed, scales)
    assert table.shape == (50, 192) and table.group_size == group_size
    ids = torch.tensor([[3, 0, 49], [7, 7, 12]])
    got = table.lookup(ids)
    assert got.dtype == torch.float32 and got.shape == (2, 3, 192)
    assert torch.equal(got, Int4Weight(packed, scales).dequantize()[ids])


@pytest.mark.parametrize(("method", "groups"), [("int8", 1), ("int8", 2), ("int4", 32)])
def test_a_weight_quantized_in_runs_of_rows_equals_it_quantized_whole(
    method: str, groups: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Quantizing takes a weight's rows a few MiB of float32 at a time (``CHUNK_BYTES``),
    never the whole weight's float copies at once: the same values and scales as all its
    rows at once, whatever the runs' size (here 7 rows, the last run shorter)."""
    w = randn(7, 50, 128).bfloat16()
    fn = {"int8": quantize_int8, "int4": quantize_int4}[method]
    monkeypatch.setattr(quantize, "CHUNK_BYTES", 1 << 30)
    whole = fn(w, groups)
    monkeypatch.setattr(quantize, "CHUNK_BYTES", 7 * 128 * 4)
    runs = fn(w, groups)
    for a, b in zip(whole, runs, strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_int4_values_round_trip_through_their_packing() -> None:
    w = randn(4, 8, 64)
    packed, scales = quantize_int4(w, 32)
    assert packed.shape == (8, 32) and scales.shape == (8, 2, 2) and scales.dtype == torch.bfloat16
    q = quantize.unpack_int4(packed)
    assert int(q.min()) >= 0 and int(q.max()) <= 15
    assert torch.equal(quantize.unpack_int4(q[:, 0::2].to(torch.uint8) | (q[:, 1::2] << 4)), q)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_rows_product_does_not_depend_on_the_batch(method: str, dtype: torch.dtype) -> None:
    """Exactly: per-token activation scales and integer (or per-row) products."""
    weight = quantized(method, randn(5, 256, 128))
    weight.pack(dtype)
    x = randn(6, 33, 128).to(dtype)
    batched = weight(x)
    for i in range(x.shape[0]):
        assert torch.equal(weight(x[i : i + 1]), batched[i : i + 1])
    assert torch.equal(weight(x[3:20]), batched[3:20])


# ---------------------------------------------------------------- loading


@pytest.fixture(scope="module")
def tiny_q(tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny preset with an FFN of 384 (the preset's 352 gives each of 2 shards 176
    inputs to w2, which no int4 group size divides), in 2 shards, tiny_ckpt's tokenizer."""
    from mpllama.offline.fixtures import random_state

    out = tmp_path_factory.mktemp("tiny-q")
    vocab = checkpoint.read_params(tiny_ckpt).vocab_size
    args = replace(PRESETS["tiny"], multiple_of=64, vocab_size=vocab)
    weights.write_checkpoint(out, args, random_state(args, 0, torch.float32), 2)
    shutil.copyfile(tiny_ckpt / "tokenizer.model", out / "tokenizer.model")
    return out


@pytest.fixture(scope="module")
def tiny_q_by_vocab(tiny_q: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny_q's weights in 2 shards that split the embedding by vocabulary, as Llama 3's."""
    out = tmp_path_factory.mktemp("tiny-q-vocab")
    args = checkpoint.read_params(tiny_q)
    state = weights.load_rank_state(checkpoint.find_shards(tiny_q), args, 0, 1)
    weights.write_checkpoint(out, args, state, 2, embed_axis=0)
    shutil.copyfile(tiny_q / "tokenizer.model", out / "tokenizer.model")
    return out


@pytest.fixture(scope="module")
def tiny_q_tied(tiny_q: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny_q with its output layer's matrix stored again as the embedding (Llama 3.2
    1B and 3B's checkpoints), in 2 shards split by vocabulary."""
    out = tmp_path_factory.mktemp("tiny-q-tied")
    args = checkpoint.read_params(tiny_q)
    state = weights.load_rank_state(checkpoint.find_shards(tiny_q), args, 0, 1)
    state["tok_embeddings.weight"] = state["output.weight"].clone()
    weights.write_checkpoint(out, args, state, 2, embed_axis=0)
    shutil.copyfile(tiny_q / "tokenizer.model", out / "tokenizer.model")
    return out


def quantize_ckpt(src: Path, out: Path, method: str, *extra: str) -> Path:
    assert main(["quantize", str(src), str(out), "--to", method, *extra]) == 0
    return out


def load(
    folder: Path,
    method: str | None = None,
    world: int = 1,
    rank: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Transformer:
    """Rank ``rank`` of ``world``'s model, quantized on load to ``method`` (or as the
    checkpoint is stored), packed as a CPU rank packs it."""
    args = checkpoint.resolve_vocab(
        checkpoint.read_params(folder),
        checkpoint.load_tokenizer(checkpoint.find_tokenizer(folder)).n_words,
    )
    shards = checkpoint.find_shards(folder)
    stored = read_quantization(folder)
    on_load = quantize.on_load(method or "none", "auto", stored, args, len(shards), world)
    state = weights.load_rank_state(shards, args, rank, world, stored, on_load)
    build = quant.materialize_quantized if stored or on_load else materialize
    model = build(Transformer(args), state, CPU, dtype)
    model.pack_linears()
    return model


def last_logits(model: Transformer, rows: list[torch.Tensor]) -> torch.Tensor:
    """Each row's last logits, all rows prefilled in one right-padded batch."""
    T = max(len(r) for r in rows)
    model.setup_slots(len(rows), 32)
    padded = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        padded[i, : len(r)] = r
    lengths = torch.tensor([len(r) for r in rows])
    start = torch.zeros(len(rows), dtype=torch.long)
    runs = model.slot_runs(list(range(len(rows))))
    return model(padded, start, runs, lengths=lengths, logits_at=lengths - 1)


ROWS = [torch.tensor(r) for r in ([5, 9, 200, 17, 3], [44, 8], [7, 7, 7, 301, 12, 90, 4])]


@pytest.mark.parametrize("method", METHODS)
def test_quantizing_on_load_equals_loading_a_quantized_checkpoint(
    method: str, tiny_q: Path, tmp_path: Path, single_rank: None
) -> None:
    on_load = load(tiny_q, method)
    stored = load(quantize_ckpt(tiny_q, tmp_path / method, method))
    assert quant.quantized_bytes(on_load) == quant.quantized_bytes(stored) > 0
    got, want = last_logits(stored, ROWS), last_logits(on_load, ROWS)
    assert torch.equal(got, want)
    # Near the float model's logits (a random model's are flat: its greedy token is not
    # a fair test; the trained demo model's agreement is measured by make bench).
    float_model = load(tiny_q)
    full = last_logits(float_model, ROWS)
    err = float((got - full).norm() / full.norm())
    assert err < {"int8": 0.03, "int4": 0.25}[method], err
    # The embedding's rows: int8's each half (a shard's) on its own scale, as stored;
    # int4's the layers' groups (which a split by model dimension never cuts), exactly
    # the values the same table quantized whole holds.
    table = float_model.tok_embeddings.weight.detach()
    for model in (on_load, stored):
        looked_up = model.tok_embeddings.weight
        assert (
            type(looked_up)
            is {"int8": vocab_tables.Int8Table, "int4": vocab_tables.Int4Table}[method]
        )
        rows = looked_up.lookup(torch.arange(table.shape[0]))
        assert rows.dtype == torch.float32
        if method == "int8":
            assert float((rows - table).norm() / table.norm()) < 0.01
        else:
            want = Int4Weight(*quantize_int4(table, looked_up.group_size)).dequantize()
            assert torch.equal(rows, want)
            assert float((rows - table).norm() / table.norm()) < 0.1


@pytest.mark.parametrize("method", METHODS)
def test_a_bf16_models_int8_logits_are_float32(
    method: str, tiny_q: Path, single_rank: None
) -> None:
    """The int8 output layer of a bf16 model gives float32 logits, as a bf16 one does
    (``Float32Product``): rounded to bf16, near-ties would be decided by the rounding.
    One row and three (the one-row and the batched kernel)."""
    model = load(tiny_q, method, dtype=torch.bfloat16)
    assert isinstance(model.output.weight, Int8Weight)
    for rows in (ROWS[:1], ROWS):
        logits = last_logits(model, rows)
        assert logits.dtype == torch.float32
        assert not torch.equal(logits, logits.bfloat16().float())


@pytest.mark.parametrize("method", METHODS)
def test_quantized_rows_batched_equal_rows_alone(
    method: str, tiny_q: Path, single_rank: None
) -> None:
    model = load(tiny_q, method)
    batched = last_logits(model, ROWS)
    for i, row in enumerate(ROWS):
        torch.testing.assert_close(last_logits(model, [row])[0], batched[i], rtol=0, atol=1e-5)


@pytest.mark.parametrize("split", ["by dimension", "by vocabulary"])
@pytest.mark.parametrize("method", METHODS)
def test_a_quantized_checkpoint_reshards_like_any_other(
    method: str, split: str, tmp_path: Path, single_rank: None, request: pytest.FixtureRequest
) -> None:
    """2 quantized shards merged into 1 and split into 4 give the same model: the
    scales split with their weights (the embedding's on either axis), nothing is
    quantized again. (int4 in groups of 32: 4 shards give the attention 32 inputs each,
    auto's 64 would not split so.)"""
    source = request.getfixturevalue("tiny_q" if split == "by dimension" else "tiny_q_by_vocab")
    groups = ("--group-size", "32") if method == "int4" else ()
    two = quantize_ckpt(source, tmp_path / "q2", method, *groups)
    assert main(["reshard", str(two), str(tmp_path / "q1"), "--mp", "1"]) == 0
    assert main(["reshard", str(tmp_path / "q1"), str(tmp_path / "q4"), "--mp", "4"]) == 0
    assert main(["check", str(tmp_path / "q4")]) == 0
    params = json.loads((tmp_path / "q4" / "params.json").read_text())
    assert params["mpllama_quantization"]["method"] == method
    want = last_logits(load(two), ROWS)
    for folder in ("q1", "q4"):
        assert torch.equal(last_logits(load(tmp_path / folder), ROWS), want)


def test_check_mp_says_whether_a_quantized_checkpoints_groups_fit_that_many_ranks(
    tiny_q: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """int4 in groups of 64 fits 2 ranks of tiny_q (w2 192 inputs each, wo 64) but not 4
    (96 and 32): `check --mp 4` says so, as a rank and `reshard --mp 4` would, where it
    said ok; and `reshard --mp 0` of it is a one-line error, not a ZeroDivisionError."""
    q = quantize_ckpt(tiny_q, tmp_path / "q", "int4", "--group-size", "64")
    capsys.readouterr()
    assert main(["check", str(q), "--mp", "2"]) == 0
    assert main(["check", str(q), "--mp", "4"]) == 1
    err = capsys.readouterr().err
    assert "group size 64 does not divide" in err and "Traceback" not in err
    assert main(["reshard", str(q), str(tmp_path / "r4"), "--mp", "4"]) == 1
    assert main(["reshard", str(q), str(tmp_path / "r0"), "--mp", "0"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "mpllama reshard: error: --mp 0: a checkpoint needs at least one shard"


def test_a_quantized_rank_holds_a_quarter_or_less_of_float32s_bytes(
    tiny_q: Path, single_rank: None
) -> None:
    """Every weight a rank holds, scales and norms included: int8 about 1/4 of float32's
    bytes, the vocabulary's tables too; int4's layers half a byte a weight and a scale
    and zero per group of 64 (auto's for tiny_q's 2 shards; in the model's dtype, here
    float32), its embedding so too (two bf16 a group), its output layer int8 as int8's."""
    full = load(tiny_q)
    int8, int4 = load(tiny_q, "int8"), load(tiny_q, "int4")
    assert isinstance(int8.output.weight, Int8Weight)
    assert isinstance(int4.output.weight, Int8Weight)
    assert 0.25 <= int8.weight_bytes() / full.weight_bytes() < 0.26
    layers = [m.weight for m in int4.modules() if isinstance(m.__dict__.get("weight"), Int4Weight)]
    assert len(layers) == 4 * full.args.n_layers  # wqkv, wo, w13, w2
    assert {w.group_size for w in layers} == {64}
    linears = sum(w.shape[0] * w.shape[1] for w in layers)
    int4_layers = sum(w.nbytes() for w in layers)
    assert int4_layers == linears // 2 + linears // 64 * 2 * 4
    table = int4.tok_embeddings.weight
    assert isinstance(table, vocab_tables.Int4Table) and table.group_size == 64
    rows, dim = full.tok_embeddings.weight.shape
    assert table.nbytes() == rows * dim // 2 + rows * dim // 64 * 2 * 2
    # the rest, the int8 output layer and the norms, as int8's
    int8_rest = int8.weight_bytes() - quant.quantized_bytes(int8) + int8.output.weight.nbytes()
    assert int4.weight_bytes() - int4_layers - table.nbytes() == int8_rest


@pytest.mark.skipif(
    not quant.onednn_int8_supported() or cpu_kernels.library() is None,
    reason="the output layer is packed for oneDNN's int8 kernel only on CPUs with VNNI",
)
@pytest.mark.parametrize("method", METHODS)
def test_a_tied_embedding_reads_its_rows_from_the_output_layer(
    method: str, tiny_q_tied: Path, tiny_q: Path, monkeypatch: pytest.MonkeyPatch, single_rank: None
) -> None:
    """A tied checkpoint's embedding, int8 even in int4 (``quantize.for_checkpoint``),
    holds no rows of its own: it reads them from the output layer's packed weight, the
    same values, and the same logits as a rank that keeps both; an untied one keeps its
    table, int4's in int4."""
    tied = load(tiny_q_tied, method)
    table = tied.tok_embeddings.weight
    assert isinstance(table, vocab_tables.SharedInt8Table) and table.nbytes() == 0
    untied = {"int8": vocab_tables.Int8Table, "int4": vocab_tables.Int4Table}[method]
    assert type(load(tiny_q, method).tok_embeddings.weight) is untied
    monkeypatch.setattr(Transformer, "share_vocabulary", lambda self: None)
    both = load(tiny_q_tied, method)
    own = both.tok_embeddings.weight
    assert type(own) is vocab_tables.Int8Table
    assert tied.weight_bytes() == both.weight_bytes() - own.nbytes()
    every = torch.arange(own.shape[0])
    assert torch.equal(table.lookup(every), own.lookup(every))
    ids = torch.tensor([[3, own.shape[0] - 1], [64, 0]])  # any shape, the last row
    assert torch.equal(table.lookup(ids), own.lookup(ids))
    assert torch.equal(last_logits(tied, ROWS), last_logits(both, ROWS))


def test_mpllama_quantize_keeps_a_tied_embedding_int8(
    tiny_q_tied: Path, tmp_path: Path, single_rank: None
) -> None:
    """``mpllama quantize --to int4`` of a tied checkpoint writes its embedding int8, as
    quantizing on load keeps it (``quantize.for_checkpoint``), and the two load alike."""
    out = quantize_ckpt(tiny_q_tied, tmp_path / "q", "int4")
    assert read_quantization(out).embedding == "int8"
    shards = checkpoint.find_shards(out)
    assert all(
        weights.load_shard(p, True)["tok_embeddings.weight"].dtype == torch.int8 for p in shards
    )
    stored, on_load = load(out), load(tiny_q_tied, "int4")
    assert type(stored.tok_embeddings.weight) is type(on_load.tok_embeddings.weight)
    assert torch.equal(last_logits(stored, ROWS), last_logits(on_load, ROWS))


def test_a_checkpoint_quantized_before_the_vocabulary_was_keeps_it_in_full_precision(
    tiny_q: Path, tmp_path: Path, single_rank: None
) -> None:
    """An int8 checkpoint written before ``vocab`` existed: its params entry has no
    ``vocab``, its embedding and output layer are float. It loads as written, its
    tables float, its layers int8 as a checkpoint quantized now."""
    old, now = tmp_path / "old", quantize_ckpt(tiny_q, tmp_path / "now", "int8")
    old.mkdir()
    written = Quantization("int8", row_groups=2, vocab=False)
    for path in checkpoint.find_shards(tiny_q):
        torch.save(quantize.quantize_state(weights.load_shard(path), written), old / path.name)
    params = json.loads((tiny_q / "params.json").read_text())
    params["mpllama_quantization"] = {"method": "int8", "row_groups": 2}
    (old / "params.json").write_text(json.dumps(params))
    shutil.copyfile(tiny_q / "tokenizer.model", old / "tokenizer.model")
    assert read_quantization(old) == written
    assert main(["check", str(old)]) == 0
    model, new = load(old), load(now)
    assert isinstance(model.tok_embeddings.weight, torch.Tensor)
    assert isinstance(model.output.weight, torch.Tensor)
    assert isinstance(new.output.weight, Int8Weight)
    for a, b in zip(model.layers, new.layers, strict=True):
        assert torch.equal(a.attention.wo.weight.scales, b.attention.wo.weight.scales)
    full = last_logits(load(tiny_q), ROWS)
    err = float((last_logits(model, ROWS) - full).norm() / full.norm())
    assert err < 0.03, err


def test_an_int4_checkpoint_quantized_before_int4_embeddings_keeps_its_int8_table(
    tiny_q: Path, tmp_path: Path, single_rank: None, capsys: pytest.CaptureFixture[str]
) -> None:
    """An int4 checkpoint written when every embedding was int8: its params entry has no
    ``embedding``. It loads as written, its embedding an int8 table, its layers as a
    checkpoint quantized now; what is written now says int4 and holds it."""
    old, now = tmp_path / "old", quantize_ckpt(tiny_q, tmp_path / "now", "int4")
    old.mkdir()
    written = Quantization("int4", 64, embedding="int8").split_as(2, 1)
    for path in checkpoint.find_shards(tiny_q):
        torch.save(quantize.quantize_state(weights.load_shard(path), written), old / path.name)
    params = json.loads((tiny_q / "params.json").read_text())
    entry = {"method": "int4", "group_size": 64, "embed_groups": 2, "vocab": True}
    params["mpllama_quantization"] = entry
    (old / "params.json").write_text(json.dumps(params))
    shutil.copyfile(tiny_q / "tokenizer.model", old / "tokenizer.model")
    assert read_quantization(old) == written
    assert json.loads((now / "params.json").read_text())["mpllama_quantization"] == {
        "method": "int4",
        "group_size": 64,
        "embedding": "int4",
        "vocab": True,
    }
    capsys.readouterr()
    for folder, embedding in ((old, "int8"), (now, "int4")):
        assert main(["check", str(folder)]) == 0
        out = capsys.readouterr().out
        assert f"quantized: int4 linear weights (groups of 64; embedding {embedding}," in out
    model, new = load(old), load(now)
    assert type(model.tok_embeddings.weight) is vocab_tables.Int8Table
    assert type(new.tok_embeddings.weight) is vocab_tables.Int4Table
    args = checkpoint.read_params(tiny_q)
    states = [
        weights.load_rank_state(checkpoint.find_shards(f), args, 0, 1, read_quantization(f))
        for f in (old, now)
    ]
    layers = [k for k in states[1] if k.startswith("layers.")]
    assert all(torch.equal(states[0][k], states[1][k]) for k in layers)
    assert states[0]["tok_embeddings.weight"].dtype == torch.int8
    full = last_logits(load(tiny_q), ROWS)
    err = float((last_logits(model, ROWS) - full).norm() / full.norm())
    assert err < 0.25, err


def test_two_ranks_run_a_quantized_checkpoint_as_one_does(
    tiny_q: Path, tiny_q_by_vocab: Path, tiny_q_tied: Path, tmp_path: Path, ray_runtime
) -> None:
    """Through the engine: the int8 checkpoint of 2 shards on 1 rank and on 2 (its
    row-parallel scales are per shard, so the two compute the same sums), int4
    quantized on load at 2 ranks against the same on 1, int8 and int4 on load from
    shards that split the embedding by vocabulary (each rank looks up its own rows), and
    a tied one so split (each rank reads its rows from its slice of the output layer)."""
    from mpllama import LLM, SamplingParams

    params = SamplingParams(temperature=0, max_tokens=5, logprobs=True, ignore_eos=True)
    int8 = quantize_ckpt(tiny_q, tmp_path / "int8", "int8")
    cases = [
        ("int8", int8, "none"),
        ("int4", tiny_q, "int4"),
        ("int8 by vocabulary", tiny_q_by_vocab, "int8"),
        ("int4 by vocabulary", tiny_q_by_vocab, "int4"),
        ("int4 tied, by vocabulary", tiny_q_tied, "int4"),
    ]
    runs = {}
    for name, folder, setting in cases:
        for world in (1, 2):
            settings = {"cpus_per_rank": 0.5, "max_seq_len": 64, "max_batch_size": 4}
            with LLM(folder, model_parallel_size=world, quantization=setting, **settings) as llm:
                assert {i["quantization"] for i in llm.engine.rank_info} == {name.split()[0]}
                runs[name, world] = llm.generate(PROMPTS[:3], params)
    for name, _, _ in cases:
        for one, two in zip(runs[name, 1], runs[name, 2], strict=True):
            assert one.token_ids == two.token_ids
            torch.testing.assert_close(one.logprobs, two.logprobs, rtol=0, atol=1e-4)


# ---------------------------------------------------------------- errors


def test_quantize_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["quantize", "--help"])
    assert info.value.code == 0
    assert "--to {int8,int4}" in capsys.readouterr().out


def test_quantization_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match=r"quantization must be one of \['none', 'int8'"):
        RuntimeConfig(quantization="int3")
    with pytest.raises(ConfigError, match="quant_group_size must be auto or one of"):
        RuntimeConfig(quant_group_size=48)
    assert RuntimeConfig().quantization == "none"
    assert Quantization("int4").embedding == "int4"
    assert Quantization("int8").embedding == "int8"
    with pytest.raises(ConfigError, match=r"embedding is one of \['int8'\], got 'int4'"):
        Quantization("int8", embedding="int4")


LLAMA32_1B = ModelArgs(
    dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim_multiplier=1.5, multiple_of=256
)


def test_int4_groups_are_the_largest_every_split_takes() -> None:
    """auto: 128 for Llama's widths at any usual split; the demo model's 2 shards give
    its wo 96 inputs each (32), one shard 192 (64); a size asked for is kept, and
    check_quantization refuses it where it does not fit."""
    demo = checkpoint.read_params(DEMO)
    for parts in (1, 2, 8):
        assert int4_group_size(LLAMA32_1B, "auto", parts, parts) == 128
    assert int4_group_size(demo, "auto", 2) == 32
    assert int4_group_size(demo, "auto", 1) == 64
    assert int4_group_size(demo, "auto", 1, 2) == 32  # one shard, two ranks
    assert int4_group_size(demo, 128, 1) == 128
    with pytest.raises(
        ConfigError, match=r"does not divide dim=192.*group sizes that fit: \[32, 64\]"
    ):
        check_quantization(demo, Quantization("int4", 128), 1)
    assert RuntimeConfig().quant_group_size == "auto"


def test_quantize_writes_auto_groups(tiny_q: Path, tmp_path: Path, single_rank: None) -> None:
    """`mpllama quantize --to int4` without --group-size writes auto's groups, and a rank
    quantizing on load makes the same (64 for tiny_q's 2 shards, 128 from 1 shard)."""
    for shards, want in ((2, 64), (1, 128)):
        src = tiny_q
        if shards == 1:
            src = tmp_path / "one"
            assert main(["reshard", str(tiny_q), str(src), "--mp", "1"]) == 0
        out = quantize_ckpt(src, tmp_path / f"q{shards}", "int4")
        stored = read_quantization(out)
        assert stored is not None and stored.group_size == want
        args = checkpoint.read_params(src)
        made = quantize.on_load("int4", "auto", None, args, shards, shards)
        assert made is not None and made.group_size == want
        model = load(out)
        assert {
            m.weight.group_size
            for m in model.modules()
            if isinstance(m.__dict__.get("weight"), Int4Weight)
        } == {want}
    explicit = quantize_ckpt(tiny_q, tmp_path / "q32", "int4", "--group-size", "32")
    assert read_quantization(explicit).group_size == 32


def test_quantize_errors(
    tiny_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def error(*argv: str) -> str:
        assert main(["quantize", *argv]) != 0
        return capsys.readouterr().err

    with pytest.raises(SystemExit):
        main(["quantize", str(tiny_ckpt), str(tmp_path / "x"), "--to", "int3"])
    assert "invalid choice: 'int3'" in capsys.readouterr().err
    assert "overwrite its input" in error(str(tiny_ckpt), str(tiny_ckpt), "--to", "int8")
    assert "group size must be one of" in error(
        str(tiny_ckpt), str(tmp_path / "x"), "--to", "int4", "--group-size", "48"
    )
    assert "--group-size applies to --to int4" in error(
        str(tiny_ckpt), str(tmp_path / "x"), "--to", "int8", "--group-size", "64"
    )
    # tiny: w2 takes 176 inputs in each of 2 shards, which no group size divides.
    assert "FFN width per part=176 (2 part(s)); no group size fits; use int8" in error(
        str(tiny_ckpt), str(tmp_path / "x"), "--to", "int4"
    )
    done = quantize_ckpt(tiny_ckpt, tmp_path / "q", "int8")
    assert "already quantized (int8)" in error(str(done), str(tmp_path / "y"), "--to", "int4")
    with pytest.raises(CheckpointError, match="would quantize it twice"):
        args = checkpoint.read_params(tiny_ckpt)
        quantize.on_load("int4", 32, Quantization("int8", row_groups=2), args, 2, 2)


def test_a_quantized_checkpoint_is_not_converted_to_hugging_face(
    tiny_q: Path, tmp_path: Path
) -> None:
    """A Hugging Face folder holds full-precision weights: converting a quantized
    checkpoint says so and names the way out (it once stopped at the first int table, with
    the advice meant for Meta's own quantized releases)."""
    from mpllama.offline.convert import convert_meta_to_hf

    quantized = quantize_ckpt(tiny_q, tmp_path / "q", "int4")
    with pytest.raises(CheckpointError, match=r"is quantized \(int4, mpllama quantize\)"):
        convert_meta_to_hf(quantized, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_a_quantized_shard_needs_its_params_entry(tiny_ckpt: Path, tmp_path: Path) -> None:
    """Without mpllama_quantization, int8 shards are refused as Meta's quantized files are
    (and Meta's own quantization_args stay refused by read_params)."""
    done = quantize_ckpt(tiny_ckpt, tmp_path / "q", "int8")
    params = json.loads((done / "params.json").read_text())
    del params["mpllama_quantization"]
    (done / "params.json").write_text(json.dumps(params))
    with pytest.raises(CheckpointError, match="quantized"):
        weights.load_shard(checkpoint.find_shards(done)[0])
    with pytest.raises(CheckpointError, match="unexpected key"):
        checkpoint.check_shards(checkpoint.find_shards(done), checkpoint.read_params(done))
    params["quantization_args"] = {"group_size": 32}
    (done / "params.json").write_text(json.dumps(params))
    with pytest.raises(CheckpointError, match="Meta quantized"):
        checkpoint.read_params(done)
