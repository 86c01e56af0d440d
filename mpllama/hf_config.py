"""Hugging Face ``config.json`` <-> Meta ``params.json`` for LLaMA-family models.

The architecture maps one to one; two things need care. Meta's FFN width is a rule
(``multiple_of``, ``ffn_dim_multiplier``), Hugging Face stores the width itself. Llama
3.1's RoPE scaling is ``use_scaled_rope`` (factor by Meta's rule, other values fixed) in
Meta's files and ``rope_type: llama3`` with all four values in Hugging Face's.

It also names the generation a checkpoint belongs to (:func:`generation`, which
``mpllama check`` reports). No torch here, and transformers is imported only inside
:func:`hf_config`: the driver and the runner never need either.
"""

from __future__ import annotations

import inspect
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from .errors import CheckpointError, ConfigError
from .model_args import (
    LLAMA3_VOCAB_SIZE,
    LLAMA_3_2_SMALL_SHAPES,
    ROPE_HIGH_FREQ_FACTOR,
    ROPE_LOW_FREQ_FACTOR,
    ROPE_OLD_CONTEXT_LEN,
    ModelArgs,
)

if TYPE_CHECKING:
    import torch
    from transformers import LlamaConfig

# Meta's default rounding; tried first so Llama 2 7B/13B and Code Llama keep their params.json.
_META_MULTIPLE_OF = 256
# Meta's released (multiple_of, ffn_dim_multiplier) pairs, in an order where each release
# (Llama 3.2 1B, 3B; Llama 2 70B and 3.x 70B; 3.x 8B; 3.1 405B) meets its own first. For
# Llama 3's vocabulary they are tried before the plain 256 (3.2 3B says 1.0, not None).
_META_FFN_PAIRS: tuple[tuple[int, float], ...] = (
    (256, 1.5),
    (256, 1.0),
    (4096, 1.3),
    (1024, 1.3),
    (4096, 1.2),
)
# max_position_embeddings of Meta's Llama 3.1+ releases (scaled RoPE).
CONTEXT_SCALED = 131072


def hf_config(
    args: ModelArgs,
    max_position_embeddings: int | None = None,
    dtype: torch.dtype | None = None,
    bos_token_id: int | None = 1,
    eos_token_id: int | list[int] | None = 2,
    tie_word_embeddings: bool = False,
) -> LlamaConfig:
    """The ``transformers.LlamaConfig`` of a model with these params.json settings.

    ``use_scaled_rope`` becomes ``rope_type: llama3`` with the factor in effect and Meta's
    fixed constants. ``max_position_embeddings`` None = 131072 for scaled RoPE (Llama
    3.1+), else 4096 (Llama 2). The bos/eos defaults are transformers' own (Llama 2's
    ids); ``dtype`` is recorded as the checkpoint's dtype (what
    ``from_pretrained(dtype="auto")`` loads). Works with transformers 4 (``rope_theta=``,
    ``rope_scaling=``) and 5 (``rope_parameters=``).
    """
    from transformers import LlamaConfig

    if args.vocab_size < 1:
        raise ConfigError(
            f"vocab_size={args.vocab_size}: a Hugging Face config needs the real vocabulary "
            "size; resolve it first (from the tokenizer or the embedding's row count)"
        )
    factor = args.rope_scaling_factor
    if max_position_embeddings is None:
        max_position_embeddings = CONTEXT_SCALED if factor is not None else 4096
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
        tie_word_embeddings=tie_word_embeddings,
        attention_bias=False,
        mlp_bias=False,
        hidden_act="silu",
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
    )
    scaling: dict[str, Any] = {"rope_type": "default"}
    if factor is not None:
        scaling = {
            "rope_type": "llama3",
            "factor": float(factor),
            "low_freq_factor": ROPE_LOW_FREQ_FACTOR,
            "high_freq_factor": ROPE_HIGH_FREQ_FACTOR,
            "original_max_position_embeddings": ROPE_OLD_CONTEXT_LEN,
        }
    if "rope_parameters" in accepted:  # transformers >= 5
        kwargs["rope_parameters"] = {**scaling, "rope_theta": args.rope_theta}
    else:
        kwargs["rope_theta"] = args.rope_theta
        kwargs["rope_scaling"] = scaling if factor is not None else None
    if dtype is not None:
        kwargs["dtype" if "dtype" in accepted else "torch_dtype"] = dtype
    return LlamaConfig(**kwargs)


