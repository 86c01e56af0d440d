"""The Transformer: built on meta, weights assigned without copies, a rank's memory is its
slice only, RoPE in Meta's layout, and forward's per-row positions and logits_at."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers import LLAMA2_70B, pretend_model_parallel

from mpllama import checkpoint
from mpllama.offline.fixtures import PRESETS, random_state
from mpllama.rank import attention, layers, weights
from mpllama.rank import model as model_module
from mpllama.rank.model import Transformer, materialize
from mpllama.rank.rope import apply_rope, rope_table
from mpllama.shard_axes import shard_shapes

CPU = torch.device("cpu")


def load(folder: Path, dtype: torch.dtype = torch.float32) -> tuple[Transformer, dict]:
    args = checkpoint.read_params(folder)
    state = weights.load_rank_state(checkpoint.find_shards(folder), args, 0, 1)
    return materialize(Transformer(args), state, CPU, dtype), state


@pytest.fixture(scope="module")
def tiny(tiny_ckpt: Path, single_rank: None) -> Transformer:
    model, _ = load(tiny_ckpt)
    return model


def tokens(seed: int, *shape: int, vocab: int = 512) -> torch.Tensor:
    return torch.randint(3, vocab, shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- meta and materialize


def test_medium_preset_is_built_on_meta(single_rank: None) -> None:
    args = replace(PRESETS["medium"], vocab_size=32000)
    model = Transformer(args)
    params = dict(model.named_parameters())
    assert params and all(p.is_meta for p in params.values())
    assert all(b.is_meta for b in model.buffers())
    expected = shard_shapes(args, 1)
    assert {k: tuple(p.shape) for k, p in params.items()} == expected
    with pytest.raises(RuntimeError, match="materialize"):
        model.setup_slots(1, 8)


def test_meta_70b_at_mp8_matches_the_shard_table(
    single_rank: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The model's layer choice and the checkpoint's axis table must agree at real shapes.
    pretend_model_parallel(monkeypatch, 8)
    model = Transformer(LLAMA2_70B)
    shapes = {k: tuple(p.shape) for k, p in model.named_parameters()}
    assert shapes == shard_shapes(LLAMA2_70B, 8)
    attn = model.layers[0].attention
    assert (attn.n_local_heads, attn.n_local_kv_heads, attn.head_dim) == (8, 1, 128)


def test_unresolved_vocab_is_refused(single_rank: None) -> None:
    with pytest.raises(ValueError, match="vocab_size must be resolved"):
        Transformer(PRESETS["tiny"])


def test_materialize_assigns_mapped_tensors_without_copying(
    tiny_ckpts: dict[int, Path], single_rank: None
) -> None:
    model, state = load(tiny_ckpts[1])
    params = dict(model.named_parameters())
    assert set(params) == set(state)
    for key, value in state.items():
        assert params[key].data_ptr() == value.data_ptr(), key
        assert params[key].untyped_storage().data_ptr() == value.untyped_storage().data_ptr()
    assert not model.training


def test_materialize_converts_when_dtype_differs(
    tiny_ckpts: dict[int, Path], single_rank: None
) -> None:
    model, state = load(tiny_ckpts[1], torch.bfloat16)
    for key, param in model.named_parameters():
        assert param.dtype == torch.bfloat16
        assert param.data_ptr() != state[key].data_ptr()
        torch.testing.assert_close(param.float(), state[key], atol=0.02, rtol=0.01)
    model.setup_slots(2, 16)
    assert model.layers[0].attention.cache_k.dtype == torch.bfloat16
    # Two slots of one 16-position block each, plus the spare block for padding writes.
    assert model.layers[0].attention.cache_k.shape == (3 * 16, 4, 16)  # [positions, K, D]


def test_materialize_is_strict(tiny_ckpts: dict[int, Path], single_rank: None) -> None:
    args = checkpoint.read_params(tiny_ckpts[1])
    state = dict(weights.load_rank_state(checkpoint.find_shards(tiny_ckpts[1]), args, 0, 1))
    del state["layers.0.ffn_norm.weight"]
    with pytest.raises(RuntimeError, match=r"layers\.0\.ffn_norm\.weight"):
        materialize(Transformer(args), state, CPU, torch.float32)


# ---------------------------------------------------------------------------- memory

MEMORY_PROBE = textwrap.dedent("""
    import json, sys
    import torch
    from mpllama import checkpoint
    from mpllama.rank import attention, dist, layers, weights
    from mpllama.rank.model import Transformer, materialize

    folder, world = sys.argv[1], int(sys.argv[2])
    dist.init_single("gloo")
    # Build rank 0's model at this world size (the layers read the size from here).
    attention.get_model_parallel_world_size = layers.get_model_parallel_world_size = lambda: world

    def status_kb(field):
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise KeyError(field)

    # getrusage's ru_maxrss is inherited through fork+exec (it would report the pytest
    # process's peak); the kernel's VmHWM is this process's own peak, reset here.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    args = checkpoint.read_params(folder)
    files = checkpoint.find_shards(folder)
    rss0, anon0 = status_kb("VmRSS"), status_kb("RssAnon")
    state = weights.load_rank_state(files, args, 0, world)
    model = materialize(Transformer(args), state, torch.device("cpu"), torch.float32)
    del state
    # Touch every weight, so each page this rank holds is really resident.
    total = sum(float(p.double().sum()) for p in model.parameters())
    peak, anon1 = status_kb("VmHWM"), status_kb("RssAnon")
    rank_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    print(json.dumps({"peak_kb": peak - rss0, "anon_kb": anon1 - anon0,
                      "rank_kb": rank_bytes // 1024, "finite": total == total}))
""")


@pytest.fixture(scope="module")
def bigger_ckpts(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[int, Path], int]:
    """The "small" preset (~97 MB in float32) as 1 and 2 shards, and its full size in kB."""
    args = replace(PRESETS["small"], vocab_size=512)
    state = random_state(args, seed=0)
    root = tmp_path_factory.mktemp("bigger")
    folders = {}
    for parts in (1, 2):
        folders[parts] = root / f"mp{parts}"
        weights.write_checkpoint(folders[parts], args, state, parts)
    full_kb = sum(v.numel() * v.element_size() for v in state.values()) // 1024
    return folders, full_kb


def probe(folder: Path, world: int) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, str(folder), str(world)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_a_rank_holds_only_its_slice(bigger_ckpts: tuple[dict[int, Path], int]) -> None:
    folders, full_kb = bigger_ckpts
    got = probe(folders[2], 2)
    assert got["finite"]
    assert 0.45 * full_kb < got["rank_kb"] < 0.55 * full_kb
    # Peak resident growth while loading and touching rank 0's half: its half, not the
    # whole model (nor a full-size fairscale master weight per layer).
    assert got["peak_kb"] < 0.75 * full_kb, (got, full_kb)
    assert got["peak_kb"] > 0.3 * full_kb, "the probe should see the touched half"


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_resharding_allocates_only_the_slice(bigger_ckpts: tuple[dict[int, Path], int]) -> None:
    # One shard onto two ranks: the shard is memory-mapped (page cache, shared by ranks
    # on a node); what the rank allocates for itself is its half only.
    folders, full_kb = bigger_ckpts
    got = probe(folders[1], 2)
    assert got["anon_kb"] < 0.75 * full_kb, (got, full_kb)


def test_vocabulary_parallel_embedding_rows_sum_to_the_full_lookup(
    single_rank: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Llama 3 shard's embedding: each of 4 ranks looks up only its own vocabulary
    range and zeros the rest, so the ranks' rows (summed by the all-reduce, a no-op in
    this one-rank group) are the full table's."""
    full = torch.randn(40, 6, generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([[0, 9, 10, 39], [25, 20, 19, 30]])
    total = torch.zeros(2, 4, 6)
    for rank in range(4):
        pretend_model_parallel(monkeypatch, 4, rank)
        layer = layers.parallel_embedding(40, 6, axis=0)
        layer.weight = torch.nn.Parameter(full[rank * 10 : (rank + 1) * 10], requires_grad=False)
        rows = layer(ids)
        mine = (ids >= rank * 10) & (ids < (rank + 1) * 10)
        assert bool((rows[~mine] == 0).all())
        total += rows
    assert torch.equal(total, full[ids])


# -------------------------------------------------------------------------------- RoPE


def test_rope_matches_meta_complex_reference() -> None:
    B, T, H, D = 2, 5, 3, 16
    x = torch.randn(B, T, H, D, generator=torch.Generator().manual_seed(0))
    table = rope_table(D, 32, 10000.0, CPU)
    positions = torch.tensor([[0, 1, 2, 3, 4], [7, 8, 9, 10, 11]])
    got = apply_rope(x, table[positions])
    # Meta's reference: interleaved pairs as complex numbers times e^{i * pos * freq}.
    freqs = 1.0 / (10000.0 ** (torch.arange(0, D, 2)[: D // 2].float() / D))
    angles = torch.outer(torch.arange(32).float(), freqs)
    cis = torch.polar(torch.ones_like(angles), angles)[positions]  # [B,T,D/2]
    ref = torch.view_as_real(
        torch.view_as_complex(x.reshape(B, T, H, D // 2, 2)) * cis[:, :, None, :]
    ).flatten(3)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(apply_rope(x, table[positions * 0]), x)


# ----------------------------------------------------------------------------- forward


def test_logits_at_picks_rows_of_the_full_output(tiny: Transformer) -> None:
    tiny.setup_slots(3, 32)
    toks = tokens(0, 3, 9)
    start = torch.zeros(3, dtype=torch.long)
    slots = torch.arange(3)
    full = tiny(toks, start, tiny.slot_runs(slots))
    assert full.shape == (3, 9, 512) and full.dtype == torch.float32
    at = torch.tensor([8, 0, 4])
    picked = tiny(toks, start, tiny.slot_runs(slots), logits_at=at)
    assert picked.shape == (3, 512)
    torch.testing.assert_close(picked, full[torch.arange(3), at], atol=1e-5, rtol=0)
    # Causal: a position's logits do not depend on later tokens.
    changed = toks.clone()
    changed[:, 5:] = tokens(1, 3, 4)
    torch.testing.assert_close(
        tiny(changed, start, tiny.slot_runs(slots))[:, :5], full[:, :5], atol=1e-5, rtol=0
    )


def run_alone(model: Transformer, chunks: list[torch.Tensor]) -> list[torch.Tensor]:
    """Feed ``chunks`` of one row in turn from position 0 of slot 0; each chunk's last
    logits."""
    out, pos = [], 0
    for chunk in chunks:
        out.append(model(chunk[None], torch.tensor([pos]), model.slot_runs([0]))[0, -1])
        pos += len(chunk)
    return out


# Where two rows' KV lives, as (first block, blocks) runs, in a pool of 4-position blocks,
# and how attention reads them: evenly spaced single runs as one strided view; single runs
# out of order, or blocks scattered out of order, each row on its own (a view, or its runs
# gathered) when padding would cost more than a call per row, else all rows gathered at
# once (as a GPU always does).
SCATTERED = [[(5, 1), (2, 1), (7, 1)], [(0, 2), (9, 1), (3, 1)]]
LAYOUTS = {
    "strided": ([[(0, 4)], [(4, 4)]], "strided"),
    "per row": ([[(8, 4)], [(0, 4)]], "per row"),
    "scattered, per row": (SCATTERED, "per row"),
    "out of order, gathered": ([[(8, 4)], [(0, 4)]], "gathered"),
    "scattered, gathered": (SCATTERED, "gathered"),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_rows_at_different_positions_equal_running_them_alone(
    tiny: Transformer, layout: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A right-padded prefill whose padding must not touch either row's blocks, then more
    tokens, then a decode step: each row gets the logits it gets alone, wherever its
    blocks are and however attention reads them. On a CPU the prompts' steps read each
    row as it reads alone (``CacheIndex.own_pieces``; bit for bit on packed weights:
    test_runner's test_prompts_beside_others_are_bit_for_bit_what_they_are_alone)."""
    runs, read = LAYOUTS[layout]
    batched = read != "per row"
    monkeypatch.setattr(model_module, "ROW_CALL_BYTES", 1 << 40 if batched else 0)
    a, b = tokens(2, 5), tokens(3, 11)
    a_more, b_more = tokens(4, 3), tokens(5, 3)
    a_next, b_next = tokens(6, 1), tokens(7, 1)
    tiny.setup_slots(1, 32)
    want_a = run_alone(tiny, [a, a_more, a_next])
    want_b = run_alone(tiny, [b, b_more, b_next])

    tiny.setup_caches(12, 4, 32)
    seen = []
    build = model_module.CacheIndex.build
    monkeypatch.setattr(
        model_module.CacheIndex, "build", lambda *a: seen.append(build(*a)) or seen[-1]
    )
    padded = torch.zeros(2, 11, dtype=torch.long)
    padded[0, :5], padded[1] = a, b
    zero = torch.zeros(2, dtype=torch.long)
    got = tiny(padded, zero, runs, lengths=torch.tensor([5, 11]), logits_at=torch.tensor([4, 10]))
    torch.testing.assert_close(got[0], want_a[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(got[1], want_b[0], atol=1e-5, rtol=0)
    # The padding wrote only to the spare block: positions 5.. of row a's blocks are 0.
    k = tiny.layers[0].attention.cache_k
    first_a = [(f + j) * 4 for f, n in runs[0] for j in range(n)]
    assert not k[first_a[1] + 1 : first_a[1] + 4].any()
    # Three more tokens per row, starting at each row's own length (5 and 11).
    pos = torch.tensor([5, 11])
    got = tiny(torch.stack([a_more, b_more]), pos, runs)[:, -1]
    torch.testing.assert_close(got[0], want_a[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(got[1], want_b[1], atol=1e-5, rtol=0)
    # One decode step each, at positions 8 and 14.
    got = tiny(torch.stack([a_next, b_next]), pos + 3, runs, logits_at=zero)
    torch.testing.assert_close(got[0], want_a[2], atol=1e-5, rtol=0)
    torch.testing.assert_close(got[1], want_b[2], atol=1e-5, rtol=0)
    # The prompts' steps read each row as alone; the decode step as the layout says.
    assert [len(at.own) for at in seen] == [2, 2, 0]
    assert [at.strided for at in seen] == [False, False, read == "strided"]
    assert [at.gather is not None for at in seen] == [False, False, read == "gathered"]
    assert all((len(at.segments[0]) > 1) == (runs is SCATTERED) for at in seen)


def test_evenly_spaced_rows_are_read_together_beside_others_read_alone(
    tiny: Transformer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows 0-2 evenly spaced (one view for the three), row 3 scattered (on its own),
    row 4 out of order (on its own): decode logits equal each row's alone."""
    monkeypatch.setattr(model_module, "ROW_CALL_BYTES", 1 << 40)  # views always pay
    monkeypatch.setattr(Transformer, "gather_pays", lambda self, S: False)
    prompts = [tokens(10 + i, 6 + i) for i in range(5)]
    tiny.setup_slots(1, 32)
    want = [run_alone(tiny, [p, tokens(20 + i, 1)]) for i, p in enumerate(prompts)]
    tiny.setup_caches(40, 4, 32)
    runs = [[(0, 3)], [(4, 3)], [(8, 3)], [(30, 1), (20, 2)], [(12, 3)]]
    seen = []
    build = model_module.CacheIndex.build
    monkeypatch.setattr(
        model_module.CacheIndex, "build", lambda *a: seen.append(build(*a)) or seen[-1]
    )
    lens = torch.tensor([len(p) for p in prompts])
    padded = torch.zeros(5, int(lens.max()), dtype=torch.long)
    for i, p in enumerate(prompts):
        padded[i, : len(p)] = p
    zero = torch.zeros(5, dtype=torch.long)
    got = tiny(padded, zero, runs, lengths=lens, logits_at=lens - 1)
    for i in range(5):
        torch.testing.assert_close(got[i], want[i][0], atol=1e-5, rtol=0)
    nxt = torch.stack([tokens(20 + i, 1) for i in range(5)])
    got = tiny(nxt, lens, runs, logits_at=zero)
    for i in range(5):
        torch.testing.assert_close(got[i], want[i][1], atol=1e-5, rtol=0)
    assert [(lo, hi) for lo, hi, _ in seen[-1].pieces] == [(0, 3), (3, 4), (4, 5)]


def test_attention_reads_rows_on_their_own_when_padding_costs_more(tiny: Transformer) -> None:
    """The tiny model keeps 512 bytes of K and V per position and layer; two rows read on
    their own cost two calls, worth 512 KiB of reading."""
    tiny.setup_slots(2, 2048)
    assert not tiny.batched_read_pays([10, 1500])  # 1490 positions of padding: 745 KiB
    assert tiny.batched_read_pays([10, 900])  # 445 KiB
    assert tiny.batched_read_pays([1500, 1500])  # no padding at all
    assert tiny.batched_read_pays([1500])  # one row has nothing to save


def test_forward_refuses_rows_past_their_blocks_or_max_seq_len(tiny: Transformer) -> None:
    tiny.setup_caches(4, 4, 16)
    with pytest.raises(ValueError, match="row 0: blocks for 4 positions, it needs 5"):
        tiny(tokens(0, 1, 5), torch.zeros(1, dtype=torch.long), [[(0, 1)]])
    with pytest.raises(ValueError, match="position 16, past max_seq_len 16"):
        tiny(tokens(0, 1, 2), torch.tensor([15]), [[(0, 4)]])


# ------------------------------------------------------------------ oneDNN linear layers

ONEDNN = layers.onednn_unsupported(CPU, torch.float32) is None
needs_onednn = pytest.mark.skipif(not ONEDNN, reason="this torch build has no oneDNN linear")


@needs_onednn
def test_packed_linears_give_the_plain_models_logits(tiny_ckpt: Path, single_rank: None) -> None:
    """Prefill chunks of different lengths, then decode steps: every logit of the packed
    model (q, k, v and w1, w3 each stacked into one product) within 1e-4 of the plain
    one; the weights are replaced, not copied."""
    plain, _ = load(tiny_ckpt)
    packed, _ = load(tiny_ckpt)
    packed.pack_linears()
    kinds = (layers.ColumnLinear, layers.RowLinear, layers.Fused)
    products = [m for m in packed.modules() if isinstance(m, kinds) and hasattr(m, "weight")]
    # Per layer: qkv, wo, w13, w2; and the output layer. wq, wk, wv, w1, w3 hold nothing.
    assert len(products) == 4 * packed.args.n_layers + 1
    assert all(m.weight.layout == torch._mkldnn for m in products)
    fused = packed.layers[0].attention.wqkv
    assert fused is not None and fused.sizes == [
        packed.layers[0].attention.wq.output_size_per_partition,
        packed.layers[0].attention.wk.output_size_per_partition,
        packed.layers[0].attention.wv.output_size_per_partition,
    ]
    assert not any(p.layout == torch._mkldnn for p in packed.parameters())
    assert packed.device == CPU
    for m in (plain, packed):
        m.setup_slots(3, 32)
    toks = tokens(8, 3, 9)
    slots, lens = torch.tensor([2, 0, 1]), torch.tensor([9, 4, 6])
    zero = torch.zeros(3, dtype=torch.long)
    for m in (plain, packed):
        m.out = [m(toks, zero, m.slot_runs(slots), lengths=lens, logits_at=lens - 1)]
        for step in range(3):
            nxt = tokens(9 + step, 3, 1)
            m.out.append(m(nxt, lens + step, m.slot_runs(slots), logits_at=zero))
    for want, got in zip(plain.out, packed.out, strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_onednn_refusals_say_why() -> None:
    assert "cuda" in (layers.onednn_unsupported(torch.device("cuda"), torch.float32) or "")
    assert "float16" in (layers.onednn_unsupported(CPU, torch.float16) or "")


def test_a_rank_chooses_its_linear_kernel() -> None:
    from mpllama.rank.rank_setup import linear_kernel as _linear_kernel

    cuda = torch.device("cuda")
    assert _linear_kernel("auto", cuda, torch.float16) == "torch"
    assert _linear_kernel("onednn", cuda, torch.float16) == "torch"  # a CPU-only setting
    assert _linear_kernel("torch", CPU, torch.float32) == "torch"
    assert _linear_kernel("auto", CPU, torch.float16) == "torch"
    with pytest.raises(RuntimeError, match="cpu_linear is onednn, but .*float16"):
        _linear_kernel("onednn", CPU, torch.float16)
    assert _linear_kernel("auto", CPU, torch.float32) == ("onednn" if ONEDNN else "torch")


@pytest.mark.skipif(
    layers.onednn_unsupported(CPU, torch.bfloat16) is not None,
    reason="oneDNN has no bfloat16 linear kernel on this CPU",
)
def test_packed_bfloat16_linears_track_the_plain_bfloat16_model(
    tiny_ckpt: Path, single_rank: None
) -> None:
    """bf16 ranks on CPUs with bf16 support pack too; bf16 rounding bounds the agreement."""
    plain, _ = load(tiny_ckpt, torch.bfloat16)
    packed, _ = load(tiny_ckpt, torch.bfloat16)
    packed.pack_linears()
    outs = []
    for m in (plain, packed):
        m.setup_slots(2, 16)
        outs.append(m(tokens(10, 2, 7), torch.zeros(2, dtype=torch.long), m.slot_runs([0, 1])))
    assert outs[1].dtype == torch.float32
    torch.testing.assert_close(outs[1], outs[0], atol=0.1, rtol=0)
    assert (outs[1].argmax(-1) == outs[0].argmax(-1)).float().mean() > 0.9


@pytest.mark.parametrize("heads, kv_heads", [(8, 2), (4, 4)])
def test_reduced_precision_decode_attention_matches_float32_sdpa(heads: int, kv_heads: int) -> None:
    """One query per row in bf16 on a CPU takes two products and a float32 softmax, not
    SDPA (slow there for a single query): grouped heads and masks as enable_gqa and
    attn_mask have them, within bf16's rounding of float32 SDPA, and no worse than bf16
    SDPA itself."""
    torch.manual_seed(0)
    B, S, D = 3, 19, 16
    q, k, v = (
        torch.randn(B, heads, 1, D),
        torch.randn(B, kv_heads, S, D),
        torch.randn(B, kv_heads, S, D),
    )
    mask = torch.ones(B, 1, 1, S, dtype=torch.bool)
    mask[0, ..., 11:] = False  # a shorter row, as in a padded batch
    gqa = heads != kv_heads
    exact = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, enable_gqa=gqa
    )
    half = [t.bfloat16() for t in (q, k, v)]
    got = attention.attend(*half, mask, gqa).float()
    sdpa = torch.nn.functional.scaled_dot_product_attention(*half, attn_mask=mask, enable_gqa=gqa)
    assert got.shape == exact.shape
    torch.testing.assert_close(got, exact, atol=2e-2, rtol=0)
    assert (got - exact).abs().max() <= 2 * (sdpa.float() - exact).abs().max() + 1e-3
    # A masked position changes nothing: row 0 without its masked tail gives the same.
    alone = attention.attend(half[0][:1], half[1][:1, :, :11], half[2][:1, :, :11], None, gqa)
    torch.testing.assert_close(alone.float(), got[:1], atol=1e-2, rtol=0)
    # Float32 keeps SDPA, bit for bit.
    assert torch.equal(attention.attend(q, k, v, mask, gqa), exact)
