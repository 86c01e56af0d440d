"""Llama 3.x checkpoints against Meta's own reference Transformer (``llama_models``, on
fairscale at world size 1): scaled RoPE, vocabulary-parallel shards as Meta writes them,
KV heads repeated across more ranks than there are, and the KV-cache memory check.

Checkpoints are random, Llama 3 shaped (vocab 128256 with Meta's real tokenizer.model,
GQA, use_scaled_rope, rope_theta 5e5) and tiny (dim 64, so head_dim 8 keeps pairs whose
wavelength the scaling changes)."""

from __future__ import annotations

import inspect
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers import LLAMA3_RELEASES, pretend_model_parallel

from mpllama import LLM, SamplingParams, checkpoint, memory
from mpllama.checkpoint import detect_embedding_axis, embedding_axis
from mpllama.config import RuntimeConfig
from mpllama.errors import CheckpointError, ConfigError
from mpllama.model_args import PRESETS, ModelArgs
from mpllama.offline.fixtures import init_llama3_checkpoint, random_state
from mpllama.protocol import Request
from mpllama.rank import weights
from mpllama.rank.model import Transformer, materialize
from mpllama.rank.rope import rope_table
from mpllama.rank.runner import Runner
from mpllama.shard_axes import check_model_parallel, kv_heads_of, shard_shapes
from mpllama.tokenizer import Tokenizer

CPU = torch.device("cpu")
TINY3 = PRESETS["llama3-tiny"]  # dim 64, 8 heads of 8, 2 KV heads, vocab 128256
LLAMA31_8B = LLAMA3_RELEASES["llama3.1-8b"]  # Meta's released params.json, vocab resolved
LLAMA31_405B = LLAMA3_RELEASES["llama3.1-405b"]
TEXTS = ["Hello world", "The quick brown fox jumps over the lazy dog.", "a", "Numbers 12345 🦙"]
MAX_NEW = 6
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_NEW, logprobs=True, ignore_eos=True)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """llama3-tiny's weights (one seed) as Meta shards them: 1, 2 and 4 shards (4 shards
    of 2 KV heads: each shard holds a copy of one, as 405B's 16 shards do)."""
    root = tmp_path_factory.mktemp("llama3")
    return {n: init_llama3_checkpoint(root / f"mp{n}", parts=n, seed=3) for n in (1, 2, 4)}


@pytest.fixture(scope="module")
def tok(ckpts: dict[int, Path]) -> Tokenizer:
    return Tokenizer(ckpts[1] / "tokenizer.model")


def meta_model(ckpt: Path, max_seq_len: int = 256):
    """Meta's reference Transformer on the checkpoint's weights (float32, CPU), its
    shards merged by Meta's own ``reshard_mp``: the reference owes nothing to mpllama's
    loader."""
    from llama_models.checkpoint import reshard_mp
    from llama_models.llama3.args import ModelArgs as MetaArgs
    from llama_models.llama3.model import Transformer as MetaTransformer

    params = json.loads((ckpt / "params.json").read_text())
    shards = [torch.load(p, weights_only=True) for p in checkpoint.find_shards(ckpt)]
    state = shards[0] if len(shards) == 1 else reshard_mp(shards, size=1, rank=0)
    model = MetaTransformer(MetaArgs(**params, max_batch_size=1, max_seq_len=max_seq_len))
    model.load_state_dict(state, strict=True)
    return model.eval()


@torch.inference_mode()
def meta_greedy(model, prompt_ids: list[int], max_new: int) -> tuple[list[int], list[float]]:
    """Greedy continuation recomputing the whole sequence every step (no cache reuse)."""
    seq, tokens, logprobs = list(prompt_ids), [], []
    for _ in range(max_new):
        logits = model(torch.tensor([seq]), 0)[0, -1].float()
        token = int(logits.argmax())
        tokens.append(token)
        logprobs.append(float(torch.log_softmax(logits, -1)[token]))
        seq.append(token)
    return tokens, logprobs


