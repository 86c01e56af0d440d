"""`mpllama serve` over real HTTP on 127.0.0.1, queried with the real openai client (sync
and async): OpenAI's shapes; greedy text, streamed or not, equal to offline generate and
chat; n, seed, logprobs, echo, stop; 32 concurrent streams; every bad request answered
with OpenAI's status and error body while the server keeps serving; 429 with Retry-After
when the queue is full; a client that leaves mid-stream has its request aborted (seen in
/health and in the Prometheus metrics); two replicas both serve; and the command itself
prints its URL, answers, and stops on SIGTERM leaving no actor or placement group."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from helpers import PROMPTS, free_port, live_ray_objects, wait_for

openai = pytest.importorskip("openai")
pytest.importorskip("ray.serve")

from mpllama import LLM, SamplingParams  # noqa: E402
from mpllama.config import RunConfig, run_config_from_dict  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
KEY = "sk-test-key"
MODEL = "tiny2"  # the checkpoint folder's name
MAX_TOKENS = 6
SLOTS, QUEUED = 4, 28  # 32 sequences per replica at once, the 33rd gets 429
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
SEEDED = GREEDY.replace(temperature=0.8, top_p=0.9, seed=1234)
# Negative penalties: a random model repeats itself only when pushed to.
PENALISED = GREEDY.replace(presence_penalty=-2.0, frequency_penalty=-2.0)
BIASED = 100  # a token id logit_bias pushes to the top
DIALOG = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
]


def serve_config(ckpt: Path, **serve: Any) -> RunConfig:
    return run_config_from_dict(
        {
            "model": {"checkpoint_dir": str(ckpt)},
            "parallel": {"cpus_per_rank": 0.5, "backend": "gloo"},
            "runtime": {"device": "cpu", "max_batch_size": SLOTS, "max_seq_len": 64},
            # The sampling section supplies what requests leave out.
            "sampling": {"max_tokens": MAX_TOKENS, "ignore_eos": True},
            "serve": {"port": free_port(), "max_queued_requests": QUEUED, **serve},
        }
    )


def http(
    url: str, body: bytes | dict | None = None, key: str | None = KEY
) -> tuple[int, dict[str, str], Any]:
    """One raw request (for what the openai client cannot send): status, headers, JSON."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    request = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    request.add_header("Content-Type", "application/json")
    if key is not None:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return reply.status, dict(reply.headers), json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), json.loads(exc.read())


def metrics(name: str) -> dict[str, float]:
    """Ray's Prometheus export of one metric: {labels: value}, summed over suffixes."""
    import ray

    port = ray._private.worker.global_worker.node.metrics_export_port
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    out: dict[str, float] = {}
    pattern = re.compile(rf"^(?:ray_)?{name}(?:_total)?\{{(.*)\}} ([0-9.e+-]+)$")
    for line in text.splitlines():
        if m := pattern.match(line):
            out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(2))
    return out


def label(labels: str, key: str) -> str | None:
    m = re.search(rf'(?:^|,){key}="([^"]*)"', labels)
    return m.group(1) if m else None


# ------------------------------------------------------------------ without a server


def test_a_failure_mid_stream_ends_it_with_an_error_event_then_done() -> None:
    """When the engine gives up on a request (replay impossible), the stream, whose 200
    headers are already sent, ends with OpenAI's error body as an event."""
    from types import SimpleNamespace

    from mpllama.errors import WorkerError
    from mpllama.server import OpenAIServer

    choice = SimpleNamespace(index=0, out=SimpleNamespace(delta_text="x", finished=False))

    async def outputs():
        yield choice, [], []
        raise WorkerError("rank 1 died during run; the gang could not be rebuilt")

    async def collect() -> list[str]:
        events = OpenAIServer._events(
            None, outputs(), [], {"id": "cmpl-1"}, lambda c, p, lp, t: {"text": t}, False, False
        )
        return [e async for e in events]

    events = asyncio.run(collect())
    assert events[0] == 'data: {"id": "cmpl-1", "choices": [{"text": "x"}]}\n\n'
    error = json.loads(events[1].removeprefix("data: "))["error"]
    assert error["type"] == "server_error" and "could not be rebuilt" in error["message"]
    assert events[2:] == ["data: [DONE]\n\n"]


