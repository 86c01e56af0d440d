"""Each rank's slice of N shards on M ranks, strict checks on untrusted checkpoint
folders, shard indexes, params.json and tokenizer discovery (the shard-axis table and
shape maths: test_shard_axes.py)."""

from __future__ import annotations

import json
import os
import shlex
import shutil
from collections import OrderedDict
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers import tiny_args

from mpllama import checkpoint
from mpllama.checkpoint import find_shards, find_tokenizer, read_params, resolve_vocab
from mpllama.errors import CheckpointError, ConfigError
from mpllama.offline.fixtures import random_state
from mpllama.rank import weights
from mpllama.rank.weights import load_rank_state, load_shard
from mpllama.shard_axes import shard_axis, shard_shapes

# ------------------------------------------------------------------- load_rank_state


@pytest.fixture(scope="module")
def full_state(tiny_ckpts: dict[int, Path]) -> dict[str, torch.Tensor]:
    one = tiny_ckpts[1]
    return load_rank_state(find_shards(one), read_params(one), 0, 1)


@pytest.mark.parametrize("shards", [1, 2, 4])
@pytest.mark.parametrize("world", [1, 2, 4])
def test_ranks_together_hold_the_full_state(
    tiny_ckpts: dict[int, Path], shards: int, world: int, full_state: dict[str, torch.Tensor]
) -> None:
    folder = tiny_ckpts[shards]
    args = read_params(folder)
    files = find_shards(folder)
    assert len(files) == shards
    ranks = [load_rank_state(files, args, r, world) for r in range(world)]
    per_rank = shard_shapes(args, world)
    for key, full in full_state.items():
        for r, state in enumerate(ranks):
            assert tuple(state[key].shape) == per_rank[key], (key, r)
            assert state[key].dtype == full.dtype
        axis = shard_axis(key)
        if axis is None:
            for state in ranks:
                assert torch.equal(state[key], full), key
        else:
            joined = torch.cat([state[key] for state in ranks], dim=axis)
            assert torch.equal(joined, full), key
    assert all(set(state) == set(full_state) for state in ranks)


def test_resharded_slices_do_not_pin_the_whole_shard(tiny_ckpts: dict[int, Path]) -> None:
    # A rank's slice is its own tensor, not a view keeping the full mapped shard alive.
    folder = tiny_ckpts[1]
    state = load_rank_state(find_shards(folder), read_params(folder), 1, 4)
    w = state["layers.0.feed_forward.w2.weight"]
    assert w.is_contiguous()
    assert w.untyped_storage().nbytes() == w.numel() * w.element_size()


# ------------------------------------------------------------------- strict checks


def copy_checkpoint(
    src: Path,
    dst: Path,
    shards: list[dict[str, torch.Tensor]] | None = None,
    params: str | None = None,
) -> Path:
    """``src``'s params.json and tokenizer, with ``shards`` (default: src's own) saved."""
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "tokenizer.model", dst / "tokenizer.model")
    if params is None:
        shutil.copy(src / "params.json", dst / "params.json")
    else:
        (dst / "params.json").write_text(params)
    if shards is None:
        for path in find_shards(src):
            shutil.copy(path, dst / path.name)
    else:
        for i, shard in enumerate(shards):
            torch.save(shard, dst / f"consolidated.{i:02d}.pth")
    return dst


def load_all(folder: Path, world: int = 1) -> None:
    args = read_params(folder)
    for r in range(world):
        load_rank_state(find_shards(folder), args, r, world)


def one_shard(src: Path) -> dict[str, torch.Tensor]:
    return dict(torch.load(src / "consolidated.00.pth", weights_only=True))


def test_missing_key_is_listed(tiny_ckpts: dict[int, Path], tmp_path: Path) -> None:
    shard = one_shard(tiny_ckpts[1])
    del shard["layers.1.feed_forward.w3.weight"]
    folder = copy_checkpoint(tiny_ckpts[1], tmp_path / "c", [shard])
    with pytest.raises(
        CheckpointError, match=r"1 missing key.*layers\.1\.feed_forward\.w3"
    ) as info:
        load_all(folder)
    assert "consolidated.00.pth" in str(info.value)


