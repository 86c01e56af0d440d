"""Rotary position embeddings in Meta's layout: the table of e^(i * position * freq),
Llama 3.1's frequency scaling, and the rotation of interleaved pairs."""

from __future__ import annotations

import torch

from ..model_args import ROPE_HIGH_FREQ_FACTOR, ROPE_LOW_FREQ_FACTOR, ROPE_OLD_CONTEXT_LEN

__all__ = ["apply_rope", "rope_table", "scale_rope"]


def scale_rope(freqs: torch.Tensor, factor: float) -> torch.Tensor:
    """Llama 3.1's RoPE scaling, as Meta's ``apply_scaling``: frequencies whose wavelength
    exceeds the original context / low_freq_factor are divided by ``factor``, those
    shorter than context / high_freq_factor kept, and the band between interpolated.
    The same float32 operations in the same order, so the table matches Meta's bit for bit.
    """
    low_freq_wavelen = ROPE_OLD_CONTEXT_LEN / ROPE_LOW_FREQ_FACTOR
    high_freq_wavelen = ROPE_OLD_CONTEXT_LEN / ROPE_HIGH_FREQ_FACTOR
    wavelen = 2 * torch.pi / freqs
    new_freqs = torch.where(wavelen > low_freq_wavelen, freqs / factor, freqs)
    smooth = (ROPE_OLD_CONTEXT_LEN / wavelen - ROPE_LOW_FREQ_FACTOR) / (
        ROPE_HIGH_FREQ_FACTOR - ROPE_LOW_FREQ_FACTOR
    )
    return torch.where(
        (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen),
        (1 - smooth) * new_freqs / factor + smooth * new_freqs,
        new_freqs,
    )


def rope_table(
    head_dim: int,
    max_seq_len: int,
    theta: float,
    device: torch.device,
    scale_factor: float | None = None,
) -> torch.Tensor:
    """e^(i * position * freq) for every (position, pair): [max_seq_len, head_dim // 2]
    complex64; frequencies scaled as Llama 3.1 scales them when ``scale_factor`` is set
    (``ModelArgs.rope_scaling_factor``)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))
    if scale_factor is not None:
        inv_freq = scale_rope(inv_freq, scale_factor)
    angles = torch.outer(torch.arange(max_seq_len, device=device).float(), inv_freq)
    return torch.polar(torch.ones_like(angles), angles)


def apply_rope(x: torch.Tensor, cis: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (2i, 2i+1) as Meta's layout does, one complex product per
    pair (a third of the kernels of the real-arithmetic form). x [B,T,H,D]; cis [B,T,D/2]."""
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # [B,T,H,D/2]
    return torch.view_as_real(pairs * cis[:, :, None, :]).flatten(-2).type_as(x)
