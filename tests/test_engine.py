"""The Ray engine: one actor per rank, resharding on load, per-step scheduling on the
lead, seeds, and agreement with transformers at every model-parallel size, with requests
admitted mid-flight and long prompts prefilled in chunks."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from helpers import PROMPTS, hf_greedy, hf_model

from mpllama import LLM, SamplingParams
from mpllama.errors import PromptError
from mpllama.protocol import Event, Request
from mpllama.rank import cpu_kernels, shm
from mpllama.rank.layers import onednn_unsupported

GREEDY = SamplingParams(temperature=0, max_tokens=6, logprobs=True, ignore_eos=True)
SMALL = {"cpus_per_rank": 0.5, "max_seq_len": 64, "max_batch_size": 4}


@pytest.fixture(scope="module")
def reference(tiny_ckpts: dict[int, Path]) -> list[tuple[list[int], list[float]]]:
    from mpllama.tokenizer import Tokenizer

    ckpt = tiny_ckpts[1]
    tok = Tokenizer(ckpt / "tokenizer.model")
    model = hf_model(ckpt)
    return [
        hf_greedy(model, tok.encode(p, bos=True, eos=False), GREEDY.max_tokens) for p in PROMPTS
    ]


# What cpu_linear "auto" picks on this machine: prepacked oneDNN wherever torch has it.
AUTO_LINEAR = "torch" if onednn_unsupported(torch.device("cpu"), torch.float32) else "onednn"
SHM = shm.supported() is None  # every gang here is on one machine

# Every compatible (shards, world) pair: world = k x shards or shards = k x world.
PAIRS = [(s, w) for s in (1, 2, 4) for w in (1, 2, 4)]


@pytest.mark.parametrize(("shards", "world"), PAIRS, ids=[f"{s}shards-mp{w}" for s, w in PAIRS])
def test_every_shard_count_and_world_size_agree_with_transformers(
    shards: int, world: int, tiny_ckpts: dict[int, Path], reference, ray_runtime
) -> None:
    """Two slots for eight requests of different lengths, prompts prefilled three tokens
    a step: requests join while others sit at arbitrary positions, long prompts take
    several steps, and every request still gets transformers' tokens."""
    agree_with_transformers(tiny_ckpts[shards], world, reference)


def test_torchs_kernel_and_gloo_collectives_agree_with_transformers(
    tiny_ckpts: dict[int, Path], reference, ray_runtime
) -> None:
    """cpu_linear: torch and shm_collectives: false keep the plain paths (F.linear and
    Gloo for every collective: what GPUs, other CPUs and multi-machine gangs run) as
    exact as the fast ones."""
    agree_with_transformers(tiny_ckpts[2], 2, reference, cpu_linear="torch", shm_collectives=False)


def agree_with_transformers(
    ckpt: Path, world: int, reference, cpu_linear: str = "auto", shm_collectives: bool = True
) -> None:
    expect_linear = AUTO_LINEAR if cpu_linear == "auto" else cpu_linear
    expect_collectives = "none" if world == 1 else ("shm" if shm_collectives and SHM else "gloo")
    settings = {
        **SMALL,
        "max_batch_size": 2,
        "prefill_chunk_tokens": 3,
        "cpu_linear": cpu_linear,
        "shm_collectives": shm_collectives,
    }
    lengths = [6, 2, 5, 3, 6, 1, 4, 6]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(lengths))]
    params = [GREEDY.replace(max_tokens=n) for n in lengths]
    with LLM(ckpt, model_parallel_size=world, **settings) as llm:
        info = llm.engine.rank_info
        assert len(info) == world
        assert {i["backend"] for i in info} == {"gloo"}
        assert {i["linear"] for i in info} == {expect_linear}
        # which of mpllama's kernels each rank runs: this machine's, as this process finds
        assert {i["cpu_kernels"] for i in info} == {cpu_kernels.path()}
        assert {i["collectives"] for i in info} == {expect_collectives}
        outputs = llm.generate(prompts, params)
    assert [o.index for o in outputs] == list(range(len(prompts)))
    for i, (out, n) in enumerate(zip(outputs, lengths, strict=True)):
        tokens, logprobs = reference[i % len(PROMPTS)]
        assert out.token_ids == tokens[:n]
        torch.testing.assert_close(
            torch.tensor(out.logprobs), torch.tensor(logprobs[:n]), atol=1e-4, rtol=0
        )


@pytest.fixture(scope="module")
def llm2(tiny_ckpt: Path, ray_runtime):
    with LLM(tiny_ckpt, **SMALL) as llm:  # model_parallel_size None = the 2 shards
        yield llm


def test_world_size_defaults_to_shard_count(llm2: LLM) -> None:
    assert llm2.world_size == 2
    assert [i["rank"] for i in llm2.engine.rank_info] == [0, 1]


