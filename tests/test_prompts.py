"""A caller's inputs made into requests (mpllama/prompts.py), without Ray: encoding,
the ranks' own checks before anything runs, seeds, and errors="return"."""

from __future__ import annotations

from pathlib import Path

import pytest

from mpllama import checkpoint
from mpllama.config import SamplingParams
from mpllama.errors import PromptError
from mpllama.prompts import Prompts
from mpllama.protocol import Request, derive_seed
from mpllama.tokenizer import Tokenizer

DEMO = Path(__file__).resolve().parents[1] / "demo" / "model"


@pytest.fixture(scope="module")
def prompts() -> Prompts:
    tok = Tokenizer(checkpoint.find_tokenizer(DEMO))
    return Prompts(tok, max_seq_len=16, vocab_size=tok.n_words, seed=7)


def test_requests_are_numbered_per_call_and_seeded_by_position(prompts: Prompts) -> None:
    own = SamplingParams(seed=99)
    first = prompts.requests(["a cat", "a dog"], None, [SamplingParams(), own], "raise")
    second = prompts.requests(None, [[1, 5, 9]], None, "raise")
    ids = [p.request.id for p in first + second]
    call = ids[0].split("-")[0]
    assert ids[:2] == [f"{call}-0", f"{call}-1"]
    assert not ids[2].startswith(f"{call}-")  # another call, another number
    assert first[0].request.seed == derive_seed(7, 0) and first[1].request.seed == 99
    assert first[0].request.prompt_token_ids == prompts.encode("a cat")
    assert second[0].request.prompt_token_ids == [1, 5, 9]


def test_a_bad_input_fails_the_call_or_becomes_an_error_output(prompts: Prompts) -> None:
    bad = ["fine", "", "x " * 40, 3]  # empty, past max_seq_len, not a string
    with pytest.raises(PromptError, match="prompt #1 is empty"):
        prompts.requests(bad, None, None, "raise")
    out = prompts.requests(bad, None, None, "return")
    assert [p.finish_reason for p in out] == [None, "error", "error", "error"]
    assert "empty" in out[1].error and "max_seq_len" in out[2].error
    assert "must be a string" in out[3].error
    with pytest.raises(ValueError, match="exactly one"):
        prompts.requests(["a"], [[1]], None, "raise")


def test_dialogs_encode_in_the_chat_format_and_bad_ones_are_named(prompts: Prompts) -> None:
    good = [{"role": "user", "content": "hi"}]
    (one,) = prompts.dialog_requests(good, None, "raise")
    assert one.request.prompt_token_ids == prompts.tokenizer.encode_dialog(good)
    out = prompts.dialog_requests([good, [{"role": "nobody", "content": "x"}]], None, "return")
    assert out[0].finish_reason is None and out[1].error.startswith("dialog 1:")


def test_check_and_echo(prompts: Prompts) -> None:
    long = Request("r", list(range(1, 20)), SamplingParams())
    with pytest.raises(PromptError, match="^request 'r': "):
        prompts.check([long], "request 'r'")
    echo = Request("e", prompts.encode("a cat"), SamplingParams(echo=True))
    assert prompts.echo_text("a cat", echo) == "a cat"
    assert prompts.echo_text(None, echo) == prompts.tokenizer.decode(echo.prompt_token_ids)
    assert prompts.echo_text("a cat", Request("n", [1, 2], SamplingParams())) == ""
