"""Greedy, temperature, top-k, top-p and log-probs, with explicit generators only."""

from __future__ import annotations

import math

import pytest
import torch

from mpllama.config import SamplingParams
from mpllama.sampling import greedy, log_probs, next_tokens, sample, top_k_filter, top_p_filter

V = 64


def random_logits(seed: int, shape: tuple[int, ...] = (V,), scale: float = 3.0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def draws(logits: torch.Tensor, params: SamplingParams, n: int, seed: int = 0) -> torch.Tensor:
    g = gen(seed)
    return torch.stack([sample(logits, params, g) for _ in range(n)])


def kept(filtered: torch.Tensor) -> int:
    return int(torch.isfinite(filtered).sum())


# ----------------------------------------------------------------------------- greedy


def test_greedy_picks_argmax_per_row() -> None:
    logits = torch.tensor([[0.1, 2.0, -1.0], [5.0, 4.9, 5.1], [1.0, 1.0, 0.0]])
    assert greedy(logits).tolist() == [1, 2, 0]  # exact tie -> lowest id
    assert greedy(logits[0]).item() == 1


@pytest.mark.parametrize("temperature", [0.05, 1.0, 7.0])
def test_top_k_1_is_greedy_at_any_temperature(temperature: float) -> None:
    params = SamplingParams(temperature=temperature, top_k=1)
    for seed in range(10):
        logits = random_logits(seed)
        assert sample(logits, params, gen(seed)).item() == logits.argmax().item()


@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
def test_tiny_top_p_is_greedy(temperature: float) -> None:
    params = SamplingParams(temperature=temperature, top_p=1e-6)
    for seed in range(10):
        logits = random_logits(seed, scale=0.1)  # flat: any other token would be likely
        got = draws(logits, params, 20, seed)
        assert (got == logits.argmax()).all()


def test_temperature_zero_is_greedy_and_needs_no_generator() -> None:
    params = SamplingParams(temperature=0)
    assert params.greedy
    logits = random_logits(3)
    assert sample(logits, params, None).item() == logits.argmax().item()


def test_tiny_temperature_picks_argmax() -> None:
    params = SamplingParams(temperature=1e-4)
    assert not params.greedy  # it really samples...
    for seed in range(10):
        logits = random_logits(seed)
        got = draws(logits, params, 20, seed)
        assert (got == logits.argmax()).all()  # ...but the top token has all the mass


def test_high_temperature_flattens() -> None:
    logits = torch.tensor([2.0, 0.0, 0.0, 0.0])
    hot = draws(logits, SamplingParams(temperature=100.0), 2000)
    assert 0.2 < float((hot == 0).float().mean()) < 0.3  # near uniform


# ------------------------------------------------------------------------------ top-k


@pytest.mark.parametrize("k", [1, 2, 5, 63])
def test_top_k_keeps_exactly_k(k: int) -> None:
    logits = random_logits(k, (3, V))  # continuous values: no ties
    filtered = top_k_filter(logits, k)
    for row in range(3):
        assert kept(filtered[row]) == k
        top = set(torch.topk(logits[row], k).indices.tolist())
        assert set(torch.isfinite(filtered[row]).nonzero().flatten().tolist()) == top
        # Survivors keep their values untouched.
        assert torch.equal(filtered[row][list(top)], logits[row][list(top)])


@pytest.mark.parametrize("k", [0, V, V + 10])
def test_top_k_off(k: int) -> None:
    logits = random_logits(1)
    assert torch.equal(top_k_filter(logits, k), logits)


def test_top_k_sampling_stays_in_the_top_k() -> None:
    logits = random_logits(7, scale=0.5)
    got = draws(logits, SamplingParams(top_k=3), 500)
    top = set(torch.topk(logits, 3).indices.tolist())
    assert set(got.tolist()) == top


# ------------------------------------------------------------------------------ top-p

PROBS = torch.tensor([0.5, 0.3, 0.15, 0.05])


@pytest.mark.parametrize(
    "p, n",
    [(0.3, 1), (0.5, 1), (0.51, 2), (0.7, 2), (0.8, 2), (0.81, 3), (0.95, 3), (0.96, 4), (1.0, 4)],
)
def test_top_p_keeps_the_minimal_set_reaching_p(p: float, n: int) -> None:
    logits = PROBS.log()
    filtered = top_p_filter(logits, p)
    assert kept(filtered) == n
    assert torch.isfinite(filtered[:n]).all()  # the most likely ones, in order


def test_top_p_on_shuffled_rows() -> None:
    order = torch.tensor([2, 0, 3, 1])  # probs 0.15, 0.5, 0.05, 0.3
    logits = torch.stack([PROBS.log(), PROBS[order].log()])
    filtered = top_p_filter(logits, 0.7)
    assert torch.isfinite(filtered[0]).tolist() == [True, True, False, False]
    assert torch.isfinite(filtered[1]).tolist() == [False, True, False, True]


def test_top_p_sampling_renormalises() -> None:
    got = draws(PROBS.log(), SamplingParams(top_p=0.7), 3000)
    assert set(got.tolist()) == {0, 1}
    share = float((got == 0).float().mean())
    assert abs(share - 0.5 / 0.8) < 0.04  # 0.625 after dropping tokens 2 and 3


# ------------------------------------------------------------------------ randomness


def test_same_seed_same_samples_different_seeds_differ() -> None:
    logits = random_logits(0, scale=0.5)
    params = SamplingParams(temperature=1.0)
    a, b = draws(logits, params, 200, seed=11), draws(logits, params, 200, seed=11)
    c = draws(logits, params, 200, seed=12)
    assert torch.equal(a, b)
    assert (a != c).sum() > 100  # near-uniform over 64 tokens: most draws differ


def test_sampling_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(5)
    before = torch.rand(3)
    torch.manual_seed(5)
    draws(random_logits(0), SamplingParams(), 50)
    assert torch.equal(torch.rand(3), before)


def test_sampled_frequencies_match_softmax() -> None:
    logits = torch.tensor([1.0, 0.0, -0.5, 0.5])
    expected = torch.softmax(logits, dim=-1)
    n = 4000
    got = draws(logits, SamplingParams(), n, seed=3)
    counts = torch.bincount(got, minlength=4).double()
    chi2 = float((((counts - n * expected) ** 2) / (n * expected)).sum())
    assert chi2 < 16.27  # chi-square, 3 degrees of freedom, p = 0.001


def test_temperature_scales_the_distribution() -> None:
    logits = torch.tensor([1.0, 0.0, -0.5, 0.5])
    expected = torch.softmax(logits / 0.5, dim=-1)
    n = 4000
    got = draws(logits, SamplingParams(temperature=0.5), n, seed=4)
    counts = torch.bincount(got, minlength=4).double()
    chi2 = float((((counts - n * expected) ** 2) / (n * expected)).sum())
    assert chi2 < 16.27


# -------------------------------------------------------------------------- log-probs


def test_log_probs_is_log_softmax_gathered() -> None:
    logits = random_logits(2, (3, V)).to(torch.float16)
    tokens = torch.tensor([0, 17, V - 1])
    got = log_probs(logits, tokens)
    assert got.dtype == torch.float32 and got.shape == (3,)
    ref = torch.log_softmax(logits.double(), dim=-1)[torch.arange(3), tokens]
    torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=0)
    assert (got <= 0).all()
    assert math.isclose(
        float(log_probs(torch.zeros(1, 4), torch.tensor([2]))), math.log(0.25), rel_tol=1e-6
    )


