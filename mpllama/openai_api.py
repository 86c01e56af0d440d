"""The OpenAI API's shapes, without Ray or FastAPI's app: request bodies (strict: unknown
fields and wrong types are errors), OpenAI's error body, and the pieces of a completion
response (choices, log-probs, usage, server-sent events). ``server.py`` serves them.
"""

# No `from __future__ import annotations`: pydantic and FastAPI read these annotations at
# run time.
import dataclasses
import json
import logging
from typing import Any, Literal

from fastapi.responses import JSONResponse
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from .api import RequestOutput
from .config import SamplingParams
from .errors import PromptError
from .guided import Guided
from .tokenizer import IncrementalDecoder, Tokenizer
from .tools import ToolStream

log = logging.getLogger(__name__)

MAX_STOP = 4  # stop strings per request, as OpenAI allows
# One of a token's most likely alternatives: its text, log-prob and own bytes.
Alternative = tuple[str, float, bytes]

# ------------------------------------------------------------------ request bodies


class Body(BaseModel):
    # Unknown fields and wrong JSON types are errors (400), never silently coerced.
    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _null_is_unset(cls, data: Any) -> Any:
        """A known field sent as null is one left out, as OpenAI's reference has it (its
        client sends null for a None it is given, e.g. ``n=None``): its default holds."""
        if not isinstance(data, dict):
            return data
        known = set(cls.model_fields) | {
            f.alias for f in cls.model_fields.values() if f.alias is not None
        }
        return {k: v for k, v in data.items() if v is not None or k not in known}


class StreamOptions(Body):
    include_usage: bool = False


class JsonSchemaFormat(Body):
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None  # accepted: the schema is always enforced


