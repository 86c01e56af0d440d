"""The transformers baselines, on the same weights as mpllama (fp32, CPU, in this process):

* ``generate`` in static batches: left padded, attention mask set, each batch decoding
  as many steps as its longest request asks for (the waste continuous batching removes);
* transformers' own continuous batching: the manager behind ``generate_batch``, fed one
  ``add_request`` per request so each keeps its own ``max_new_tokens``.

EOS is disabled in both (``eos_token_id`` None / -1) so every request decodes exactly the
tokens it asked for, as mpllama's ``ignore_eos=True`` does.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from bench_workloads import RunResult, Workload
from transformers import ContinuousBatchingConfig, GenerationConfig, LlamaForCausalLM
from transformers.generation.continuous_batching import ContinuousBatchingManager

from mpllama import checkpoint
from mpllama.offline.convert import hf_config, meta_to_hf
from mpllama.rank import weights

PAD_ID = 0
RESULT_TIMEOUT_S = 300.0  # the longest wait for one continuous-batching result


def load_model(ckpt: Path) -> LlamaForCausalLM:
    """transformers' Llama on the weights of a one-shard mpllama checkpoint."""
    args = checkpoint.read_params(ckpt)
    state = weights.load_rank_state(checkpoint.find_shards(ckpt), args, 0, 1)
    model = LlamaForCausalLM(hf_config(args))
    model.load_state_dict(meta_to_hf(state, args))
    model.generation_config.eos_token_id = None  # decode to max_new_tokens, like ignore_eos
    return model.float().eval()


# ------------------------------------------------------------------------ static batches


def generate_batch(
    model: LlamaForCausalLM, prompts: list[list[int]], new_tokens: int
) -> list[list[int]]:
    """One left-padded ``generate`` call; returns each row's ``new_tokens`` new tokens."""
    width = max(map(len, prompts))
    input_ids = torch.tensor([[PAD_ID] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    config = GenerationConfig(
        do_sample=False, max_new_tokens=new_tokens, eos_token_id=None, pad_token_id=PAD_ID
    )
    with torch.inference_mode():
        out = model.generate(
            input_ids.to(model.device),
            attention_mask=mask.to(model.device),
            generation_config=config,
        )
    return out[:, width:].tolist()


def run_generate(
    model: LlamaForCausalLM, work: Workload, batch_size: int, name: str = "transformers generate"
) -> RunResult:
    """``work`` in input order, ``batch_size`` requests per ``generate`` call; a batch
    runs to its longest request, and only the tokens each request asked for count."""
    generate_batch(model, work.prompts[:2], 2)  # warm up
    tokens: list[list[int]] = []
    start = time.perf_counter()
    for i in range(0, len(work), batch_size):
        wanted = work.new_tokens[i : i + batch_size]
        rows = generate_batch(model, work.prompts[i : i + batch_size], max(wanted))
        tokens += [row[:n] for row, n in zip(rows, wanted, strict=True)]
    elapsed = time.perf_counter() - start
    return RunResult(name, sum(map(len, tokens)), elapsed, tokens)


# ------------------------------------------------------------------------ continuous batching


def cb_config(work: Workload, slots: int) -> ContinuousBatchingConfig:
    """At most ``slots`` requests per step, like mpllama's max_batch_size, and a KV cache
    sized to hold them. Left unset, ``num_blocks`` on CPU becomes 60% of the machine's
    free RAM (measured with psutil), which costs seconds to allocate on a shared box."""
    page = ContinuousBatchingConfig.page_size
    return ContinuousBatchingConfig(
        num_blocks=slots * math.ceil(work.longest / page) + 1, max_requests_per_batch=slots
    )


def run_continuous_batching(
    model: LlamaForCausalLM,
    work: Workload,
    slots: int,
    name: str = "transformers continuous batching",
) -> RunResult:
    """All requests submitted at once to transformers' continuous-batching manager; the
    clock runs from the first submission to the last result."""
    config = GenerationConfig(
        do_sample=False, max_new_tokens=max(work.new_tokens), eos_token_id=-1, pad_token_id=PAD_ID
    )
    with (
        torch.inference_mode(),
        model.continuous_batching_context_manager(
            generation_config=config,
            continuous_batching_config=cb_config(work, slots),
            block=True,
            timeout=30,
        ) as manager,
    ):
        warm = [manager.add_request(p, f"warmup-{i}", 2) for i, p in enumerate(work.prompts[:2])]
        _collect(manager, warm)
        start = time.perf_counter()
        ids = [
            manager.add_request(prompt, f"req-{i}", n)
            for i, (prompt, n) in enumerate(zip(work.prompts, work.new_tokens, strict=True))
        ]
        results = _collect(manager, ids)
        elapsed = time.perf_counter() - start
    tokens = [results[i] for i in ids]
    return RunResult(name, sum(map(len, tokens)), elapsed, tokens)


def _collect(
    manager: ContinuousBatchingManager, request_ids: list[str | None]
) -> dict[str, list[int]]:
    """Wait for every request's final result; raise if one fails or the loop dies."""
    if None in request_ids:
        raise RuntimeError("transformers' continuous batching refused a request (see its log)")
    pending, done = set(request_ids), {}
    while pending:
        result = manager.get_result(timeout=RESULT_TIMEOUT_S)
        if result is None:
            raise RuntimeError(
                f"transformers' continuous batching produced nothing for {RESULT_TIMEOUT_S:.0f}"
                f" s with {len(pending)} request(s) pending (running: "
                f"{manager.is_running()})"
            )
        if result.error is not None:
            raise RuntimeError(f"transformers request {result.request_id} failed: {result.error}")
        if result.is_finished() and result.request_id in pending:
            pending.discard(result.request_id)
            done[result.request_id] = list(result.generated_tokens)
    return done