@pytest.fixture(scope="module")
def reference(ckpts: dict[int, Path], tok: Tokenizer, single_rank: None) -> list:
    model = meta_model(ckpts[2])
    ids = [tok.encode(t, bos=True, eos=False) for t in TEXTS]
    return [(i, *meta_greedy(model, i, MAX_NEW)) for i in ids]


def assert_matches(got: list[tuple[list[int], list[float]]], reference: list) -> None:
    for (tokens, logprobs), (_, ref_tokens, ref_logprobs) in zip(got, reference, strict=True):
        assert tokens == ref_tokens
        torch.testing.assert_close(
            torch.tensor(logprobs), torch.tensor(ref_logprobs), atol=1e-3, rtol=0
        )


def load(ckpt: Path, args: ModelArgs | None = None, slots: int = 4, seq: int = 256) -> Transformer:
    shards = checkpoint.find_shards(ckpt)
    args = args or checkpoint.read_params(ckpt)
    state = weights.load_rank_state(shards, args, 0, 1)
    axis = detect_embedding_axis(shards, args)
    model = materialize(Transformer(args, axis), state, CPU, torch.float32)
    model.setup_slots(slots, seq)
    return model


# ---------------------------------------------------------------- parity with Meta


@pytest.mark.parametrize("shards", [1, 2])
def test_world_1_matches_metas_reference(
    shards: int, ckpts: dict[int, Path], tok: Tokenizer, reference: list, single_rank: None
) -> None:
    """Prompts of different lengths prefilled together, through the lead's Runner."""
    runner = Runner(load(ckpts[shards]), tok, prefill_chunk_tokens=256)
    runner.add([Request(str(n), ids, GREEDY) for n, (ids, _, _) in enumerate(reference)])
    got: dict[str, tuple[list[int], list[float]]] = {str(n): ([], []) for n in range(len(TEXTS))}
    while runner.has_work:
        for e in runner.step():
            got[e.id][0].extend(e.token_ids)
            got[e.id][1].extend(e.logprobs or [])
    assert_matches([got[str(n)] for n in range(len(TEXTS))], reference)


PAIRS = [(1, 2), (2, 2), (1, 4), (2, 4)]


@pytest.mark.parametrize(("shards", "world"), PAIRS, ids=[f"{s}shards-mp{w}" for s, w in PAIRS])
def test_model_parallel_matches_metas_reference(
    shards: int, world: int, ckpts: dict[int, Path], reference: list, ray_runtime
) -> None:
    """Through the LLM API on local Ray: 2 ranks split 2 KV heads, 4 ranks repeat them
    (each rank a copy of one); 2-shard checkpoints split the embedding by vocabulary."""
    settings = {"cpus_per_rank": 0.5, "max_seq_len": 64, "max_batch_size": 2}
    with LLM(ckpts[shards], model_parallel_size=world, **settings) as llm:
        assert llm.world_size == world
        outputs = llm.generate(prompt_token_ids=[r[0] for r in reference], sampling_params=GREEDY)
    assert_matches([(o.token_ids, o.logprobs) for o in outputs], reference)


# --------------------------------------------------------------------- scaled RoPE


def test_scaled_rope_table_is_metas_bit_for_bit() -> None:
    from llama_models.llama3.model import precompute_freqs_cis

    for head_dim, theta in ((8, 500000.0), (128, 500000.0), (64, 10000.0)):
        ours = rope_table(head_dim, 512, theta, CPU, scale_factor=8.0)
        assert torch.equal(ours, precompute_freqs_cis(head_dim, 512, theta, use_scaled=True))
    scaled, plain = rope_table(8, 512, 500000.0, CPU, 8.0), rope_table(8, 512, 500000.0, CPU)
    # Pairs 0 and 1 (wavelengths 6 and 167) are kept; 2 (4443, in the band) is
    # interpolated, 3 (118k, past 8192) divided by 8.
    assert torch.equal(scaled[:, :2], plain[:, :2])
    assert not torch.allclose(scaled[1:, 2:], plain[1:, 2:])
    assert torch.allclose(scaled[:, 3].angle() * 8, plain[:, 3].angle(), atol=1e-4)


