"""A model's architecture as Meta's ``params.json`` gives it (``ModelArgs``, field names
equal to its keys), what follows from it (head sizes, the FFN width, Llama 3's RoPE
factor), the release variants mpllama refuses, and the presets of the checkpoints the
project writes itself. No torch, no Ray: the driver reads a checkpoint's shape too.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any

from .errors import ConfigError
from .typecheck import build


@dataclass(frozen=True)
class ModelArgs:
    """The architecture, named exactly as Meta's ``params.json`` names it."""

    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # absent = n_heads (no grouped-query attention)
    vocab_size: int = -1  # -1 = the tokenizer's
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    use_scaled_rope: bool = False  # Llama 3.1+: RoPE frequencies rescaled for long contexts
    # mpllama's own key (Meta's files never carry it): the scaling factor when
    # use_scaled_rope is set. None = Meta's rule (see rope_scaling_factor).
    rope_scale_factor: float | None = None

    @classmethod
    def from_params(cls, params: dict[str, Any], source: str = "params.json") -> ModelArgs:
        if not isinstance(params, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(params).__name__}")
        for key, variant in _UNSUPPORTED_VARIANTS.items():
            if key in params:
                raise ConfigError(
                    f"{source}: this is a {variant} checkpoint ({key!r} in params.json), "
                    "which mpllama does not support: it is not a plain Llama and must not run "
                    "as one. Use the release's plain bf16 checkpoint instead."
                )
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(params) - known)
        if unknown:
            raise ConfigError(
                f"{source}: unknown key(s) {unknown}; known keys are {sorted(known)}. "
                "Is this a LLaMA-family params.json (LLaMA 1, Llama 2, Code Llama, "
                "Llama 3.x)?"
            )
        args = build(cls, params, source)
        args.validate(source)
        return args

    def validate(self, source: str = "params.json") -> None:
        for name in ("dim", "n_layers", "n_heads", "multiple_of"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{source}: {name} must be >= 1, got {getattr(self, name)}")
        if self.n_kv_heads is not None and (self.n_kv_heads < 1 or self.n_heads % self.n_kv_heads):
            raise ConfigError(
                f"{source}: n_kv_heads={self.n_kv_heads} must be >= 1 and divide "
                f"n_heads={self.n_heads}"
            )
        if self.dim % self.n_heads or self.head_dim % 2:
            raise ConfigError(
                f"{source}: dim={self.dim} must split into n_heads={self.n_heads} heads of "
                "even size (rotary embeddings rotate pairs)"
            )
        if self.vocab_size != -1 and self.vocab_size < 1:
            raise ConfigError(f"{source}: vocab_size must be -1 or >= 1, got {self.vocab_size}")
        if self.norm_eps <= 0 or self.rope_theta <= 0:
            raise ConfigError(f"{source}: norm_eps and rope_theta must be > 0")
        if self.rope_scale_factor is not None and self.rope_scale_factor < 1:
            raise ConfigError(
                f"{source}: rope_scale_factor must be >= 1 (or null for Meta's rule), got "
                f"{self.rope_scale_factor}"
            )

    @property
    def rope_scaling_factor(self) -> float | None:
        """The RoPE scaling factor in effect, or None when RoPE is not scaled.

        Meta's reference ``apply_scaling`` hard-codes 8, but Llama 3.2 1B and 3B were
        trained with 32 (llama-models issue #166, confirmed by Meta's maintainers; with 8
        their output degrades at long context). Their shapes are recognised; a setting
        (``model.rope_scale_factor``, stored here) overrides the rule.
        """
        if not self.use_scaled_rope:
            return None
        if self.rope_scale_factor is not None:
            return self.rope_scale_factor
        return 32.0 if (self.dim, self.n_layers) in LLAMA_3_2_SMALL_SHAPES else 8.0

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_dim(self) -> int:
        """SwiGLU width as Meta computes it: 2/3 of 4*dim, scaled, rounded up."""
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    def to_params(self) -> dict[str, Any]:
        """The params.json form (optional keys left out when unset, as Meta's files do)."""
        out = dataclasses.asdict(self)
        if out["n_kv_heads"] is None:
            del out["n_kv_heads"]
        if out["ffn_dim_multiplier"] is None:
            del out["ffn_dim_multiplier"]
        if not out["use_scaled_rope"]:
            del out["use_scaled_rope"]
        if out["rope_scale_factor"] is None:
            del out["rope_scale_factor"]
        return out


# Meta's RoPE scaling constants (``apply_scaling`` in llama-models), fixed for every
# Llama 3.1+ release; only the factor varies.
ROPE_LOW_FREQ_FACTOR = 1.0
ROPE_HIGH_FREQ_FACTOR = 4.0
ROPE_OLD_CONTEXT_LEN = 8192
# Every Llama 3.x vocabulary: 128000 BPE tokens + 256 special tokens (Meta's tiktoken file).
LLAMA3_VOCAB_SIZE = 128256
# (dim, n_layers) of Llama 3.2 1B and 3B: RoPE scaled by 32, not 8.
LLAMA_3_2_SMALL_SHAPES = frozenset({(2048, 16), (3072, 28)})

# params.json keys that mark a Meta release mpllama must refuse rather than run as a plain
# model: each is another format whose weights mean something else.
_UNSUPPORTED_VARIANTS = {
    "quantization_args": "Meta quantized (SpinQuant / QAT int4)",
    "lora_args": "Meta QLoRA",
    "vision_chunk_size": "Llama 3.2 Vision",
    "vision_max_num_chunks": "Llama 3.2 Vision",
    "vision_num_cross_attention_layers": "Llama 3.2 Vision",
    "vision_model": "Llama 3.2 Vision",
}


# The random checkpoints the project writes for tests and demos (mpllama init-checkpoint).
PRESETS: dict[str, ModelArgs] = {
    # Divisible by 1, 2 and 4 ranks everywhere; GQA so the KV-head path is exercised.
    "tiny": ModelArgs(dim=128, n_layers=2, n_heads=8, n_kv_heads=4, multiple_of=32, norm_eps=1e-5),
    "small": ModelArgs(dim=512, n_layers=8, n_heads=8, n_kv_heads=4, multiple_of=64, norm_eps=1e-5),
    "medium": ModelArgs(
        dim=1024,
        n_layers=12,
        n_heads=16,
        n_kv_heads=8,
        multiple_of=128,
        ffn_dim_multiplier=1.3,
        norm_eps=1e-5,
        rope_theta=500000.0,
    ),
    # Llama 3 shaped (Meta's tiktoken vocabulary, GQA, scaled RoPE at theta 5e5; head_dim
    # 8 keeps low-frequency pairs that the scaling changes). The writer gives it Meta's
    # real tokenizer.model and shards the embedding by vocabulary, as Meta does.
    "llama3-tiny": ModelArgs(
        dim=64,
        n_layers=2,
        n_heads=8,
        n_kv_heads=2,
        vocab_size=LLAMA3_VOCAB_SIZE,
        multiple_of=16,
        norm_eps=1e-5,
        rope_theta=500000.0,
        use_scaled_rope=True,
    ),
}