# ------------------------------------------------------------------------ next_tokens


def test_next_tokens_mixes_greedy_and_sampled_rows() -> None:
    logits = random_logits(9, (3, V), scale=0.3)
    params = [SamplingParams(temperature=0), SamplingParams(), SamplingParams(top_k=1)]
    out = next_tokens(logits, params, [None, gen(1), None])
    assert out.shape == (3,) and out.dtype == torch.long
    assert out[0] == logits[0].argmax() and out[2] == logits[2].argmax()
    assert out[1] == sample(logits[1], params[1], gen(1))


def test_next_tokens_rows_do_not_depend_on_the_batch() -> None:
    """A row seeded alike picks alike, whoever else shares its batch."""
    mine = random_logits(20, scale=0.3)
    p = SamplingParams(temperature=0.9, top_p=0.95)

    def run(
        batch: list[torch.Tensor],
        params: list[SamplingParams],
        seeds: list[int | None],
        steps: int = 30,
    ) -> list[list[int]]:
        gens = [None if s is None else gen(s) for s in seeds]
        picked = [next_tokens(torch.stack(batch), params, gens) for _ in range(steps)]
        return torch.stack(picked).T.tolist()

    alone = run([mine], [p], [42])[0]
    others = [random_logits(21, scale=0.3), random_logits(22, scale=0.3)]
    first = run(
        [mine, *others], [p, SamplingParams(), SamplingParams(temperature=0)], [42, 7, None]
    )
    last = run([*others, mine], [SamplingParams(top_k=5), SamplingParams(), p], [3, 99, 42])
    assert first[0] == alone
    assert last[2] == alone
    assert len(set(alone)) > 1  # really sampled, not stuck on one token


def test_next_tokens_needs_one_generator_per_row() -> None:
    with pytest.raises(ValueError):
        next_tokens(random_logits(0, (2, V)), [SamplingParams()] * 2, [gen(0)])
