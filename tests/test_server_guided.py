"""Structured outputs and tool calling over real HTTP, with the real openai client, on a
Llama-3-shaped model with random weights (Meta's tokenizer): response_format's JSON
schema always validates where the same request without it does not parse; vLLM's
guided_regex and guided_choice; tool_choice required and named give tool_calls whose
arguments validate, streamed as OpenAI's deltas; a conversation with a call and its
result goes on; bad schemas are 400s in OpenAI's error shape. (The sentencepiece kind is
served by test_server.py's replica; both kinds run every constraint in test_guided.py.)"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from helpers import openai_client

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("ray.serve")

from test_guided import SCHEMA  # noqa: E402

MODEL = "llama3"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"enum": ["Paris", "Lima", "Oslo"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "days"],
            "additionalProperties": False,
        },
    },
}
CLOCK = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string", "maxLength": 8}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, CLOCK)}
ASK = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather?"}]


@pytest.fixture(scope="module")
def client(llama3_ckpt: Path, ray_runtime):
    with openai_client(llama3_ckpt, {"max_batch_size": 4, "max_seq_len": 640}, 8) as client:
        yield client


def test_a_json_schema_answer_always_validates_and_without_it_none_parses(client) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
    for temperature, n in ((0, 1), (1.0, 3)):
        reply = client.chat.completions.create(
            model=MODEL,
            messages=ASK,
            response_format=fmt,
            max_tokens=200,
            temperature=temperature,
            n=n,
            seed=11,
        )
        for choice in reply.choices:
            assert choice.finish_reason == "stop"
            jsonschema.validate(json.loads(choice.message.content), SCHEMA)
    free = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=40, n=3, seed=11)
    for choice in free.choices:
        with pytest.raises(ValueError):
            json.loads(choice.message.content)
    anything = client.completions.create(
        model=MODEL,
        prompt="Data:",
        max_tokens=200,
        temperature=0,
        extra_body={"response_format": {"type": "json_object"}},
    )
    assert isinstance(json.loads(anything.choices[0].text), dict)


def test_vllm_style_regex_and_choice(client) -> None:
    reply = client.completions.create(
        model=MODEL,
        prompt="Code:",
        max_tokens=20,
        temperature=1.0,
        n=3,
        seed=2,
        extra_body={"guided_regex": "[A-Z]{2}-[0-9]{2,4}"},
    )
    assert all(re.fullmatch("[A-Z]{2}-[0-9]{2,4}", c.text) for c in reply.choices)
    chat = client.chat.completions.create(
        model=MODEL,
        messages=ASK,
        max_tokens=20,
        temperature=1.0,
        n=4,
        seed=3,
        extra_body={"guided_choice": ["sunny", "rain", "snow storm"]},
    )
    assert {c.message.content for c in chat.choices} <= {"sunny", "rain", "snow storm"}
    assert all(c.finish_reason == "stop" for c in chat.choices)
    gbnf = 'root ::= "<" [a-c] [a-c]? ">"'
    grammar = client.completions.create(
        model=MODEL, prompt="Tag:", max_tokens=20, extra_body={"guided_grammar": gbnf}
    )
    assert re.fullmatch("<[a-c]{1,2}>", grammar.choices[0].text)
    small = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}},
        "required": ["ok"],
        "additionalProperties": False,
    }
    as_json = client.completions.create(
        model=MODEL, prompt="Flag:", max_tokens=20, extra_body={"guided_json": small}
    )
    jsonschema.validate(json.loads(as_json.choices[0].text), small)


def test_bad_constraints_are_400s_in_openai_shape(client) -> None:
    for extra, words in [
        ({"guided_regex": "(ab"}, "unclosed group"),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "objekt"}},
                }
            },
            "objekt",
        ),
        ({"guided_choice": ["a"], "guided_regex": "b"}, "one structured output"),
        (
            {"tools": [WEATHER], "tool_choice": "required", "guided_regex": "b"},
            "constrains the answer",
        ),
        ({"tool_choice": "required"}, "tool_choice needs tools"),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "not in tools",
        ),
    ]:
        with pytest.raises(openai.BadRequestError) as excinfo:
            client.chat.completions.create(model=MODEL, messages=ASK, extra_body=extra)
        assert words in excinfo.value.body["message"], excinfo.value.body
        assert excinfo.value.body["type"] == "invalid_request_error"
    assert client.chat.completions.create(model=MODEL, messages=ASK).choices[0].message.content


@pytest.mark.parametrize(
    "choice", ["required", {"type": "function", "function": {"name": "get_time"}}]
)
def test_forced_tool_calls_have_arguments_that_validate(client, choice) -> None:
    reply = client.chat.completions.create(
        model=MODEL,
        messages=ASK,
        tools=[WEATHER, CLOCK],
        tool_choice=choice,
        max_tokens=80,
        temperature=1.0,
        n=3,
        seed=5,
    )
    for c in reply.choices:
        assert c.finish_reason == "tool_calls" and c.message.content is None
        (call,) = c.message.tool_calls
        assert call.type == "function" and call.id.startswith("call_")
        if isinstance(choice, dict):
            assert call.function.name == "get_time"
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_a_streamed_tool_call_adds_up_to_the_unstreamed_one(client) -> None:
    ask = {
        "model": MODEL,
        "messages": ASK,
        "tools": [WEATHER, CLOCK],
        "tool_choice": "required",
        "max_tokens": 80,
        "temperature": 0,
    }
    whole = client.chat.completions.create(**ask).choices[0].message.tool_calls[0]
    chunks = list(client.chat.completions.create(**ask, stream=True))
    calls = [tc for ch in chunks for tc in (ch.choices[0].delta.tool_calls or [])]
    assert len(calls) >= 2 and calls[0].id and calls[0].function.name == whole.function.name
    assert all(tc.index == 0 for tc in calls) and all(tc.id is None for tc in calls[1:])
    arguments = "".join(tc.function.arguments or "" for tc in calls)
    assert json.loads(arguments) == json.loads(whole.function.arguments)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not any(ch.choices[0].delta.content for ch in chunks)


def test_a_conversation_with_a_call_and_its_result_goes_on(client) -> None:
    call = (
        client.chat.completions.create(
            model=MODEL,
            messages=ASK,
            tools=[WEATHER],
            tool_choice="required",
            max_tokens=80,
            temperature=0,
        )
        .choices[0]
        .message
    )
    history = [
        *ASK,
        call.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.tool_calls[0].id, "content": '{"sky": "clear"}'},
    ]
    reply = client.chat.completions.create(
        model=MODEL, messages=history, tools=[WEATHER], max_tokens=8, temperature=0
    )
    # "auto" on random weights: text, not a call.
    assert reply.choices[0].message.content and reply.choices[0].finish_reason == "length"
    none = client.chat.completions.create(
        model=MODEL, messages=history, tools=[WEATHER], tool_choice="none", max_tokens=8
    )
    assert none.choices[0].message.tool_calls is None