def test_extra_key_is_listed(tiny_ckpts: dict[int, Path], tmp_path: Path) -> None:
    shard = one_shard(tiny_ckpts[1])
    shard["layers.2.attention.wq.weight"] = torch.zeros(128, 128)
    folder = copy_checkpoint(tiny_ckpts[1], tmp_path / "c", [shard])
    with pytest.raises(CheckpointError, match=r"unexpected key.*layers\.2\.attention\.wq"):
        load_all(folder)


def test_rope_freqs_is_ignored(tiny_ckpts: dict[int, Path], tmp_path: Path) -> None:
    shard = one_shard(tiny_ckpts[1])
    shard["rope.freqs"] = torch.zeros(8)  # Meta's files carry it; the model recomputes it
    folder = copy_checkpoint(tiny_ckpts[1], tmp_path / "c", [shard])
    state = load_rank_state(find_shards(folder), read_params(folder), 0, 2)
    assert "rope.freqs" not in state


def test_wrong_shape_is_listed(tiny_ckpts: dict[int, Path], tmp_path: Path) -> None:
    shards = [dict(torch.load(p, weights_only=True)) for p in find_shards(tiny_ckpts[2])]
    shards[1]["layers.0.attention.wk.weight"] = torch.zeros(64, 128)  # a full, not a half
    folder = copy_checkpoint(tiny_ckpts[2], tmp_path / "c", shards)
    with pytest.raises(
        CheckpointError,
        match=r"wrong shape.*layers\.0\.attention\.wk\.weight "
        r"\(64, 128\) != \(32, 128\)",
    ) as info:
        load_all(folder, world=2)
    assert "consolidated.01.pth" in str(info.value)


def test_replicated_weights_must_agree(tiny_ckpts: dict[int, Path], tmp_path: Path) -> None:
    shards = [dict(torch.load(p, weights_only=True)) for p in find_shards(tiny_ckpts[2])]
    shards[1]["norm.weight"] = shards[1]["norm.weight"] + 1
    folder = copy_checkpoint(tiny_ckpts[2], tmp_path / "c", shards)
    with pytest.raises(CheckpointError, match=r"replicated weight norm\.weight differs"):
        load_all(folder, world=1)


def test_truncated_shard_names_the_file(tiny_ckpts: dict[int, Path], tmp_path: Path) -> None:
    folder = copy_checkpoint(tiny_ckpts[2], tmp_path / "c")
    path = folder / "consolidated.01.pth"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cannot read shard .*consolidated\.01\.pth"):
        load_all(folder, world=2)


def test_garbage_and_non_dict_shards(tmp_path: Path) -> None:
    garbage = tmp_path / "consolidated.00.pth"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match=r"cannot read shard .*consolidated\.00\.pth"):
        load_shard(garbage)
    listed = tmp_path / "consolidated.01.pth"
    torch.save([torch.zeros(2)], listed)
    with pytest.raises(CheckpointError, match=r"consolidated\.01\.pth is not a state dict"):
        load_shard(listed)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_shard(tmp_path / "consolidated.02.pth")


class _RunsCode:
    """Pickles to a call of os.system: what a malicious checkpoint would carry."""

    def __init__(self, sentinel: Path) -> None:
        self.command = f"touch {shlex.quote(str(sentinel))}"

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (self.command,))


def test_shard_that_would_run_code_is_refused(tiny_ckpts: dict[int, Path], tmp_path: Path) -> None:
    sentinel = tmp_path / "SENTINEL"
    shard = one_shard(tiny_ckpts[1])
    shard["norm.weight"] = _RunsCode(sentinel)  # type: ignore[assignment]
    folder = copy_checkpoint(tiny_ckpts[1], tmp_path / "c", [shard])
    with pytest.raises(CheckpointError, match=r"consolidated\.00\.pth.*refused for safety"):
        load_all(folder)
    assert not sentinel.exists()
    # The payload is real: an unsafe load would have run it.
    torch.load(folder / "consolidated.00.pth", weights_only=False)
    assert sentinel.exists()


# ------------------------------------------------------------------- shard indexes


