"""The generation loop on one rank: batching with per-row positions, the KV cache against
a full recomputation, EOS, max_tokens, the context limit, stop strings, chunking, sync."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from mpllama import checkpoint
from mpllama.config import SamplingParams
from mpllama.generate import Completion, Request, check_request, generate
from mpllama.model import Transformer, materialize
from mpllama.tokenizer import Tokenizer

PROMPTS = ["Once upon a time", "The cat sat on the mat and", "Hi", "In the beginning"]
GREEDY = SamplingParams(temperature=0, max_tokens=12, logprobs=True)


@pytest.fixture(scope="module")
def tok(tiny_ckpt: Path) -> Tokenizer:
    return Tokenizer(checkpoint.find_tokenizer(tiny_ckpt))


@pytest.fixture(scope="module")
def model(tiny_ckpt: Path, single_rank: None) -> Transformer:
    args = checkpoint.read_params(tiny_ckpt)
    state = checkpoint.load_rank_state(checkpoint.find_shards(tiny_ckpt), args, 0, 1)
    return materialize(Transformer(args), state, torch.device("cpu"), torch.float32)


def sized(model: Transformer, batch: int = 4, seq: int = 64) -> Transformer:
    model.setup_caches(batch, seq)
    return model


def ids(tok: Tokenizer, text: str) -> list[int]:
    return tok.encode(text, bos=True, eos=False)


def req(tok: Tokenizer, text: str, params: SamplingParams = GREEDY, seed: int = 0) -> Request:
    return Request(ids(tok, text), params, seed)


def alone(model: Transformer, tok: Tokenizer, requests: list[Request]) -> list[Completion]:
    """Each request in a batch of its own."""
    return [generate(model, tok, [r])[0] for r in requests]


def assert_same(got: Completion, want: Completion) -> None:
    assert got.token_ids == want.token_ids
    assert got.text == want.text
    assert got.finish_reason == want.finish_reason
    assert got.error == want.error
    if want.logprobs is None:
        assert got.logprobs is None
    else:
        torch.testing.assert_close(
            torch.tensor(got.logprobs), torch.tensor(want.logprobs), atol=1e-5, rtol=0
        )


def with_eos(tok: Tokenizer, eos_id: int) -> Tokenizer:
    """The same tokenizer claiming ``eos_id`` as its end-of-sequence token."""
    other = copy.copy(tok)
    other.eos_id = eos_id
    return other


# -------------------------------------------------------------------------- batching


def test_batch_rows_equal_each_prompt_alone(model: Transformer, tok: Tokenizer) -> None:
    sized(model)
    requests = [req(tok, p) for p in PROMPTS]
    assert len({len(r.prompt_token_ids) for r in requests}) >= 3  # really different lengths
    batch = generate(model, tok, requests)
    assert len(batch) == len(requests)
    for got, want in zip(batch, alone(model, tok, requests), strict=True):
        assert_same(got, want)
        assert got.finish_reason == "length" and len(got.token_ids) == 12
        assert got.text == tok.decode(got.token_ids)
        assert all(lp <= 0 for lp in got.logprobs)


def test_kv_cache_equals_full_recomputation(model: Transformer, tok: Tokenizer) -> None:
    sized(model, 4, 64)
    requests = [req(tok, p, GREEDY.replace(max_tokens=16)) for p in PROMPTS[:2]]
    done = generate(model, tok, requests)
    for request, completion in zip(requests, done, strict=True):
        seq = list(request.prompt_token_ids)
        for step, token in enumerate(completion.token_ids):
            # No cache reuse: every step recomputes the whole sequence from position 0.
            logits = model(torch.tensor([seq]), torch.tensor([0]))[0, -1]
            assert int(logits.argmax()) == token, f"step {step}"
            ref_lp = float(torch.log_softmax(logits, dim=-1)[token])
            assert abs(ref_lp - completion.logprobs[step]) < 1e-4
            seq.append(token)


def test_seeded_sampling_is_independent_of_the_batch(model: Transformer, tok: Tokenizer) -> None:
    sized(model)
    sampled = SamplingParams(temperature=1.0, top_p=0.95, max_tokens=10, logprobs=True)
    mine = req(tok, PROMPTS[1], sampled, seed=123)
    (solo,) = generate(model, tok, [mine])
    batch = generate(
        model, tok, [req(tok, PROMPTS[0], sampled, seed=5), mine, req(tok, PROMPTS[2])]
    )
    assert_same(batch[1], solo)
    (again,) = generate(model, tok, [mine])
    assert again.token_ids == solo.token_ids
    (other_seed,) = generate(model, tok, [req(tok, PROMPTS[1], sampled, seed=124)])
    assert other_seed.token_ids != solo.token_ids


def test_logprobs_only_when_asked(model: Transformer, tok: Tokenizer) -> None:
    sized(model)
    plain = GREEDY.replace(logprobs=False)
    out = generate(model, tok, [req(tok, PROMPTS[0], plain), req(tok, PROMPTS[1])])
    assert out[0].logprobs is None and len(out[1].logprobs) == 12
    assert out[0].token_ids == generate(model, tok, [req(tok, PROMPTS[0])])[0].token_ids


# ---------------------------------------------------------------------- stop reasons


def test_eos_stops_the_row(model: Transformer, tok: Tokenizer) -> None:
    sized(model)
    base = generate(model, tok, [req(tok, PROMPTS[0])])[0].token_ids
    # The first token (past the first two) that has not appeared before plays EOS.
    cut = next(i for i in range(2, len(base)) if base[i] not in base[:i])
    eos_tok = with_eos(tok, base[cut])
    other = req(tok, PROMPTS[1])
    stopped, rider = generate(model, eos_tok, [req(tok, PROMPTS[0]), other])
    assert stopped.finish_reason == "stop"
    assert stopped.token_ids == base[:cut]  # EOS itself is not part of the output
    assert base[cut] not in stopped.token_ids
    assert len(stopped.logprobs) == cut
    assert stopped.text == tok.decode(base[:cut])
    # The other row keeps going, unaffected by the finished row riding along.
    (rider_alone,) = generate(model, eos_tok, [other])
    assert_same(rider, rider_alone)
    assert rider.finish_reason == "length" and len(rider.token_ids) == 12


def test_ignore_eos_continues(model: Transformer, tok: Tokenizer) -> None:
    sized(model)
    base = generate(model, tok, [req(tok, PROMPTS[0])])[0]
    eos_tok = with_eos(tok, base.token_ids[3])
    (got,) = generate(model, eos_tok, [req(tok, PROMPTS[0], GREEDY.replace(ignore_eos=True))])
    assert_same(got, base)
    assert base.token_ids[3] in got.token_ids


@pytest.mark.parametrize("max_tokens", [1, 2, 7])
def test_max_tokens(model: Transformer, tok: Tokenizer, max_tokens: int) -> None:
    sized(model)
    full = generate(model, tok, [req(tok, PROMPTS[3])])[0].token_ids
    (got,) = generate(model, tok, [req(tok, PROMPTS[3], GREEDY.replace(max_tokens=max_tokens))])
    assert got.finish_reason == "length"
    assert got.token_ids == full[:max_tokens]


def test_context_limit(model: Transformer, tok: Tokenizer) -> None:
    prompt = ids(tok, PROMPTS[1])
    S = len(prompt) + 5
    sized(model, 2, S)
    long = GREEDY.replace(max_tokens=50)
    short = GREEDY.replace(max_tokens=3)
    (got,) = generate(model, tok, [Request(prompt, long)])
    assert got.finish_reason == "length"
    assert len(got.token_ids) == S - len(prompt) == 5
    (within,) = generate(model, tok, [Request(prompt, short)])
    assert len(within.token_ids) == 3
    # The tokens are the ones a roomier cache gives: the limit only cuts.
    sized(model, 2, 64)
    (roomy,) = generate(model, tok, [Request(prompt, long)])
    assert got.token_ids == roomy.token_ids[:5]
    # One free slot: exactly one token.
    sized(model, 2, len(prompt) + 1)
    (one,) = generate(model, tok, [Request(prompt, long)])
    assert len(one.token_ids) == 1 and one.finish_reason == "length"


def test_too_long_prompt_is_an_error_row(model: Transformer, tok: Tokenizer) -> None:
    S = 24
    sized(model, 4, S)
    fits = [req(tok, PROMPTS[0]), req(tok, PROMPTS[2])]
    expected = alone(model, tok, fits)
    too_long = Request(list(range(3, 3 + S)), GREEDY)  # exactly max_seq_len tokens
    much_too_long = Request(list(range(3, 3 + 2 * S)), GREEDY)
    out = generate(model, tok, [fits[0], too_long, fits[1], much_too_long])
    assert [c.finish_reason for c in out] == ["length", "error", "length", "error"]
    for bad, n in ((out[1], S), (out[3], 2 * S)):
        assert bad.token_ids == [] and bad.text == ""
        assert f"{n} tokens" in bad.error and f"max_seq_len is {S}" in bad.error
    assert_same(out[0], expected[0])
    assert_same(out[2], expected[1])


def test_check_request() -> None:
    assert check_request(Request([1, 2, 3]), 8, 512) is None
    assert "no tokens" in check_request(Request([]), 8, 512)
    assert "max_seq_len is 3" in check_request(Request([1, 2, 3]), 3, 512)
    assert "[512, -1]" in check_request(Request([1, 512, 5, -1]), 8, 512)


def test_bad_tokens_are_an_error_row(model: Transformer, tok: Tokenizer) -> None:
    sized(model)
    good = req(tok, PROMPTS[0])
    out = generate(model, tok, [Request([1, 5000], GREEDY), good, Request([], GREEDY)])
    assert [c.finish_reason for c in out] == ["error", "length", "error"]
    assert "5000" in out[0].error and "no tokens" in out[2].error
    assert_same(out[1], alone(model, tok, [good])[0])


# ---------------------------------------------------------------------- stop strings


def boundary_stop(tok: Tokenizer, tokens: list[int]) -> tuple[str, int, str]:
    """A 2-character stop string made of the last character of token k and the first of
    token k+1; returns (stop, tokens generated when it is seen, text before it)."""
    texts = [tok.decode(tokens[:j]) for j in range(len(tokens) + 1)]
    for k in range(1, len(tokens) - 1):
        before, after = texts[k + 1], texts[k + 2]  # k+1 and k+2 tokens decoded
        if not (after.startswith(before) and len(after) > len(before) and before):
            continue
        stop = before[-1] + after[len(before)]
        if stop.isascii() and stop.isalnum() and all(stop not in t for t in texts[: k + 2]):
            return stop, k + 2, before[:-1]
    raise AssertionError(f"no stop string across a token boundary in {texts[-1]!r}")


@pytest.mark.parametrize("prompt", PROMPTS)
def test_stop_string_across_token_boundary(model: Transformer, tok: Tokenizer, prompt: str) -> None:
    sized(model)
    params = GREEDY.replace(max_tokens=24)
    base = generate(model, tok, [req(tok, prompt, params)])[0]
    stop, n_tokens, text = boundary_stop(tok, base.token_ids)
    (got,) = generate(model, tok, [req(tok, prompt, params.replace(stop=("@@never@@", stop)))])
    assert got.finish_reason == "stop"
    assert got.text == text  # cut right before the stop string
    assert got.token_ids == base.token_ids[:n_tokens]  # tokens up to the one completing it
    assert len(got.logprobs) == n_tokens


def test_earliest_stop_string_wins(model: Transformer, tok: Tokenizer) -> None:
    sized(model)
    params = GREEDY.replace(max_tokens=24, logprobs=False)
    base = generate(model, tok, [req(tok, PROMPTS[0], params)])[0]
    stop, n_tokens, text = boundary_stop(tok, base.token_ids)
    whole = base.text
    later = whole[len(text) + 1 : len(text) + 3]  # overlaps the first hit, starts later
    (got,) = generate(model, tok, [req(tok, PROMPTS[0], params.replace(stop=[later, stop]))])
    assert got.text == text and got.finish_reason == "stop"


# ------------------------------------------------------------------ chunking and sync


def test_more_requests_than_batch_size_are_chunked(model: Transformer, tok: Tokenizer) -> None:
    sized(model, 2, 64)
    requests = [req(tok, p, GREEDY.replace(max_tokens=3 + i)) for i, p in enumerate(PROMPTS)]
    requests.append(req(tok, "A fifth one", GREEDY.replace(max_tokens=2)))
    out = generate(model, tok, requests)
    assert [len(c.token_ids) for c in out] == [3, 4, 5, 6, 2]
    for got, want in zip(out, alone(model, tok, requests), strict=True):
        assert_same(got, want)


class RecordingSync:
    """Stands in for the broadcast: records each step's packet, or replays recorded ones."""

    def __init__(self, replay: list[torch.Tensor] | None = None) -> None:
        self.packets: list[torch.Tensor] = []
        self.replay = replay

    def __call__(self, packet: torch.Tensor) -> torch.Tensor:
        self.packets.append(packet.clone())
        if self.replay is not None:
            return self.replay[len(self.packets) - 1].clone()
        return packet