@pytest.mark.parametrize("kind", ["tiktoken", "sentencepiece"])
def test_chat_logprobs_give_each_token_its_own_bytes(kind: str) -> None:
    """OpenAI's ``bytes`` are each token's own: a character split across tokens shows as
    its parts (each token's text stays "" until the character is whole, so the texts
    still join to the answer), and so do alternatives that end partway through one. They
    were the bytes of the token's text: [] for each part, U+FFFD's for an alternative."""
    from mpllama.detokenize import IncrementalDecoder
    from mpllama.openai_api import Choice, chat_logprobs
    from mpllama.outputs import RequestOutput
    from mpllama.tokenizer import load_tokenizer

    if kind == "tiktoken":
        pytest.importorskip("llama_models")
        from mpllama.offline.fixtures import llama3_tokenizer_path

        tokenizer = load_tokenizer(llama3_tokenizer_path())
    else:
        tokenizer = load_tokenizer(REPO / "demo" / "model" / "tokenizer.model")  # byte fallback
    text = "a 🦙 llama"
    ids = tokenizer.encode(text, bos=False, eos=False)
    parts = [tokenizer.token_bytes(t) for t in ids]
    split = [i for i, raw in enumerate(parts) if raw and b"\xf0" in raw]  # its first byte
    assert split and parts[split[0] + 1] not in (None, b""), "the llama spans tokens"
    choice = Choice(0, 0, [], 0, SamplingParams(logprobs=True), IncrementalDecoder(tokenizer))
    alternative = ids[split[0]]  # a first part, offered beside every token
    tops = [{t: -0.5, alternative: -1.0} if t != alternative else {t: -0.5} for t in ids]
    out = RequestOutput(
        0, None, [], text, ids, [-0.5] * len(ids), "stop",
        delta_token_ids=ids, finished=True, top_logprobs=tops,
    )  # fmt: skip
    choice.add(out)
    content = chat_logprobs(choice.pieces, choice.raw, choice.logprobs, choice.tops)["content"]
    assert "".join(e["token"] for e in content) == tokenizer.decode(ids)
    assert b"".join(bytes(e["bytes"]) for e in content) == tokenizer.decode(ids).encode()
    for entry, token, raw in zip(content, ids, parts, strict=True):
        assert bytes(entry["bytes"]) == (entry["token"].encode() if raw is None else raw)
        offered = {a["logprob"]: bytes(a["bytes"]) for a in entry["top_logprobs"]}
        assert offered[-0.5] == bytes(entry["bytes"])
        if token != alternative:
            assert offered[-1.0] == parts[split[0]]


def test_serve_command_fails_fast_on_a_bad_checkpoint(tmp_path: Path, capsys) -> None:
    from mpllama.cli import main

    missing = tmp_path / "nowhere"
    started = time.monotonic()
    code = main(
        ["serve", str(REPO / "configs/serve/demo.yaml"), f"--set=model.checkpoint_dir={missing}"]
    )
    assert code == 1 and time.monotonic() - started < 10
    assert "mpllama serve: error:" in capsys.readouterr().err


def test_a_port_in_use_is_named_before_serve_starts(tiny_ckpt: Path, ray_runtime) -> None:
    from mpllama.deploy import Server
    from mpllama.errors import ConfigError

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        config = serve_config(tiny_ckpt, port=taken.getsockname()[1])
        with pytest.raises(ConfigError, match="in use"):
            Server(config).start()
    from ray import serve

    assert not serve.status().applications and not serve.status().proxies


# ------------------------------------------------------------------ the command