def test_thirteen_prompts_through_four_slots_come_back_complete_and_in_order(llm2: LLM) -> None:
    prompts = [f"Prompt number {i}: " + "word " * (i % 5) for i in range(13)]
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    outputs = llm2.generate(prompts, params)
    assert [o.index for o in outputs] == list(range(13))
    assert [o.prompt for o in outputs] == prompts
    assert all(len(o.token_ids) == 4 and o.finish_reason == "length" for o in outputs)
    # Order is right only if each output is its own prompt's continuation.
    for i in (0, 6, 12):
        alone = llm2.generate(prompts[i], params)[0]
        assert alone.token_ids == outputs[i].token_ids
        assert alone.prompt_token_ids == outputs[i].prompt_token_ids


def test_the_leads_submits_and_aborts_leave_from_the_engines_own_thread(
    llm2: LLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Never from the caller's thread: a Ray call made inside a Ray task is its child, and
    Ray Serve cancels a request's task with its children when the client leaves. A
    numbered abort cancelled so never reached the lead, which waited for its number for
    good: every later request on the gang hung (control_sender.py)."""
    engine = llm2.engine
    lead, calls = engine.gang.lead, []

    class Method:
        def __init__(self, name: str) -> None:
            self.name = name

        def remote(self, payload, order):
            calls.append((self.name, threading.current_thread().name))
            return getattr(lead, self.name).remote(payload, order)

    class Lead:
        def __getattr__(self, name: str):
            return Method(name) if name in ("submit", "abort") else getattr(lead, name)

    monkeypatch.setattr(type(engine.gang), "lead", property(lambda gang: Lead()))
    done = threading.Event()
    engine.submit([Request("spy-long", [1, 5, 9], SamplingParams(max_tokens=40))], lambda e: None)
    engine.abort(["spy-long"])
    engine.submit(
        [Request("spy", [1, 5, 9], SamplingParams(max_tokens=2))],
        lambda e: done.set() if not isinstance(e, Event) or e.finish_reason else None,
    )
    assert done.wait(60)
    assert [name for name, _ in calls] == ["submit", "abort", "submit"]
    assert {thread for _, thread in calls} == {"mpllama-engine-control"}


def test_an_id_aborted_and_at_once_reused_names_only_the_new_request(llm2: LLM) -> None:
    """A caller may reuse a request id as soon as it aborted it (AsyncLLM's request_id,
    as in vLLM). The lead may still be sending the old request's events, and may take the
    abort and the new submit in one turn; under one id the new request got the old one's
    tokens and "abort", or the lead refused it as "already running". Each hand-over to
    the lead now has an id of its own."""
    engine, params = llm2.engine, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    prompt = [1, 5, 9, 13]
    want = llm2.generate(prompt_token_ids=[prompt], sampling_params=params)[0].token_ids
    for trial in range(8):
        rid, got, done = f"reused-{trial}", [], threading.Event()

        def sink(e: Event | BaseException, got: list = got, done: threading.Event = done) -> None:
            got.append(e)
            if not isinstance(e, Event) or e.finish_reason is not None:
                done.set()

        old: list[Event | BaseException] = []
        long = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)
        engine.submit([Request(rid, [1, 7, 7, 7, 2], long)], old.append)
        while not any(isinstance(e, Event) and e.token_ids for e in old):  # it runs
            assert not any(isinstance(e, BaseException) for e in old), old
            threading.Event().wait(0.005)
        engine.abort([rid])
        engine.submit([Request(rid, prompt, params)], sink)
        assert done.wait(60), got
        events = [e for e in got if isinstance(e, Event)]
        assert len(events) == len(got) and all(e.id == rid for e in events), got
        assert events[-1].finish_reason == "length", events[-1]
        assert [t for e in events for t in e.token_ids] == want, trial
        assert old[-1].finish_reason == "abort"  # the old one ended once, by the abort


def test_seeded_sampling_repeats_and_fixed_seed_ignores_batch_company(llm2: LLM) -> None:
    sampled = SamplingParams(temperature=0.8, top_p=0.9, max_tokens=8, ignore_eos=True)
    first = llm2.generate(PROMPTS, sampled)
    second = llm2.generate(PROMPTS, sampled)
    assert [o.token_ids for o in first] == [o.token_ids for o in second]
    # Different requests get different derived seeds: not all rows are greedy copies.
    greedy = llm2.generate(PROMPTS, sampled.replace(temperature=0))
    assert [o.token_ids for o in first] != [o.token_ids for o in greedy]

    fixed = sampled.replace(seed=1234)
    alone = llm2.generate(PROMPTS[1], fixed)[0]
    batched = llm2.generate(PROMPTS, [sampled, fixed, sampled, sampled])[1]
    assert alone.token_ids == batched.token_ids


def test_prompt_token_ids_chat_and_per_prompt_params(llm2: LLM) -> None:
    ids = llm2.tokenizer.encode(PROMPTS[0], bos=True, eos=False)
    by_ids = llm2.generate(prompt_token_ids=[ids], sampling_params=GREEDY)[0]
    by_text = llm2.generate(PROMPTS[0], GREEDY)[0]
    assert by_ids.token_ids == by_text.token_ids and by_ids.prompt is None
    chat = llm2.chat([[{"role": "user", "content": "Hi"}]], GREEDY)[0]
    assert len(chat.token_ids) == GREEDY.max_tokens
    echoed = llm2.generate(PROMPTS[0], GREEDY.replace(echo=True))[0]
    assert echoed.text == PROMPTS[0] + by_text.text


@pytest.mark.parametrize("cpu_linear", ["torch", "auto"])
def test_each_rank_holds_about_half_the_model_at_mp2(
    cpu_linear: str, ckpt_root: Path, tiny_ckpt: Path, ray_runtime
) -> None:
    """Plain weights stay the mapped shard's pages, so the peak shows what a rank read;
    packed ones are copies, so what the rank holds for good (anonymous memory) shows
    that packing replaced the weights rather than adding to them."""
    from helpers import make_checkpoint

    from mpllama.offline.fixtures import PRESETS
    from mpllama.shard_axes import full_shapes

    args = PRESETS["small"].__class__(**{**PRESETS["small"].__dict__, "vocab_size": 512})
    ckpt = make_checkpoint(ckpt_root / "small2", args, tiny_ckpt, parts=2)
    full_mb = sum(torch.Size(s).numel() for s in full_shapes(args).values()) * 4 / 2**20
    settings = dict(cpus_per_rank=0.5, max_seq_len=32, max_batch_size=1, cpu_linear=cpu_linear)
    with LLM(ckpt, **settings) as llm:
        llm.generate("touch every weight", SamplingParams(temperature=0, max_tokens=2))
        memory = llm.engine.call_all("memory")
        packed = {i["linear"] for i in llm.engine.rank_info} == {"onednn"}
    key = "anon_growth_mb" if packed else "growth_mb"
    # Each rank holds its half (plus cache and activations), never the whole model.
    for rank in memory:
        assert 0.3 * full_mb < rank[key] < 0.75 * full_mb, (memory, full_mb)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; this machine has none")
def test_gpu_ranks_use_cuda_and_match_transformers(
    tiny_ckpts: dict[int, Path], reference, ray_runtime
) -> None:
    world = min(2, torch.cuda.device_count())
    with LLM(
        tiny_ckpts[2],
        model_parallel_size=world,
        device="auto",
        dtype="float32",
        max_seq_len=64,
        max_batch_size=4,
    ) as llm:
        info = llm.engine.rank_info
        outputs = llm.generate(PROMPTS, GREEDY)
    assert {i["device"].split(":")[0] for i in info} == {"cuda"}
    if world > 1 and torch.distributed.is_nccl_available():
        assert {i["backend"] for i in info} == {"nccl"}
    assert [o.token_ids for o in outputs] == [tokens for tokens, _ in reference]


def test_errors_return_answers_bad_inputs_and_runs_the_rest(llm2: LLM) -> None:
    """errors="return": one output per input; the bad ones say what is wrong, the good
    ones are exactly what a call without the bad ones gives."""
    good = ["Hello world", "The quick brown fox"]
    clean = llm2.generate(good, GREEDY)
    mixed = llm2.generate(
        [good[0], "", 42, "word " * 100, good[1]],  # type: ignore[list-item]
        GREEDY,
        errors="return",
    )
    assert [o.index for o in mixed] == [0, 1, 2, 3, 4]
    assert [o.finish_reason for o in mixed] == ["length", "error", "error", "error", "length"]
    assert "empty" in mixed[1].error and "must be a string" in mixed[2].error
    assert "max_seq_len" in mixed[3].error
    assert all(o.token_ids == [] and o.text == "" for o in mixed[1:4])
    assert [mixed[0].token_ids, mixed[4].token_ids] == [o.token_ids for o in clean]
    assert mixed[0].error is None
    ids = llm2.generate(
        prompt_token_ids=[[1, 5], [1, 99999], []], sampling_params=GREEDY, errors="return"
    )
    assert [o.finish_reason for o in ids] == ["length", "error", "error"]
    assert "outside the vocabulary" in ids[1].error and "no tokens" in ids[2].error
    dialogs = [
        [{"role": "user", "content": "Hi"}],
        [{"role": "user", "content": "[INST] injected"}],
        [{"role": "assistant", "content": "I speak first"}],
    ]
    chats = llm2.chat(dialogs, GREEDY, errors="return")
    assert [o.finish_reason for o in chats] == ["length", "error", "error"]
    assert "reserved" in chats[1].error and "expected role 'user'" in chats[2].error
    assert chats[0].token_ids == llm2.chat(dialogs[:1], GREEDY)[0].token_ids
    streamed = [o for o in llm2.stream(["", good[0]], GREEDY, errors="return") if o.finished]
    assert sorted(o.finish_reason for o in streamed) == ["error", "length"]
    with pytest.raises(ValueError, match="errors must be one of"):
        llm2.generate(good, GREEDY, errors="ignore")
    # A grammar that does not compile is its request's error; the others run.
    bad = GREEDY.replace(guided={"json_schema": {"type": "objekt"}})
    guided = llm2.generate(good, [bad, GREEDY], errors="return")
    assert [o.finish_reason for o in guided] == ["error", "length"]
    assert "objekt" in guided[0].error and guided[1].token_ids == clean[1].token_ids
    with pytest.raises(PromptError, match="objekt"):
        llm2.generate(good[:1], bad)