def test_other_factors_match_metas_apply_scaling_with_its_constant_changed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Meta's code hard-codes factor 8; Llama 3.2 1B/3B use 32. Meta's own function,
    with that one constant changed, is the reference."""
    from llama_models.llama3 import model as meta

    monkeypatch.setattr(meta, "apply_scaling", metas_apply_scaling_with_factor(32))
    ours = rope_table(64, 1024, 500000.0, CPU, scale_factor=32.0)
    assert torch.equal(ours, meta.precompute_freqs_cis(64, 1024, 500000.0, use_scaled=True))
    assert not torch.equal(ours, rope_table(64, 1024, 500000.0, CPU, scale_factor=8.0))
    llama32_1b = replace(LLAMA31_8B, dim=2048, n_layers=16)
    assert (llama32_1b.rope_scaling_factor, LLAMA31_8B.rope_scaling_factor) == (32.0, 8.0)
    assert replace(LLAMA31_8B, rope_scale_factor=16.0).rope_scaling_factor == 16.0


@torch.inference_mode()
def test_the_model_is_sensitive_to_the_scaling(ckpts: dict[int, Path], single_rank: None) -> None:
    """Scaling on: within 1e-3 of Meta everywhere. Scaling off (as a loader that ignored
    use_scaled_rope would run): off by far more, and greedy tokens change."""
    ids = torch.randint(0, TINY3.vocab_size, (1, 200), generator=torch.Generator().manual_seed(1))
    ref = meta_model(ckpts[2])(ids, 0).log_softmax(-1)[0]
    args = checkpoint.read_params(ckpts[2])
    assert args.rope_scaling_factor == 8.0
    at = (ids, torch.tensor([0]), [[(0, 16)]])  # slot 0 of load()'s: 16 blocks of 16
    scaled = load(ckpts[2], args)(*at).log_softmax(-1)[0]
    plain = load(ckpts[2], replace(args, use_scaled_rope=False))(*at).log_softmax(-1)[0]
    torch.testing.assert_close(scaled, ref, atol=1e-3, rtol=0)
    assert torch.equal(scaled.argmax(-1), ref.argmax(-1))
    assert float((plain - ref).abs().max()) > 0.05
    assert bool((plain.argmax(-1) != ref.argmax(-1)).any())


def metas_apply_scaling_with_factor(factor: int):
    """Meta's own ``apply_scaling`` with its hard-coded factor 8 changed to ``factor``."""
    from llama_models.llama3 import model as meta

    source = inspect.getsource(meta.apply_scaling)
    assert "scale_factor = 8\n" in source
    namespace = dict(vars(meta))
    exec(source.replace("scale_factor = 8\n", f"scale_factor = {factor}\n"), namespace)
    return namespace["apply_scaling"]


