"""HF <-> Meta conversion: exact round trips, logits parity with transformers' Llama against
an independent reference forward written here from Meta's math, folder conversion, and
config inversion at real Llama 2 / Code Llama shapes (configs only, no weights)."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import LLAMA2_70B

from mpllama.checkpoint import find_shards, read_params
from mpllama.errors import CheckpointError
from mpllama.model_args import ModelArgs
from mpllama.offline.convert import (
    args_from_hf_config,
    convert_hf_to_meta,
    convert_meta_to_hf,
    hf_config,
    hf_key,
    hf_to_meta,
    meta_to_hf,
)
from mpllama.offline.fixtures import random_state
from mpllama.rank.weights import load_rank_state, write_checkpoint
from mpllama.shard_axes import full_shapes

transformers = pytest.importorskip("transformers", reason="HF parity needs transformers")
pytest.importorskip("safetensors", reason="HF folders are safetensors files")
from safetensors.torch import save_file  # noqa: E402

MHA = ModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=96, multiple_of=16, norm_eps=1e-6)
GQA = ModelArgs(
    dim=64, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=96, multiple_of=32, rope_theta=500000.0
)
FFN_MULT = ModelArgs(
    dim=96,
    n_layers=1,
    n_heads=6,
    n_kv_heads=3,
    vocab_size=64,
    multiple_of=64,
    ffn_dim_multiplier=1.3,
    rope_theta=1e6,
)
VARIANTS = pytest.mark.parametrize("args", [MHA, GQA, FFN_MULT], ids=["mha", "gqa", "ffn-mult"])
TOKENS = [3, 17, 0, 42, 5, 63, 8]

# Released params.json files and the FFN width Hugging Face's config.json gives each.
RELEASED = {
    "llama2-7b": (
        ModelArgs(
            dim=4096, n_layers=32, n_heads=32, vocab_size=32000, multiple_of=256, norm_eps=1e-5
        ),
        11008,
    ),
    "llama2-13b": (
        ModelArgs(
            dim=5120, n_layers=40, n_heads=40, vocab_size=32000, multiple_of=256, norm_eps=1e-5
        ),
        13824,
    ),
    "llama2-70b": (LLAMA2_70B, 28672),
    "codellama-7b": (
        ModelArgs(
            dim=4096,
            n_layers=32,
            n_heads=32,
            vocab_size=32016,
            multiple_of=256,
            norm_eps=1e-5,
            rope_theta=1e6,
        ),
        11008,
    ),
    "codellama-34b": (
        ModelArgs(
            dim=8192,
            n_layers=48,
            n_heads=64,
            n_kv_heads=8,
            vocab_size=32000,
            multiple_of=256,
            ffn_dim_multiplier=1.0,
            norm_eps=1e-5,
            rope_theta=1e6,
        ),
        22016,
    ),
}


# ------------------------------------------------------------------ reference forward


def reference_logits(
    state: dict[str, torch.Tensor], args: ModelArgs, tokens: list[int]
) -> torch.Tensor:
    """Meta's reference Llama forward on a Meta state dict, one sequence: [T, vocab]."""
    seq, heads, kv, hd = len(tokens), args.n_heads, args.kv_heads, args.head_dim
    freqs = 1.0 / (args.rope_theta ** (torch.arange(0, hd, 2)[: hd // 2].float() / hd))
    angles = torch.outer(torch.arange(seq).float(), freqs)
    freqs_cis = torch.polar(torch.ones_like(angles), angles)  # [T, hd/2] complex

    def rms_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + args.norm_eps)).type_as(
            x
        ) * weight

    def rope(x: torch.Tensor) -> torch.Tensor:  # [T, H, hd], pairs (2i, 2i+1) are complex
        xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(xc * freqs_cis[:, None, :]).flatten(-2).type_as(x)

    def repeat_kv(x: torch.Tensor) -> torch.Tensor:  # [T, kv, hd] -> [T, heads, hd]
        rep = heads // kv
        return x[:, :, None, :].expand(seq, kv, rep, hd).reshape(seq, heads, hd)

    mask = torch.full((seq, seq), float("-inf")).triu(1)
    h = state["tok_embeddings.weight"][torch.tensor(tokens)]
    for i in range(args.n_layers):
        w = {
            k.removeprefix(f"layers.{i}."): v
            for k, v in state.items()
            if k.startswith(f"layers.{i}.")
        }
        x = rms_norm(h, w["attention_norm.weight"])
        q = rope((x @ w["attention.wq.weight"].T).view(seq, heads, hd))
        k = repeat_kv(rope((x @ w["attention.wk.weight"].T).view(seq, kv, hd)))
        v = repeat_kv((x @ w["attention.wv.weight"].T).view(seq, kv, hd))
        scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(hd) + mask
        probs = F.softmax(scores.float(), dim=-1).type_as(q)
        attn = torch.einsum("hqk,khd->qhd", probs, v).reshape(seq, heads * hd)
        h = h + attn @ w["attention.wo.weight"].T
        x = rms_norm(h, w["ffn_norm.weight"])
        gate = F.silu(x @ w["feed_forward.w1.weight"].T) * (x @ w["feed_forward.w3.weight"].T)
        h = h + gate @ w["feed_forward.w2.weight"].T
    return rms_norm(h, state["norm.weight"]) @ state["output.weight"].T


def hf_logits(
    hf_state: dict[str, torch.Tensor], args: ModelArgs, tokens: list[int]
) -> torch.Tensor:
    model = transformers.LlamaForCausalLM(hf_config(args)).float().eval()
    model.set_attn_implementation("eager")
    model.load_state_dict(hf_state, strict=True)
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0]