def args_from_hf_config(config_dict: dict[str, Any], source: str = "config.json") -> ModelArgs:
    """params.json settings from a Hugging Face Llama ``config.json`` (as a dict).

    Written by transformers 4 (``rope_theta``, ``rope_scaling``) or 5 (``rope_parameters``).
    ``multiple_of``/``ffn_dim_multiplier`` are chosen so that ``ffn_dim`` equals the
    config's ``intermediate_size``; they need not be the values Meta wrote. ``rope_type:
    llama3`` becomes ``use_scaled_rope``; its factor is written as ``rope_scale_factor``
    only where it differs from Meta's rule (8, or 32 for the Llama 3.2 1B/3B shapes).
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
    rope = _rope_settings(config_dict, source)
    rope_type = rope.get("rope_type") or "default"
    if rope_type not in ("default", "llama3"):
        wrong.append(
            f"rope_type={rope_type!r} (Meta's format has plain RoPE ('default') and Llama "
            "3.1's scaling ('llama3') only)"
        )
    if wrong:
        raise CheckpointError(
            f"{source}: not expressible as a Meta params.json: " + "; ".join(wrong)
        )

    kv = config_dict.get("num_key_value_heads") or n_heads
    llama3 = config_dict["vocab_size"] == LLAMA3_VOCAB_SIZE
    multiple_of, multiplier = _ffn_fields(dim, config_dict["intermediate_size"], source, llama3)
    args = ModelArgs(
        dim=dim,
        n_layers=config_dict["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=None if kv == n_heads else kv,
        vocab_size=config_dict["vocab_size"],
        multiple_of=multiple_of,
        ffn_dim_multiplier=multiplier,
        norm_eps=float(config_dict.get("rms_norm_eps", 1e-6)),  # HF's default when absent
        rope_theta=float(rope.get("rope_theta", 10000.0)),
    )
    if rope_type == "llama3":
        args = _with_llama3_scaling(args, rope, source)
    try:
        args.validate(source)
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from None
    return args


def _rope_settings(config_dict: dict[str, Any], source: str) -> dict[str, Any]:
    """One dict of the RoPE settings: transformers 4 keeps ``rope_theta`` at the top and
    the scaling in ``rope_scaling``; transformers 5 keeps both in ``rope_parameters``.
    Where a config has both, ``rope_scaling`` (written to ask for scaling) wins."""
    rope: dict[str, Any] = {}
    if "rope_theta" in config_dict:
        rope["rope_theta"] = config_dict["rope_theta"]
    for key in ("rope_parameters", "rope_scaling"):
        value = config_dict.get(key) or {}
        if not isinstance(value, dict):
            raise CheckpointError(f"{source}: {key} must be an object, got {value!r}")
        if "type" in value:  # transformers' older name of rope_type
            value = {"rope_type": value["type"], **value}
        rope.update(value)
    return rope


def _with_llama3_scaling(args: ModelArgs, rope: dict[str, Any], source: str) -> ModelArgs:
    """``use_scaled_rope`` from a ``rope_type: llama3`` block; only the factor may vary,
    the other three values are Meta's constants (its params.json cannot say others)."""
    fixed = {
        "low_freq_factor": ROPE_LOW_FREQ_FACTOR,
        "high_freq_factor": ROPE_HIGH_FREQ_FACTOR,
        "original_max_position_embeddings": ROPE_OLD_CONTEXT_LEN,
    }
    absent = [k for k in ("factor", *fixed) if k not in rope]
    if absent:
        raise CheckpointError(f"{source}: rope_type 'llama3' without {absent}")
    other = [f"{k}={rope[k]!r} (Meta's is {v:g})" for k, v in fixed.items() if rope[k] != v]
    if other:
        raise CheckpointError(
            f"{source}: llama3 RoPE scaling with {', '.join(other)} is not supported: Meta's "
            "params.json fixes these values, only the factor may differ"
        )
    args = replace(args, use_scaled_rope=True)
    factor = float(rope["factor"])
    # Meta's rule gives this shape's factor; write ours only where the config differs.
    return args if factor == args.rope_scaling_factor else replace(args, rope_scale_factor=factor)


def _ffn_fields(
    dim: int, width: int, source: str, llama3: bool = False
) -> tuple[int, float | None]:
    """(multiple_of, ffn_dim_multiplier) for which Meta's FFN rule gives ``width``.

    Meta's released pairs are tried first, so each release gets its own params.json back.
    Otherwise: Meta rounds int(8*dim/3) (times the multiplier) up to a multiple of multiple_of, so
    multiple_of = width works whenever int(8*dim/3) <= width (Llama 2 70B: 21845 -> 28672);
    narrower FFNs need a multiplier below 1 to bring the base under width first.
    """
    base = int(2 * (4 * dim) / 3)
    released: list[tuple[int, float | None]] = [(_META_MULTIPLE_OF, None), *_META_FFN_PAIRS]
    candidates = [
        *(released[1:] + released[:1] if llama3 else released),
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


# ------------------------------------------------------------------------ generations


def generation(args: ModelArgs, tokenizer_kind: str) -> str:
    """Which of Meta's releases a checkpoint looks like, from params.json and the kind of
    its tokenizer ("sentencepiece" or "tiktoken").

    Code Llama is the sentencepiece family with rope_theta 1e6 (vocab 32016 for 7B, 13B
    and 70B, 32000 for 34B). Llama 3.1 and 3.3 share one format; 3.2 1B/3B are told apart
    by their shapes (RoPE factor 32). LLaMA 1 and Llama 2 files cannot be told apart.
    """
    if tokenizer_kind == "tiktoken":
        if not args.use_scaled_rope:
            return "Llama 3"
        small = (args.dim, args.n_layers) in LLAMA_3_2_SMALL_SHAPES
        return "Llama 3.2" if small or args.rope_scaling_factor == 32 else "Llama 3.1/3.3"
    return "Code Llama" if args.rope_theta == 1e6 else "LLaMA 1/2"


# max_position_embeddings of Meta's Hugging Face releases, by generation (LLaMA 1 had
# 2048 but cannot be told from Llama 2).
_CONTEXT = {"LLaMA 1/2": 4096, "Code Llama": 16384, "Llama 3": 8192}


def context_length(args: ModelArgs, tokenizer_kind: str) -> int:
    """config.json's max_position_embeddings for this generation, as Meta's releases say."""
    if args.use_scaled_rope:
        return CONTEXT_SCALED
    return _CONTEXT.get(generation(args, tokenizer_kind), CONTEXT_SCALED)