def test_the_setting_reaches_the_ranks_and_matches_meta_at_that_factor(
    ckpts: dict[int, Path],
    tok: Tokenizer,
    monkeypatch: pytest.MonkeyPatch,
    single_rank: None,
    ray_runtime,
) -> None:
    """model.rope_scale_factor (here 32, Llama 3.2 1B/3B's) is applied where the driver
    reads params.json, so every rank runs it: 2 ranks agree with Meta's model built with
    its factor changed to 32, on a prompt long enough that factor 8 would not."""
    from llama_models.llama3 import model as meta

    from mpllama.config import ModelConfig, RunConfig

    _, args, _ = checkpoint.inspect(str(ckpts[2]), None)
    assert args.rope_scaling_factor == 8.0
    long = torch.randint(0, 128000, (150,), generator=torch.Generator().manual_seed(0)).tolist()
    prompts = [tok.encode(TEXTS[1], bos=True, eos=False), long]
    at_8 = meta_greedy(meta_model(ckpts[2]), long, MAX_NEW)
    monkeypatch.setattr(meta, "apply_scaling", metas_apply_scaling_with_factor(32))
    ref = meta_model(ckpts[2])
    expected = [(i, *meta_greedy(ref, i, MAX_NEW)) for i in prompts]
    gap = max(abs(a - b) for a, b in zip(at_8[1], expected[1][2], strict=True))
    # Far past the 1e-3 the comparison allows: at factor 8 this test fails.
    assert at_8[0] != expected[1][1] or gap > 5e-3, "the prompt must tell the factors apart"
    config = RunConfig(model=ModelConfig(checkpoint_dir=str(ckpts[2]), rope_scale_factor=32.0))
    settings = {"cpus_per_rank": 0.5, "max_seq_len": 192, "max_batch_size": 2}
    with LLM(config=config, **settings) as llm:
        assert llm.spec.args.rope_scaling_factor == 32.0
        outputs = llm.generate(prompt_token_ids=prompts, sampling_params=GREEDY)
    assert_matches([(o.token_ids, o.logprobs) for o in outputs], expected)


# ----------------------------------------------------------- shards as Meta makes them


def test_the_writer_shards_by_vocabulary_and_the_axis_is_read_from_shapes(
    ckpts: dict[int, Path],
) -> None:
    args = checkpoint.read_params(ckpts[2])
    assert args == TINY3
    shards = checkpoint.find_shards(ckpts[2])
    head = checkpoint.read_shapes(shards[0])
    assert head["tok_embeddings.weight"] == (64128, 64)
    assert head["output.weight"] == (64128, 64)
    assert detect_embedding_axis(shards, args) == 0
    assert checkpoint.check_shards(shards, args) > 0
    # The same weights written in Llama 2's layout read as axis 1; one shard is either.
    assert embedding_axis({"tok_embeddings.weight": (128256, 32)}, args, 2) == 1
    assert detect_embedding_axis(checkpoint.find_shards(ckpts[1]), args) == 1