def test_sync_is_called_once_per_step(model: Transformer, tok: Tokenizer) -> None:
    sized(model)
    requests = [
        req(tok, PROMPTS[0], GREEDY.replace(max_tokens=3)),
        req(tok, PROMPTS[1], GREEDY.replace(max_tokens=6)),
        req(tok, PROMPTS[2], GREEDY.replace(max_tokens=4)),
    ]
    sync = RecordingSync()
    out = generate(model, tok, requests, sync=sync)
    assert len(sync.packets) == 6  # the longest row's steps, no more
    for packet in sync.packets:
        assert packet.shape == (2, 3) and packet.dtype == torch.long
    tokens = torch.stack([p[0] for p in sync.packets])  # [steps, B]
    done = torch.stack([p[1] for p in sync.packets])
    for row, completion in enumerate(out):
        n = len(completion.token_ids)
        assert tokens[:n, row].tolist() == completion.token_ids
        assert done[:, row].tolist() == [0] * (n - 1) + [1] * (7 - n)
    assert out == generate(model, tok, requests)  # syncing changes nothing on the lead


def test_follower_runs_the_lead_steps(model: Transformer, tok: Tokenizer) -> None:
    sized(model)
    requests = [req(tok, PROMPTS[0], GREEDY.replace(max_tokens=5))]
    lead = RecordingSync()
    generate(model, tok, requests, sync=lead)
    follower = RecordingSync(replay=lead.packets)
    assert generate(model, tok, requests, lead=False, sync=follower) == []
    assert len(follower.packets) == len(lead.packets) == 5
    assert all(not p.any() for p in follower.packets)  # followers send placeholders
