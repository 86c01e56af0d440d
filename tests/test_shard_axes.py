"""The shard-axis table, shape maths at real sizes (no weight is allocated), which rank
counts split a model, and resharding N shards onto M ranks."""

from __future__ import annotations

import pytest
from helpers import LLAMA2_70B, tiny_args

from mpllama.errors import ConfigError
from mpllama.model_args import ModelArgs
from mpllama.shard_axes import (
    SHARD_AXES,
    check_model_parallel,
    full_shapes,
    shard_axis,
    shard_plan,
    shard_shapes,
)

COLUMN = (
    "attention.wq.weight",
    "attention.wk.weight",
    "attention.wv.weight",
    "feed_forward.w1.weight",
    "feed_forward.w3.weight",
    "output.weight",
)
ROW = ("attention.wo.weight", "feed_forward.w2.weight", "tok_embeddings.weight")
REPLICATED = ("norm.weight", "attention_norm.weight", "ffn_norm.weight")


# ----------------------------------------------------------------- shard-axis table


def test_every_weight_has_an_axis() -> None:
    for args in (tiny_args(), LLAMA2_70B):
        for key in full_shapes(args):
            shard_axis(key)  # raises KeyError for a key the table lacks
    assert set(SHARD_AXES) == set(COLUMN + ROW + REPLICATED)


def test_axes_at_70b() -> None:
    seen = {0: 0, 1: 0, None: 0}
    for key in full_shapes(LLAMA2_70B):
        name = key.split(".", 2)[-1] if key.startswith("layers.") else key
        expected = 0 if name in COLUMN else 1 if name in ROW else None
        assert name in COLUMN + ROW + REPLICATED, key
        assert shard_axis(key) == expected, key
        seen[expected] += 1
    assert seen == {0: 5 * 80 + 1, 1: 2 * 80 + 1, None: 2 * 80 + 1}


def test_unknown_weight_is_a_key_error() -> None:
    with pytest.raises(KeyError, match="rope.freqs"):
        shard_axis("rope.freqs")
    with pytest.raises(KeyError, match="layers.0.attention.wqkv.weight"):
        shard_axis("layers.0.attention.wqkv.weight")


def test_full_shapes_tiny() -> None:
    args = tiny_args()  # dim 128, 8 heads of 16, 4 kv heads, ffn 352
    shapes = full_shapes(args)
    assert len(shapes) == 2 + 9 * args.n_layers + 1
    assert list(shapes)[0] == "tok_embeddings.weight" and list(shapes)[-1] == "output.weight"
    assert shapes["tok_embeddings.weight"] == (512, 128)
    assert shapes["layers.1.attention.wq.weight"] == (128, 128)
    assert shapes["layers.1.attention.wk.weight"] == (64, 128)
    assert shapes["layers.1.attention.wv.weight"] == (64, 128)
    assert shapes["layers.1.attention.wo.weight"] == (128, 128)
    assert shapes["layers.0.feed_forward.w1.weight"] == (args.ffn_dim, 128) == (352, 128)
    assert shapes["layers.0.feed_forward.w2.weight"] == (128, 352)
    assert shapes["norm.weight"] == (128,)


def test_shard_shapes_llama2_70b_mp8_is_pure_shape_maths() -> None:
    # 70B is ~69e9 parameters: this must not allocate a single weight.
    shapes = shard_shapes(LLAMA2_70B, 8)
    assert len(shapes) == 3 + 9 * 80
    expected = {
        "tok_embeddings.weight": (32000, 1024),
        "output.weight": (4000, 8192),
        "norm.weight": (8192,),
        "layers.0.attention.wq.weight": (1024, 8192),
        "layers.0.attention.wk.weight": (128, 8192),  # 8 kv heads / 8 ranks = 1 head
        "layers.0.attention.wv.weight": (128, 8192),
        "layers.0.attention.wo.weight": (8192, 1024),
        "layers.79.feed_forward.w1.weight": (3584, 8192),
        "layers.79.feed_forward.w2.weight": (8192, 3584),
        "layers.79.feed_forward.w3.weight": (3584, 8192),
        "layers.79.attention_norm.weight": (8192,),
        "layers.79.ffn_norm.weight": (8192,),
    }
    for key, shape in expected.items():
        assert shapes[key] == shape, key
    full = full_shapes(LLAMA2_70B)
    n_full = sum(_numel(s) for s in full.values())
    assert 68.9e9 < n_full < 69.1e9  # the published 70B size
    # Eight shards hold the whole model once, plus the replicated norms seven more times.
    norms = sum(_numel(s) for k, s in full.items() if shard_axis(k) is None)
    assert 8 * sum(_numel(s) for s in shapes.values()) == n_full + 7 * norms


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