# ------------------------------------------------------------------ state dicts


@VARIANTS
def test_meta_hf_meta_round_trip_is_exact(args: ModelArgs) -> None:
    state = random_state(args, seed=1)
    hf = meta_to_hf({**state, "rope.freqs": torch.zeros(args.head_dim // 2)}, args)
    assert set(hf) == {hf_key(k) for k in state}
    back = hf_to_meta(hf, args)
    assert list(back) == list(state)
    for key, value in state.items():
        assert torch.equal(back[key], value), key
    # The permutation moves rows of wq/wk only when a head has more than one pair.
    assert not torch.equal(
        hf["model.layers.0.self_attn.q_proj.weight"], state["layers.0.attention.wq.weight"]
    )


@VARIANTS
def test_hf_llama_matches_meta_reference_forward(args: ModelArgs) -> None:
    torch.manual_seed(0)  # HF's random init is overwritten, but keep the run deterministic
    state = random_state(args, seed=2)
    expected = reference_logits(state, args, TOKENS)
    assert expected.std() > 1.0  # well-spread logits: a wrong layout cannot hide in noise
    got = hf_logits(meta_to_hf(state, args), args, TOKENS)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    # Control: renaming without the RoPE permutation must not match (the test can fail).
    unpermuted = {hf_key(k): v for k, v in state.items()}
    assert not torch.allclose(hf_logits(unpermuted, args, TOKENS), expected, atol=1e-2)


def test_missing_and_unknown_keys_are_named() -> None:
    state = random_state(MHA)
    del state["layers.1.feed_forward.w3.weight"]
    with pytest.raises(CheckpointError, match=r"1 missing key\(s\): layers\.1\.feed_forward\.w3"):
        meta_to_hf(state, MHA)

    hf = meta_to_hf(random_state(MHA), MHA)
    hf["model.layers.0.self_attn.q_norm.weight"] = torch.ones(MHA.head_dim)
    with pytest.raises(
        CheckpointError,
        match=r"unexpected key\(s\): model\.layers\.0\.self_attn"
        r"\.q_norm\.weight",
    ):
        hf_to_meta(hf, MHA)

    layer1 = {k: v for k, v in hf.items() if not k.startswith("model.layers.1.")}
    with pytest.raises(CheckpointError, match=r"9 missing key\(s\): .* and 4 more"):
        hf_to_meta(layer1, MHA)


# ------------------------------------------------------------------ configs


@pytest.mark.parametrize("name", list(RELEASED))
def test_args_from_hf_config_inverts_hf_config_at_real_shapes(name: str) -> None:
    args, width = RELEASED[name]
    config = hf_config(args)  # a config only: no weight is allocated
    assert config.intermediate_size == width
    assert config.num_key_value_heads == args.kv_heads
    back = args_from_hf_config(json.loads(config.to_json_string(use_diff=False)))
    # multiple_of / ffn_dim_multiplier are not recoverable, only the width they give.
    assert back.ffn_dim == width
    assert (
        replace(back, multiple_of=args.multiple_of, ffn_dim_multiplier=args.ffn_dim_multiplier)
        == args
    )
    assert full_shapes(back) == full_shapes(args)


def test_args_from_transformers4_codellama_config() -> None:
    # codellama/CodeLlama-7b-hf's config.json, as written by transformers 4.
    config = {
        "architectures": ["LlamaForCausalLM"],
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": 4096,
        "initializer_range": 0.02,
        "intermediate_size": 11008,
        "max_position_embeddings": 16384,
        "model_type": "llama",
        "num_attention_heads": 32,
        "num_hidden_layers": 32,
        "num_key_value_heads": 32,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": None,
        "rope_theta": 1000000,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": 32016,
    }
    assert args_from_hf_config(config) == RELEASED["codellama-7b"][0]


@pytest.mark.parametrize("dim", [64, 4096])
@pytest.mark.parametrize("width", [1, 100, 170, 171, 172, 256, 1000, 11008, 28672])
def test_any_ffn_width_is_expressible(dim: int, width: int) -> None:
    config = {
        "hidden_size": dim,
        "intermediate_size": width,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "vocab_size": 10,
    }
    assert args_from_hf_config(config).ffn_dim == width


@pytest.mark.parametrize(
    "change, message",
    [
        ({"rope_scaling": {"rope_type": "yarn", "factor": 8.0}}, "rope_type='yarn'"),
        ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_type='dynamic'"),
        ({"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4}}, "rope_type='linear'"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "without \\['low_freq_factor'"),
        ({"head_dim": 32}, "head_dim=32"),
        ({"attention_bias": True}, "attention_bias=True"),
        ({"model_type": "mistral"}, "model_type is 'mistral'"),
    ],
)
def test_configs_meta_cannot_express_are_refused(change: dict, message: str) -> None:
    config = {**hf_config(MHA).to_dict(), **change}
    with pytest.raises(CheckpointError, match=message):
        args_from_hf_config(config)


# ------------------------------------------------------------------ folders


def test_folder_round_trip_through_hf(tmp_path: Path, model_path: Path) -> None:
    args = GQA
    state = random_state(args, seed=3)
    meta = tmp_path / "meta"
    write_checkpoint(meta, args, state, parts=2)
    # Meta's own files say -1 and leave the vocabulary to the embedding / tokenizer.
    (meta / "params.json").write_text(json.dumps({**args.to_params(), "vocab_size": -1}))
    (meta / "tokenizer.model").write_bytes(model_path.read_bytes())  # sentencepiece

    hf = convert_meta_to_hf(meta, tmp_path / "hf")
    config = json.loads((hf / "config.json").read_text())
    assert config["vocab_size"] == args.vocab_size
    assert (hf / "tokenizer.model").read_bytes() == model_path.read_bytes()
    # Llama 2's ids (the trained tokenizer's, as Meta's), plain RoPE, an untied output.
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)
    assert config["rope_parameters"]["rope_type"] == "default"
    assert config["tie_word_embeddings"] is False
    model, info = transformers.LlamaForCausalLM.from_pretrained(hf, output_loading_info=True)
    assert not any(info.values()), info

    out = convert_hf_to_meta(hf, tmp_path / "back", parts=2)
    shards = find_shards(out)
    assert len(shards) == 2
    back_args = read_params(out)
    assert back_args.ffn_dim == args.ffn_dim
    merged = load_rank_state(shards, back_args, 0, 1)
    assert list(merged) == list(state)
    for key, value in state.items():
        assert torch.equal(merged[key], value), key
    assert (out / "tokenizer.model").is_file()


def test_sharded_hf_folder_with_stale_rope_buffers(tmp_path: Path) -> None:
    state = random_state(MHA, seed=4)
    hf = meta_to_hf(state, MHA)
    hf["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(MHA.head_dim // 2)
    keys = list(hf)
    files = {
        "model-00001-of-00002.safetensors": keys[: len(keys) // 2],
        "model-00002-of-00002.safetensors": keys[len(keys) // 2 :],
    }
    for name, names in files.items():
        save_file({k: hf[k].contiguous() for k in names}, tmp_path / name)
    weight_map = {k: name for name, names in files.items() for k in names}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (tmp_path / "config.json").write_text(hf_config(MHA).to_json_string(use_diff=False))

    out = convert_hf_to_meta(tmp_path, tmp_path / "meta", parts=1)
    merged = load_rank_state(find_shards(out), read_params(out), 0, 1)
    assert all(torch.equal(merged[k], v) for k, v in state.items())


def test_tied_hf_embeddings_become_a_separate_output(tmp_path: Path) -> None:
    hf = meta_to_hf(random_state(MHA, seed=5), MHA)
    del hf["lm_head.weight"]
    save_file({k: v.contiguous() for k, v in hf.items()}, tmp_path / "model.safetensors")
    config = {**hf_config(MHA).to_dict(), "tie_word_embeddings": True}
    (tmp_path / "config.json").write_text(json.dumps(config, default=str))

    out = convert_hf_to_meta(tmp_path, tmp_path / "meta", parts=1)
    merged = load_rank_state(find_shards(out), read_params(out), 0, 1)
    assert torch.equal(merged["output.weight"], merged["tok_embeddings.weight"])


def test_hf_folder_without_safetensors_is_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(hf_config(MHA).to_json_string(use_diff=False))
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        convert_hf_to_meta(tmp_path, tmp_path / "meta", parts=1)