def test_serve_command_prints_its_url_answers_and_stops_cleanly_on_sigterm(
    tiny_ckpt: Path, ray_runtime, tmp_path: Path
) -> None:
    """Runs first, before this module starts Serve on the shared runtime itself."""
    import os

    before_actors, before_pgs = live_ray_objects()
    port = free_port()
    env = {**os.environ, "RAY_ADDRESS": ray_runtime.get_runtime_context().gcs_address}
    env.pop("MPLLAMA_API_KEY", None)
    cmd = [
        sys.executable,
        "-m",
        "mpllama.cli",
        "serve",
        str(REPO / "configs/serve/demo.yaml"),
        f"--set=model.checkpoint_dir={tiny_ckpt}",
        f"--set=serve.port={port}",
        "--set=parallel.model_parallel_size=1",
        "--set=parallel.cpus_per_rank=0.5",
        "--set=runtime.max_seq_len=64",
    ]
    child = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(child.stdout), daemon=True)
    reader.start()
    try:
        assert wait_for(lambda: any("ready at" in x for x in lines), 150, 0.5), "".join(lines)
        url = re.search(r"ready at (\S+)", next(x for x in lines if "ready at" in x)).group(1)
        assert url == f"http://127.0.0.1:{port}/v1"
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
        reply = client.completions.create(model="tiny2", prompt="Hello", max_tokens=3)
        assert reply.model == "tiny2" and reply.usage.completion_tokens <= 3

        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=60) == 0, "".join(lines[-40:])
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        reader.join(timeout=10)
    output = "".join(lines)
    assert "mpllama serve: stopped" in output, output[-3000:]
    # The replica, its gang's rank, its placement group, Serve's controller and proxy: gone.
    assert wait_for(
        lambda: live_ray_objects()[0] <= before_actors and live_ray_objects()[1] <= before_pgs,
        30,
    ), (live_ray_objects(), before_actors, before_pgs)


# ------------------------------------------------------------------ one replica, MP 2


@pytest.fixture(scope="module")
def offline(tiny_ckpt: Path, ray_runtime) -> dict[str, Any]:
    """What LLM.generate and LLM.chat give, computed before the server starts."""
    settings = {"cpus_per_rank": 0.5, "max_seq_len": 64, "max_batch_size": SLOTS}
    with LLM(tiny_ckpt, **settings) as llm:
        return {
            "greedy": llm.generate(PROMPTS, GREEDY.replace(logprobs=True)),
            "stop": llm.generate(PROMPTS[2], GREEDY.replace(stop=("J",)))[0],
            "seeded": [llm.generate(PROMPTS[1], SEEDED.replace(seed=s))[0] for s in (1234, 1235)],
            "chat": llm.chat(DIALOG, GREEDY)[0],
            "long": llm.generate(PROMPTS[0], GREEDY.replace(max_tokens=40))[0],
            "ids": llm.tokenizer.encode(PROMPTS[0], bos=True, eos=False),
            "biased": llm.generate(PROMPTS[0], GREEDY.replace(logit_bias={BIASED: 100}))[0],
            "penalised": llm.generate(PROMPTS[0], PENALISED.replace(logprobs=True))[0],
            "repeating": llm.generate(PROMPTS[1], GREEDY.replace(repetition_penalty=0.5))[0],
        }


