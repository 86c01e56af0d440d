"""The per-step engine on one rank, without Ray: slots, admission mid-flight, chunked
prefill, retirement and abort; EOS, max_tokens, the context limit and stop strings;
streamed deltas; and the plan a follower rank runs. Every output is checked against the
same request run alone, so batch composition can never change a request's tokens."""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from mpllama import checkpoint
from mpllama.config import SamplingParams
from mpllama.protocol import Event, Request
from mpllama.rank import runner as runner_module
from mpllama.rank import weights
from mpllama.rank.model import Transformer, materialize
from mpllama.rank.runner import Runner
from mpllama.rank.step_plan import OP_STOP, StepBatch, follow, publish, receive
from mpllama.tokenizer import Tokenizer

PROMPTS = ["Once upon a time", "The cat sat on the mat and", "Hi", "In the beginning"]
GREEDY = SamplingParams(temperature=0, max_tokens=12, logprobs=True)


@pytest.fixture(scope="module")
def tok(tiny_ckpt: Path) -> Tokenizer:
    return Tokenizer(checkpoint.find_tokenizer(tiny_ckpt))


def load(ckpt: Path) -> Transformer:
    args = checkpoint.read_params(ckpt)
    state = weights.load_rank_state(checkpoint.find_shards(ckpt), args, 0, 1)
    return materialize(Transformer(args), state, torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def model(tiny_ckpt: Path, single_rank: None) -> Transformer:
    return load(tiny_ckpt)


def sized(model: Transformer, slots: int = 4, seq: int = 64) -> Transformer:
    model.setup_slots(slots, seq)
    return model


_ids = iter(range(10**9))


def req(tok: Tokenizer, text: str, params: SamplingParams = GREEDY, seed: int = 0) -> Request:
    return Request(f"r{next(_ids)}", tok.encode(text, bos=True, eos=False), params, seed)


@dataclass
class Done:
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[float] | None = None
    finish_reason: str | None = None
    error: str | None = None
    events: list[Event] = field(default_factory=list)

    def add(self, e: Event) -> None:
        assert self.finish_reason is None, "an event after the request finished"
        assert e.token_offset == len(self.token_ids) and e.text_offset == len(self.text)
        self.events.append(e)
        self.token_ids += e.token_ids
        self.text += e.text
        if e.logprobs is not None:
            self.logprobs = (self.logprobs or []) + e.logprobs
        self.finish_reason, self.error = e.finish_reason, e.error


def run(
    model: Transformer,
    tok: Tokenizer,
    requests: list[Request],
    *,
    chunk: int = 256,
    later: dict[int, list[Request]] | None = None,
    runner: Runner | None = None,
) -> list[Done]:
    """Run to the end; ``later`` maps a step number to requests submitted before it."""
    runner = runner or Runner(model, tok, chunk)
    runner.add(requests)
    pending = dict(later or {})
    done: dict[str, Done] = {}
    step = 0
    while runner.has_work or pending:
        runner.add(pending.pop(step, []))
        for e in runner.step():
            done.setdefault(e.id, Done()).add(e)
        step += 1
    every = requests + [r for rs in (later or {}).values() for r in rs]
    return [done[r.id] for r in every]


def alone(model: Transformer, tok: Tokenizer, requests: list[Request]) -> list[Done]:
    return [run(model, tok, [copy.copy(r)])[0] for r in requests]


def assert_same(got: Done, want: Done, atol: float = 1e-4) -> None:
    assert got.token_ids == want.token_ids
    assert got.text == want.text
    assert got.finish_reason == want.finish_reason
    assert got.error == want.error
    if want.logprobs is None:
        assert got.logprobs is None
    else:
        torch.testing.assert_close(
            torch.tensor(got.logprobs), torch.tensor(want.logprobs), atol=atol, rtol=0
        )


def with_eos(tok: Tokenizer, eos_id: int) -> Tokenizer:
    """The same tokenizer claiming ``eos_id`` as its end-of-sequence (and only stop) token."""
    other = copy.copy(tok)
    other.eos_id = eos_id
    other.stop_ids = frozenset({eos_id})
    return other


# ------------------------------------------------------------------ batch invariance


def test_full_batch_rows_equal_each_prompt_alone(model: Transformer, tok: Tokenizer) -> None:
    sized(model)
    requests = [req(tok, p) for p in PROMPTS]
    assert len({len(r.prompt_token_ids) for r in requests}) >= 3  # really different lengths
    batch = run(model, tok, requests)
    for got, want in zip(batch, alone(model, tok, requests), strict=True):
        assert_same(got, want)
        assert got.finish_reason == "length" and len(got.token_ids) == 12
        assert got.text == tok.decode(got.token_ids)
        assert all(lp <= 0 for lp in got.logprobs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_prompts_beside_others_are_bit_for_bit_what_they_are_alone(
    tiny_ckpt: Path, tok: Tokenizer, dtype: torch.dtype, single_rank: None
) -> None:
    """Weights packed as a rank packs them, prompts of 1 to 90 tokens prefilled in one
    step, more than 64 rows in all (tiny's shapes, where oneDNN's sums past 64 rows are
    mpllama's; on others they may differ: README): the prefill's log-prob is what it gets alone,
    to the last bit, and in bf16 every later one too. Padded beside longer prompts,
    attention's call had another shape: log-probs moved by 1e-6 in float32 and 0.1-0.8%
    in bf16, where greedy tokens parted (session 15); now each row's attention is its own
    call. (float32's decode steps of several rows run oneDNN's product, one row alone
    mpllama's one-row kernel: those differ in the last bits; bf16's batched decode product
    sums each row as its one-row kernel does.)"""
    args = checkpoint.read_params(tiny_ckpt)
    state = weights.load_rank_state(checkpoint.find_shards(tiny_ckpt), args, 0, 1)
    model = materialize(Transformer(args), state, torch.device("cpu"), dtype)
    model.pack_linears()
    sized(model, 6, 128)
    texts = ["A", "The quick brown fox", "def f(x):\n    return x", PROMPTS[0] * 6, "Hi", "x = 1"]
    requests = [req(tok, t) for t in texts]
    assert sum(len(r.prompt_token_ids) for r in requests) > 64
    assert max(len(r.prompt_token_ids) for r in requests) < 100
    for got, want in zip(run(model, tok, requests), alone(model, tok, requests), strict=True):
        assert got.token_ids == want.token_ids
        assert got.logprobs is not None and want.logprobs is not None
        assert got.logprobs[0] == want.logprobs[0]  # the prefill's
        if dtype == torch.bfloat16:
            assert got.logprobs == want.logprobs
        else:
            assert_same(got, want, atol=1e-5)


def test_admitted_mid_flight_equals_alone(model: Transformer, tok: Tokenizer) -> None:
    """Requests join while others sit at arbitrary positions, and take whichever slots
    are free (not consecutive), yet each gets the tokens it gets alone."""
    sized(model, 4, 64)
    first = [req(tok, p, GREEDY.replace(max_tokens=3 + 5 * i)) for i, p in enumerate(PROMPTS)]
    joiners = {2: [req(tok, "A late one")], 5: [req(tok, "Later still", GREEDY)]}
    joiners[9] = [req(tok, p, GREEDY.replace(max_tokens=7)) for p in PROMPTS[:3]]
    out = run(model, tok, first, later=joiners)
    everyone = first + [r for rs in joiners.values() for r in rs]
    for got, want in zip(out, alone(model, tok, everyone), strict=True):
        assert_same(got, want)


def test_chunked_prefill_equals_whole_prefill(model: Transformer, tok: Tokenizer) -> None:
    sized(model, 4, 128)
    long_text = "The quick brown fox jumps over the lazy dog. " * 3
    requests = [req(tok, long_text), req(tok, PROMPTS[1]), req(tok, long_text + "Again")]
    assert len(requests[0].prompt_token_ids) > 30
    whole = alone(model, tok, requests)
    runner = Runner(model, tok, prefill_chunk_tokens=5, prefix_caching=False)
    chunked = run(model, tok, [copy.copy(r) for r in requests], runner=runner)
    for got, want in zip(chunked, whole, strict=True):
        assert_same(got, want)
    # Five prompt tokens a step at most: the long prompts took many steps to prefill.
    assert runner.steps >= sum(len(r.prompt_token_ids) for r in requests) // 5


def test_running_requests_keep_decoding_while_a_long_prompt_prefills(
    model: Transformer, tok: Tokenizer
) -> None:
    sized(model, 4, 128)
    runner = Runner(model, tok, prefill_chunk_tokens=4)
    short = req(tok, "Hi", GREEDY.replace(max_tokens=30))
    runner.add([short])
    runner.step()  # prefilled: decoding from now on
    runner.add([req(tok, "The quick brown fox jumps over the lazy dog. " * 2)])
    for _ in range(5):  # the long prompt needs about 10 steps of 4 tokens
        events = runner.step()
        assert [e.id for e in events if e.token_ids] == [short.id]


def test_kv_cache_equals_full_recomputation(model: Transformer, tok: Tokenizer) -> None:
    sized(model, 4, 64)
    requests = [req(tok, p, GREEDY.replace(max_tokens=16)) for p in PROMPTS[:2]]
    for request, done in zip(requests, run(model, tok, requests), strict=True):
        seq = list(request.prompt_token_ids)
        for step, token in enumerate(done.token_ids):
            # No cache reuse: every step recomputes the whole sequence from position 0.
            logits = model(torch.tensor([seq]), torch.tensor([0]), model.slot_runs([3]))[0, -1]
            assert int(logits.argmax()) == token, f"step {step}"
            ref_lp = float(torch.log_softmax(logits, dim=-1)[token])
            assert abs(ref_lp - done.logprobs[step]) < 1e-4
            seq.append(token)


def test_seeded_sampling_ignores_batch_company_and_admission_time(
    model: Transformer, tok: Tokenizer
) -> None:
    sized(model)
    sampled = SamplingParams(temperature=1.0, top_p=0.95, max_tokens=10, logprobs=True)
    mine = req(tok, PROMPTS[1], sampled, seed=123)
    (solo,) = alone(model, tok, [mine])
    others = [req(tok, PROMPTS[0], sampled, seed=5), req(tok, PROMPTS[2])]
    batch = run(model, tok, [others[0], copy.copy(mine), others[1]])
    assert_same(batch[1], solo)
    late = run(model, tok, others, later={3: [copy.copy(mine)]})
    assert_same(late[2], solo)
    (other_seed,) = run(model, tok, [req(tok, PROMPTS[1], sampled, seed=124)])
    assert other_seed.token_ids != solo.token_ids


def test_logprobs_only_when_asked(model: Transformer, tok: Tokenizer) -> None:
    sized(model)
    plain = GREEDY.replace(logprobs=False)
    out = run(model, tok, [req(tok, PROMPTS[0], plain), req(tok, PROMPTS[1])])
    assert out[0].logprobs is None and len(out[1].logprobs) == 12
    assert out[0].token_ids == run(model, tok, [req(tok, PROMPTS[0])])[0].token_ids


def test_logprobs_of_the_rows_that_ask_are_those_of_each_alone(
    model: Transformer, tok: Tokenizer
) -> None:
    """Log-probs are computed for the asking rows only: they still sit among rows that
    do not ask, sampled ones (top-k, top-p) included, and must be each row's own."""
    sized(model)
    topk = SamplingParams(temperature=0.9, top_k=5, max_tokens=8)
    topp = SamplingParams(temperature=1.1, top_p=0.8, max_tokens=8, logprobs=True)
    requests = [
        req(tok, PROMPTS[0], GREEDY.replace(logprobs=False)),
        req(tok, PROMPTS[1], topp, seed=9),
        req(tok, PROMPTS[2], topk, seed=3),
        req(tok, PROMPTS[3]),
    ]
    batch = run(model, tok, requests)
    for got, want in zip(batch, alone(model, tok, requests), strict=True):
        assert_same(got, want)
    assert batch[0].logprobs is None and batch[2].logprobs is None
    assert len(batch[1].logprobs) == 8 and len(batch[3].logprobs) == 12


# ---------------------------------------------------------------------- stop reasons


def test_eos_stops_the_request(model: Transformer, tok: Tokenizer) -> None:
    sized(model)
    base = run(model, tok, [req(tok, PROMPTS[0])])[0].token_ids
    # The first token (past the first two) that has not appeared before plays EOS.
    cut = next(i for i in range(2, len(base)) if base[i] not in base[:i])
    eos_tok = with_eos(tok, base[cut])
    other = req(tok, PROMPTS[1])
    stopped, rider = run(model, eos_tok, [req(tok, PROMPTS[0]), other])
    assert stopped.finish_reason == "stop"
    assert stopped.token_ids == base[:cut]  # EOS itself is not part of the output
    assert len(stopped.logprobs) == cut
    assert stopped.text == tok.decode(base[:cut])
    assert_same(rider, alone(model, eos_tok, [other])[0])
    assert rider.finish_reason == "length" and len(rider.token_ids) == 12


def test_ignore_eos_continues(model: Transformer, tok: Tokenizer) -> None:
    sized(model)
    base = run(model, tok, [req(tok, PROMPTS[0])])[0]
    eos_tok = with_eos(tok, base.token_ids[3])
    (got,) = run(model, eos_tok, [req(tok, PROMPTS[0], GREEDY.replace(ignore_eos=True))])
    assert_same(got, base)


def test_every_stop_id_stops(model: Transformer, tok: Tokenizer) -> None:
    """A tokenizer with several stop ids (Llama 3's three) stops at whichever comes."""
    sized(model)
    base = run(model, tok, [req(tok, PROMPTS[0])])[0].token_ids
    cut = next(i for i in range(2, len(base)) if base[i] not in base[:i])
    many = copy.copy(tok)
    many.stop_ids = frozenset({base[cut], tok.eos_id, tok.n_words - 1})
    (got,) = run(model, many, [req(tok, PROMPTS[0])])
    assert got.finish_reason == "stop" and got.token_ids == base[:cut]
    assert got.text == tok.decode(base[:cut])


@pytest.mark.parametrize("ignore_eos", [False, True])
def test_stop_token_ids(model: Transformer, tok: Tokenizer, ignore_eos: bool) -> None:
    """A request's own stop ids stop it, ignore_eos or not (vLLM's rule), and are not
    part of its tokens or text."""
    sized(model)
    base = run(model, tok, [req(tok, PROMPTS[0])])[0].token_ids
    cut = next(i for i in range(2, len(base)) if base[i] not in base[:i])
    params = GREEDY.replace(stop_token_ids=(base[cut], tok.n_words - 1), ignore_eos=ignore_eos)
    other = req(tok, PROMPTS[1])
    stopped, rider = run(model, tok, [req(tok, PROMPTS[0], params), other])
    assert stopped.finish_reason == "stop" and stopped.token_ids == base[:cut]
    assert stopped.text == tok.decode(base[:cut]) and len(stopped.logprobs) == cut
    assert_same(rider, alone(model, tok, [other])[0])  # another request's ids are its own


def test_ignore_eos_ignores_every_model_stop_id(model: Transformer, tok: Tokenizer) -> None:
    sized(model)
    base = run(model, tok, [req(tok, PROMPTS[0])])[0]
    many = copy.copy(tok)
    many.stop_ids = frozenset(base.token_ids[2:5])
    (got,) = run(model, many, [req(tok, PROMPTS[0], GREEDY.replace(ignore_eos=True))])
    assert_same(got, base)


@pytest.mark.parametrize("max_tokens", [1, 2, 7])
def test_max_tokens(model: Transformer, tok: Tokenizer, max_tokens: int) -> None:
    sized(model)
    full = run(model, tok, [req(tok, PROMPTS[3])])[0].token_ids
    (got,) = run(model, tok, [req(tok, PROMPTS[3], GREEDY.replace(max_tokens=max_tokens))])
    assert got.finish_reason == "length"
    assert got.token_ids == full[:max_tokens]


def test_context_limit(model: Transformer, tok: Tokenizer) -> None:
    prompt = tok.encode(PROMPTS[1], bos=True, eos=False)
    S = len(prompt) + 5
    sized(model, 2, S)
    long = GREEDY.replace(max_tokens=50)
    (got,) = run(model, tok, [Request("a", prompt, long)])
    assert got.finish_reason == "length"
    assert len(got.token_ids) == S - len(prompt) == 5
    (within,) = run(model, tok, [Request("b", prompt, GREEDY.replace(max_tokens=3))])
    assert len(within.token_ids) == 3
    sized(model, 2, 64)  # the tokens are the ones a roomier cache gives: the limit only cuts
    (roomy,) = run(model, tok, [Request("c", prompt, long)])
    assert got.token_ids == roomy.token_ids[:5]
    sized(model, 2, len(prompt) + 1)  # one free position: exactly one token
    (one,) = run(model, tok, [Request("d", prompt, long)])
    assert len(one.token_ids) == 1 and one.finish_reason == "length"


def test_bad_requests_finish_with_an_error_and_disturb_nobody(
    model: Transformer, tok: Tokenizer
) -> None:
    S = 24
    sized(model, 4, S)
    fits = [req(tok, PROMPTS[0]), req(tok, PROMPTS[2])]
    expected = alone(model, tok, fits)
    bad = [
        Request("exact", list(range(3, 3 + S)), GREEDY),  # exactly max_seq_len tokens
        Request("vocab", [1, 5000], GREEDY),
        Request("empty", [], GREEDY),
    ]
    out = run(model, tok, [bad[0], fits[0], bad[1], fits[1], bad[2]])
    assert [d.finish_reason for d in out] == ["error", "length", "error", "length", "error"]
    assert f"{S} tokens" in out[0].error and f"max_seq_len is {S}" in out[0].error
    assert "5000" in out[2].error and "no tokens" in out[4].error
    assert all(d.token_ids == [] and d.text == "" for d in (out[0], out[2], out[4]))
    assert_same(out[1], expected[0])
    assert_same(out[3], expected[1])


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
    base = run(model, tok, [req(tok, prompt, params)])[0]
    stop, n_tokens, text = boundary_stop(tok, base.token_ids)
    (got,) = run(model, tok, [req(tok, prompt, params.replace(stop=("@@never@@", stop)))])
    assert got.finish_reason == "stop"
    assert got.text == text  # cut right before the stop string
    assert got.token_ids == base.token_ids[:n_tokens]  # tokens up to the one completing it
    assert len(got.logprobs) == n_tokens
    # No piece ever showed a character of the stop string, not even its first one.
    shown = ""
    for e in got.events:
        shown += e.text
        assert stop[0] not in shown[len(text) :]


def test_earliest_stop_string_wins(model: Transformer, tok: Tokenizer) -> None:
    sized(model)
    params = GREEDY.replace(max_tokens=24, logprobs=False)
    base = run(model, tok, [req(tok, PROMPTS[0], params)])[0]
    stop, n_tokens, text = boundary_stop(tok, base.token_ids)
    later = base.text[len(text) + 1 : len(text) + 3]  # overlaps the first hit, starts later
    (got,) = run(model, tok, [req(tok, PROMPTS[0], params.replace(stop=[later, stop]))])
    assert got.text == text and got.finish_reason == "stop"


def test_text_held_back_for_a_stop_prefix_is_released_when_it_does_not_complete(
    model: Transformer, tok: Tokenizer
) -> None:
    sized(model)
    base = run(model, tok, [req(tok, PROMPTS[2], GREEDY.replace(max_tokens=20))])[0]
    # A stop string that starts like the output's 4th character but never completes.
    c = base.text[3]
    (got,) = run(model, tok, [req(tok, PROMPTS[2], GREEDY.replace(max_tokens=20, stop=c + "\0"))])
    assert got.text == base.text and got.finish_reason == "length"
    held = [len("".join(e.text for e in got.events[: i + 1])) for i in range(len(got.events))]
    assert any(n < len(tok.decode(got.token_ids[: i + 1])) for i, n in enumerate(held))


# ------------------------------------------------------------ slots, volume and abort


def test_deltas_add_up_to_the_final_text_and_tokens(model: Transformer, tok: Tokenizer) -> None:
    sized(model)
    requests = [
        req(tok, p, GREEDY.replace(max_tokens=30)) for p in ["你好，世界", "🦙 llama", "Hi"]
    ]
    for done in run(model, tok, requests):
        assert done.text == tok.decode(done.token_ids)
        assert "".join(e.text for e in done.events) == done.text
        assert [t for e in done.events for t in e.token_ids] == done.token_ids
        assert all("\ufffd" not in e.text for e in done.events) or "\ufffd" in done.text


def test_two_hundred_random_requests_through_four_slots(model: Transformer, tok: Tokenizer) -> None:
    sized(model, 4, 64)
    rng = random.Random(0)
    requests = []
    for i in range(200):
        prompt = [1] + [rng.randrange(3, 500) for _ in range(rng.randrange(1, 20))]
        params = SamplingParams(
            temperature=rng.choice([0.0, 0.8]), max_tokens=rng.randrange(1, 12), ignore_eos=True
        )
        requests.append(Request(f"v{i}", prompt, params, seed=i))
    runner = Runner(model, tok, prefill_chunk_tokens=16)
    out = run(model, tok, requests, runner=runner)
    assert [len(d.token_ids) for d in out] == [r.params.max_tokens for r in requests]
    assert runner.blocks.used == 0 and not any(runner.blocks.refs)  # every block back
    assert not runner.live and not runner.running
    for i in rng.sample(range(200), 8):  # spot checks against a run alone
        assert_same(out[i], alone(model, tok, [requests[i]])[0])


def test_abort_frees_the_slot_within_a_step(model: Transformer, tok: Tokenizer) -> None:
    sized(model, 1, 64)  # one slot: the next request can only run once it is freed
    runner = Runner(model, tok, 256)
    victim = req(tok, PROMPTS[0], GREEDY.replace(max_tokens=40))
    nxt = req(tok, PROMPTS[1])
    runner.add([victim, nxt])
    for _ in range(3):
        runner.step()
    runner.abort([victim.id, "never-submitted"])
    events = runner.step()
    assert events[0].id == victim.id and events[0].finish_reason == "abort"
    assert events[0].token_offset == 3  # it had made three tokens
    # The same step admitted the waiting request into the freed slot.
    assert runner.running[0].request.id == nxt.id
    got = Done()
    for e in events[1:]:
        got.add(e)
    while runner.has_work:
        for e in runner.step():
            got.add(e)
    assert_same(got, alone(model, tok, [nxt])[0])


@pytest.mark.parametrize("runs_per_row", [1, 3])  # in the header, or past it in the body
def test_step_batch_round_trips_through_the_wire_format(runs_per_row: int) -> None:
    def runs(first: int) -> list[tuple[int, int]]:
        return [(first + 10 * j, j + 1) for j in range(runs_per_row)]

    batch = StepBatch(
        pf_starts=[0, 4],
        pf_tokens=[[1, 5, 6], [7]],
        pf_runs=[runs(2), runs(0)],
        dec_starts=[9, 2],
        dec_tokens=[11, 12],
        dec_runs=[runs(1), runs(3)],
    )
    sent: list[torch.Tensor] = []
    publish(batch, 2, lambda t: sent.append(t.clone()) or t)
    assert len(sent) == 2  # the header, and a body: the prompt chunks (and runs past 8 ints)
    replay = iter(sent)
    assert receive(2, lambda t: t.copy_(next(replay))) == batch
    decode_only = StepBatch(dec_starts=[5], dec_tokens=[3], dec_runs=[runs(0)])
    sent.clear()
    publish(decode_only, 2, lambda t: sent.append(t.clone()) or t)
    assert len(sent) == 1  # up to 4 run ints a row ride in the header
    replay = iter(sent)
    assert receive(2, lambda t: t.copy_(next(replay))) == decode_only


def test_follower_runs_the_lead_steps(tiny_ckpt: Path, single_rank: None, tok: Tokenizer) -> None:
    """A follower fed the lead's broadcasts ends with the same KV cache: same forwards."""
    lead_model, follower_model = sized(load(tiny_ckpt)), sized(load(tiny_ckpt))
    sent: list[torch.Tensor] = []
    runner = Runner(lead_model, tok, 4, broadcast=lambda t: sent.append(t.clone()) or t)
    requests = [req(tok, p, GREEDY.replace(max_tokens=4 + i)) for i, p in enumerate(PROMPTS)]
    run(lead_model, tok, requests, runner=runner, later={2: [req(tok, "Late")]})
    runner.idle()
    runner.stop()
    replay = iter(sent)
    follow(follower_model, runner.max_running, lambda t: t.copy_(next(replay)))
    assert next(replay, None) is None  # it consumed every broadcast, then stopped
    assert int(sent[-1][0]) == OP_STOP
    for a, b in zip(lead_model.layers, follower_model.layers, strict=True):
        assert torch.equal(a.attention.cache_k, b.attention.cache_k)
        assert torch.equal(a.attention.cache_v, b.attention.cache_v)


# ------------------------------------------- penalties, logit_bias and min_tokens


def spy_logits(monkeypatch: pytest.MonkeyPatch) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Record each step's raw logits (what ``_sample`` gets) and the logits it picks
    from (what ``next_tokens`` gets)."""
    raw: list[torch.Tensor] = []
    picked: list[torch.Tensor] = []
    sample, pick = Runner._sample, runner_module.next_tokens

    def spy_sample(self: Runner, rows: list, logits: torch.Tensor, masks: object) -> list[Event]:
        raw.append(logits.clone())
        return sample(self, rows, logits, masks)

    def spy_pick(logits: torch.Tensor, *args: object) -> torch.Tensor:
        picked.append(logits.clone())
        return pick(logits, *args)

    monkeypatch.setattr(Runner, "_sample", spy_sample)
    monkeypatch.setattr(runner_module, "next_tokens", spy_pick)
    return raw, picked


def test_min_tokens_holds_off_eos(model: Transformer, tok: Tokenizer) -> None:
    sized(model)
    base = run(model, tok, [req(tok, PROMPTS[0])])[0].token_ids
    cut = next(i for i in range(2, len(base)) if base[i] not in base[:i])
    eos_tok = with_eos(tok, base[cut])
    (held,) = run(model, eos_tok, [req(tok, PROMPTS[0], GREEDY.replace(min_tokens=cut + 3))])
    assert held.token_ids[:cut] == base[:cut]
    assert len(held.token_ids) >= cut + 3 and base[cut] not in held.token_ids[: cut + 3]
    # min_tokens reached: the stop id stops it again at once.
    (at,) = run(model, eos_tok, [req(tok, PROMPTS[0], GREEDY.replace(min_tokens=cut))])
    assert at.finish_reason == "stop" and at.token_ids == base[:cut]
    # Stop strings wait for min_tokens too (vLLM's rule).
    first = tok.decode(base[:1])
    params = GREEDY.replace(stop=(first,), min_tokens=3)
    (late,) = run(model, tok, [req(tok, PROMPTS[0], params)])
    (early,) = run(model, tok, [req(tok, PROMPTS[0], params.replace(min_tokens=0))])
    assert early.finish_reason == "stop" and early.text == ""
    assert late.token_ids[:3] == base[:3] and late.text.startswith(first)


def test_logit_bias_makes_greedy_pick_the_token_and_logprobs_stay_raw(
    model: Transformer, tok: Tokenizer
) -> None:
    sized(model)
    base = run(model, tok, [req(tok, PROMPTS[1])])[0]
    target = next(t for t in range(100, tok.n_words) if t not in base.token_ids)
    params = GREEDY.replace(logit_bias={target: 100.0}, max_tokens=6)
    (got,) = run(model, tok, [req(tok, PROMPTS[1], params)])
    assert got.token_ids == [target] * 6
    # The raw model's log-probs: far below the ~0 the biased distribution gives.
    assert all(lp < -1.0 for lp in got.logprobs)
    # A bias of -100 on the greedy pick moves the pick elsewhere.
    (away,) = run(
        model, tok, [req(tok, PROMPTS[1], GREEDY.replace(logit_bias={base.token_ids[0]: -100}))]
    )
    assert away.token_ids[0] != base.token_ids[0]


def test_frequency_and_presence_penalties_adjust_the_logits_exactly(
    model: Transformer, tok: Tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each step picks from raw - frequency * count - presence * (count > 0), counts over
    the tokens generated before it (the prompt does not count); greedy is its argmax."""
    sized(model)
    base = run(model, tok, [req(tok, PROMPTS[2], GREEDY.replace(max_tokens=16))])[0].token_ids
    assert len(set(base)) < len(base)  # plain greedy repeats itself: the penalty bites
    raw, picked = spy_logits(monkeypatch)
    params = GREEDY.replace(max_tokens=16, frequency_penalty=1.5, presence_penalty=0.5)
    (got,) = run(model, tok, [req(tok, PROMPTS[2], params)])
    assert got.token_ids != base and len(raw) == len(got.token_ids) == 16
    for k, token in enumerate(got.token_ids):
        counts = torch.zeros(raw[k].shape[-1])
        for t in got.token_ids[:k]:
            counts[t] += 1
        want = raw[k][0] - 1.5 * counts - 0.5 * (counts > 0).float()
        torch.testing.assert_close(
            torch.log_softmax(picked[k][0], -1), torch.log_softmax(want, -1), atol=1e-5, rtol=0
        )
        assert token == int(want.argmax())
        # The log-prob returned is the raw model's.
        assert got.logprobs[k] == pytest.approx(
            float(torch.log_softmax(raw[k][0], -1)[token]), abs=1e-5
        )


def test_adjusted_rows_leave_plain_rows_exactly_as_alone(
    model: Transformer, tok: Tokenizer
) -> None:
    sized(model)
    sampled = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=10, logprobs=True)
    requests = [
        req(tok, PROMPTS[0]),
        req(tok, PROMPTS[1], GREEDY.replace(frequency_penalty=2.0, logit_bias={5: 3.0})),
        req(tok, PROMPTS[2], sampled, seed=7),
        req(tok, PROMPTS[3], sampled.replace(repetition_penalty=1.3, min_tokens=4), seed=8),
    ]
    batch = run(model, tok, requests)
    for got, want in zip(batch, alone(model, tok, requests), strict=True):
        assert_same(got, want)
    plain = alone(model, tok, [req(tok, PROMPTS[1]), req(tok, PROMPTS[3], sampled, seed=8)])
    assert batch[1].token_ids != plain[0].token_ids or batch[3].token_ids != plain[1].token_ids


def test_top_logprobs_list_the_most_likely_raw_tokens(
    model: Transformer, tok: Tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    sized(model)
    raw, _ = spy_logits(monkeypatch)
    params = GREEDY.replace(top_logprobs=3, logit_bias={7: 5.0})
    got, plain = run(model, tok, [req(tok, PROMPTS[0], params), req(tok, PROMPTS[1])])
    tops = [t for e in got.events for t in (e.top_logprobs or [])]
    assert len(tops) == len(got.token_ids) == 12
    assert all(e.top_logprobs is None for e in plain.events)
    for k, top in enumerate(tops):
        ls = torch.log_softmax(raw[k][0], -1)  # the raw distribution, before logit_bias
        want = torch.topk(ls, 3)
        assert list(top) == want.indices.tolist()
        assert list(top.values()) == pytest.approx(want.values.tolist(), abs=1e-6)
        assert got.logprobs[k] == pytest.approx(float(ls[got.token_ids[k]]), abs=1e-6)
