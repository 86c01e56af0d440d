"""Llama 3's stop tokens, end to end: a Llama-3-shaped checkpoint (Meta's real tiktoken
tokenizer.model, vocab 128256) whose greedy first token is <|eot_id|> ends every request
at once with finish_reason "stop" and no text, in completion and in chat, through the
API (real Ray actors) and through the server (the real openai client); ignore_eos lets
it run on, and a request's own stop_token_ids still stop it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from helpers import openai_client

from mpllama import LLM, SamplingParams
from mpllama.model_args import ModelArgs
from mpllama.offline.fixtures import random_state
from mpllama.rank.weights import write_checkpoint

llama3_tokenizer = pytest.importorskip("llama_models.llama3.tokenizer")
LLAMA3_MODEL = Path(llama3_tokenizer.__file__).parent / "tokenizer.model"

EOT = 128009
ARGS = ModelArgs(
    dim=64,
    n_layers=1,
    n_heads=4,
    n_kv_heads=2,
    vocab_size=128256,
    multiple_of=16,
    norm_eps=1e-5,
    rope_theta=500000.0,
)
GREEDY = SamplingParams(temperature=0, max_tokens=5)
DIALOG = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Say <|eot_id|> please"},  # text, not the stop token
]
SETTINGS = {"cpus_per_rank": 0.5, "max_seq_len": 64, "max_batch_size": 2}


def eot_first_checkpoint(out: Path) -> Path:
    """Every position's hidden state is its token's embedding (wo and w2 zero, so the
    blocks add nothing), every embedding the same positive vector, and only the output
    row of <|eot_id|> non-zero: the logits are 0 but for <|eot_id|>'s, which is positive."""
    state = random_state(ARGS, seed=0)
    for key in state:
        if key.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
            state[key].zero_()
        elif key.endswith("norm.weight"):
            state[key].fill_(1.0)
    state["tok_embeddings.weight"][:] = torch.linspace(0.5, 1.5, ARGS.dim)
    state["output.weight"].zero_()
    state["output.weight"][EOT] = 1.0
    out.mkdir(parents=True)
    shutil.copyfile(LLAMA3_MODEL, out / "tokenizer.model")
    write_checkpoint(out, ARGS, state, 1)
    return out


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return eot_first_checkpoint(tmp_path_factory.mktemp("llama3") / "eot-first")


@pytest.fixture(scope="module")
def llm(ckpt: Path, ray_runtime) -> LLM:
    with LLM(ckpt, **SETTINGS) as llm:
        yield llm


def test_the_tokenizer_is_llama3s(llm: LLM) -> None:
    assert llm.tokenizer.kind == "tiktoken" and EOT in llm.tokenizer.stop_ids
    assert llm.args.vocab_size == 128256


def test_completion_and_chat_end_at_once(llm: LLM) -> None:
    (done,) = llm.generate("Hello there", GREEDY)
    (chat,) = llm.chat(DIALOG, GREEDY)
    for out in (done, chat):
        assert out.finish_reason == "stop"
        assert out.token_ids == [] and out.text == ""
    assert chat.prompt_token_ids == llm.tokenizer.encode_dialog(DIALOG)
    assert chat.prompt_token_ids.count(EOT) == 2  # the turns' own, not the text's
    streamed = list(llm.stream(["Hello there"], GREEDY))
    assert [(o.finish_reason, o.text) for o in streamed] == [("stop", "")]


def test_ignore_eos_runs_on_and_stop_token_ids_still_stop(llm: LLM) -> None:
    (on,) = llm.chat(DIALOG, GREEDY.replace(ignore_eos=True))
    assert on.finish_reason == "length" and on.token_ids == [EOT] * 5
    assert on.text == "<|eot_id|>" * 5  # ignored stop tokens are ordinary tokens
    (stopped,) = llm.generate("Hi", GREEDY.replace(ignore_eos=True, stop_token_ids=(EOT,)))
    assert stopped.finish_reason == "stop" and stopped.token_ids == []


# ------------------------------------------------------------------------ the server


@pytest.fixture(scope="module")
def client(ckpt: Path, ray_runtime):
    pytest.importorskip("openai")
    pytest.importorskip("ray.serve")
    with openai_client(ckpt, {"max_batch_size": 2, "max_seq_len": 64}, 5) as client:
        yield client


def test_server_completion_and_chat_end_at_once(client) -> None:
    done = client.completions.create(model="eot-first", prompt="Hello", temperature=0)
    assert (done.choices[0].finish_reason, done.choices[0].text) == ("stop", "")
    assert done.usage.completion_tokens == 0
    chat = client.chat.completions.create(model="eot-first", messages=DIALOG, temperature=0)
    assert (chat.choices[0].finish_reason, chat.choices[0].message.content) == ("stop", "")
    stream = client.chat.completions.create(
        model="eot-first", messages=DIALOG, temperature=0, stream=True
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ""
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_server_ignore_eos_tool_turns_and_stop_token_ids(client) -> None:
    tool_dialog = [*DIALOG, {"role": "assistant", "content": "f()"}]
    tool_dialog.append({"role": "tool", "content": "42", "tool_call_id": "call-1"})
    on = client.chat.completions.create(
        model="eot-first",
        messages=tool_dialog,
        temperature=0,
        max_tokens=3,
        extra_body={"ignore_eos": True},
    )
    assert on.choices[0].finish_reason == "length"
    assert on.choices[0].message.content == "<|eot_id|>" * 3
    stopped = client.completions.create(
        model="eot-first",
        prompt="Hello",
        temperature=0,
        extra_body={"ignore_eos": True, "stop_token_ids": [EOT]},
    )
    assert (stopped.choices[0].finish_reason, stopped.choices[0].text) == ("stop", "")