class ResponseFormat(Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class SamplingBody(Body):
    """Fields both routes take; None = the serve YAML's sampling section decides."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)  # an extra field, as in vLLM: -1 or 0 = off
    ignore_eos: bool | None = None  # an extra field
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None  # an extra field, as in vLLM
    seed: int | None = Field(None, ge=0, lt=2**63)
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted, unused
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0)  # an extra field, as in vLLM
    logit_bias: dict[str, float] | None = None  # token id (a string, in JSON) -> bias
    min_tokens: int | None = Field(None, ge=0)  # an extra field, as in vLLM
    # Structured outputs: OpenAI's response_format, or vLLM's extra guided_* fields.
    response_format: ResponseFormat | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    def guided(self) -> Guided | None:
        """The one constraint the body asks for; ValueError for none-of-one."""
        given: dict[str, Any] = {}
        fmt = self.response_format
        if fmt is not None and fmt.type == "json_object":
            given["json"] = True
        elif fmt is not None and fmt.type == "json_schema":
            if fmt.json_schema is None or fmt.json_schema.schema_ is None:
                raise ValueError("response_format json_schema needs json_schema.schema")
            given["json_schema"] = fmt.json_schema.schema_
        for name in ("json", "regex", "choice", "grammar"):
            value = getattr(self, f"guided_{name}")
            if value is not None:
                given["json_schema" if name == "json" else name] = value
        if len(given) > 1:
            raise ValueError(
                "give one structured output at most (response_format or one guided_* field)"
            )
        return Guided.of(given) if given else None

    @field_validator("stop")
    @classmethod
    def _stop(cls, stop: str | list[str] | None) -> str | list[str] | None:
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > MAX_STOP or any(not s for s in stops):
            raise ValueError(f"give at most {MAX_STOP} non-empty stop strings")
        return stop

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        for key, value in (bias or {}).items():
            if not key.isdigit():
                raise ValueError(f'keys must be token ids, e.g. "128", got {key!r}')
            if not -100 <= value <= 100:
                raise ValueError(f"values must be in [-100, 100], got {value} for {key!r}")
        return bias


class CompletionRequest(SamplingBody):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    # k: each token's log-prob and the k most likely tokens' (OpenAI's limit: 5).
    logprobs: int | None = Field(None, ge=0, le=5)


class ContentPart(Body):
    type: Literal["text"]
    text: str


class FunctionCall(Body):
    name: str
    arguments: str  # JSON text


class ToolCall(Body):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(Body):
    # "tool" (a tool's result) needs a Llama 3 model: the Llama 2 format refuses it (400).
    # "developer": OpenAI's newer name for the system's instructions, taken as "system".
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None  # None: an assistant turn of tool calls
    name: str | None = None  # accepted, unused
    tool_call_id: str | None = None  # accepted, unused (Llama 3's ipython turn has no id)
    tool_calls: list[ToolCall] | None = None  # an assistant turn's calls
    # An answer sent back as the client parsed it (``message.model_dump()``) carries
    # these too: accepted, unused. Llama refuses nothing and makes neither audio nor
    # the functions API's calls, so those two must be null (dropped: ``_null_is_unset``).
    refusal: str | None = None
    annotations: list[dict[str, Any]] | None = None
    audio: None = None
    function_call: None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, content: Any) -> Any:
        """Name what is wrong with a part that is not text (pydantic would say only that
        the content is not a string)."""
        for part in content if isinstance(content, list) else []:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind is not None and kind != "text":
                raise ValueError(
                    f"content parts of type {kind!r} are not supported; Llama reads text"
                )
        return content

    @property
    def text(self) -> str:
        if self.content is None:
            return ""
        return (
            self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        )

    def plain(self) -> dict[str, Any]:
        calls = [c.model_dump() for c in self.tool_calls or []]
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": self.text, **({"tool_calls": calls} if calls else {})}


class FunctionDef(Body):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments
    strict: bool | None = None  # accepted: required and named calls are always enforced


class Tool(Body):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(Body):
    name: str


class NamedToolChoice(Body):
    type: Literal["function"]
    function: NamedFunction


class ChatRequest(SamplingBody):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)  # the k most likely, with logprobs
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None  # accepted: Llama 3.1 makes one call a turn


# ------------------------------------------------------------------ errors


class ApiError(Exception):
    """An answer in OpenAI's error shape: {"error": {message, type, param, code}}."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def api_error(exc: BaseException) -> ApiError:
    """What a client is told about a failure while its request runs."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, (PromptError, ValueError, TypeError)):
        return ApiError(400, str(exc))
    # A gang that could not be brought back (the engine replays requests after a rank
    # fault, and gives up only after parallel.max_restarts failed rebuilds).
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    log.warning("request failed: %s", first)
    return ApiError(500, f"the model failed: {first}", type="server_error")


def parse_body(model: type[Body], raw: bytes, route: str) -> Any:
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        error = exc.errors()[0]
        loc = [str(part) for part in error["loc"]]
        param = loc[0] if loc else None
        if error["type"] == "json_invalid":
            message = f"the body is not valid JSON: {error['msg']}"
        elif error["type"] == "extra_forbidden":
            message = f"unknown field {'.'.join(loc)!r} for {route}"
        elif error["type"] == "missing":
            message = f"missing required field {'.'.join(loc)!r}"
        else:
            message = f"{param}: {error['msg']}" if param else error["msg"]
        raise ApiError(400, message, param=param) from None


# ------------------------------------------------------------------ one choice


@dataclasses.dataclass
class Choice:
    """One sequence a request asked for: what it runs and what it has made so far."""

    index: int
    prompt_index: int  # n choices share a prompt
    prompt: str | list[int]
    prompt_tokens: int
    params: SamplingParams
    decoder: IncrementalDecoder
    out: RequestOutput | None = None
    pieces: list[str] = dataclasses.field(default_factory=list)  # one text per token
    raw: list[bytes] = dataclasses.field(default_factory=list)  # each token's own bytes
    logprobs: list[float] = dataclasses.field(default_factory=list)
    # Per token, the most likely tokens' texts, log-probs and bytes (top_logprobs > 0).
    tops: list[list[Alternative]] = dataclasses.field(default_factory=list)
    tools: ToolStream | None = None  # a chat answer that may be a tool call

    def add(self, out: RequestOutput) -> tuple[list[str], list[float]]:
        """Take the next output; return its tokens' texts and log-probs (when asked for)."""
        self.out = out
        if out.logprobs is None:
            return [], []
        new = out.logprobs[len(self.logprobs) :]
        pieces = [self.decoder.add(t) for t in out.delta_token_ids]
        if out.finished and pieces:
            pieces[-1] += self.decoder.flush()
        tokenizer = self.decoder.tokenizer
        self.pieces += pieces
        self.raw += [
            own_bytes(tokenizer, t, piece)
            for t, piece in zip(out.delta_token_ids, pieces, strict=True)
        ]
        self.logprobs += new
        if out.top_logprobs is not None:
            # The chosen token among them shows as its own piece (at the start of the
            # text, without the leading space), the others as they read mid-text.
            new_tops = out.top_logprobs[len(self.tops) :]
            for token, piece, top in zip(out.delta_token_ids, pieces, new_tops, strict=True):
                alternatives = []
                for t, lp in top.items():
                    text = piece if t == token else token_text(tokenizer, t)
                    alternatives.append((text, lp, own_bytes(tokenizer, t, text)))
                self.tops.append(alternatives)
        return pieces, new

    def top(self, pieces: list[str]) -> list[list[Alternative]]:
        """The alternatives of the last ``len(pieces)`` tokens."""
        return self.tops[len(self.tops) - len(pieces) :] if pieces else []

    def raw_of(self, pieces: list[str]) -> list[bytes]:
        """The own bytes of the last ``len(pieces)`` tokens."""
        return self.raw[len(self.raw) - len(pieces) :] if pieces else []


def token_text(tokenizer: Tokenizer, token_id: int) -> str:
    """A token's text where it stands mid-text, as OpenAI lists alternatives: a
    sentencepiece word piece with its leading space, a lone byte as U+FFFD."""
    raw = tokenizer.token_bytes(token_id)
    if raw is None:  # "▁word": decode drops the space it shows mid-text
        return " " + tokenizer.decode([token_id])
    return raw.decode("utf-8", errors="replace")


def own_bytes(tokenizer: Tokenizer, token_id: int, text: str) -> bytes:
    """OpenAI's ``bytes`` of a token: the bytes it stands for, so that a character split
    across tokens shows as its parts, each token with its own (its text there shows
    nothing until the character is whole); a sentencepiece word piece, whose leading
    space depends on where it stands, as ``text``, its text where it stands."""
    raw = tokenizer.token_bytes(token_id)
    return text.encode() if raw is None else raw


def completion_logprobs(
    pieces: list[str], logprobs: list[float], tops: list[list[Alternative]], offset: int
) -> dict[str, Any]:
    """OpenAI's completions shape; ``tops`` (one list per token, or none at all) become
    its top_logprobs: each token's alternatives, with the chosen token among them."""
    offsets = []
    for piece in pieces:
        offsets.append(offset)
        offset += len(piece)
    top_logprobs = None
    if tops:
        top_logprobs = [
            {**{text: alp for text, alp, _ in alts}, piece: lp}
            for piece, lp, alts in zip(pieces, logprobs, tops, strict=True)
        ]
    return {
        "tokens": pieces,
        "token_logprobs": logprobs,
        "top_logprobs": top_logprobs,
        "text_offset": offsets,
    }


def chat_logprobs(
    pieces: list[str], raw: list[bytes], logprobs: list[float], tops: list[list[Alternative]]
) -> dict[str, Any]:
    """OpenAI's chat shape: per token its text, log-prob and own bytes (``raw``), and
    ``tops`` (one list per token, or none at all) as its top_logprobs."""

    def entry(text: str, lp: float, own: bytes) -> dict[str, Any]:
        return {"token": text, "logprob": lp, "bytes": list(own)}

    alternatives = tops or [[] for _ in pieces]
    return {
        "content": [
            {**entry(p, lp, own), "top_logprobs": [entry(*alt) for alt in alts]}
            for p, own, lp, alts in zip(pieces, raw, logprobs, alternatives, strict=True)
        ]
    }


def usage_of(choices: list[Choice]) -> dict[str, int]:
    prompts = {c.prompt_index: c.prompt_tokens for c in choices}
    done = sum(len(c.out.token_ids) for c in choices if c.out is not None)
    return {
        "prompt_tokens": sum(prompts.values()),
        "completion_tokens": done,
        "total_tokens": sum(prompts.values()) + done,
    }


def sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"