class TestOneReplica:
    @pytest.fixture(scope="class")
    def server(self, tiny_ckpt: Path, offline, ray_runtime):
        from mpllama.deploy import Server

        with Server(serve_config(tiny_ckpt, api_key=KEY)) as server:
            yield server

    @pytest.fixture(scope="class")
    def client(self, server):
        return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)

    def health(self, server) -> dict[str, Any]:
        return http(f"{server.url}/health", key=None)[2]

    def test_a_second_server_refuses_and_leaves_the_first_running(
        self, server, tiny_ckpt: Path
    ) -> None:
        from mpllama.deploy import Server
        from mpllama.errors import MpllamaError

        with pytest.raises(MpllamaError, match="already runs"):
            Server(serve_config(tiny_ckpt)).start()
        assert self.health(server)["status"] == "ok"

    def test_models_health_and_the_api_key(self, server, client) -> None:
        assert [m.id for m in client.models.list().data] == [MODEL]
        assert client.models.retrieve(MODEL).owned_by == "mpllama"
        health = self.health(server)
        assert {k: health[k] for k in ("status", "running", "waiting")} == {
            "status": "ok",
            "running": 0,
            "waiting": 0,
        }
        assert 0 <= health["kv_cache_usage"] <= 1 and 0 <= health["prefix_hit_rate"] <= 1
        for key in ("wrong", None):
            status, _, body = http(f"{server.url}/v1/models", key=key)
            assert status == 401 and body["error"]["code"] == "invalid_api_key"
        wrong = openai.OpenAI(base_url=f"{server.url}/v1", api_key="sk-wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            wrong.completions.create(model=MODEL, prompt="x")

    def test_completions_equal_offline_generate(self, client, offline) -> None:
        greedy = offline["greedy"]
        reply = client.completions.create(model=MODEL, prompt=PROMPTS, temperature=0)
        assert reply.object == "text_completion" and reply.model == MODEL
        assert reply.id.startswith("cmpl-") and reply.created > 0
        assert [c.index for c in reply.choices] == [0, 1, 2, 3]
        assert [c.text for c in reply.choices] == [o.text for o in greedy]
        assert {c.finish_reason for c in reply.choices} == {"length"}
        assert reply.usage.prompt_tokens == sum(len(o.prompt_token_ids) for o in greedy)
        assert reply.usage.completion_tokens == 4 * MAX_TOKENS
        assert reply.usage.total_tokens == reply.usage.prompt_tokens + 4 * MAX_TOKENS

        stream = client.completions.create(
            model=MODEL,
            prompt=PROMPTS[1],
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
        assert "".join(c.choices[0].text for c in chunks if c.choices) == greedy[1].text
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == MAX_TOKENS

        by_ids = client.completions.create(model=MODEL, prompt=offline["ids"], temperature=0)
        assert by_ids.choices[0].text == greedy[0].text
        echoed = client.completions.create(model=MODEL, prompt=PROMPTS[0], temperature=0, echo=True)
        assert echoed.choices[0].text == PROMPTS[0] + greedy[0].text
        stopped = client.completions.create(model=MODEL, prompt=PROMPTS[2], temperature=0, stop="J")
        assert stopped.choices[0].text == offline["stop"].text
        assert stopped.choices[0].finish_reason == offline["stop"].finish_reason == "stop"

        scored = client.completions.create(
            model=MODEL, prompt=PROMPTS[3], temperature=0, logprobs=1
        )
        lp = scored.choices[0].logprobs
        assert lp.token_logprobs == pytest.approx(greedy[3].logprobs, abs=1e-5)
        assert len(lp.tokens) == len(lp.top_logprobs) == len(lp.text_offset) == MAX_TOKENS
        assert lp.text_offset[0] == 0 and "".join(lp.tokens) == greedy[3].text

    def test_chat_equals_offline_chat_streamed_or_not(self, server, offline) -> None:
        async def run() -> None:
            client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
            reply = await client.chat.completions.create(
                model=MODEL, messages=DIALOG, temperature=0, logprobs=True, top_logprobs=1
            )
            choice = reply.choices[0]
            assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")
            assert choice.message.role == "assistant"
            assert choice.message.content == offline["chat"].text
            assert choice.finish_reason == "length" and len(choice.logprobs.content) == MAX_TOKENS
            assert reply.usage.prompt_tokens == len(offline["chat"].prompt_token_ids)

            stream = await client.chat.completions.create(
                model=MODEL, messages=DIALOG, temperature=0, stream=True
            )
            chunks = [c async for c in stream]
            assert chunks[0].choices[0].delta.role == "assistant"
            assert {c.object for c in chunks} == {"chat.completion.chunk"}
            text = "".join(c.choices[0].delta.content or "" for c in chunks)
            assert text == offline["chat"].text
            assert chunks[-1].choices[0].finish_reason == "length"
            await client.close()

        asyncio.run(run())

    def test_nulls_an_answer_sent_back_as_parsed_and_the_developer_role(
        self, client, offline
    ) -> None:
        """The openai client sends null for a None it is given (n=None): the default
        holds, as OpenAI's reference has it (400 before); an answer sent back as the
        client parsed it (``message.model_dump()``: refusal, audio, ... all null) is a
        turn (400 before); "developer" is the system's role. Unknown fields stay errors."""
        reply = client.chat.completions.create(
            model=MODEL, messages=DIALOG, temperature=0, n=None, stream=None, logprobs=None
        )
        assert reply.choices[0].message.content == offline["chat"].text
        completion = client.completions.create(
            model=MODEL, prompt=PROMPTS[0], temperature=0, n=None, echo=None, max_tokens=None
        )
        assert completion.choices[0].text == offline["greedy"][0].text
        developer = [{"role": "developer", "content": DIALOG[0]["content"]}, DIALOG[1]]
        again = client.chat.completions.create(model=MODEL, messages=developer, temperature=0)
        assert again.choices[0].message.content == offline["chat"].text
        sent_back = reply.choices[0].message.model_dump()
        assert "refusal" in sent_back and sent_back["refusal"] is None
        turn = [DIALOG[1], sent_back, {"role": "user", "content": "Go on"}]
        later = client.chat.completions.create(model=MODEL, messages=turn, temperature=0)
        assert later.choices[0].finish_reason == "length"
        with pytest.raises(openai.BadRequestError, match="bogus"):
            client.chat.completions.create(model=MODEL, messages=DIALOG, extra_body={"bogus": None})

    def test_n_choices_each_with_its_own_seed(self, client, offline) -> None:
        kwargs = {"model": MODEL, "prompt": PROMPTS[1], "temperature": 0.8, "top_p": 0.9}
        reply = client.completions.create(**kwargs, n=2, seed=1234)
        assert [c.text for c in reply.choices] == [o.text for o in offline["seeded"]]
        again = client.completions.create(**kwargs, n=2, seed=1234)
        assert [c.text for c in again.choices] == [c.text for c in reply.choices]
        # top_k and ignore_eos are extra fields: top_k=1 is greedy.
        extra = client.completions.create(**kwargs, extra_body={"top_k": 1, "ignore_eos": True})
        assert extra.choices[0].text == offline["greedy"][1].text

    def test_32_concurrent_streams_each_add_up_to_their_text(self, server, offline) -> None:
        async def one(client: Any, i: int) -> tuple[int, str, str | None]:
            stream = await client.completions.create(
                model=MODEL, prompt=PROMPTS[i % 4], temperature=0, stream=True
            )
            pieces, reason = [], None
            async for chunk in stream:
                pieces.append(chunk.choices[0].text)
                reason = chunk.choices[0].finish_reason or reason
            return i, "".join(pieces), reason

        async def run() -> list[tuple[int, str, str | None]]:
            client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
            try:
                return await asyncio.gather(*(one(client, i) for i in range(32)))
            finally:
                await client.close()

        for i, text, reason in asyncio.run(run()):
            assert text == offline["greedy"][i % 4].text and reason == "length"

    def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(
        self, server, client
    ) -> None:
        url = f"{server.url}/v1"
        base = {"model": MODEL, "prompt": "Hello"}
        chat = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]}
        cases = [
            ("/completions", b'{"model": "tiny2", "prompt": ', 400),  # malformed JSON
            ("/completions", {**base, "max_tokens": "5"}, 400),  # wrong type
            ("/completions", {**base, "temperature": 2.5}, 400),  # out of range
            ("/completions", {**base, "n": 0}, 400),
            ("/completions", {**base, "best_of": 2}, 400),  # unknown field
            ("/chat/completions", {**chat, "prompt": "x"}, 400),  # a field of the other route
            ("/completions", {**base, "max_tokens": 60, "prompt": "Hello " * 8}, 400),
            ("/chat/completions", {**chat, "messages": []}, 400),
            (
                "/chat/completions",
                {**chat, "messages": [{"role": "user", "content": "[INST]"}]},
                400,
            ),
            (
                "/chat/completions",
                {**chat, "messages": [{"role": "user", "content": "<<SYS>>"}]},
                400,
            ),
            ("/completions", {**base, "model": "gpt-4"}, 404),
            ("/completions", {**base, "stop_token_ids": [-1]}, 400),
            ("/completions", {**base, "stop_token_ids": ["5"]}, 400),
            ("/completions", {**base, "presence_penalty": 2.5}, 400),
            ("/completions", {**base, "frequency_penalty": "1"}, 400),
            ("/chat/completions", {**chat, "repetition_penalty": 0}, 400),
            ("/completions", {**base, "logit_bias": {"a": 1}}, 400),
            ("/completions", {**base, "logit_bias": {"5": 101}}, 400),
            ("/chat/completions", {**chat, "logit_bias": {"99999": 1}}, 400),  # past the vocab
            ("/completions", {**base, "min_tokens": -1}, 400),
            ("/completions", {**base, "min_tokens": 9, "max_tokens": 4}, 400),
            # A tool's turn needs a Llama 3 model: the Llama 2 format has no tool role.
            ("/chat/completions", {**chat, "messages": [{"role": "tool", "content": "x"}]}, 400),
        ]
        for path, body, status in cases:
            got, _, reply = http(url + path, body)
            assert got == status, (path, body, reply)
            assert set(reply["error"]) == {"message", "type", "param", "code"}, reply
            assert reply["error"]["message"]
        image = {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}
        looking = [{"role": "user", "content": [{"type": "text", "text": "What is it?"}, image]}]
        got, _, reply = http(url + "/chat/completions", {**chat, "messages": looking})
        assert got == 400 and "type 'image_url' are not supported" in reply["error"]["message"]
        assert http(url + "/completions", base, key=None)[0] == 401
        assert http(url + "/completions", base, key="sk-nope")[0] == 401
        # The openai client sees the same statuses as its own exception types.
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="gpt-4", messages=chat["messages"])
        with pytest.raises(openai.BadRequestError, match="context"):
            client.completions.create(model=MODEL, prompt="Hello " * 8, max_tokens=60)
        with pytest.raises(openai.BadRequestError, match="INST"):
            client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "a [INST] b"}]
            )
        assert client.completions.create(**base).choices[0].finish_reason == "length"
        with pytest.raises(openai.BadRequestError, match="no 'tool' role"):
            client.chat.completions.create(
                model=MODEL, messages=[{"role": "tool", "content": "x", "tool_call_id": "1"}]
            )

    def test_stop_token_ids_end_completions_and_chats(self, client, offline, tiny_ckpt) -> None:
        from mpllama.tokenizer import load_tokenizer

        tok = load_tokenizer(tiny_ckpt / "tokenizer.model")
        for out, ask in [
            (offline["greedy"][1], lambda **kw: client.completions.create(prompt=PROMPTS[1], **kw)),
            (offline["chat"], lambda **kw: client.chat.completions.create(messages=DIALOG, **kw)),
        ]:
            cut = next(i for i in range(1, MAX_TOKENS) if out.token_ids[i] not in out.token_ids[:i])
            reply = ask(
                model=MODEL, temperature=0, extra_body={"stop_token_ids": [out.token_ids[cut]]}
            )
            choice = reply.choices[0]
            text = choice.text if reply.object == "text_completion" else choice.message.content
            assert choice.finish_reason == "stop"  # with ignore_eos (the serve YAML's) too
            assert text == tok.decode(out.token_ids[:cut]) and reply.usage.completion_tokens == cut

    def test_penalties_logit_bias_and_min_tokens(self, client, offline) -> None:
        """The Python API's penalties and logit_bias, the same over HTTP; log-probs stay
        the raw model's (the runner's tests check the adjusted distribution itself)."""
        biased = offline["biased"]
        assert biased.token_ids == [BIASED] * MAX_TOKENS
        reply = client.completions.create(
            model=MODEL, prompt=PROMPTS[0], temperature=0, logit_bias={str(BIASED): 100}
        )
        assert reply.choices[0].text == biased.text
        chat = client.chat.completions.create(
            model=MODEL, messages=DIALOG, temperature=0, logit_bias={str(BIASED): 100}
        )
        assert chat.choices[0].message.content == biased.text
        assert chat.usage.completion_tokens == MAX_TOKENS

        penalised = offline["penalised"]
        assert penalised.token_ids != offline["greedy"][0].token_ids
        scored = client.completions.create(
            model=MODEL,
            prompt=PROMPTS[0],
            temperature=0,
            presence_penalty=-2.0,
            frequency_penalty=-2,
            logprobs=1,
            extra_body={"min_tokens": 2},
        )
        assert scored.choices[0].text == penalised.text
        lps = scored.choices[0].logprobs.token_logprobs
        assert lps == pytest.approx(penalised.logprobs, abs=1e-5)
        repeating = offline["repeating"]
        assert repeating.token_ids != offline["greedy"][1].token_ids
        again = client.completions.create(
            model=MODEL, prompt=PROMPTS[1], temperature=0, extra_body={"repetition_penalty": 0.5}
        )
        assert again.choices[0].text == repeating.text

    def test_structured_outputs_on_a_sentencepiece_model(self, client) -> None:
        """The Llama 2 kind over HTTP (test_server_guided.py serves Llama 3): a schema's
        answer validates; tools are refused, its chat format has no tool turns."""
        jsonschema = pytest.importorskip("jsonschema")
        schema = {
            "type": "object",
            "properties": {"a": {"enum": ["x", "yz"]}, "n": {"type": "integer", "maximum": 99}},
            "required": ["a", "n"],
            "additionalProperties": False,
        }
        fmt = {"type": "json_schema", "json_schema": {"name": "t", "schema": schema}}
        hi = [{"role": "user", "content": "Hi"}]  # the context is 64 tokens
        reply = client.chat.completions.create(
            model=MODEL, messages=hi, response_format=fmt, max_tokens=40, n=2, seed=4
        )
        for choice in reply.choices:
            assert choice.finish_reason == "stop"
            jsonschema.validate(json.loads(choice.message.content), schema)
        tools = [{"type": "function", "function": {"name": "f"}}]
        with pytest.raises(openai.BadRequestError, match="Llama 3.1"):
            client.chat.completions.create(model=MODEL, messages=DIALOG, tools=tools)

    def test_top_logprobs_in_openai_shapes(self, client, offline) -> None:
        greedy = offline["greedy"][3]
        scored = client.completions.create(
            model=MODEL, prompt=PROMPTS[3], temperature=0, logprobs=3
        )
        lp = scored.choices[0].logprobs
        assert lp.token_logprobs == pytest.approx(greedy.logprobs, abs=1e-5)
        for piece, chosen, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
            assert 3 <= len(top) <= 4 and top[piece] == chosen
            assert max(top.values()) == pytest.approx(chosen)  # greedy: the most likely
        chat = client.chat.completions.create(
            model=MODEL, messages=DIALOG, temperature=0, logprobs=True, top_logprobs=4
        )
        for item in chat.choices[0].logprobs.content:
            values = [t.logprob for t in item.top_logprobs]
            assert len(values) == 4 and values == sorted(values, reverse=True)
            assert values[0] == pytest.approx(item.logprob)
            assert item.top_logprobs[0].token == item.token
            # A token's own bytes: its text's (after the U+FFFD of an earlier token's
            # unfinished character, shown with it), or one byte of a character.
            for t in item.top_logprobs:
                own = bytes(t.bytes)
                assert own == t.token.lstrip("\ufffd").encode() or (len(own) == 1 and own[0] > 127)
        with pytest.raises(openai.BadRequestError, match="top_logprobs needs logprobs"):
            client.chat.completions.create(model=MODEL, messages=DIALOG, top_logprobs=2)

    def test_a_full_queue_answers_429_and_a_client_that_leaves_frees_its_slot(
        self, server, client
    ) -> None:
        holder = client.completions.create(
            model=MODEL, prompt="a", temperature=0, max_tokens=60, stream=True
        )
        assert next(iter(holder)).choices[0].index == 0
        # One sequence runs; 32 more would overfill the replica's 4 slots + 28 queued.
        with pytest.raises(openai.RateLimitError) as excinfo:
            client.completions.create(model=MODEL, prompt="b", n=32)
        assert excinfo.value.response.headers["retry-after"] == "1"
        assert excinfo.value.body["code"] == "rate_limit_exceeded"
        assert self.health(server)["running"] == 1
        holder.close()  # the client goes away mid-stream
        assert wait_for(
            lambda: (lambda h: (h["running"], h["waiting"]) == (0, 0))(self.health(server)), 10
        )
        assert client.completions.create(model=MODEL, prompt="b", n=32, max_tokens=1)

    def test_a_rank_killed_mid_stream_is_rebuilt_in_the_replicas_own_bundles(
        self, server, client, offline
    ) -> None:
        import os

        from ray._private import state

        pgs = live_ray_objects()[1]
        ranks = [
            v["Pid"]
            for v in state.actors().values()
            if v["ActorClassName"] == "RankActor" and v["State"] == "ALIVE"
        ]
        assert len(ranks) == 2  # MP 2: the replica's gang
        stream = client.completions.create(
            model=MODEL, prompt=PROMPTS[0], temperature=0, max_tokens=40, stream=True
        )
        chunks = iter(stream)
        pieces = [next(chunks).choices[0].text]
        os.kill(ranks[-1], signal.SIGKILL)
        pieces += [c.choices[0].text for c in chunks]
        assert "".join(pieces) == offline["long"].text
        now = [
            v["Pid"]
            for v in state.actors().values()
            if v["ActorClassName"] == "RankActor" and v["State"] == "ALIVE"
        ]
        assert len(now) == 2 and not set(now) & set(ranks)  # a new gang
        # Rebuilt inside the placement group Serve reserved: no group was added or lost.
        assert live_ray_objects()[1] == pgs
        assert client.completions.create(model=MODEL, prompt="a", temperature=0).choices

    def test_metrics_count_tokens_and_the_aborted_request(self, server) -> None:
        def exported() -> bool:
            finished = metrics("mpllama_requests_finished")
            aborts = sum(v for k, v in finished.items() if label(k, "finish_reason") == "abort")
            lengths = sum(v for k, v in finished.items() if label(k, "finish_reason") == "length")
            tokens = sum(metrics("mpllama_generated_tokens").values())
            return aborts >= 1 and lengths >= 32 and tokens >= 32 * MAX_TOKENS

        assert wait_for(exported, 40, 1.0), metrics("mpllama_requests_finished")
        assert metrics("mpllama_time_to_first_token_seconds_count")
        assert metrics("mpllama_inter_token_latency_seconds_count")
        assert metrics("mpllama_requests_running") and metrics("mpllama_requests_waiting")
        assert metrics("mpllama_kv_cache_usage") and metrics("mpllama_prefix_cache_hit_rate")
        # Serve's own metrics sit beside them.
        assert metrics("serve_num_http_requests")


# ------------------------------------------------------------------ two replicas


def test_two_replicas_each_mp1_both_receive_traffic(tiny_ckpt: Path, ray_runtime) -> None:
    from mpllama.deploy import Server

    old = {label(k, "replica") for k in metrics("mpllama_generated_tokens")}  # earlier servers
    config = serve_config(tiny_ckpt, replicas=2)
    config = dataclasses.replace(
        config, parallel=dataclasses.replace(config.parallel, model_parallel_size=1)
    )
    with Server(config) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)

        async def burst() -> None:
            aclient = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)
            await asyncio.gather(
                *(
                    aclient.completions.create(model=MODEL, prompt=p, max_tokens=2)
                    for p in PROMPTS * 4
                )
            )
            await aclient.close()

        asyncio.run(burst())
        assert client.models.list().data[0].id == MODEL

        def both_served() -> bool:
            tokens = metrics("mpllama_generated_tokens")
            served = {label(k, "replica") for k, v in tokens.items() if v > 0} - old
            return len(served) >= 2

        assert wait_for(both_served, 40, 1.0), metrics("mpllama_generated_tokens")
