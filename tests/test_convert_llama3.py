"""HF <-> Meta conversion for Llama 3.x: ``rope_type: llama3`` both ways, tied embeddings,
bos/eos ids from the tokenizer, the tokenizer file, vocabulary-parallel shards; a random
Llama-3-shaped checkpoint (vocab 128256, GQA, scaled RoPE, Meta's real tokenizer.model)
goes Meta -> HF -> transformers (greedy tokens equal to Meta's reference Transformer)
-> Meta (equal weights and params.json; mpllama's model on it gives the same greedy
tokens). Config inversion at real 3.x shapes too."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers import LLAMA3_RELEASES

from mpllama.checkpoint import detect_embedding_axis, find_shards, read_params
from mpllama.config import SamplingParams
from mpllama.errors import CheckpointError
from mpllama.model_args import ModelArgs
from mpllama.offline.convert import (
    args_from_hf_config,
    convert_hf_to_meta,
    convert_meta_to_hf,
    generation,
    hf_config,
)
from mpllama.offline.fixtures import random_state
from mpllama.rank.weights import load_rank_state, load_shard, write_checkpoint

transformers = pytest.importorskip("transformers", reason="HF parity needs transformers")
pytest.importorskip("safetensors", reason="HF folders are safetensors files")
llama_models = pytest.importorskip("llama_models", reason="Meta's reference code")
from safetensors.torch import load_file  # noqa: E402

META_TOKENIZER = Path(llama_models.__file__).parent / "llama3" / "tokenizer.model"
STOP_IDS = [128001, 128008, 128009]

# Llama-3-shaped but tiny; not a Llama 3.2 1B/3B shape, so Meta's rule (and its reference
# model's hard-coded value) gives factor 8. head_dim 32: 7 of its 16 RoPE frequencies lie
# beyond the 8192-token wavelength that scaling divides by 8, and one in the band between.
LLAMA31 = ModelArgs(
    dim=128,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    vocab_size=128256,
    multiple_of=256,
    ffn_dim_multiplier=1.5,  # Llama 3.2 1B's pair: params.json comes back exactly
    norm_eps=1e-5,
    rope_theta=500000.0,
    use_scaled_rope=True,
)

# Released params.json files and their Hugging Face intermediate_size and release line.
RELEASED = {
    name: (LLAMA3_RELEASES[name], width, release)
    for name, width, release in [
        ("llama3-8b", 14336, "Llama 3"),
        ("llama3-70b", 28672, "Llama 3"),
        ("llama3.1-70b", 28672, "Llama 3.1/3.3"),
        ("llama3.1-405b", 53248, "Llama 3.1/3.3"),
        ("llama3.1-8b", 14336, "Llama 3.1/3.3"),
        ("llama3.2-1b", 8192, "Llama 3.2"),
        ("llama3.2-3b", 8192, "Llama 3.2"),
    ]
}
LLAMA3_8B = LLAMA3_RELEASES["llama3-8b"]


# ------------------------------------------------------------------ configs


@pytest.mark.parametrize("name", list(RELEASED))
def test_llama3_configs_invert_at_real_shapes(name: str) -> None:
    args, width, _ = RELEASED[name]
    config = json.loads(hf_config(args).to_json_string(use_diff=False))  # no weights
    assert config["intermediate_size"] == width
    rope = config["rope_parameters"]
    if args.use_scaled_rope:
        assert rope == {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 32.0 if name.startswith("llama3.2") else 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        }
    else:
        assert rope["rope_type"] == "default"
    # Meta's own params.json back: its FFN pair, and no rope_scale_factor (Meta's rule
    # gives the factor).
    assert args_from_hf_config(config) == args


def test_transformers4_llama31_config() -> None:
    # meta-llama/Llama-3.1-8B-Instruct's config.json, as written by transformers 4.43.
    config = {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 128000,
        "eos_token_id": STOP_IDS,
        "hidden_act": "silu",
        "hidden_size": 4096,
        "initializer_range": 0.02,
        "intermediate_size": 14336,
        "max_position_embeddings": 131072,
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": 32,
        "num_hidden_layers": 32,
        "num_key_value_heads": 8,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": {
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": 128256,
    }
    args = args_from_hf_config(config)
    assert args == RELEASED["llama3.1-8b"][0]  # Meta's params.json exactly
    # Another factor than Meta's rule gives is kept, in mpllama's own params.json key.
    config["rope_scaling"]["factor"] = 16.0
    args = args_from_hf_config(config)
    assert (args.rope_scale_factor, args.rope_scaling_factor) == (16.0, 16.0)
    assert json.loads(hf_config(args).to_json_string())["rope_parameters"]["factor"] == 16.0


@pytest.mark.parametrize(
    "key, value",
    [
        ("low_freq_factor", 2.0),
        ("high_freq_factor", 8.0),
        ("original_max_position_embeddings", 4096),
    ],
)
def test_llama3_rope_values_meta_cannot_express_are_refused(key: str, value: float) -> None:
    config = json.loads(hf_config(LLAMA31).to_json_string(use_diff=False))
    config["rope_parameters"][key] = value
    with pytest.raises(CheckpointError, match=f"{key}={value!r} .* is not supported"):
        args_from_hf_config(config)


@pytest.mark.parametrize(
    "args, kind, expected",
    [
        *[(a, "tiktoken", g) for a, _, g in RELEASED.values()],
        (replace(LLAMA3_8B, use_scaled_rope=True, rope_scale_factor=32.0), "tiktoken", "Llama 3.2"),
        (ModelArgs(vocab_size=32000), "sentencepiece", "LLaMA 1/2"),
        (ModelArgs(vocab_size=32016, rope_theta=1e6), "sentencepiece", "Code Llama"),
        (
            ModelArgs(dim=8192, n_layers=48, vocab_size=32000, rope_theta=1e6),
            "sentencepiece",
            "Code Llama",
        ),
    ],
)
def test_generation(args: ModelArgs, kind: str, expected: str) -> None:
    assert generation(args, kind) == expected


# ------------------------------------------------------------------ folders


def meta_reference(state: dict[str, torch.Tensor], args: ModelArgs, max_seq_len: int):
    """Meta's reference Transformer (llama_models, fairscale at world size 1) on ``state``."""
    from llama_models.llama3.args import ModelArgs as MetaArgs
    from llama_models.llama3.model import Transformer

    params = {k: v for k, v in args.to_params().items() if k != "rope_scale_factor"}
    model = Transformer(MetaArgs(**params, max_batch_size=1, max_seq_len=max_seq_len))
    model.load_state_dict(state, strict=True)
    return model.float().eval()