@pytest.mark.parametrize("shards", [1, 2, 4])
@pytest.mark.parametrize("world", [1, 2, 4, 8])
def test_ranks_hold_their_vocabulary_rows_and_their_kv_head(
    shards: int, world: int, ckpts: dict[int, Path]
) -> None:
    """Every shard count onto every world size: the embedding and output split by
    vocabulary rows, and with more ranks than KV heads, rank r holds head
    r // (world / n_kv_heads), as Meta's reshard_mp repeats them."""
    full = random_state(TINY3, seed=3)
    files = checkpoint.find_shards(ckpts[shards])
    axis = 0 if shards > 1 else 1
    hd = TINY3.head_dim
    for r in range(world):
        state = weights.load_rank_state(files, TINY3, r, world)
        expected = shard_shapes(TINY3, world, axis)
        assert {k: tuple(v.shape) for k, v in state.items()} == expected
        emb = full["tok_embeddings.weight"].chunk(world, dim=axis)[r]
        assert torch.equal(state["tok_embeddings.weight"], emb)
        heads = kv_heads_of(r, world, TINY3.kv_heads)
        # 2 KV heads: split over 1 or 2 ranks, one copy each on 4 or 8.
        assert heads == ([r // (world // 2)] if world > 2 else [0, 1][r::world])
        for key in ("layers.1.attention.wk.weight", "layers.0.attention.wv.weight"):
            rows = torch.cat([full[key][h * hd : (h + 1) * hd] for h in heads])
            assert torch.equal(state[key], rows), (key, r)


def test_differing_copies_of_a_repeated_kv_head_are_refused(
    ckpts: dict[int, Path], tmp_path: Path
) -> None:
    shards = checkpoint.find_shards(ckpts[4])
    for path in shards:
        (tmp_path / path.name).write_bytes(path.read_bytes())
    second = weights.load_shard(tmp_path / "consolidated.01.pth")
    second = {k: v.clone() for k, v in second.items()}
    second["layers.0.attention.wk.weight"] += 1.0  # shards 0 and 1 both hold KV head 0
    torch.save(second, tmp_path / "consolidated.01.pth")
    with pytest.raises(CheckpointError, match=r"layers\.0\.attention\.wk\.weight.*KV head 0"):
        weights.load_rank_state(checkpoint.find_shards(tmp_path), TINY3, 0, 1)


@pytest.mark.parametrize("damaged", [0, 1])
def test_a_vocabulary_shard_of_the_wrong_size_is_named(
    damaged: int, ckpts: dict[int, Path], tmp_path: Path
) -> None:
    for i, path in enumerate(checkpoint.find_shards(ckpts[2])):
        shard = dict(weights.load_shard(path))
        if i == damaged:
            shard["tok_embeddings.weight"] = shard["tok_embeddings.weight"][:-8].clone()
        torch.save(shard, tmp_path / path.name)
    with pytest.raises(
        CheckpointError, match=r"tok_embeddings\.weight \(64120, 64\) != \(64128, 64\)"
    ):
        checkpoint.check_shards(checkpoint.find_shards(tmp_path), TINY3)


# --------------------------------------------- more ranks than KV heads, at real shapes


def test_405b_on_16_ranks_is_pure_shape_maths(
    monkeypatch: pytest.MonkeyPatch, single_rank: None
) -> None:
    check_model_parallel(LLAMA31_405B, 16)
    shapes = shard_shapes(LLAMA31_405B, 16, embed_axis=0)
    assert shapes["tok_embeddings.weight"] == (8016, 16384)
    assert shapes["layers.0.attention.wq.weight"] == (1024, 16384)  # 8 query heads
    assert shapes["layers.0.attention.wk.weight"] == (128, 16384)  # a copy of 1 KV head
    assert shapes["layers.125.attention.wv.weight"] == (128, 16384)
    assert [kv_heads_of(r, 16, 8) for r in range(16)] == [[r // 2] for r in range(16)]
    # The model's layers at that size agree with the table, built on meta (nothing allocated).
    pretend_model_parallel(monkeypatch, 16, 3)
    model = Transformer(LLAMA31_405B, embed_axis=0)
    assert {k: tuple(p.shape) for k, p in model.named_parameters()} == shapes
    attn = model.layers[0].attention
    assert (attn.n_local_heads, attn.n_local_kv_heads) == (8, 1)
    assert model.tok_embeddings.vocab_start_index == 3 * 8016


@pytest.mark.parametrize(("size", "words"), [(12, "n_kv_heads=8"), (24, "n_heads=128")])
def test_rank_counts_that_cannot_split_405b_say_which_fit(size: int, words: str) -> None:
    with pytest.raises(ConfigError, match=f"model_parallel_size={size}") as info:
        check_model_parallel(LLAMA31_405B, size)
    assert words in str(info.value)
    assert "sizes that fit this model: [1, 2, 4, 8, 16, 32" in str(info.value)


# ------------------------------------------------------------------ KV-cache memory


def test_the_kv_pool_is_sized_from_a_budget_not_from_slots() -> None:
    per_position = 32 * 2 * 8 * 128 * 4  # layers x K,V x heads x D x fp32
    assert memory.kv_position_bytes(LLAMA31_8B, 1, 4) == per_position
    # 16 ranks over 8 KV heads each hold one head's cache, like 8 ranks do.
    assert memory.kv_position_bytes(LLAMA31_405B, 16, 2) == 126 * 2 * 128 * 2
    gib = 2**30
    # 64 requests of 131072 positions would reserve 4 TiB as slots; the pool takes what
    # the budget holds instead, in 16-position blocks (one of them the spare).
    runtime = RuntimeConfig(device="cpu", max_seq_len=131072, max_batch_size=64)
    blocks = memory.kv_pool_blocks(LLAMA31_8B, 1, runtime, 4, 200 * gib, "here")
    assert blocks == int(0.9 * 200 * gib) // (16 * per_position) - 1
    # Unless the requests' own need is smaller: max_batch_size x max_seq_len positions.
    small = RuntimeConfig(device="cpu", max_seq_len=1024, max_batch_size=4)
    assert memory.kv_pool_blocks(LLAMA31_8B, 1, small, 4, 200 * gib, "here") == 4 * 64
    budget = replace(small, kv_cache_memory_gb=2.0)
    assert memory.kv_pool_blocks(LLAMA31_8B, 1, budget, 4, 200 * gib, "here") == (
        2 * gib // (16 * per_position) - 1
    )
    # A budget that cannot hold one max_seq_len sequence is refused, with the numbers.
    with pytest.raises(ConfigError) as info:
        memory.kv_pool_blocks(LLAMA31_8B, 1, runtime, 4, 20 * gib, "this machine")
    message = str(info.value)
    one = (131072 // 16 + 1) * 16 * per_position
    assert f"needs {one:,} bytes" in message and "max_seq_len=131072" in message
    assert "8192 blocks of 16 positions" in message and "90% of the" in message
    assert "Lower runtime.max_seq_len, raise runtime.kv_cache_memory_gb" in message
    with pytest.raises(ConfigError, match="kv_cache_memory_gb=300.0 asks .* has .* available"):
        memory.kv_pool_blocks(
            LLAMA31_8B, 1, replace(runtime, kv_cache_memory_gb=300.0), 4, 200 * gib, "here"
        )
    # GPU ranks are left to size their pool on their own device.
    assert memory.check_kv_cache(LLAMA31_8B, 1, replace(runtime, device="cuda"), None) is None


def test_the_llm_refuses_it_before_any_rank_starts(ckpts: dict[int, Path]) -> None:
    with pytest.raises(ConfigError, match=r"the KV cache needs [\d,]+ bytes .* max_seq_len"):
        LLM(ckpts[1], device="cpu", max_seq_len=131072, kv_cache_memory_gb=0.001)


def test_a_rank_sizes_its_pool_from_its_own_memory(
    ckpts: dict[int, Path], monkeypatch: pytest.MonkeyPatch, single_rank: None
) -> None:
    """The rank checks its own machine (a CPU allocation would succeed lazily and the
    rank be killed when the pages are touched), and a failed allocation says so."""
    from types import SimpleNamespace

    from mpllama.protocol import RankSpec
    from mpllama.rank import rank_setup

    model = load(ckpts[1], slots=1, seq=8)
    spec = RankSpec(str(ckpts[1]), TINY3, b"", 1, max_batch_size=3, max_seq_len=100)
    per_block = memory.kv_position_bytes(TINY3, 1, 4) * 16
    memory_of = SimpleNamespace(available=per_block * 100)
    monkeypatch.setattr(rank_setup.psutil, "virtual_memory", lambda: memory_of)
    rank_setup.setup_caches(model, spec, CPU, torch.float32)
    assert model.num_blocks == 3 * 7  # 3 requests of 7 blocks (and the spare)
    memory_of.available = per_block * 5  # 90% of it: 4 blocks, under the 7 one needs
    with pytest.raises(ConfigError, match="needs .* one sequence of max_seq_len=100"):
        rank_setup.setup_caches(model, spec, CPU, torch.float32)
    # Four ranks on this machine (they met in shared memory) share its RAM.
    memory_of.available = per_block * 30
    with pytest.raises(ConfigError, match="4 ranks share it"):
        rank_setup.setup_caches(model, spec, CPU, torch.float32, ranks=4)

    def out_of_memory(blocks: int, block_size: int, seq: int) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3 GiB")

    memory_of.available = per_block * 100
    monkeypatch.setattr(model, "setup_caches", out_of_memory)
    with pytest.raises(ConfigError, match="allocating the KV cache .* failed"):
        rank_setup.setup_caches(model, spec, CPU, torch.float32)
