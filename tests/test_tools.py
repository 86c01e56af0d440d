"""Tool calling's pieces without a server: the prompt is the Llama 3.1 Instruct chat
template's, token for token (tools in the first user message, calls and results in the
history); a call is parsed only when it is one; a constrained call streams as OpenAI's
deltas that add up to its arguments; tool_choice's rules."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mpllama.tokenizer import load_tokenizer
from mpllama.tools import ToolStream, dialog_of, guided_for, parse_call, tool_use

llama3_tokenizer = pytest.importorskip("llama_models.llama3.tokenizer")
LLAMA3_MODEL = Path(llama3_tokenizer.__file__).parent / "tokenizer.model"

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["C", "F"]}},
            "required": ["city"],
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
CALL = {
    "id": "call_1",
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
}


def template(messages: list[dict], tools: list[dict]) -> str:
    """What the Llama 3.1 Instruct chat template (Meta's, on the Hugging Face hub) renders
    with tools in the first user message and a generation prompt, written out by hand."""
    out = "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
    out += (
        "Environment: ipython\nCutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
    )
    rest = list(messages)
    if rest[0]["role"] == "system":
        out += rest.pop(0)["content"].strip()
    out += "<|eot_id|>"
    first = rest.pop(0)
    out += "<|start_header_id|>user<|end_header_id|>\n\n"
    out += (
        "Given the following functions, please respond with a JSON for a function call "
        "with its proper arguments that best answers the given prompt.\n\n"
        'Respond in the format {"name": function name, "parameters": dictionary of argument '
        "name and its value}.Do not use variables.\n\n"
    )
    for t in tools:
        out += json.dumps(t, indent=4) + "\n\n"
    out += first["content"].strip() + "<|eot_id|>"
    for m in rest:
        if m.get("tool_calls"):
            f = m["tool_calls"][0]["function"]
            out += "<|start_header_id|>assistant<|end_header_id|>\n\n"
            out += '{"name": "' + f["name"] + '", "parameters": '
            out += json.dumps(json.loads(f["arguments"])) + "}<|eot_id|>"
        elif m["role"] == "tool":
            out += "<|start_header_id|>ipython<|end_header_id|>\n\n" + m["content"] + "<|eot_id|>"
        else:
            out += f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n"
            out += m["content"].strip() + "<|eot_id|>"
    return out + "<|start_header_id|>assistant<|end_header_id|>\n\n"


def test_the_prompt_is_the_llama31_template_token_for_token() -> None:
    tok = load_tokenizer(LLAMA3_MODEL)
    messages = [
        {"role": "system", "content": "Be brief. "},
        {"role": "user", "content": " Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [CALL]},
        {"role": "tool", "content": '{"temperature": 21}'},
        {"role": "assistant", "content": "21 degrees."},
        {"role": "user", "content": "And the time?"},
    ]
    ids = tok.encode_dialog(dialog_of(messages, [WEATHER, TIME]))
    assert tok.decode(ids) == template(messages, [WEATHER, TIME])
    # Special tokens are tokens, not text: the template's text encodes to the same ids.
    assert ids[:1] == [tok.bos_id] and ids.count(tok.special_ids["<|eot_id|>"]) == 6


def test_without_tools_a_past_call_is_still_written_as_meta_writes_it() -> None:
    dialog = dialog_of(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [CALL]}], None
    )
    assert dialog[1] == {
        "role": "assistant",
        "content": '{"name": "get_weather", "parameters": {"city": "Paris"}}',
    }
    with pytest.raises(ValueError, match="one tool call"):
        dialog_of([{"role": "assistant", "tool_calls": [CALL, CALL]}], None)
    with pytest.raises(ValueError, match="need a user message"):
        dialog_of([{"role": "system", "content": "x"}], [WEATHER])


@pytest.mark.parametrize(
    "text, call",
    [
        (
            '{"name": "get_weather", "parameters": {"city": "Lima"}}',
            ("get_weather", '{"city": "Lima"}'),
        ),
        ('  {"name":"get_time","parameters":{}}', ("get_time", "{}")),
        ('{"name": "nope", "parameters": {}}', None),  # not a tool of the request
        ('{"name": "get_time", "parameters": {}} and more', None),
        ('{"name": "get_time", "parameters": {}, "x": 1}', None),
        ('{"name": "get_time", "parameters": {', None),  # cut short
        ("It is sunny.", None),
    ],
)
def test_parse_call_takes_only_a_whole_call_of_a_known_tool(text: str, call) -> None:
    got = parse_call(text, {"get_weather", "get_time"})
    assert (got.name, got.arguments) == call if call else got is None
    if got is not None:
        assert got.id.startswith("call_") and got.openai()["type"] == "function"


def test_a_forced_call_streams_deltas_that_add_up_to_its_arguments() -> None:
    text = '{"name": "get_weather", "parameters": {"city": "Par}is", "unit": "C"}}'
    stream = ToolStream({"get_weather"}, forced=True)
    deltas = [stream.delta(text[i : i + 3], i + 3 >= len(text)) for i in range(0, len(text), 3)]
    calls = [d["tool_calls"][0] for d in deltas if d is not None]
    assert calls[0]["id"].startswith("call_") and calls[0]["function"]["name"] == "get_weather"
    assert all(c["index"] == 0 for c in calls) and all("id" not in c for c in calls[1:])
    args = "".join(c["function"].get("arguments", "") for c in calls)
    assert args == '{"city": "Par}is", "unit": "C"}' and stream.made_call


def test_a_forced_call_cut_short_is_the_same_answer_streamed_or_not() -> None:
    """max_tokens may end a "required" call anywhere. Streamed and not, the answer is the
    same: a call with its arguments as far as they got once its name is whole, the text
    as content before. Before, the whole answer gave content where streaming gave a call,
    and a stream cut before the name was whole sent nothing at all."""
    from types import SimpleNamespace

    from mpllama.openai_requests import RequestBuilder

    full = '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "C"}}'
    for cut in range(1, len(full) + 1):
        text, finish = full[:cut], "length" if cut < len(full) else "stop"
        stream = ToolStream({"get_weather"}, forced=True)
        deltas = [stream.delta(text[i : i + 4], i + 4 >= len(text)) for i in range(0, cut, 4)]
        content = "".join(d.get("content", "") for d in deltas if d)
        calls = [d["tool_calls"][0] for d in deltas if d and "tool_calls" in d]
        whole = RequestBuilder.message(
            SimpleNamespace(
                index=0,
                out=SimpleNamespace(text=text, finish_reason=finish),
                tools=ToolStream({"get_weather"}, forced=True),
            ),
            None,
        )
        message = whole["message"]
        if "tool_calls" in message:
            function = message["tool_calls"][0]["function"]
            assert not content and calls[0]["function"]["name"] == function["name"], cut
            assert (
                "".join(c["function"].get("arguments", "") for c in calls) == function["arguments"]
            ), cut
            assert whole["finish_reason"] == ("tool_calls" if finish == "stop" else "length")
        else:
            assert not calls and content == message["content"] == text, cut
    assert function["arguments"] == '{"city": "Paris", "unit": "C"}'


def test_an_auto_answer_is_content_at_once_or_a_call_held_to_the_end() -> None:
    plain = ToolStream({"get_time"}, forced=False)
    assert plain.delta("  It", False) == {"content": "  It"}
    assert plain.delta(" is", True) == {"content": " is"} and not plain.made_call
    call = ToolStream({"get_time"}, forced=False)
    assert call.delta(' {"name": "get_time",', False) is None
    last = call.delta(' "parameters": {}}', True)
    assert last["tool_calls"][0]["function"] == {"name": "get_time", "arguments": "{}"}
    brace = ToolStream({"get_time"}, forced=False)
    assert brace.delta("{not json", False) is None
    assert brace.delta("}", True) == {"content": "{not json}"}


def test_tool_choice_rules() -> None:
    assert tool_use(None, None) is None and tool_use([WEATHER], "none") is None
    auto = tool_use([WEATHER, TIME], None)
    assert auto is not None and not auto.forced and auto.guided is None
    required = tool_use([WEATHER, TIME], "required")
    assert required.forced and "anyOf" in required.guided.json_schema
    named = guided_for([WEATHER, TIME], {"type": "function", "function": {"name": "get_time"}})
    assert named.json_schema["properties"]["name"] == {"const": "get_time"}
    with pytest.raises(ValueError, match="not in tools"):
        guided_for([WEATHER], {"type": "function", "function": {"name": "get_time"}})
    with pytest.raises(ValueError, match="needs tools"):
        tool_use([], "required")
    with pytest.raises(ValueError, match="must differ"):
        tool_use([TIME, TIME], "auto")


def test_a_tool_whose_parameters_refer_to_their_own_definitions_is_enforced() -> None:
    """A nested pydantic model's parameters (openai.pydantic_function_tool) refer to their
    own $defs ("#/$defs/City"); placed inside the call's schema those pointers must move
    with them. Before, "required" and named calls failed to compile (400: "Pointer
    '/$defs/City' does not exist"). The grammar takes a call of either tool and refuses
    one that breaks the nested model."""
    jsonschema = pytest.importorskip("jsonschema")
    from mpllama.rank.constrain import Grammars

    city = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}
    trip = {
        "type": "function",
        "function": {
            "name": "plan_trip",
            "parameters": {
                "$defs": {"City": city},
                "type": "object",
                "properties": {
                    "to": {"$ref": "#/$defs/City"},
                    "stops": {"type": "array", "items": {"$ref": "#/$defs/City"}},
                },
                "required": ["to", "stops"],
                "additionalProperties": False,
            },
        },
    }
    good = '{"name": "plan_trip", "parameters": {"to": {"name": "Oslo"}, "stops": []}}'
    bad = '{"name": "plan_trip", "parameters": {"to": {"town": "Oslo"}, "stops": []}}'
    tokenizer = load_tokenizer(LLAMA3_MODEL)
    grammars = Grammars(tokenizer, tokenizer.n_words)
    named = {"type": "function", "function": {"name": "plan_trip"}}
    for tools, choice in (([trip], "required"), ([WEATHER, trip], "required"), ([trip], named)):
        guided = guided_for(tools, choice)
        assert guided is not None and guided.problem() is None
        jsonschema.validate(json.loads(good), guided.json_schema)
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(json.loads(bad), guided.json_schema)
        for text, takes in ((good, True), (bad, False)):
            matcher = grammars.matcher(guided)
            ids = tokenizer.encode(text, bos=False, eos=False)
            assert matcher.consume_tokens(ids) == takes, text
            assert matcher.is_accepting() or not takes
