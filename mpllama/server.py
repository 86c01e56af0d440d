"""``mpllama serve``: an OpenAI-compatible HTTP server on Ray Serve.

One Serve replica owns one model-parallel gang: the deployment reserves one
placement-group bundle per rank, and the replica lends that group to its ``AsyncLLM``,
whose rank i runs in bundle i. Serve brings the HTTP proxy, the routing between replicas
and its own metrics; this module is the replica: the OpenAI routes (FastAPI), server-sent
events and the API key. ``openai_requests`` turns a body into checked choices (400s,
sampling, structured outputs, tool use), ``openai_api`` holds the API's shapes,
``capacity`` its backpressure (429 when its queue is full) and mpllama's metrics;
``deploy`` starts it all from the driver.

Requests run exactly as ``LLM.generate`` runs them (same prompt encoding, same sampling
defaults, same seeds), so greedy text over HTTP is the offline text. Prompts and
completions are never logged.
"""

# No `from __future__ import annotations`: FastAPI reads the route signatures of the Serve
# ingress class at run time, and Serve's wrapping loses this module's names.
import asyncio
import hmac
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import ray
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException

from .api import RequestOutput
from .async_llm import AsyncLLM
from .capacity import Load, Metrics, Ticket
from .config import RunConfig
from .errors import PromptError
from .openai_api import (
    ApiError,
    ChatRequest,
    Choice,
    CompletionRequest,
    SamplingBody,
    api_error,
    chat_logprobs,
    completion_logprobs,
    parse_body,
    sse,
    usage_of,
)
from .openai_requests import RequestBuilder
from .tools import dialog_of

log = logging.getLogger(__name__)


app = FastAPI(title="mpllama", docs_url=None, redoc_url=None, openapi_url=None)


@app.exception_handler(ApiError)
async def _on_api_error(request: Request, exc: ApiError) -> JSONResponse:
    return exc.response()


@app.exception_handler(RequestValidationError)
async def _on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return ApiError(400, f"invalid request: {exc.errors()[:1]}").response()


@app.exception_handler(HTTPException)
async def _on_http_error(request: Request, exc: HTTPException) -> JSONResponse:
    # Unknown routes and methods: FastAPI's own 404/405, in OpenAI's shape.
    return ApiError(exc.status_code, str(exc.detail)).response()


# ------------------------------------------------------------------ the deployment


