"""mpllama against transformers' LlamaForCausalLM on the same random weights: identical
greedy tokens and log-probs within 1e-4, for prompts of different lengths prefilled
together in one step, across MHA, GQA, ffn_dim_multiplier and rope_theta variants, on the
CPU and (marked gpu) on a CUDA GPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import PROMPTS, hf_greedy, hf_model, make_checkpoint

from mpllama import checkpoint
from mpllama.config import SamplingParams
from mpllama.model_args import ModelArgs
from mpllama.protocol import Request
from mpllama.rank import weights
from mpllama.rank.model import Transformer, materialize
from mpllama.rank.runner import Runner
from mpllama.tokenizer import Tokenizer

VARIANTS = {
    "mha": ModelArgs(dim=64, n_layers=2, n_heads=4, multiple_of=16, vocab_size=512),
    "gqa": ModelArgs(dim=64, n_layers=2, n_heads=8, n_kv_heads=2, multiple_of=16, vocab_size=512),
    "ffn_multiplier": ModelArgs(
        dim=96,
        n_layers=2,
        n_heads=6,
        n_kv_heads=3,
        multiple_of=32,
        ffn_dim_multiplier=1.3,
        vocab_size=512,
    ),
    "rope_theta": ModelArgs(
        dim=64,
        n_layers=3,
        n_heads=4,
        n_kv_heads=2,
        multiple_of=16,
        rope_theta=1_000_000.0,
        norm_eps=1e-6,
        vocab_size=512,
    ),
}
MAX_NEW = 8


# The CPU always; a CUDA GPU where there is one (float32 products: torch leaves TF32 off).
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(
                not torch.cuda.is_available(), reason="needs a CUDA GPU; this machine has none"
            ),
        ],
    ),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_greedy_matches_transformers(
    variant: str, device: str, tiny_ckpt: Path, ckpt_root: Path, single_rank: None
) -> None:
    ckpt = make_checkpoint(ckpt_root / f"parity-{variant}", VARIANTS[variant], tiny_ckpt)
    tok = Tokenizer(ckpt / "tokenizer.model")
    args = checkpoint.read_params(ckpt)
    state = weights.load_rank_state(checkpoint.find_shards(ckpt), args, 0, 1)
    model = materialize(Transformer(args), state, torch.device(device), torch.float32)
    model.setup_slots(len(PROMPTS), 64)
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW, logprobs=True, ignore_eos=True)
    ids = [tok.encode(p, bos=True, eos=False) for p in PROMPTS]
    assert len({len(i) for i in ids}) == len(ids), "prompts must differ in length"
    runner = Runner(model, tok, prefill_chunk_tokens=256)
    runner.add([Request(str(n), i, params) for n, i in enumerate(ids)])
    got: dict[str, tuple[list[int], list[float]]] = {str(n): ([], []) for n in range(len(ids))}
    while runner.has_work:
        for e in runner.step():
            got[e.id][0].extend(e.token_ids)
            got[e.id][1].extend(e.logprobs or [])

    reference = hf_model(ckpt)
    for n, prompt_ids in enumerate(ids):
        tokens, logprobs = hf_greedy(reference, prompt_ids, MAX_NEW)
        assert got[str(n)][0] == tokens
        torch.testing.assert_close(
            torch.tensor(got[str(n)][1]), torch.tensor(logprobs), atol=1e-4, rtol=0
        )