@torch.no_grad()
def meta_greedy(model, prompt: list[int], max_new: int) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens through Meta's KV cache, and the prompt's logits [T, vocab]."""
    prompt_logits = model(torch.tensor([prompt]), 0)[0]
    tokens, pos, logits = [], len(prompt), prompt_logits[-1]
    for _ in range(max_new):
        tokens.append(int(logits.argmax()))
        logits = model(torch.tensor([[tokens[-1]]]), pos)[0, -1]
        pos += 1
    return tokens, prompt_logits


@torch.no_grad()
def hf_greedy(model, prompt: list[int], max_new: int) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens recomputing the whole sequence each step (no cache), and the
    prompt's logits [T, vocab]."""
    prompt_logits = model(input_ids=torch.tensor([prompt])).logits[0]
    seq, tokens, logits = list(prompt), [], prompt_logits[-1]
    for _ in range(max_new):
        tokens.append(int(logits.argmax()))
        seq.append(tokens[-1])
        logits = model(input_ids=torch.tensor([seq]), logits_to_keep=1).logits[0, -1]
    return tokens, prompt_logits


def load_hf(folder: Path):
    model, info = transformers.LlamaForCausalLM.from_pretrained(
        folder, output_loading_info=True, dtype=torch.float32
    )
    assert not any(info.values()), info
    model.set_attn_implementation("eager")
    return model.eval()


