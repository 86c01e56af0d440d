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
# then the first words of demo/train.py's held-out documents (48, then the other 239
# whose first four words no prompt before starts alike). The golden prompts were chosen
# for their margins, so they would flatter it.
AGREEMENT_PROMPTS = json.loads((DEMO.parent / "agreement_prompts.json").read_text())
AGREEMENT_TOKENS = 32
# Prompts run this many at a time, so a decode step's rows run mpllama's kernels (oneDNN
# takes more than cpu_products.BATCH_ROWS), as a rank's few dozen requests do.
AGREEMENT_BATCH = 60
# bf16's logits differ from float32's by about 0.03 on this model (its weights rounded to
# bf16), and bf16 logits would come in steps of 1/16 near 10: a greedy choice between two
# tokens closer than that is a coin toss.
NEAR_TIE = 0.06
# Where mpllama's CPU kernels cannot run (no AVX-512 bf16/VNNI, no compiler), bf16 keeps
# torch's kernels: bf16 logits and attention scores, measured at 81.7% of the 299 prompts
# (85.9% of the first 60) with gaps up to 0.045. The bounds it is held to there: (share,
# largest gap).
TORCH_BF16_BOUNDS = (0.80, 0.1)


def test_bf16_greedy_agrees_with_float32(single_rank: None) -> None:
    """bf16 (the default on a CPU with bf16 instructions) against float32 on the trained
    model, both packed as a rank runs them: of 299 prompts x 32 greedy tokens, the share
    that comes before each prompt's first divergence, and every divergence a near-tie in
    float32's own logits (bf16 never overturns a clear choice). The share is held to what
    bf16 weights allow at all: float32 itself, run on the weights rounded to bf16, in the
    same test, less 2.5 points for the activations' rounding (measured: 0.9).

    Why not the issue's 95% as it stands: on this model the bound itself is under it.
    Here, bf16 93.0% against the bound's 93.9%, on AMX tiles and on AVX-512 alike. On the
    first 60 prompts alone (the set until session 9) the bound is 97.8%, and the runtime
    96.6% (EPYC, AVX-512), 95.7% (Intel, AVX-512) and 94.8% (Intel, AMX, whose sums are
    twice as close to exact): which near-ties the weights' rounding flips is chance, and
    60 prompts too few to tell (benchmarks/RESULTS.md, session 9).

    The history of the figure, on the 60 prompts: 81.6% on torch's kernels (bf16 logits,
    bf16 attention scores); 90.7% on mpllama's CPU kernels (float32 logits and scores);
    96.6% since the residual stream stays float32 (model.Transformer.forward)."""
    shards = checkpoint.find_shards(DEMO)
    args = checkpoint.read_params(DEMO)
    tok = Tokenizer(checkpoint.find_tokenizer(DEMO))
    runs: list[dict[str, list[int]]] = []
    tops: dict[str, list[dict[int, float]]] = {}
    # float32; float32 on the weights rounded to bf16 (the bound); bf16
    for dtype, rounded in ((torch.float32, False), (torch.float32, True), (torch.bfloat16, False)):
        state = weights.load_rank_state(shards, args, 0, 1)
        if rounded:
            state = {
                k: v.bfloat16().float() if v.is_floating_point() else v for k, v in state.items()
            }
        model = materialize(Transformer(args), state, torch.device("cpu"), dtype)
        model.pack_linears()  # as a rank runs it
        model.setup_slots(AGREEMENT_BATCH, 128)
        assert model.layers[0].attention.cache_k.dtype is dtype  # the KV cache follows
        first_run = not runs
        params = SamplingParams(
            temperature=0,
            max_tokens=AGREEMENT_TOKENS,
            ignore_eos=True,
            logprobs=first_run,
            top_logprobs=2 if first_run else 0,
        )
        out: dict[str, list[int]] = {p: [] for p in AGREEMENT_PROMPTS}
        for i in range(0, len(AGREEMENT_PROMPTS), AGREEMENT_BATCH):
            runner = Runner(model, tok, 256)
            batch = AGREEMENT_PROMPTS[i : i + AGREEMENT_BATCH]
            runner.add([Request(p, tok.encode(p, bos=True, eos=False), params) for p in batch])
            while runner.has_work:
                for e in runner.step():
                    out[e.id] += e.token_ids
                    if e.top_logprobs:
                        tops.setdefault(e.id, []).extend(e.top_logprobs)
        runs.append(out)

    def agreement(other: dict[str, list[int]]) -> tuple[float, list[float]]:
        agreed, ties = 0, []
        for p in AGREEMENT_PROMPTS:
            pairs = list(zip(runs[0][p], other[p], strict=True))
            first = next((i for i, (a, b) in enumerate(pairs) if a != b), len(pairs))
            agreed += first
            if first < len(pairs):
                # float32's own log-probs of its choice and of the other's there (same
                # normaliser, so their difference is the logits' difference).
                top = tops[p][first]
                theirs = pairs[first][1]
                assert theirs in top, (p, first, top, theirs)
                ties.append(top[pairs[first][0]] - top[theirs])
        return agreed / (len(AGREEMENT_PROMPTS) * AGREEMENT_TOKENS), ties

    bound, _ = agreement(runs[1])
    share, ties = agreement(runs[2])
    print(
        f"bf16 greedy agreement with float32: {share:.1%} (float32 on bf16-rounded weights: "
        f"{bound:.1%}); gaps where they part: {ties}"
    )
    if cpu_kernels.unavailable() is None:
        least, near_tie = bound - 0.025, NEAR_TIE
    else:
        least, near_tie = TORCH_BF16_BOUNDS
    assert max(ties, default=0.0) < near_tie, ties
    assert share >= least, (share, bound)
