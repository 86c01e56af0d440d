"""The committed demo model (demo/model, trained by demo/train.py), pinned token for token
as llama2.c pins its stories model: a change to the model maths, the checkpoint reader,
the tokenizer or greedy decoding that moves a logit far enough to flip one token fails
here. The prompts were chosen so that every greedy step wins by a clear logit margin
(at least 0.14, against float32 rounding of about 1e-5), so the pins do not hang on the
CPU's kernels.

If a change is meant to move the numbers (or the model is retrained), check that the
new text still reads as English and update GOLDEN from the failure message."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from mpllama import checkpoint
from mpllama.config import SamplingParams
from mpllama.protocol import Request
from mpllama.rank import cpu_kernels, weights
from mpllama.rank.model import Transformer, materialize
from mpllama.rank.runner import Runner
from mpllama.tokenizer import Tokenizer

DEMO = Path(__file__).resolve().parents[1] / "demo" / "model"
MAX_TOKENS = 24

# prompt -> (greedy token ids, their text)
# fmt: off
GOLDEN: dict[str, tuple[list[int], str]] = {
    'The "while" statement is used for': (
        [261, 744, 1956, 13, 13, 599, 310, 1426, 1964, 744, 13, 949,
         404, 325, 1973, 13, 13, 599, 310, 1426, 1964, 744, 290, 509],
        'a statement.\n\n'
        'The "with" statement\n=======================\n\n'
        'The "with" statement is used',
    ),
    'When an exception is raised,': (
        [267, 585, 290, 957, 1956, 13, 13, 689, 267, 310, 1418, 588,
         1964, 1314, 290, 1244, 1961, 267, 585, 290, 957, 1961, 316, 267],
        'the exception is raised.\n\n'
        'If the "finally" clause is present, the exception is raised, and the',
    ),
    'A dictionary maps': (
        [261, 792, 302, 267, 792, 1956, 13, 13, 599, 792, 728, 1344,
         383, 267, 774, 373, 1344, 1961, 348, 267, 792, 1956, 259, 599],
        'a dictionary of the dictionary.\n\n'
        'The dictionary returned keys are the same as keys, or the dictionary.  The',
    ),
}
# fmt: on


@pytest.fixture(scope="module")
def outputs(single_rank: None) -> dict[str, tuple[list[int], str]]:
    """Greedy ids and text for each GOLDEN prompt, from the demo model on one rank."""
    tok, args, shards = checkpoint.inspect(str(DEMO), None)
    # Both shards onto one rank: the golden path also covers resharding 2 -> 1.
    state = weights.load_rank_state(shards, args, 0, 1)
    model = materialize(Transformer(args), state, torch.device("cpu"), torch.float32)
    model.setup_slots(len(GOLDEN), 256)
    return greedy(model, tok, list(GOLDEN))


def greedy(
    model: Transformer, tok: Tokenizer, prompts: list[str]
) -> dict[str, tuple[list[int], str]]:
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
    runner = Runner(model, tok, 256)
    runner.add([Request(p, tok.encode(p, bos=True, eos=False), params) for p in prompts])
    out: dict[str, tuple[list[int], str]] = {p: ([], "") for p in prompts}
    while runner.has_work:
        for e in runner.step():
            ids, text = out[e.id]
            out[e.id] = (ids + e.token_ids, text + e.text)
    return out


def test_greedy_output_is_pinned(outputs: dict[str, tuple[list[int], str]]) -> None:
    assert outputs == GOLDEN, f"demo model output moved; if that is intended, GOLDEN = {outputs!r}"


def test_output_is_mostly_words(outputs: dict[str, tuple[list[int], str]]) -> None:
    # A random model writes byte soup ("?urc?|am..?,"); this one writes words.
    words = " ".join(text for _, text in outputs.values()).split()
    plain = [w for w in words if re.fullmatch(r"[A-Za-z]+", w.strip(".,;:!?()\"'"))]
    assert len(plain) >= 0.8 * len(words), f"not English enough: {words}"


def test_checkpoint_stays_small() -> None:
    files = sorted(p.name for p in DEMO.iterdir())
    assert files == [
        "consolidated.00.pth",
        "consolidated.01.pth",
        "params.json",
        "tokenizer.model",
    ]
    size = sum(p.stat().st_size for p in DEMO.iterdir())
    assert size < 6e6, f"demo/model is {size / 1e6:.1f} MB; it is committed, keep it small"


# Prompts for the bf16 check (bench.py's quant part uses them too): 12 of several kinds,
# then the first words of 48 of demo/train.py's held-out documents. The golden prompts
# were chosen for their margins, so they would flatter it.
AGREEMENT_PROMPTS = json.loads((DEMO.parent / "agreement_prompts.json").read_text())
AGREEMENT_TOKENS = 32
# bf16's logits differ from float32's by about 0.03 on this model (its weights rounded to
# bf16), and bf16 logits would come in steps of 1/16 near 10: a greedy choice between two
# tokens closer than that is a coin toss.
NEAR_TIE = 0.06
# Where mpllama's CPU kernels cannot run (no AVX-512 bf16/VNNI, no compiler), bf16 keeps
# torch's kernels: bf16 logits and attention scores, measured at 85.9% with gaps up to
# 0.045. The bounds it is held to there: (share, largest gap).
TORCH_BF16_BOUNDS = (0.80, 0.1)


def test_bf16_greedy_agrees_with_float32(single_rank: None) -> None:
    """bf16 (the default on a CPU with bf16 instructions) against float32 on the trained
    model, both packed as a rank runs them: of 60 prompts x 32 greedy tokens, the share
    that comes before each prompt's first divergence, at least the issue's 95% (measured:
    96.6%), and every divergence a near-tie in float32's own logits (bf16 never overturns
    a clear choice).

    The history of that figure, on these 60 prompts: 81.6% on torch's kernels (bf16
    logits, bf16 attention scores); 90.7% on mpllama's CPU kernels (float32 logits and
    scores); 96.6% since the residual stream stays float32 (model.Transformer.forward).
    float32 itself, run on the weights rounded to bf16, agrees at 97.0%: what is left is
    mostly the weights' own rounding, which decides near-ties by chance. The first 12
    prompts alone once swung from 97% to 85% on two such ties, which is why 60."""
    shards = checkpoint.find_shards(DEMO)
    args = checkpoint.read_params(DEMO)
    tok = Tokenizer(checkpoint.find_tokenizer(DEMO))
    runs: list[dict[str, list[int]]] = []
    tops: dict[str, list[dict[int, float]]] = {}
    for dtype in (torch.float32, torch.bfloat16):
        state = weights.load_rank_state(shards, args, 0, 1)
        model = materialize(Transformer(args), state, torch.device("cpu"), dtype)
        model.pack_linears()  # as a rank runs it
        model.setup_slots(len(AGREEMENT_PROMPTS), 128)
        assert model.layers[0].attention.cache_k.dtype is dtype  # the KV cache follows
        params = SamplingParams(
            temperature=0,
            max_tokens=AGREEMENT_TOKENS,
            ignore_eos=True,
            logprobs=dtype is torch.float32,
            top_logprobs=2 if dtype is torch.float32 else 0,
        )
        runner = Runner(model, tok, 256)
        runner.add(
            [Request(p, tok.encode(p, bos=True, eos=False), params) for p in AGREEMENT_PROMPTS]
        )
        out: dict[str, list[int]] = {p: [] for p in AGREEMENT_PROMPTS}
        while runner.has_work:
            for e in runner.step():
                out[e.id] += e.token_ids
                if e.top_logprobs:
                    tops.setdefault(e.id, []).extend(e.top_logprobs)
        runs.append(out)
    agreed, ties = 0, []
    for p in AGREEMENT_PROMPTS:
        pairs = list(zip(runs[0][p], runs[1][p], strict=True))
        first = next((i for i, (a, b) in enumerate(pairs) if a != b), len(pairs))
        agreed += first
        if first < len(pairs):
            # float32's own log-probs of its choice and of bf16's there (same normaliser,
            # so their difference is the logits' difference).
            top = tops[p][first]
            bf16_token = pairs[first][1]
            assert bf16_token in top, (p, first, top, bf16_token)
            ties.append(top[pairs[first][0]] - top[bf16_token])
    share = agreed / (len(AGREEMENT_PROMPTS) * AGREEMENT_TOKENS)
    print(f"bf16 greedy agreement with float32: {share:.1%}; gaps where they part: {ties}")
    least, near_tie = (0.95, NEAR_TIE) if cpu_kernels.unavailable() is None else TORCH_BF16_BOUNDS
    assert max(ties, default=0.0) < near_tie, ties
    assert share >= least, share
