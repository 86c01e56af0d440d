"""Structured outputs on the lead rank, without Ray: every kind of constraint (JSON
schema, any JSON object, regex, Lark and GBNF grammars, choice) holds on models with
random weights for both tokenizer kinds (sentencepiece, Meta's 128k tiktoken); each
step's mask allows exactly the tokens llguidance allows; a constraint changes nothing
for the rows beside it; a bad grammar is that request's error alone; and max_tokens cuts
a constrained answer with "length"."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from llguidance import LLMatcher
from test_runner import alone, assert_same, load, run, sized

from mpllama.checkpoint import find_tokenizer
from mpllama.config import SamplingParams, run_config_from_dict
from mpllama.errors import ConfigError
from mpllama.guided import Guided
from mpllama.protocol import Request
from mpllama.rank import runner as runner_module
from mpllama.rank.model import Transformer
from mpllama.rank.runner import Runner
from mpllama.tokenizer import Tokenizer

jsonschema = pytest.importorskip("jsonschema")

# Nested: objects, arrays, enums, required fields, numbers, bounded strings.
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "pets": {"type": "array", "items": {"enum": ["cat", "dog", "fish"]}, "maxItems": 3},
        "home": {
            "type": "object",
            "properties": {
                "city": {"enum": ["Paris", "Lima"]},
                "floor": {"type": "integer", "minimum": -5, "maximum": 99},
            },
            "required": ["city"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "pets", "home"],
    "additionalProperties": False,
}
REGEX = r"[A-Z][a-z]{2,5} [0-9]{3}"
CHOICES = ["yes", "no", "maybe later"]
LARK = 'start: "(" DIGIT DIGIT? DIGIT? ")"\nDIGIT: /[0-9]/'
GBNF = 'root ::= "[" item ("," item)? "]"\nitem ::= [a-c] [a-c]?'
GRAMMAR_TEXT = r"\[[a-c]{1,2}(,[a-c]{1,2})?\]"  # what GBNF above matches, as a Python regex


def check(kind: str, text: str) -> None:
    """Fail unless ``text`` is a complete match of the constraint of ``kind``."""
    if kind == "json_schema":
        jsonschema.validate(json.loads(text), SCHEMA)
    elif kind == "json":
        assert isinstance(json.loads(text), dict)
    elif kind == "regex":
        assert re.fullmatch(REGEX, text), text
    elif kind == "choice":
        assert text in CHOICES
    elif kind == "lark":
        assert re.fullmatch(r"\([0-9]{1,3}\)", text), text
    else:
        assert re.fullmatch(GRAMMAR_TEXT, text), text


GUIDES = {
    "json_schema": Guided(json_schema=SCHEMA),
    "json": Guided(json=True),
    "regex": Guided(regex=REGEX),
    "choice": Guided(choice=tuple(CHOICES)),
    "lark": Guided(grammar=LARK),
    "gbnf": Guided(grammar=GBNF),
}


@pytest.fixture(scope="module", params=["sentencepiece", "tiktoken"])
def kit(request: pytest.FixtureRequest, single_rank: None) -> tuple[Transformer, Tokenizer]:
    ckpt: Path = request.getfixturevalue(
        "tiny_ckpt" if request.param == "sentencepiece" else "llama3_ckpt"
    )
    model = sized(load(ckpt), slots=4, seq=160)
    return model, Tokenizer(find_tokenizer(ckpt))


_ids = iter(range(10**9))


def req(tok: Tokenizer, params: SamplingParams, text: str = "Tell me", seed: int = 0) -> Request:
    return Request(f"g{next(_ids)}", tok.encode(text, bos=True, eos=False), params, seed)


@pytest.mark.parametrize("kind", list(GUIDES))
def test_every_kind_of_constraint_holds_greedy_and_sampled(kit, kind: str) -> None:
    model, tok = kit
    params = SamplingParams(temperature=0, max_tokens=120, guided=GUIDES[kind])
    requests = [req(tok, params), req(tok, params.replace(temperature=1.0), seed=5)]
    for done in run(model, tok, requests):
        assert done.finish_reason == "stop", (done.text, done.error)
        check(kind, done.text)


def test_the_same_requests_without_a_schema_are_not_json(kit) -> None:
    model, tok = kit
    params = SamplingParams(temperature=0, max_tokens=40)
    for done in run(model, tok, [req(tok, params), req(tok, params.replace(temperature=1.0))]):
        with pytest.raises(ValueError):  # json.JSONDecodeError is a ValueError
            json.loads(done.text)


def test_masks_allow_exactly_what_the_grammar_allows(kit, monkeypatch) -> None:
    """Each step's picked-from logits of a guided row are finite exactly on the tokens a
    fresh llguidance matcher, fed the tokens so far, allows (EOS where it may end)."""
    model, tok = kit
    picked: list[torch.Tensor] = []
    pick = runner_module.next_tokens

    def spy(logits: torch.Tensor, *args: object) -> torch.Tensor:
        picked.append(logits.clone())
        return pick(logits, *args)

    runner = Runner(model, tok, 256)
    monkeypatch.setattr(runner_module, "next_tokens", spy)
    params = SamplingParams(temperature=0.8, max_tokens=120, guided=GUIDES["json_schema"])
    (done,) = run(model, tok, [req(tok, params, seed=3)], runner=runner)
    assert done.finish_reason == "stop" and len(picked) == len(done.token_ids)
    reference = LLMatcher(runner.grammars.ll_tokenizer, GUIDES["json_schema"].lark)
    V = model.args.vocab_size
    for k, logits in enumerate(picked):
        bits = torch.frombuffer(bytearray(reference.compute_bitmask()), dtype=torch.uint8)
        allowed = ((bits[:, None] >> torch.arange(8)) & 1).flatten()[:V].bool()
        assert torch.equal(logits[0] > -1e29, allowed), f"step {k}"
        if k < len(done.token_ids):
            assert reference.consume_token(done.token_ids[k])
    assert reference.is_stopped()


def test_plain_rows_beside_guided_ones_are_exactly_as_alone(kit) -> None:
    model, tok = kit
    greedy = SamplingParams(temperature=0, max_tokens=12, logprobs=True)
    sampled = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=12, logprobs=True)
    requests = [
        req(tok, greedy, "Once upon a time"),
        req(tok, greedy.replace(guided=GUIDES["json_schema"], max_tokens=80), "Hi"),
        req(tok, sampled, "The cat sat", seed=7),
        req(tok, sampled.replace(guided=GUIDES["regex"]), "In the beginning", seed=8),
    ]
    batch = run(model, tok, requests)
    for got, want in zip(batch, alone(model, tok, requests), strict=True):
        assert_same(got, want)
    # Guided rows with penalties beside rows with logit_bias alone: the same holds.
    mixed = [
        req(tok, greedy.replace(logit_bias={7: 2.0}), "Once upon a time"),
        req(tok, sampled.replace(guided=GUIDES["choice"], presence_penalty=1.0), "Hi", seed=9),
        req(tok, greedy.replace(guided=GUIDES["lark"], repetition_penalty=1.3), "The cat"),
        requests[2],
    ]
    for got, want in zip(run(model, tok, mixed), alone(model, tok, mixed), strict=True):
        assert_same(got, want)


def test_a_bad_grammar_is_its_request_error_alone(kit) -> None:
    model, tok = kit
    greedy = SamplingParams(temperature=0, max_tokens=8)
    good = req(tok, greedy, "Once upon a time")
    bad_regex = req(tok, greedy.replace(guided=Guided(regex="(ab")))
    bad_schema = req(tok, greedy.replace(guided=Guided(json_schema={"type": "objekt"})))
    bad_lark = req(tok, greedy.replace(guided=Guided(grammar="start: missing_rule")))
    got = run(model, tok, [bad_regex, good, bad_schema, bad_lark])
    assert [d.finish_reason for d in got] == ["error", "length", "error", "error"]
    assert "unclosed group" in got[0].error
    assert "objekt" in got[2].error
    assert "missing_rule" in got[3].error
    assert_same(got[1], alone(model, tok, [good])[0])


def test_max_tokens_cuts_a_guided_answer_with_length(kit) -> None:
    model, tok = kit
    params = SamplingParams(temperature=0, max_tokens=120, guided=GUIDES["json_schema"])
    (full,) = run(model, tok, [req(tok, params)])
    (cut,) = run(model, tok, [req(tok, params.replace(max_tokens=4))])
    assert cut.finish_reason == "length" and len(cut.token_ids) == 4
    assert full.token_ids[:4] == cut.token_ids and full.text.startswith(cut.text)


# ------------------------------------------------------------------ the spec


def test_guided_takes_exactly_one_constraint() -> None:
    with pytest.raises(ValueError, match="exactly one of"):
        Guided()
    with pytest.raises(ValueError, match="regex, choice"):
        Guided(regex="a", choice=("b",))
    with pytest.raises(ValueError, match="non-empty"):
        Guided(choice=("a", ""))
    with pytest.raises(ValueError, match="unknown key"):
        Guided.of({"regexp": "a"})
    assert SamplingParams(guided={"regex": "a+"}).guided == Guided(regex="a+")
    assert Guided(choice=["a", "b"]).choice == ("a", "b")  # type: ignore[arg-type]


def test_problems_are_named_and_good_grammars_have_none() -> None:
    for guided in GUIDES.values():
        assert guided.problem() is None, guided
    assert "not JSON" in Guided(json_schema="{nope").problem()
    assert "unclosed group" in Guided(regex="(ab").problem()
    assert "GBNF" in Guided(grammar="root ::= (").problem()


def test_a_job_yaml_takes_guided_in_its_sampling_section(tiny_ckpt: Path) -> None:
    config = run_config_from_dict(
        {
            "model": {"checkpoint_dir": str(tiny_ckpt)},
            "sampling": {"guided": {"json_schema": SCHEMA}},
        }
    )
    assert config.sampling.guided == Guided(json_schema=SCHEMA)
    with pytest.raises(ConfigError, match="exactly one"):
        run_config_from_dict(
            {"model": {"checkpoint_dir": str(tiny_ckpt)}, "sampling": {"guided": {}}}
        )