@serve.ingress(app)
class OpenAIServer:
    """One Serve replica: an ``AsyncLLM`` whose gang runs in the replica's placement group
    (one bundle per rank), behind the OpenAI routes."""

    def __init__(self, config: RunConfig, model_name: str, api_key: str | None) -> None:
        # The replica's own group, one bundle per rank: Serve reserved the ranks with it.
        self.llm = AsyncLLM(config=config, placement_group=ray.util.get_current_placement_group())
        self.tokenizer = self.llm.tokenizer
        self.model_name = model_name
        self._key = api_key.encode() if api_key else None
        self.build = RequestBuilder(
            self.tokenizer,
            config.sampling,
            config.runtime.max_seq_len,
            self.llm.llm.args.vocab_size,
            self.llm.llm.prompts.encode,
        )
        self.created = int(time.time())
        self.metrics = Metrics()
        self.load = Load(
            config.runtime.max_batch_size, config.serve.max_queued_requests, self.metrics
        )
        log.info("replica up: model %r, %d rank(s)", model_name, self.llm.llm.world_size)

    def __del__(self) -> None:  # Serve calls it when the replica stops
        llm = getattr(self, "llm", None)
        if llm is not None:
            llm.close()

    # ------------------------------------------------------------------ routes

    @app.get("/health")
    async def health(self) -> dict[str, Any]:
        running, waiting = self.llm.counts()  # the lead's scheduler, at its last step
        cache = self.llm.cache_stats()
        return {
            "status": "ok",
            "running": running,
            "waiting": waiting,
            "kv_cache_usage": cache["kv_cache_usage"],
            "prefix_hit_rate": cache["prefix_hit_rate"],
        }

    @app.get("/v1/models")
    async def models(self, request: Request) -> dict[str, Any]:
        self._authorize(request)
        return {"object": "list", "data": [self._card()]}

    @app.get("/v1/models/{model:path}")
    async def model(self, model: str, request: Request) -> dict[str, Any]:
        self._authorize(request)
        self._check_model(model)
        return self._card()

    @app.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        self._authorize(request)
        body: CompletionRequest = parse_body(
            CompletionRequest, await request.body(), "/v1/completions"
        )
        self._check_model(body.model)
        self.build.check_stream(body)
        if body.echo and body.logprobs is not None:
            raise ApiError(
                400,
                "echo with logprobs is not supported (prompt log-probs are not computed)",
                param="echo",
            )
        params = self.build.params(
            body,
            body.max_tokens,
            logprobs=body.logprobs is not None,
            top_logprobs=body.logprobs or 0,
            echo=body.echo,
        )
        prompts = body.prompt
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        if not prompts:
            raise ApiError(400, "prompt is empty", param="prompt")
        encoded = [self.build.encode(p, i) for i, p in enumerate(prompts)]
        for ids in encoded:
            self.build.check_length(ids, params, body.max_tokens is not None)
        choices = self.build.choices(list(zip(prompts, encoded, strict=True)), params, body.n)

        def render(
            c: Choice, pieces: list[str], logprobs: list[float], text: str
        ) -> dict[str, Any]:
            offset = len(c.out.text) - len(text) if c.out is not None else 0
            return {
                "index": c.index,
                "text": text,
                "logprobs": completion_logprobs(pieces, logprobs, c.top(pieces), offset)
                if c.params.logprobs
                else None,
                "finish_reason": c.out.finish_reason if c.out is not None else None,
            }

        return await self._answer(body, choices, render, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(self, request: Request) -> Response:
        self._authorize(request)
        body: ChatRequest = parse_body(ChatRequest, await request.body(), "/v1/chat/completions")
        self._check_model(body.model)
        self.build.check_stream(body)
        if not body.messages:
            raise ApiError(
                400, "messages is empty; send at least one user message", param="messages"
            )
        use = self.build.tool_use(body)
        try:
            dialog = dialog_of([m.plain() for m in body.messages], use.tools if use else None)
            ids = self.tokenizer.encode_dialog(dialog)  # type: ignore[arg-type]
        except (PromptError, ValueError) as exc:
            raise ApiError(400, str(exc), param="messages") from None
        if body.top_logprobs and not body.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        max_tokens = body.max_completion_tokens or body.max_tokens
        params = self.build.params(
            body,
            max_tokens,
            logprobs=body.logprobs,
            top_logprobs=body.top_logprobs or 0,
            echo=False,
            guided=use.guided if use else None,
        )
        self.build.check_length(ids, params, max_tokens is not None)
        choices = self.build.choices([(ids, ids)], params, body.n)
        for c in choices:
            c.tools = use.stream() if use else None

        def render(
            c: Choice, pieces: list[str], logprobs: list[float], text: str
        ) -> dict[str, Any]:
            finished = c.out is not None and c.out.finished
            if c.tools is not None:
                delta = c.tools.delta(text, finished) or {}
            else:
                delta = {"content": text} if text else {}
            finish = c.out.finish_reason if c.out is not None else None
            return {
                "index": c.index,
                "delta": delta,
                "logprobs": chat_logprobs(pieces, c.raw_of(pieces), logprobs, c.top(pieces))
                if c.params.logprobs
                else None,
                "finish_reason": "tool_calls"
                if finish == "stop" and c.tools is not None and c.tools.made_call
                else finish,
            }

        return await self._answer(body, choices, render, chat=True)

    # ------------------------------------------------------------------ answering

    async def _answer(
        self,
        body: SamplingBody,
        choices: list[Choice],
        render: Callable[[Choice, list[str], list[float], str], dict[str, Any]],
        chat: bool,
    ) -> Response:
        """Run the choices; one JSON body, or (``stream``) server-sent chunks."""
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        chunk = "chat.completion.chunk" if chat else "text_completion"
        head = {"id": rid, "object": chunk, "created": int(time.time()), "model": self.model_name}
        ticket = self.load.take(len(choices))
        outputs = self._run(rid, choices, ticket)
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            events = self._events(outputs, choices, head, render, chat, usage)
            return StreamingResponse(events, media_type="text/event-stream")
        try:
            async for _ in outputs:
                pass
        except Exception as exc:
            raise api_error(exc) from None
        finally:
            await outputs.aclose()  # also when the client left: aborts what still runs
        result = []
        for c in choices:
            assert c.out is not None
            if chat:
                item = self.build.message(c, render(c, c.pieces, c.logprobs, "")["logprobs"])
            else:
                item = render(c, c.pieces, c.logprobs, c.out.text)
            result.append(item)
        kind = "chat.completion" if chat else "text_completion"
        return JSONResponse({**head, "object": kind, "choices": result, "usage": usage_of(choices)})

    async def _events(
        self,
        outputs: AsyncIterator[tuple[Choice, list[str], list[float]]],
        choices: list[Choice],
        head: dict[str, Any],
        render: Callable[[Choice, list[str], list[float], str], dict[str, Any]],
        chat: bool,
        usage: bool,
    ) -> AsyncIterator[str]:
        """Server-sent events: a chunk per new piece of any choice, then [DONE]. A client
        that goes away cancels this generator, which aborts every unfinished choice."""
        extra = {"usage": None} if usage else {}
        if chat:
            for c in choices:
                start = {"index": c.index, "delta": {"role": "assistant", "content": ""}}
                yield sse(
                    {
                        **head,
                        "choices": [{**start, "logprobs": None, "finish_reason": None}],
                        **extra,
                    }
                )
        try:
            async for c, pieces, logprobs in outputs:
                assert c.out is not None
                if c.out.delta_text or pieces or c.out.finished:
                    yield sse(
                        {
                            **head,
                            "choices": [render(c, pieces, logprobs, c.out.delta_text)],
                            **extra,
                        }
                    )
        except Exception as exc:
            # Headers are sent: the failure travels as an event (the openai client raises it).
            yield sse(api_error(exc).body())
        else:
            if usage:
                yield sse({**head, "choices": [], "usage": usage_of(choices)})
        yield "data: [DONE]\n\n"

    async def _run(
        self, rid: str, choices: list[Choice], ticket: Ticket
    ) -> AsyncIterator[tuple[Choice, list[str], list[float]]]:
        """Run every choice at once; yield each one's outputs as they come. Closing this
        (a client that left) cancels the rest: AsyncLLM aborts them, freeing their slots."""
        arrived = time.monotonic()
        queue: asyncio.Queue[tuple[Choice, RequestOutput | BaseException]] = asyncio.Queue()

        async def pump(c: Choice) -> None:
            try:
                async for out in self.llm.generate(c.prompt, c.params, f"{rid}-{c.index}"):
                    queue.put_nowait((c, out))
            except Exception as exc:
                queue.put_nowait((c, exc))

        tasks = [asyncio.create_task(pump(c)) for c in choices]
        seen: dict[int, float] = {}  # choice index -> when its last token came
        left = {c.index for c in choices}
        try:
            while left:
                c, item = await queue.get()
                if isinstance(item, BaseException):
                    self.metrics.finished.inc(tags={"finish_reason": "error"})
                    left.discard(c.index)
                    ticket.give()
                    raise item
                now = time.monotonic()
                if item.delta_token_ids:
                    self.metrics.tokens.inc(len(item.delta_token_ids))
                    if c.index in seen:
                        gap = (now - seen[c.index]) / len(item.delta_token_ids)
                        for _ in item.delta_token_ids:
                            self.metrics.itl.observe(gap)
                    else:
                        self.metrics.ttft.observe(now - arrived)
                    seen[c.index] = now
                pieces, logprobs = c.add(item)
                if item.finished:
                    left.discard(c.index)
                    ticket.give()
                    self.metrics.finished.inc(tags={"finish_reason": item.finish_reason or "stop"})
                    cache = self.llm.cache_stats()
                    self.metrics.kv_usage.set(cache["kv_cache_usage"])
                    self.metrics.prefix_hit_rate.set(cache["prefix_hit_rate"])
                yield c, pieces, logprobs
        finally:
            for task in tasks:
                task.cancel()
            if left:
                self.metrics.finished.inc(len(left), tags={"finish_reason": "abort"})
            ticket.give(ticket.held)

    # ------------------------------------------------------------------ checks

    def _authorize(self, request: Request) -> None:
        if self._key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        # compare_digest: the time taken says nothing about how much of the key matched.
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self._key):
            raise ApiError(
                401,
                "missing or wrong API key; send the header 'Authorization: Bearer <key>'",
                code="invalid_api_key",
            )

    def _check_model(self, model: str) -> None:
        if model != self.model_name:
            raise ApiError(
                404,
                f"the model {model!r} does not exist; this server serves {self.model_name!r}",
                param="model",
                code="model_not_found",
            )

    def _card(self) -> dict[str, Any]:
        return {
            "id": self.model_name,
            "object": "model",
            "created": self.created,
            "owned_by": "mpllama",
        }