def merged_vocab_parallel(folder: Path) -> dict[str, torch.Tensor]:
    """A Llama 3 folder's shards merged by hand: the embedding on dim 0 (Meta's
    VocabParallelEmbedding), the rest by Meta's Llama 2 axes."""
    from mpllama.shard_axes import shard_axis

    shards = [load_shard(p) for p in find_shards(folder)]
    out = {}
    for key in shards[0]:
        axis = 0 if key == "tok_embeddings.weight" else shard_axis(key)
        out[key] = shards[0][key] if axis is None else torch.cat([s[key] for s in shards], axis)
    return out


def test_llama31_round_trip_through_transformers(tmp_path: Path, single_rank: None) -> None:
    args = LLAMA31
    state = random_state(args, seed=7)
    meta = tmp_path / "meta"
    write_checkpoint(meta, args, state, parts=2, embed_axis=0)  # as Meta shards Llama 3
    shutil.copyfile(META_TOKENIZER, meta / "tokenizer.model")

    hf = convert_meta_to_hf(meta, tmp_path / "hf")
    config = json.loads((hf / "config.json").read_text())
    assert config["rope_parameters"]["rope_type"] == "llama3"
    assert config["rope_parameters"]["factor"] == 8.0
    assert (config["bos_token_id"], config["eos_token_id"]) == (128000, STOP_IDS)
    assert config["max_position_embeddings"] == 131072
    assert config["tie_word_embeddings"] is False
    assert (hf / "tokenizer.model").read_bytes() == META_TOKENIZER.read_bytes()

    # A prompt long enough that the scaled (low) frequencies turn by a visible angle.
    gen = torch.Generator().manual_seed(0)
    prompt = [128000, *torch.randint(0, 128000, (95,), generator=gen).tolist()]
    expected, expected_logits = meta_greedy(meta_reference(state, args, 128), prompt, 6)
    model = load_hf(hf)
    tokens, logits = hf_greedy(model, prompt, 6)
    assert tokens == expected
    torch.testing.assert_close(logits, expected_logits, atol=1e-3, rtol=1e-4)
    # Control: the same weights with RoPE unscaled give other logits, so the test can fail.
    plain = transformers.LlamaForCausalLM(hf_config(replace(args, use_scaled_rope=False)))
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        unscaled = plain.float().eval()(input_ids=torch.tensor([prompt])).logits[0]
    assert not torch.allclose(unscaled, expected_logits, atol=1e-2)

    back = convert_hf_to_meta(hf, tmp_path / "back", parts=2)
    assert json.loads((back / "params.json").read_text()) == args.to_params()
    assert read_params(back) == args
    shard = load_shard(find_shards(back)[0])
    assert shard["tok_embeddings.weight"].shape == (args.vocab_size // 2, args.dim)  # dim 0
    merged = merged_vocab_parallel(back)
    loaded = load_rank_state(find_shards(back), args, 0, 1)  # the loader reads the axis too
    assert list(merged) == list(loaded) == list(state)
    for key, value in state.items():
        assert torch.equal(merged[key], value) and torch.equal(loaded[key], value), key
    assert (back / "tokenizer.model").read_bytes() == META_TOKENIZER.read_bytes()
    # mpllama's own model on the converted-back shards: transformers' greedy tokens too.
    assert mpllama_greedy(back, prompt, 6) == tokens


def mpllama_greedy(folder: Path, prompt: list[int], max_new: int) -> list[int]:
    from mpllama.protocol import Request
    from mpllama.rank.model import Transformer, materialize
    from mpllama.rank.runner import Runner
    from mpllama.tokenizer import load_tokenizer

    shards, args = find_shards(folder), read_params(folder)
    state = load_rank_state(shards, args, 0, 1)
    model = Transformer(args, detect_embedding_axis(shards, args))
    model = materialize(model, state, torch.device("cpu"), torch.float32)
    model.setup_slots(1, len(prompt) + max_new)
    runner = Runner(model, load_tokenizer(folder / "tokenizer.model"), prefill_chunk_tokens=256)
    greedy = SamplingParams(temperature=0, max_tokens=max_new, ignore_eos=True)
    runner.add([Request("0", prompt, greedy)])
    tokens: list[int] = []
    while runner.has_work:
        for event in runner.step():
            tokens.extend(event.token_ids)
    return tokens


def test_tied_embeddings_round_trip(tmp_path: Path) -> None:
    # Llama 3.2 1B/3B store one matrix for the embedding and the output layer.
    # (A small vocabulary: the tokenizer plays no part here.)
    args = replace(LLAMA31, vocab_size=512, ffn_dim_multiplier=None, rope_scale_factor=32.0)
    state = random_state(args, seed=8)
    state["output.weight"] = state["tok_embeddings.weight"].clone()
    meta = tmp_path / "meta"
    write_checkpoint(meta, args, state, parts=1)

    hf = convert_meta_to_hf(meta, tmp_path / "hf")
    config = json.loads((hf / "config.json").read_text())
    assert config["tie_word_embeddings"] is True
    assert config["rope_parameters"]["factor"] == 32.0
    assert "lm_head.weight" not in load_file(hf / "model.safetensors")  # written once
    model = load_hf(hf)  # no missing key: transformers ties lm_head to the embedding
    assert torch.equal(model.lm_head.weight, state["tok_embeddings.weight"])

    back = convert_hf_to_meta(hf, tmp_path / "back", parts=1)
    assert read_params(back) == args
    merged = load_shard(find_shards(back)[0])
    assert torch.equal(merged["output.weight"], state["tok_embeddings.weight"])

    # An untied model stays untied.
    state["output.weight"][0, 0] += 1
    write_checkpoint(meta, args, state, parts=1)
    hf = convert_meta_to_hf(meta, tmp_path / "hf2")
    assert json.loads((hf / "config.json").read_text())["tie_word_embeddings"] is False
    assert "lm_head.weight" in load_file(hf / "model.safetensors")


def test_tokenizer_in_original_folder_is_copied(tmp_path: Path) -> None:
    args = replace(LLAMA31, vocab_size=512)
    meta = tmp_path / "meta"
    write_checkpoint(meta, args, random_state(args, seed=9), parts=2, embed_axis=0)
    # vocab_size -1: the vocabulary-parallel shards say 2 x 256 rows.
    (meta / "params.json").write_text(json.dumps({**args.to_params(), "vocab_size": -1}))
    hf = convert_meta_to_hf(meta, tmp_path / "hf")  # no tokenizer: no ids
    config = json.loads((hf / "config.json").read_text())
    assert config["vocab_size"] == 512
    assert (config["bos_token_id"], config["eos_token_id"]) == (None, None)
    # Meta's Hugging Face releases keep the Meta tokenizer.model in original/.
    (hf / "original").mkdir()
    shutil.copyfile(META_TOKENIZER, hf / "original" / "tokenizer.model")
    back = convert_hf_to_meta(hf, tmp_path / "back", parts=2)
    assert (back / "tokenizer.model").read_bytes() == META_TOKENIZER.read_bytes()
    # tiktoken: the embedding is split by vocabulary.
    assert load_shard(find_shards(back)[1])["tok_embeddings.weight"].shape == (256, args.dim)


def test_a_tokenizer_of_neither_kind_is_named(tmp_path: Path) -> None:
    # Its ids would go into config.json: a broken file stops the conversion.
    args = replace(LLAMA31, vocab_size=512)
    meta = tmp_path / "meta"
    write_checkpoint(meta, args, random_state(args, seed=10), parts=1)
    (meta / "tokenizer.model").write_bytes(b"not a tokenizer")
    with pytest.raises(CheckpointError, match="tokenizer.model' is neither"):
        convert_meta_to_hf(meta, tmp_path / "hf")
