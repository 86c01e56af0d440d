"""Hugging Face <-> Meta checkpoint conversion for LLaMA-family models.

Two differences separate the layouts: the key names, and the row order of ``wq``/``wk``.
Meta's RoPE rotates interleaved pairs (2i, 2i+1) of each head; Hugging Face's rotates the
two halves (i, i + head_dim/2). Conversion permutes those rows per head, so the same
rotation meets the same weights. Everything else is copied as is.

Folders carry more than weights: config.json's RoPE scaling (``hf_config.py``), tied
embeddings, bos/eos ids from the tokenizer, and the tokenizer file itself. transformers is
imported only where its config is built: the runner never needs it.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import replace
from pathlib import Path

import torch

from ..checkpoint import (
    IGNORED_KEYS,
    check_state,
    copy_tokenizer,
    find_shards,
    generation_axis,
    read_params,
    vocab_from_shards,
)
from ..errors import CheckpointError
from ..hf_config import args_from_hf_config, context_length, generation, hf_config
from ..model_args import LLAMA3_VOCAB_SIZE, ModelArgs
from ..quantization import read_quantization
from ..rank.weights import load_rank_state, tensor_shapes, write_checkpoint
from ..shard_axes import full_shapes
from ..tokenizer import load_tokenizer

__all__ = [
    "args_from_hf_config",
    "convert_hf_to_meta",
    "convert_meta_to_hf",
    "generation",
    "hf_config",
    "hf_key",
    "hf_to_meta",
    "meta_to_hf",
]

log = logging.getLogger(__name__)

# Meta key -> Hugging Face key. Per-layer keys are listed without their "layers.N." prefix.
_TOP_KEYS: dict[str, str] = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_KEYS: dict[str, str] = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_META_LAYER_KEY = re.compile(r"^layers\.(\d+)\.(.+)$")
# Older HF checkpoints store the RoPE frequencies; like Meta's rope.freqs they are recomputed.
_HF_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


# ------------------------------------------------------------------------ state dicts


def hf_key(meta_key: str) -> str:
    """The Hugging Face name of a Meta weight, e.g. layers.3.feed_forward.w1.weight ->
    model.layers.3.mlp.gate_proj.weight."""
    match = _META_LAYER_KEY.match(meta_key)
    if match:
        return f"model.layers.{match.group(1)}.{_LAYER_KEYS[match.group(2)]}"
    return _TOP_KEYS[meta_key]


def meta_to_hf(state: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """A full (unsharded) Meta state dict under Hugging Face names and RoPE layout.

    Tensors that need no permutation are passed through, not copied.
    """
    args = _with_vocab(args, state, "tok_embeddings.weight")
    expected = full_shapes(args)
    weights = {k: v for k, v in state.items() if k not in IGNORED_KEYS}
    check_state(tensor_shapes(weights), expected, "the Meta state dict")
    out = {}
    for key in expected:
        value = weights[key]
        if key.endswith("attention.wq.weight"):
            value = _interleaved_to_halves(value, args.n_heads)
        elif key.endswith("attention.wk.weight"):
            value = _interleaved_to_halves(value, args.kv_heads)
        out[hf_key(key)] = value
    return out


def hf_to_meta(state: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """A full Hugging Face Llama state dict under Meta names and RoPE layout (the inverse
    of :func:`meta_to_hf`)."""
    args = _with_vocab(args, state, "model.embed_tokens.weight")
    meta_shapes = full_shapes(args)
    # Permuting rows keeps every shape, so the expected HF shapes are Meta's, renamed.
    expected = {hf_key(k): shape for k, shape in meta_shapes.items()}
    weights = {k: v for k, v in state.items() if not _HF_IGNORED.search(k)}
    check_state(tensor_shapes(weights), expected, "the Hugging Face state dict")
    out = {}
    for key in meta_shapes:
        value = weights[hf_key(key)]
        if key.endswith("attention.wq.weight"):
            value = _halves_to_interleaved(value, args.n_heads)
        elif key.endswith("attention.wk.weight"):
            value = _halves_to_interleaved(value, args.kv_heads)
        out[key] = value
    return out


def _interleaved_to_halves(w: torch.Tensor, heads: int) -> torch.Tensor:
    """wq/wk rows [heads * head_dim, dim], per head: Meta's pair rows (2i, 2i+1) move to
    rows (i, i + head_dim/2), where HF's rotate_half expects them."""
    rows, cols = w.shape
    return w.reshape(heads, rows // heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def _halves_to_interleaved(w: torch.Tensor, heads: int) -> torch.Tensor:
    """The inverse of :func:`_interleaved_to_halves`."""
    rows, cols = w.shape
    return w.reshape(heads, 2, rows // heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def _with_vocab(args: ModelArgs, state: dict[str, torch.Tensor], embedding: str) -> ModelArgs:
    """params.json may say vocab_size -1 (= the tokenizer's); the embedding's rows say it too."""
    if args.vocab_size == -1 and isinstance(state.get(embedding), torch.Tensor):
        return replace(args, vocab_size=state[embedding].shape[0])
    return args


# ------------------------------------------------------------------------ folders


def convert_meta_to_hf(meta_dir: str | Path, out_dir: str | Path) -> Path:
    """A Meta folder (consolidated.NN.pth + params.json) -> a Hugging Face folder
    (config.json + model.safetensors), with tokenizer.model copied when present.

    bos/eos ids come from the tokenizer: eos is its stop ids (Llama 3: 128001, 128008 and
    128009, as Meta's Instruct releases write it; mpllama stops at all three for every
    model, and a base model rarely emits the other two). An output layer equal to the
    embedding (Llama 3.2 1B/3B) is written once, with ``tie_word_embeddings``.
    """
    folder = Path(meta_dir)
    shards = find_shards(folder)
    quant = read_quantization(folder)
    if quant is not None:
        raise CheckpointError(
            f"{folder} is quantized ({quant.method}, mpllama quantize): a Hugging Face "
            "folder holds full-precision weights; convert the checkpoint it was quantized from"
        )
    args = vocab_from_shards(read_params(folder), shards)
    tok_path = _find_tokenizer(folder, folder.parent)
    # Without a tokenizer, the kind (for the context length) follows the vocabulary.
    kind = "tiktoken" if args.vocab_size == LLAMA3_VOCAB_SIZE else "sentencepiece"
    bos: int | None = None
    eos: int | list[int] | None = None
    if tok_path is None:
        log.warning(
            "%s: no tokenizer.model beside it or one folder up: bos/eos ids left "
            "out of config.json",
            folder,
        )
    else:
        kind, bos, eos = _token_ids(tok_path)
    state = meta_to_hf(load_rank_state(shards, args, 0, 1), args)
    tied = torch.equal(state["model.embed_tokens.weight"], state["lm_head.weight"])
    if tied:
        del state["lm_head.weight"]  # transformers ties it to the embedding on load
    name = generation(args, kind)
    config = hf_config(
        args,
        max_position_embeddings=context_length(args, kind),
        dtype=state["model.embed_tokens.weight"].dtype,
        bos_token_id=bos,
        eos_token_id=eos,
        tie_word_embeddings=tied,
    )

    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # use_diff=False: a full config.json, readable without transformers' defaults.
    (out / "config.json").write_text(config.to_json_string(use_diff=False))
    # save_file writes only contiguous tensors (the permuted wq/wk already are).
    save_file(
        {k: v.contiguous() for k, v in state.items()},
        out / "model.safetensors",
        metadata={"format": "pt"},
    )
    if tok_path is not None:
        copy_tokenizer(tok_path, out)
    log.info("wrote %s from %s (%d shard(s), %s)", out, meta_dir, len(shards), name)
    return out


def convert_hf_to_meta(hf_dir: str | Path, out_dir: str | Path, parts: int) -> Path:
    """A Hugging Face Llama folder (config.json + *.safetensors, sharded or not) -> a Meta
    folder of ``parts`` shards, with tokenizer.model copied when present (in the folder,
    or in its ``original/`` folder as Meta's Hugging Face releases keep it)."""
    folder = Path(hf_dir)
    config_path = folder / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except FileNotFoundError:
        raise CheckpointError(
            f"{config_path} is missing: is {folder} a Hugging Face model folder?"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{config_path} is not valid JSON: {exc}") from None
    args = args_from_hf_config(config, str(config_path))
    state = _read_safetensors(folder)
    if config.get("tie_word_embeddings") and "model.embed_tokens.weight" in state:
        # Tied models store one matrix (transformers uses the embedding for both, even
        # where lm_head is stored too); Meta's format keeps output.weight separately.
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    tok_path = _find_tokenizer(folder, folder / "original")
    kind = _token_ids(tok_path)[0] if tok_path is not None else None
    # Split the embedding as the generation's own shards do (Llama 3: by vocabulary).
    embed_axis = generation_axis(args, kind)
    write_checkpoint(out_dir, args, hf_to_meta(state, args), parts, embed_axis=embed_axis)
    if tok_path is not None:
        copy_tokenizer(tok_path, Path(out_dir))
    log.info("wrote %s from %s (%d shard(s))", out_dir, folder, parts)
    return Path(out_dir)


def _find_tokenizer(*folders: Path) -> Path | None:
    for folder in folders:
        if (folder / "tokenizer.model").is_file():
            return folder / "tokenizer.model"
    return None


def _token_ids(path: Path) -> tuple[str, int, int | list[int]]:
    """(kind, bos id, eos id or ids) of a tokenizer.model, for config.json: the eos is
    every stop id, a list where there are several (Llama 3)."""
    tok = load_tokenizer(path)
    stops = sorted(tok.stop_ids)
    return tok.kind, tok.bos_id, stops[0] if len(stops) == 1 else stops


def _read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the folder's model.safetensors, or of the files its index names."""
    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index} is not a safetensors index: {exc}") from None
        files = [folder / name for name in sorted(set(weight_map.values()))]
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(
            f"{folder} holds no *.safetensors files. Pickled pytorch_model*.bin files are "
            "not read (they can run code); re-save with save_pretrained(safe_serialization=True)"
        )
    state: dict[str, torch.Tensor] = {}
    for path in files:
        if not path.is_file():
            raise CheckpointError(f"{path} is missing (named in {index.name})")
        part = load_file(path)
        repeated = sorted(set(part) & set(state))
        if repeated:
            raise CheckpointError(f"{path} repeats key(s) already read: {repeated[:5]}")
        state.update(part)
    return state
