"""Greedy, temperature, top-k, top-p and log-probs, with explicit generators only."""

from __future__ import annotations

import math

import pytest
import torch

from mpllama.config import SamplingParams
from mpllama.rank.sampling import (
    LogitAdjuster,
    _flat_nucleus,
    apply_penalties,
    draw,
    greedy,
    kept_tokens,
    log_probs,
    next_tokens,
    sample,
    top_k_filter,
    top_log_probs,
    top_p_filter,
)

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


# ------------------------------------------------------------- large vocabularies


def reference_kept(x: torch.Tensor, k: int, p: float) -> list[int]:
    """Brute force in float64: rank every token (value, then id), cut at the k-th value
    (ties kept), then keep the prefix whose earlier tokens have not yet reached p."""
    values = x.double().tolist()
    ranked = sorted(range(len(values)), key=lambda i: (-values[i], i))
    if 0 < k < len(values):
        kth = values[ranked[k - 1]]
        ranked = [i for i in ranked if values[i] >= kth]
    top = values[ranked[0]]
    weights = [math.exp(values[i] - top) for i in ranked]
    total, before, out = sum(weights), 0.0, []
    for i, w in zip(ranked, weights, strict=True):
        if out and before >= p:
            break
        out.append(i)
        before += w / total
    return out


def tied_logits(seed: int, n: int, distinct: int) -> torch.Tensor:
    """n logits drawn from ``distinct`` values: many exact ties, at every rank."""
    g = gen(seed)
    pool = torch.randn(distinct, generator=g) * 2
    return pool[torch.randint(distinct, (n,), generator=g)]


@pytest.mark.parametrize("seed", range(4))
def test_kept_tokens_equal_a_brute_force_reference_with_ties(seed: int) -> None:
    n = 1200
    rows = [random_logits(seed, (n,)), tied_logits(seed, n, 40), tied_logits(seed, n, 1200)]
    rows.append(random_logits(seed, (n,), scale=0.05))  # near flat: the full-sort branch
    g = gen(100 + seed)
    cases = [(0, 0.5), (1, 0.9), (5, 1.0), (n - 1, 0.97), (n, 0.3)]
    for _ in range(20):
        cases.append(
            (int(torch.randint(0, 300, (1,), generator=g)), float(torch.rand(1, generator=g)))
        )
    cases += [(0, float(torch.rand(1, generator=g)) * 0.999 + 1e-3) for _ in range(10)]
    for x in rows:
        for k, p in cases:
            p = max(p, 1e-4)
            ids, values = kept_tokens(x, k, p)
            want = reference_kept(x, k, p)
            assert ids.tolist() == want, (k, p)
            assert torch.equal(values, x[ids])
            if k == 0 and p < 1:  # the full-sort fallback, ties fixed after an unstable sort
                assert _flat_nucleus(x, torch.softmax(x, -1), p)[0].tolist() == want
            # The full-sort filters keep the same set.
            filtered = top_p_filter(top_k_filter(x, k), p)
            assert sorted(torch.isfinite(filtered).nonzero()[:, 0].tolist()) == sorted(want)


def test_kept_tokens_at_llama3_vocabulary_size() -> None:
    V = 128256
    for seed, scale in [(0, 8.0), (1, 3.0)]:
        x = random_logits(seed, (V,), scale=scale)
        for k, p in [(0, 0.9), (50, 0.95), (40, 1.0), (0, 0.5)]:
            ids, _ = kept_tokens(x, k, p)
            filtered = top_p_filter(top_k_filter(x, k), p)
            assert sorted(ids.tolist()) == torch.isfinite(filtered).nonzero()[:, 0].tolist()


def test_draw_follows_the_probabilities_and_skips_zeros() -> None:
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.25, 0.25, 0.0]])
    g = gen(5)
    got = torch.cat([draw(probs, [g]) for _ in range(4000)])
    assert set(got.tolist()) == {1, 3, 4}
    counts = torch.bincount(got, minlength=6).double()[[1, 3, 4]]
    expected = 4000 * torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64)
    assert float(((counts - expected) ** 2 / expected).sum()) < 13.82  # chi2, 2 dof, p=.001
    # Unnormalised rows are fine; each row uses only its own generator.
    two = draw(torch.tensor([[0.0, 2.0], [3.0, 0.0]]), [gen(1), gen(2)])
    assert two.tolist() == [1, 0]


