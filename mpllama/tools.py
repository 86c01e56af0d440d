"""Tool calling on ``/v1/chat/completions`` for Llama 3.1+ models, in Meta's JSON format
(as the Llama 3.1 Instruct chat template writes it, tools in the first user message):

    system:    "Environment: ipython\\nCutting Knowledge Date: December 2023\\n
                Today Date: 26 Jul 2024\\n\\n" + the system message
    user:      "Given the following functions, ..." + each tool's JSON (indent 4) + the
               first user message
    assistant: {"name": "get_weather", "parameters": {"city": "Paris"}}   (a call)
    ipython:   the tool's result

``tool_choice`` "auto" lets the model answer or call; "required" and a named function
constrain the answer with the tools' JSON schemas, so the arguments always parse; "none"
leaves the tools out of the prompt. No torch, no FastAPI: the server uses these.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from .guided import Guided

# The date the Llama 3.1 template writes when it is given none: fixed, so that the same
# request always encodes to the same prompt (and replays exactly).
TODAY = "26 Jul 2024"
SYSTEM_HEADER = (
    f"Environment: ipython\nCutting Knowledge Date: December 2023\nToday Date: {TODAY}\n\n"
)
USER_PREFACE = (
    "Given the following functions, please respond with a JSON for a function call "
    "with its proper arguments that best answers the given prompt.\n\n"
    'Respond in the format {"name": function name, "parameters": dictionary of argument '
    "name and its value}.Do not use variables.\n\n"
)
# The start of a call as the model writes it, up to where its arguments begin.
_CALL_HEAD = re.compile(
    r'\s*\{\s*"name"\s*:\s*"(?P<name>(?:[^"\\]|\\.)*)"\s*,\s*"parameters"\s*:\s*'
)


@dataclass
class Call:
    """One tool call the model made: the function's name and its arguments (JSON text)."""

    name: str
    arguments: str
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def openai(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


def dialog_of(
    messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None
) -> list[dict[str, str]]:
    """OpenAI chat messages (plain dicts, ``tool_calls`` on assistant turns) -> the
    role/content dialog the model's chat format encodes, with ``tools`` (OpenAI's tool
    objects, or None) written into the system and first user messages as Meta's
    template writes them."""
    dialog: list[dict[str, str]] = []
    for m in messages:
        content = m.get("content") or ""
        if m.get("tool_calls"):
            if len(m["tool_calls"]) != 1:
                raise ValueError(
                    "an assistant message holds one tool call at most: Llama 3.1's JSON "
                    "tool format has no parallel calls"
                )
            function = m["tool_calls"][0]["function"]
            content = call_text(function["name"], function["arguments"])
        dialog.append({"role": m["role"], "content": content})
    if tools is None:
        return dialog
    if dialog and dialog[0]["role"] == "system":
        system = dialog.pop(0)["content"].strip()
    else:
        system = ""
    first_user = next((i for i, m in enumerate(dialog) if m["role"] == "user"), None)
    if first_user is None:
        raise ValueError("tools need a user message to be written into (there is none)")
    preface = USER_PREFACE + "".join(json.dumps(t, indent=4) + "\n\n" for t in tools)
    dialog[first_user] = {
        "role": "user",
        "content": preface + dialog[first_user]["content"].strip(),
    }
    return [{"role": "system", "content": SYSTEM_HEADER + system}, *dialog]


def call_text(name: str, arguments: str) -> str:
    """A past call as the assistant wrote it (arguments re-serialised, as the template does)."""
    try:
        parsed = json.loads(arguments)
    except json.JSONDecodeError:
        raise ValueError(f"tool call {name!r}: arguments are not JSON: {arguments!r:.80}") from None
    return json.dumps({"name": name, "parameters": parsed}, ensure_ascii=False)


def guided_for(tools: list[dict[str, Any]], choice: str | dict[str, Any]) -> Guided | None:
    """The constraint a ``tool_choice`` puts on the answer: "required" any of the tools'
    calls, a named function that one's; "auto" and "none" none."""
    if choice in ("auto", "none"):
        return None
    functions = [t["function"] for t in tools]
    if isinstance(choice, dict):
        name = choice["function"]["name"]
        functions = [f for f in functions if f["name"] == name]
        if not functions:
            raise ValueError(f"tool_choice names the function {name!r}, which is not in tools")
    at = (
        ["/properties/parameters"]
        if len(functions) == 1
        else [f"/anyOf/{i}/properties/parameters" for i in range(len(functions))]
    )
    calls = [
        {
            "type": "object",
            "properties": {
                "name": {"const": f["name"]},
                "parameters": rerooted(f.get("parameters") or {"type": "object"}, where),
            },
            "required": ["name", "parameters"],
            "additionalProperties": False,
        }
        for f, where in zip(functions, at, strict=True)
    ]
    return Guided(json_schema=calls[0] if len(calls) == 1 else {"anyOf": calls})


def rerooted(schema: Any, where: str) -> Any:
    """A function's parameters schema placed at JSON pointer ``where`` of the call's: its
    own local references ("#/$defs/City", as pydantic writes a nested model, or "#" for
    itself) point there too, where they were read from the combined schema's root."""
    if isinstance(schema, list):
        return [rerooted(item, where) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: rerooted(v, where) for k, v in schema.items()}
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#"):
        out["$ref"] = "#" + where + ref[1:]
    return out


def parse_call(text: str, names: set[str]) -> Call | None:
    """The tool call ``text`` is, or None when it is not one (plain content): a JSON
    object of a known function's name and its parameters, nothing around it."""
    head = _CALL_HEAD.match(text)
    if head is None:
        return None
    try:
        call = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(call, dict) or set(call) != {"name", "parameters"}:
        return None
    if call["name"] not in names or not isinstance(call["parameters"], dict):
        return None
    return Call(call["name"], arguments_of(text, head.end()))


def forced_call(text: str) -> Call | None:
    """The call a constrained answer ("required", a named function) is, whole or as far
    as it got (cut short by max_tokens: its arguments as written, perhaps not yet valid
    JSON, as OpenAI gives them); None while not even its name is complete."""
    head = _CALL_HEAD.match(text)
    if head is None:
        return None
    try:
        args = arguments_of(text, head.end())
    except json.JSONDecodeError:
        args = text[head.end() :]
    return Call(json.loads(f'"{head.group("name")}"'), args)


def arguments_of(text: str, start: int) -> str:
    """The parameters' JSON text as the model wrote it, from ``start``."""
    _, end = json.JSONDecoder().raw_decode(text, start)
    return text[start:end]


class ToolStream:
    """One streamed choice's answer with tools on: OpenAI's deltas, ``{"content": ...}``
    or ``{"tool_calls": [...]}``, from the text as it grows.

    A constrained answer ("required", a named function) is a call from its first token:
    the call's id and name go out once the name is complete, then the arguments as they
    come, holding back trailing "}" that may close the call rather than its arguments.
    An "auto" answer that starts with "{" may be a call: it is held until it ends, then
    sent as a call or, when it does not parse as one, as content. Any other answer is
    content as it comes."""

    def __init__(self, names: set[str], forced: bool) -> None:
        self.names = names
        self.forced = forced
        self.text = ""
        self.call: Call | None = None  # the call whose name has gone out
        self.sent_args = 0  # characters of its arguments sent
        self.content = False  # decided: plain content
        self.sent_content = 0

    def delta(self, new_text: str, finished: bool) -> dict[str, Any] | None:
        """The delta for ``new_text`` (None when there is nothing to send yet)."""
        self.text += new_text
        if self.content:
            return self._content()
        if self.forced:
            return self._forced(finished)
        stripped = self.text.lstrip()
        if not stripped and not finished:
            return None
        if stripped.startswith("{") and not finished:
            return None  # perhaps a call: wait for the end
        call = parse_call(self.text, self.names) if finished else None
        if call is None:
            self.content = True
            return self._content()
        self.call = call
        return {"tool_calls": [{"index": 0, **call.openai()}]}

    @property
    def made_call(self) -> bool:
        return self.call is not None

    def _content(self) -> dict[str, Any] | None:
        piece = self.text[self.sent_content :]
        self.sent_content = len(self.text)
        return {"content": piece} if piece else None

    def _forced(self, finished: bool) -> dict[str, Any] | None:
        head = _CALL_HEAD.match(self.text)
        if head is None:
            if finished:  # cut short before its name was whole: the text, as not streamed
                self.content = True
                return self._content()
            return None
        out: dict[str, Any] = {"index": 0}
        if self.call is None:
            self.call = Call(json.loads(f'"{head.group("name")}"'), "")
            out.update(self.call.openai())
        if finished:
            final = forced_call(self.text)
            assert final is not None
            args = final.arguments
        else:
            # Trailing "}" may close the call rather than its arguments: held back.
            args = self.text[head.end() :].rstrip("} \t\r\n")
        piece = args[self.sent_args :]
        self.sent_args = max(self.sent_args, len(args))
        if piece:
            self.call.arguments += piece
            out.setdefault("function", {})["arguments"] = piece
        return {"tool_calls": [out]} if len(out) > 1 else None


@dataclass
class ToolUse:
    """What a chat request's ``tools`` and ``tool_choice`` ask of the answer."""

    tools: list[dict[str, Any]]  # written into the prompt
    names: set[str]
    forced: bool  # "required" or a named function: the answer is a call
    guided: Guided | None

    def stream(self) -> ToolStream:
        return ToolStream(self.names, self.forced)


def tool_use(
    tools: list[dict[str, Any]] | None, choice: str | dict[str, Any] | None
) -> ToolUse | None:
    """None when the answer is plain text: no tools, or ``tool_choice`` "none" (the tools
    are then left out of the prompt, so the model is not asked to call one)."""
    if not tools:
        if choice not in (None, "none"):
            raise ValueError("tool_choice needs tools")
        return None
    names = [t["function"]["name"] for t in tools]
    if len(set(names)) != len(names):
        raise ValueError(f"tools: function names must differ, got {names}")
    choice = choice or "auto"
    if choice == "none":
        return None
    guided = guided_for(tools, choice)
    return ToolUse(tools, set(names), guided is not None, guided)
