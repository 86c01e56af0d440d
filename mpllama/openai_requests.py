"""From an OpenAI request body to the choices the engine runs: the checks that answer a
bad request with a 400 before anything runs, the ``SamplingParams`` a body asks for
(the serve YAML's sampling section fills in what it leaves out), tool use, and a whole
chat choice's message. No Ray: ``server.py`` holds one per replica.
"""

# No `from __future__ import annotations`: kept as openai_api.py is (pydantic types).
from collections.abc import Callable
from typing import Any

from .config import SamplingParams
from .errors import PromptError
from .openai_api import ApiError, ChatRequest, Choice, SamplingBody
from .protocol import Request as EngineRequest
from .protocol import check_params, check_request
from .tokenizer import IncrementalDecoder, Tokenizer
from .tools import ToolUse, forced_call, parse_call, tool_use


class RequestBuilder:
    """One model's rules for turning bodies into choices."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        defaults: SamplingParams,
        max_seq_len: int,
        vocab_size: int,
        encode_prompt: Callable[[str, int], list[int]],
    ) -> None:
        self.tokenizer = tokenizer
        self.defaults = defaults
        self.max_seq_len = max_seq_len
        self.vocab_size = vocab_size
        self.encode_prompt = encode_prompt  # the offline API's prompt encoding

    @staticmethod
    def message(c: Choice, logprobs: dict[str, Any] | None) -> dict[str, Any]:
        """A whole chat choice: its text, or the tool call it is."""
        assert c.out is not None
        message: dict[str, Any] = {"role": "assistant", "content": c.out.text}
        finish = c.out.finish_reason
        call = None
        if c.tools is not None and c.tools.forced:  # a call, however far it got
            call = forced_call(c.out.text)
        elif c.tools is not None:
            call = parse_call(c.out.text, c.tools.names)
        if call is not None:
            message = {"role": "assistant", "content": None, "tool_calls": [call.openai()]}
            finish = "tool_calls" if finish == "stop" else finish
        return {"index": c.index, "message": message, "logprobs": logprobs, "finish_reason": finish}

    def tool_use(self, body: ChatRequest) -> ToolUse | None:
        tools = [t.model_dump(exclude_none=True) for t in body.tools or []]
        choice = body.tool_choice
        try:
            use = tool_use(
                tools,
                choice.model_dump()
                if choice is not None and not isinstance(choice, str)
                else choice,
            )
        except ValueError as exc:
            raise ApiError(400, str(exc), param="tool_choice") from None
        if use is not None and self.tokenizer.kind != "tiktoken":
            raise ApiError(
                400,
                "tool calling needs a Llama 3.1+ model (Meta's JSON tool format and the ipython "
                "role); this model's chat format is Llama 2's",
                param="tools",
            )
        return use

    @staticmethod
    def check_stream(body: SamplingBody) -> None:
        if body.stream_options is not None and not body.stream:
            raise ApiError(
                400, "stream_options is only allowed with stream: true", param="stream_options"
            )

    def params(self, body: SamplingBody, max_tokens: int | None, **fixed: Any) -> SamplingParams:
        given: dict[str, Any] = {
            name: value
            for name in (
                "temperature",
                "top_p",
                "seed",
                "ignore_eos",
                "presence_penalty",
                "frequency_penalty",
                "repetition_penalty",
                "min_tokens",
                "stop_token_ids",  # a list: SamplingParams makes it a tuple
                "logit_bias",  # "123" keys: SamplingParams takes them as ids
            )
            if (value := getattr(body, name)) is not None
        }
        if max_tokens is not None:
            given["max_tokens"] = max_tokens
        if body.top_k is not None:
            given["top_k"] = max(0, body.top_k)
        if body.stop is not None:
            given["stop"] = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop)
        try:
            guided = body.guided()
            if guided is not None and fixed.get("guided") is not None:
                raise ValueError(
                    "tool_choice required or a named function constrains the answer already: "
                    "leave out response_format and guided_*"
                )
            given["guided"] = fixed.pop("guided", None) or guided
            params = self.defaults.replace(**given, **fixed)
        except (ValueError, TypeError) as exc:
            raise ApiError(400, str(exc)) from None
        problem = check_params(params, self.vocab_size)
        if problem is not None:
            raise ApiError(400, problem)
        return params

    def encode(self, prompt: str | list[int], index: int) -> list[int]:
        if isinstance(prompt, str):
            try:
                return self.encode_prompt(prompt, index)
            except PromptError as exc:
                raise ApiError(400, str(exc), param="prompt") from None
        return list(prompt)

    def check_length(self, ids: list[int], params: SamplingParams, explicit: bool) -> None:
        problem = check_request(EngineRequest("", ids, params), self.max_seq_len, self.vocab_size)
        if problem is None and explicit and len(ids) + params.max_tokens > self.max_seq_len:
            problem = (
                f"this model's context is {self.max_seq_len} tokens, but the request asks for "
                f"{len(ids) + params.max_tokens} ({len(ids)} in the prompt, {params.max_tokens} "
                "to generate); shorten the prompt or lower max_tokens"
            )
        if problem is not None:
            too_long = len(ids) + (params.max_tokens if explicit else 1) > self.max_seq_len
            code = "context_length_exceeded" if too_long else None
            raise ApiError(400, problem, param="prompt", code=code)

    def choices(
        self, prompts: list[tuple[str | list[int], list[int]]], params: SamplingParams, n: int
    ) -> list[Choice]:
        """n choices per prompt, numbered prompt by prompt; choice j of a seeded request
        samples with seed + j, so n=1 samples exactly as the offline API with that seed."""
        choices = []
        for i, (prompt, ids) in enumerate(prompts):
            for j in range(n):
                p = (
                    params
                    if params.seed is None
                    else params.replace(seed=(params.seed + j) % 2**63)
                )
                decoder = IncrementalDecoder(self.tokenizer)
                choices.append(Choice(len(choices), i, prompt, len(ids), p, decoder))
        return choices
