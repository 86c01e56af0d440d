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
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .api import RequestOutput
from .config import SamplingParams
from .errors import PromptError
from .tokenizer import IncrementalDecoder

log = logging.getLogger(__name__)

MAX_STOP = 4  # stop strings per request, as OpenAI allows

# ------------------------------------------------------------------ request bodies


class Body(BaseModel):
    # Unknown fields and wrong JSON types are errors (400), never silently coerced.
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(Body):
    include_usage: bool = False


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
    frequency_penalty: float | None = None  # accepted at their no-op value 0 only
    presence_penalty: float | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, stop: str | list[str] | None) -> str | list[str] | None:
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > MAX_STOP or any(not s for s in stops):
            raise ValueError(f"give at most {MAX_STOP} non-empty stop strings")
        return stop

    @field_validator("frequency_penalty", "presence_penalty")
    @classmethod
    def _penalty(cls, value: float | None) -> float | None:
        if value:
            raise ValueError("penalties are not supported; leave them out or send 0")
        return value


class CompletionRequest(SamplingBody):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    # Only the chosen token's log-prob is computed: top_logprobs lists that token alone.
    logprobs: int | None = Field(None, ge=0, le=5)


class ContentPart(Body):
    type: Literal["text"]
    text: str


class ChatMessage(Body):
    # "tool" (a tool's result) needs a Llama 3 model: the Llama 2 format refuses it (400).
    role: Literal["system", "user", "assistant", "tool"]
    content: str | list[ContentPart]
    name: str | None = None  # accepted, unused
    tool_call_id: str | None = None  # accepted, unused (Llama 3's ipython turn has no id)

    @property
    def text(self) -> str:
        return (
            self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        )


class ChatRequest(SamplingBody):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)  # as for completions: the chosen one


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
    logprobs: list[float] = dataclasses.field(default_factory=list)

    def add(self, out: RequestOutput) -> tuple[list[str], list[float]]:
        """Take the next output; return its tokens' texts and log-probs (when asked for)."""
        self.out = out
        if out.logprobs is None:
            return [], []
        new = out.logprobs[len(self.logprobs) :]
        pieces = [self.decoder.add(t) for t in out.delta_token_ids]
        if out.finished and pieces:
            pieces[-1] += self.decoder.flush()
        self.pieces += pieces
        self.logprobs += new
        return pieces, new


def completion_logprobs(
    pieces: list[str], logprobs: list[float], top: int, offset: int
) -> dict[str, Any]:
    offsets = []
    for piece in pieces:
        offsets.append(offset)
        offset += len(piece)
    return {
        "tokens": pieces,
        "token_logprobs": logprobs,
        "top_logprobs": [{p: lp} for p, lp in zip(pieces, logprobs, strict=True)] if top else None,
        "text_offset": offsets,
    }


def chat_logprobs(pieces: list[str], logprobs: list[float], top: int) -> dict[str, Any]:
    def entry(piece: str, lp: float) -> dict[str, Any]:
        return {"token": piece, "logprob": lp, "bytes": list(piece.encode())}

    return {
        "content": [
            {**entry(p, lp), "top_logprobs": [entry(p, lp)] if top else []}
            for p, lp in zip(pieces, logprobs, strict=True)
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
