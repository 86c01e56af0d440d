"""Hugging Face <-> Meta checkpoint conversion for LLaMA-family models.

Two differences separate the layouts: the key names, and the row order of ``wq``/``wk``.
Meta's RoPE rotates interleaved pairs (2i, 2i+1) of each head; Hugging Face's rotates the
two halves (i, i + head_dim/2). Conversion permutes those rows per head, so the same
rotation meets the same weights. Everything else is copied as is.

transformers is imported only inside the functions that build its config: the runner
never needs it, only conversion and the parity tests do.
"""

from __future__ import annotations

import inspect
import json
import logging
import re
import shutil
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .checkpoint import IGNORED_KEYS, check_state, find_shards, full_shapes, read_params
from .config import ModelArgs
from .errors import CheckpointError, ConfigError
from .weights import load_rank_state, load_shard, tensor_shapes, write_checkpoint

if TYPE_CHECKING:
    from transformers import LlamaConfig

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
# Meta's default rounding; tried first so Llama 2 7B/13B and Code Llama keep their params.json.
_META_MULTIPLE_OF = 256


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


# ------------------------------------------------------------------------ configs


def hf_config(
    args: ModelArgs, max_position_embeddings: int = 4096, dtype: torch.dtype | None = None
) -> LlamaConfig:
    """The ``transformers.LlamaConfig`` of a model with these params.json settings.

    ``dtype`` is recorded as the checkpoint's dtype (what ``from_pretrained(dtype="auto")``
    loads). Works with transformers 4 (``rope_theta=``) and 5 (``rope_parameters=``).
    """
    from transformers import LlamaConfig

    if args.vocab_size < 1:
        raise ConfigError(
            f"vocab_size={args.vocab_size}: a Hugging Face config needs the real vocabulary "
            "size; resolve it first (from the tokenizer or the embedding's row count)"
        )
    accepted = inspect.signature(LlamaConfig.__init__).parameters
    kwargs: dict[str, Any] = dict(
        architectures=["LlamaForCausalLM"],
        hidden_size=args.dim,
        intermediate_size=args.ffn_dim,
        num_hidden_layers=args.n_layers,
        num_attention_heads=args.n_heads,
        num_key_value_heads=args.kv_heads,
        vocab_size=args.vocab_size,
        rms_norm_eps=args.norm_eps,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        hidden_act="silu",
    )
    if "rope_parameters" in accepted:  # transformers >= 5
        kwargs["rope_parameters"] = {"rope_type": "default", "rope_theta": args.rope_theta}
    else:
        kwargs["rope_theta"] = args.rope_theta
    if dtype is not None:
        kwargs["dtype" if "dtype" in accepted else "torch_dtype"] = dtype
    return LlamaConfig(**kwargs)