# --------------------------------------------------------------- check_model_parallel


# 12 heads sharing 4 KV heads: 6 ranks split the heads but not the KV heads (6 is
# neither a divisor nor a multiple of 4).
KV4_OF_12 = ModelArgs(dim=96, n_layers=1, n_heads=12, n_kv_heads=4, multiple_of=48, vocab_size=600)


@pytest.mark.parametrize("size", [1, 2, 4, 8, 16, 32, 64])
def test_model_parallel_sizes_that_fit_70b(size: int) -> None:
    # Past 8 ranks, 70B's 8 KV heads are repeated: each rank holds a copy of one.
    check_model_parallel(LLAMA2_70B, size)


@pytest.mark.parametrize(
    "args, size, names, fits",
    [
        (LLAMA2_70B, 3, ["n_heads=64", "n_kv_heads=8"], [1, 2, 4, 8, 16, 32, 64]),
        (LLAMA2_70B, 24, ["n_heads=64"], [1, 2, 4, 8, 16, 32, 64]),
        (KV4_OF_12, 6, ["n_kv_heads=4"], [1, 2, 4, 12]),
        (tiny_args(), 3, ["n_heads=8", "n_kv_heads=4"], [1, 2, 4, 8]),
    ],
)
def test_model_parallel_errors_list_sizes_that_fit(
    args: ModelArgs, size: int, names: list[str], fits: list[int]
) -> None:
    with pytest.raises(ConfigError, match=f"model_parallel_size={size}") as info:
        check_model_parallel(args, size)
    message = str(info.value)
    for name in names:
        assert name in message
    assert f"sizes that fit this model: {fits}" in message


@pytest.mark.parametrize("size", [0, -2])
def test_model_parallel_size_below_one(size: int) -> None:
    with pytest.raises(ConfigError, match=f"model_parallel_size={size}"):
        check_model_parallel(tiny_args(), size)


# ------------------------------------------------------------------------ shard_plan


@pytest.mark.parametrize(
    "shards, world, plan",
    [
        (1, 1, [([0], 0, 1)]),
        (1, 2, [([0], 0, 2), ([0], 1, 2)]),
        (1, 4, [([0], 0, 4), ([0], 1, 4), ([0], 2, 4), ([0], 3, 4)]),
        (2, 4, [([0], 0, 2), ([0], 1, 2), ([1], 0, 2), ([1], 1, 2)]),
        (4, 2, [([0, 1], 0, 1), ([2, 3], 0, 1)]),
        (4, 1, [([0, 1, 2, 3], 0, 1)]),
        (2, 1, [([0, 1], 0, 1)]),
        (2, 2, [([0], 0, 1), ([1], 0, 1)]),
    ],
)
def test_shard_plan(shards: int, world: int, plan: list) -> None:
    assert shard_plan(shards, world) == plan


@pytest.mark.parametrize("shards, world", [(2, 3), (4, 3), (3, 2), (4, 6)])
def test_shard_plan_refuses_incompatible(shards: int, world: int) -> None:
    with pytest.raises(ConfigError, match=f"{shards} shard.*onto {world} rank") as info:
        shard_plan(shards, world)
    assert "reshard" in str(info.value)