def test_top_p_sampling_matches_the_filtered_distribution_at_large_vocabulary() -> None:
    V = 128256
    x = random_logits(3, (V,), scale=0.1) - 20.0  # a negligible tail
    x[[7, 1000, 99999, 128255]] = torch.tensor([3.0, 2.0, 2.0, 1.0])
    params = SamplingParams(temperature=1.0, top_p=0.9)
    got = draws(x, params, 600, seed=9)
    keep = torch.isfinite(top_p_filter(x, 0.9))
    assert set(got.tolist()) == set(keep.nonzero()[:, 0].tolist())
    expected = torch.softmax(x.masked_fill(~keep, float("-inf")), dim=-1)[[7, 1000, 99999]]
    counts = torch.tensor([(got == i).sum() for i in (7, 1000, 99999)], dtype=torch.float64)
    chi2 = float(((counts - 600 * expected) ** 2 / (600 * expected)).sum())
    assert chi2 < 13.82


# ------------------------------------------------------------- logit adjustments


def test_penalties_equal_a_hand_computed_reference() -> None:
    """Repetition over prompt and output (positive divided, negative multiplied), then
    frequency times each count, then presence once per generated token; repeats count."""
    row = torch.tensor([2.0, -1.0, 0.5, -3.0, 4.0, 0.0])
    prompt, generated = [0, 1], [2, 2, 2, 4]
    counts = torch.zeros(6)
    for t in generated:
        counts[t] += 1
    seen = torch.zeros(6, dtype=torch.bool)
    seen[prompt + generated] = True
    got = apply_penalties(row.clone(), counts, seen, 0.5, 0.25, 2.0)
    want = torch.tensor(
        [
            2.0 / 2,  # prompt only: repetition alone
            -1.0 * 2,
            0.5 / 2 - 0.25 * 3 - 0.5,  # generated three times
            -3.0,  # never seen: untouched
            4.0 / 2 - 0.25 - 0.5,
            0.0,
        ]
    )
    assert torch.equal(got, want)


def test_adjuster_applies_bias_then_min_tokens_then_penalties_incrementally() -> None:
    params = SamplingParams(
        max_tokens=8,
        frequency_penalty=1.0,
        presence_penalty=0.5,
        logit_bias={"3": 10, 5: -2.5},
        min_tokens=2,
    )
    adj = LogitAdjuster(params, [1, 2], frozenset({0}))
    row = torch.arange(6, dtype=torch.float32)
    first = adj.apply(row.clone())
    assert torch.equal(first, torch.tensor([-math.inf, 1, 2, 13, 4, 2.5]))
    adj.add(3)
    adj.add(3)
    # Two tokens made: the stop id is free again; token 3 is penalised 2 * 1 + 0.5.
    second = adj.apply(row.clone())
    assert torch.equal(second, torch.tensor([0, 1, 2, 13 - 2.5, 4, 2.5]))


def test_adjuster_counts_tokens_added_before_its_first_use() -> None:
    """Replay and prompts without logits yet: the history is rebuilt, not lost."""
    params = SamplingParams(frequency_penalty=1.0, repetition_penalty=2.0)
    early = LogitAdjuster(params, [4], frozenset())
    early.add(1)
    early.add(1)
    late = LogitAdjuster(params, [4], frozenset())
    late.apply(torch.zeros(6))
    late.add(1)
    late.add(1)
    row = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    want = torch.tensor([1.0, 2.0 / 2 - 2, 3.0, 4.0, 5.0 / 2, 6.0])
    assert torch.equal(early.apply(row.clone()), want)
    assert torch.equal(late.apply(row.clone()), want)


def test_greedy_after_penalties_is_the_adjusted_argmax() -> None:
    params = SamplingParams(temperature=0, logit_bias={7: 100})
    adj = LogitAdjuster(params, [1], frozenset())
    logits = random_logits(3)
    row = adj.apply(logits.clone())
    assert int(next_tokens(row[None], [params], [None])[0]) == 7


def test_top_log_probs_are_the_k_most_likely_raw_log_probs_ties_by_id() -> None:
    logits = torch.tensor([1.0, 3.0, 2.0, 3.0, -1.0])
    got = top_log_probs(logits, 3)
    ls = torch.log_softmax(logits, -1)
    assert list(got) == [1, 3, 2]  # most likely first; the tie at 3.0 by id
    assert list(got.values()) == [float(ls[1]), float(ls[3]), float(ls[2])]
    assert list(top_log_probs(logits, 20)) == [1, 3, 2, 0, 4]  # k past V: all of them