def test_read_shapes_reads_the_index_as_torch_would(
    tiny_ckpts: dict[int, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    odd = tmp_path / "odd.pth"
    base = torch.arange(24.0).view(4, 6)
    torch.save(
        OrderedDict(
            half=base.half(),
            bf16=base.bfloat16(),
            view=base[:, 2:5],  # a slice: shares the storage, has its own shape
            param=torch.nn.Parameter(base),
            scalar=torch.tensor(3),
            count=7,  # not a tensor
            **{"rope.freqs": torch.zeros(3)},  # ignored, as load_shard ignores it
        ),
        odd,
    )
    paths = [*find_shards(tiny_ckpts[2]), odd]
    by_torch = {p: weights.tensor_shapes(weights.load_shard(p)) for p in paths}
    # The fast path alone: torch's loader is never asked.
    monkeypatch.setattr(weights, "load_shard", lambda path: pytest.fail(f"torch read {path}"))
    for path in paths:
        assert checkpoint.read_shapes(path) == by_torch[path]
    assert checkpoint.read_shapes(odd)["view"] == (4, 3)
    assert checkpoint.read_shapes(odd)["count"] is None
    assert checkpoint.count_values(checkpoint.read_shapes(odd)) == 24 * 3 + 12 + 1


def test_read_shapes_leaves_damaged_and_unsafe_files_to_torch(
    tiny_ckpts: dict[int, Path], tmp_path: Path
) -> None:
    truncated = tmp_path / "truncated.pth"
    data = find_shards(tiny_ckpts[1])[0].read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    legacy = tmp_path / "legacy.pth"  # pre-1.6 format: torch cannot memory-map it
    torch.save({"a": torch.zeros(2)}, legacy, _use_new_zipfile_serialization=False)
    listed = tmp_path / "listed.pth"
    torch.save([torch.zeros(2)], listed)
    for path, words in (
        (truncated, "cannot read shard"),
        (legacy, "cannot read shard"),
        (listed, "is not a state dict"),
        (tmp_path / "absent.pth", "does not exist"),
    ):
        with pytest.raises(CheckpointError, match=words):
            checkpoint.read_shapes(path)
    sentinel = tmp_path / "SENTINEL"
    unsafe = tmp_path / "unsafe.pth"
    torch.save({"norm.weight": _RunsCode(sentinel)}, unsafe)
    with pytest.raises(CheckpointError, match="refused for safety"):
        checkpoint.read_shapes(unsafe)
    assert not sentinel.exists()


def test_check_state_names_values_that_are_not_tensors() -> None:
    with pytest.raises(CheckpointError, match=r"norm\.weight \(not a tensor\) != \(128,\)"):
        checkpoint.check_state({"norm.weight": None}, {"norm.weight": (128,)}, "x.pth")


# ------------------------------------------------------------- folders and params.json


def test_find_shards_in_order(tiny_ckpts: dict[int, Path]) -> None:
    found = find_shards(tiny_ckpts[4])
    assert [p.name for p in found] == [f"consolidated.0{i}.pth" for i in range(4)]


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"checkpoint folder .*nowhere does not exist"):
        find_shards(tmp_path / "nowhere")


def test_folder_without_shards(tmp_path: Path) -> None:
    (tmp_path / "consolidated.pth").write_bytes(b"")  # not the naming scheme
    (tmp_path / "params.json").write_text("{}")
    with pytest.raises(CheckpointError, match="holds no consolidated.NN.pth shards"):
        find_shards(tmp_path)


def test_gap_in_shard_numbering(tiny_ckpts: dict[int, Path], tmp_path: Path) -> None:
    folder = copy_checkpoint(tiny_ckpts[4], tmp_path / "c")
    (folder / "consolidated.02.pth").unlink()
    with pytest.raises(CheckpointError, match=r"\['consolidated\.02\.pth'\] missing; found 3 of 4"):
        find_shards(folder)


def test_missing_params_json(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"params\.json is missing"):
        read_params(tmp_path)


@pytest.mark.parametrize(
    "text, words",
    [
        ('{"dim": 128,', "is not valid JSON"),
        ("[128, 2]", "expected a JSON object"),
        ('{"dim": 128, "n_layers": 2, "n_heads": 8, "moe": true}', r"unknown key.*'moe'"),
        ('{"dim": "128"}', r"params\.json\.dim: '128' is not an integer"),
        ('{"dim": 128, "n_heads": 8, "n_kv_heads": 3}', "n_kv_heads=3"),
    ],
)
def test_bad_params_json(tmp_path: Path, text: str, words: str) -> None:
    (tmp_path / "params.json").write_text(text)
    with pytest.raises(CheckpointError, match=words) as info:
        read_params(tmp_path)
    assert str(tmp_path / "params.json") in str(info.value)


def test_params_json_round_trip(tiny_ckpts: dict[int, Path]) -> None:
    params = json.loads((tiny_ckpts[2] / "params.json").read_text())
    assert params == tiny_args().to_params()
    assert "ffn_dim_multiplier" not in params  # absent, as in Meta's files, when unset


# --------------------------------------------------------------- tokenizer and vocab


def test_find_tokenizer_beside_one_up_explicit_missing(tmp_path: Path) -> None:
    model = tmp_path / "llama-2-7b"
    model.mkdir()
    with pytest.raises(CheckpointError, match="no tokenizer found") as info:
        find_tokenizer(model)
    assert str(model / "tokenizer.model") in str(info.value)
    assert str(tmp_path / "tokenizer.model") in str(info.value)
    (tmp_path / "tokenizer.model").write_bytes(b"up")
    assert find_tokenizer(model) == tmp_path / "tokenizer.model"
    (model / "tokenizer.model").write_bytes(b"beside")
    assert find_tokenizer(model) == model / "tokenizer.model"  # beside wins
    other = tmp_path / "other.model"
    other.write_bytes(b"x")
    assert find_tokenizer(model, other) == other
    with pytest.raises(CheckpointError, match=r"missing\.model"):
        find_tokenizer(model, tmp_path / "missing.model")


def test_resolve_vocab() -> None:
    args = replace(tiny_args(), vocab_size=-1)
    assert resolve_vocab(args, 32000).vocab_size == 32000
    same = replace(args, vocab_size=32016)
    assert resolve_vocab(same, 32016) is same
    with pytest.raises(CheckpointError, match=r"vocab_size=32016 .* 32000 pieces"):
        resolve_vocab(same, 32000)


# ------------------------------------------------------------------------- writers


def test_split_state_and_writer_refuse_bad_parts(tmp_path: Path) -> None:
    args = tiny_args()
    state = random_state(args, seed=1)
    shards = weights.split_state(state, 4)
    assert shards[3]["output.weight"].shape == (128, 128)
    assert torch.equal(shards[2]["norm.weight"], state["norm.weight"])
    with pytest.raises(ConfigError, match="model_parallel_size=3"):
        weights.write_checkpoint(tmp_path, args, state, 3)
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_meta_fp8_checkpoint_is_refused(tiny_ckpts: dict[int, Path], tmp_path: Path) -> None:
    # Meta's 405B FP8 release keeps fp8_scales_N.pt beside float8 shards.
    folder = tmp_path / "fp8"
    shutil.copytree(tiny_ckpts[1], folder)
    torch.save({"0_feed_forward.w1_0": torch.ones(4)}, folder / "fp8_scales_0.pt")
    with pytest.raises(CheckpointError, match="FP8 quantized checkpoint.*fp8_scales_0.pt"):
        checkpoint.find_shards(folder)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.int8, torch.uint8])
def test_quantized_weights_are_refused_not_cast(
    dtype: torch.dtype, tiny_ckpts: dict[int, Path], tmp_path: Path
) -> None:
    state = load_shard(checkpoint.find_shards(tiny_ckpts[1])[0])
    state = {k: v.clone() for k, v in state.items()}
    w1 = "layers.0.feed_forward.w1.weight"
    state[w1] = state[w1].to(dtype)
    torch.save(state, tmp_path / "consolidated.00.pth")
    name = str(dtype).removeprefix("torch.")
    with pytest.raises(CheckpointError, match=rf"w1\.weight is {name}, a quantized weight"):
        load_shard(tmp_path / "consolidated.00.pth")