def args_from_hf_config(config_dict: dict[str, Any], source: str = "config.json") -> ModelArgs:
    """params.json settings from a Hugging Face Llama ``config.json`` (as a dict).

    Written by transformers 4 (``rope_theta``, ``rope_scaling``) or 5 (``rope_parameters``).
    ``multiple_of``/``ffn_dim_multiplier`` are chosen so that ``ffn_dim`` equals the
    config's ``intermediate_size``; they need not be the values Meta wrote.
    """
    model_type = config_dict.get("model_type", "llama")
    if model_type != "llama":
        raise CheckpointError(f"{source}: model_type is {model_type!r}; only 'llama' converts")
    required = (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "vocab_size",
    )
    missing = [k for k in required if k not in config_dict]
    if missing:
        raise CheckpointError(f"{source}: missing key(s) {missing}; is it a Llama config.json?")
    # Architectural switches Meta's model does not have; converting them would run silently wrong.
    unsupported = {"hidden_act": "silu", "attention_bias": False, "mlp_bias": False}
    wrong = [
        f"{k}={config_dict[k]!r} (needs {v!r})"
        for k, v in unsupported.items()
        if config_dict.get(k, v) != v
    ]
    dim, n_heads = config_dict["hidden_size"], config_dict["num_attention_heads"]
    head_dim = config_dict.get("head_dim")
    if head_dim is not None and head_dim * n_heads != dim:
        wrong.append(f"head_dim={head_dim} (needs hidden_size / num_attention_heads)")
    rope = config_dict.get("rope_parameters") or {}
    scaling = config_dict.get("rope_scaling") or {}
    rope_type = scaling.get("rope_type", scaling.get("type")) or rope.get("rope_type", "default")
    if rope_type != "default":
        wrong.append(f"rope_type={rope_type!r} (needs plain RoPE: 'default')")
    if wrong:
        raise CheckpointError(
            f"{source}: not expressible as a Meta params.json: " + "; ".join(wrong)
        )

    kv = config_dict.get("num_key_value_heads") or n_heads
    multiple_of, multiplier = _ffn_fields(dim, config_dict["intermediate_size"], source)
    args = ModelArgs(
        dim=dim,
        n_layers=config_dict["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=None if kv == n_heads else kv,
        vocab_size=config_dict["vocab_size"],
        multiple_of=multiple_of,
        ffn_dim_multiplier=multiplier,
        norm_eps=float(config_dict.get("rms_norm_eps", 1e-6)),  # HF's default when absent
        rope_theta=float(rope.get("rope_theta", config_dict.get("rope_theta", 10000.0))),
    )
    try:
        args.validate(source)
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from None
    return args


def _ffn_fields(dim: int, width: int, source: str) -> tuple[int, float | None]:
    """(multiple_of, ffn_dim_multiplier) for which Meta's FFN rule gives ``width``.

    Meta rounds int(8*dim/3) (times the multiplier) up to a multiple of multiple_of, so
    multiple_of = width works whenever int(8*dim/3) <= width (Llama 2 70B: 21845 -> 28672);
    narrower FFNs need a multiplier below 1 to bring the base under width first.
    """
    base = int(2 * (4 * dim) / 3)
    candidates: list[tuple[int, float | None]] = [
        (_META_MULTIPLE_OF, None),
        (width, None),
        (width, width / base),
    ]
    for multiple_of, multiplier in candidates if width >= 1 else []:
        trial = ModelArgs(dim=dim, multiple_of=multiple_of, ffn_dim_multiplier=multiplier)
        if trial.ffn_dim == width:
            return multiple_of, multiplier
    raise CheckpointError(
        f"{source}: intermediate_size={width} cannot be expressed with Meta's FFN rule for "
        f"hidden_size={dim} (multiple_of and ffn_dim_multiplier)"
    )


# ------------------------------------------------------------------------ folders


def convert_meta_to_hf(meta_dir: str | Path, out_dir: str | Path) -> Path:
    """A Meta folder (consolidated.NN.pth + params.json) -> a Hugging Face folder
    (config.json + model.safetensors), with tokenizer.model copied when present."""
    shards = find_shards(meta_dir)
    args = read_params(meta_dir)
    if args.vocab_size == -1:
        # The embedding is split on its columns, so every shard holds all vocab rows.
        embedding = load_shard(shards[0]).get("tok_embeddings.weight")
        if embedding is None:
            raise CheckpointError(f"{shards[0]} has no tok_embeddings.weight")
        args = replace(args, vocab_size=embedding.shape[0])
    state = meta_to_hf(load_rank_state(shards, args, 0, 1), args)
    config = hf_config(args, dtype=state["model.embed_tokens.weight"].dtype)

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
    _copy_tokenizer(Path(meta_dir), out)
    log.info("wrote %s from %s (%d shard(s))", out, meta_dir, len(shards))
    return out


def convert_hf_to_meta(hf_dir: str | Path, out_dir: str | Path, parts: int) -> Path:
    """A Hugging Face Llama folder (config.json + *.safetensors, sharded or not) -> a Meta
    folder of ``parts`` shards, with tokenizer.model copied when present."""
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
    if (
        config.get("tie_word_embeddings")
        and "lm_head.weight" not in state
        and "model.embed_tokens.weight" in state
    ):
        # Tied models store one matrix; Meta's format keeps output.weight separately.
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    write_checkpoint(out_dir, args, hf_to_meta(state, args), parts)
    _copy_tokenizer(folder, Path(out_dir))
    log.info("wrote %s from %s (%d shard(s))", out_dir, folder, parts)
    return Path(out_dir)


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


def _copy_tokenizer(src: Path, dst: Path) -> None:
    if (src / "tokenizer.model").is_file():
        shutil.copyfile(src / "tokenizer.model", dst / "tokenizer.model")
