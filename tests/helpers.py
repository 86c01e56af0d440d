"""Test helpers shared by several test files (imported as `from helpers import ...`)."""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from mpllama import checkpoint
from mpllama.model_args import ModelArgs
from mpllama.offline.fixtures import PRESETS, random_state
from mpllama.rank import weights

# Llama 2 70B's released params.json (GQA, ffn_dim_multiplier), vocab resolved.
LLAMA2_70B = ModelArgs(
    dim=8192,
    n_layers=80,
    n_heads=64,
    n_kv_heads=8,
    vocab_size=32000,
    multiple_of=4096,
    ffn_dim_multiplier=1.3,
    norm_eps=1e-5,
)

# The params.json of Meta's Llama 3.x releases (their original/ folders), vocab resolved.
_LLAMA3 = {"vocab_size": 128256, "norm_eps": 1e-5, "rope_theta": 500000.0, "n_kv_heads": 8}
_LLAMA3_8B = ModelArgs(
    dim=4096, n_layers=32, n_heads=32, multiple_of=1024, ffn_dim_multiplier=1.3, **_LLAMA3
)
_LLAMA3_70B = ModelArgs(
    dim=8192, n_layers=80, n_heads=64, multiple_of=4096, ffn_dim_multiplier=1.3, **_LLAMA3
)
LLAMA3_RELEASES: dict[str, ModelArgs] = {
    "llama3-8b": _LLAMA3_8B,
    "llama3-70b": _LLAMA3_70B,
    "llama3.1-8b": replace(_LLAMA3_8B, use_scaled_rope=True),
    "llama3.1-70b": replace(_LLAMA3_70B, use_scaled_rope=True),
    "llama3.1-405b": ModelArgs(
        dim=16384,
        n_layers=126,
        n_heads=128,
        multiple_of=4096,
        ffn_dim_multiplier=1.2,
        use_scaled_rope=True,
        **_LLAMA3,
    ),
    "llama3.2-1b": ModelArgs(
        dim=2048,
        n_layers=16,
        n_heads=32,
        multiple_of=256,
        ffn_dim_multiplier=1.5,
        use_scaled_rope=True,
        **_LLAMA3,
    ),
    "llama3.2-3b": ModelArgs(
        dim=3072,
        n_layers=28,
        n_heads=24,
        multiple_of=256,
        ffn_dim_multiplier=1.0,
        use_scaled_rope=True,
        **_LLAMA3,
    ),
    "llama3.3-70b": replace(_LLAMA3_70B, use_scaled_rope=True),
}

PROMPTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "a",
    "Numbers 12345 and 你好 🦙",
]


def make_checkpoint(
    out: Path, args: ModelArgs, tokenizer_from: Path, parts: int = 1, seed: int = 0
) -> Path:
    """A random checkpoint with custom ModelArgs, borrowing an existing tokenizer."""
    if not (out / "params.json").exists():
        shutil.copy(tokenizer_from / "tokenizer.model", out.mkdir(parents=True) or out)
        weights.write_checkpoint(out, args, random_state(args, seed), parts)
    return out


def full_state(ckpt: Path) -> tuple[ModelArgs, dict[str, torch.Tensor]]:
    args = checkpoint.read_params(ckpt)
    return args, weights.load_rank_state(checkpoint.find_shards(ckpt), args, 0, 1)


def hf_model(ckpt: Path):
    """transformers' LlamaForCausalLM (fp32, eager attention) on the checkpoint's weights."""
    from transformers import LlamaForCausalLM

    from mpllama.offline.convert import hf_config, meta_to_hf

    args, state = full_state(ckpt)
    model = LlamaForCausalLM(hf_config(args))
    model.load_state_dict(meta_to_hf(state, args), strict=True)
    model.set_attn_implementation("eager")
    return model.float().eval()


@torch.no_grad()
def hf_greedy(model, prompt_ids: list[int], max_new: int) -> tuple[list[int], list[float]]:
    """Greedy continuation and its log-probs, recomputing the whole sequence each step
    (no cache): an independent path from mpllama's KV-cached, batched loop."""
    seq = list(prompt_ids)
    tokens, logprobs = [], []
    for _ in range(max_new):
        logits = model(input_ids=torch.tensor([seq])).logits[0, -1].float()
        token = int(logits.argmax())
        tokens.append(token)
        logprobs.append(float(torch.log_softmax(logits, -1)[token]))
        seq.append(token)
    return tokens, logprobs


LIVE_PG_STATES = {"PENDING", "CREATED", "RESCHEDULING"}


def wait_for(condition: Callable[[], bool], timeout: float = 15.0, every: float = 0.2) -> bool:
    """Poll ``condition`` until it holds (True) or ``timeout`` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(every)
    return True


def live_ray_objects() -> tuple[set[str], set[str]]:
    """Actors not yet dead and placement groups not yet removed (``ray.util.state``
    needs the dashboard, which the test runtime leaves out; these are the GCS tables)."""
    import ray
    from ray._private import state

    actors = {k for k, v in state.actors().items() if v["State"] != "DEAD"}
    pgs = {k for k, v in ray.util.placement_group_table().items() if v["state"] in LIVE_PG_STATES}
    return actors, pgs


def completable(start: bytes) -> bool:
    """Whether some continuation makes ``start`` one valid UTF-8 character (only the
    second byte has ranges narrower than 80..BF)."""
    for second in range(0x80, 0xC0):
        for more in range(3):
            try:
                (start + bytes((second,)) + b"\x80" * more).decode("utf-8")
                return True
            except UnicodeDecodeError:
                pass
    return False


def pretend_model_parallel(monkeypatch: Any, world: int, rank: int = 0) -> None:
    """Make the model and its layers build rank ``rank`` of ``world`` in a one-rank
    process (shape maths on the meta device, no collectives)."""
    from mpllama.rank import attention, layers

    for module in (attention, layers):
        monkeypatch.setattr(module, "get_model_parallel_world_size", lambda: world)
        if hasattr(module, "get_model_parallel_rank"):
            monkeypatch.setattr(module, "get_model_parallel_rank", lambda: rank)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def openai_client(ckpt: Path, runtime: dict[str, Any], max_tokens: int) -> Iterator[Any]:
    """A real `mpllama serve` (on the session's Ray) on ``ckpt`` with one replica, and
    the real openai client pointed at it; the server stops on exit."""
    import openai

    from mpllama.config import run_config_from_dict
    from mpllama.deploy import Server

    config = run_config_from_dict(
        {
            "model": {"checkpoint_dir": str(ckpt)},
            "parallel": {"cpus_per_rank": 0.5, "backend": "gloo"},
            "runtime": {"device": "cpu", **runtime},
            "sampling": {"max_tokens": max_tokens},
            "serve": {"port": free_port()},
        }
    )
    with Server(config) as server:
        yield openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def blocked(w: torch.Tensor, block: int) -> torch.Tensor:
    """w [rows, in] in oneDNN's one-row layout, built by hand: blocks of ``block`` rows
    (zero rows pad the last), each [in / pair][block][pair], pair 2 for bf16, 1 float32."""
    pair = 2 if w.dtype == torch.bfloat16 else 1
    rows, inner = w.shape
    padded = torch.cat([w, w.new_zeros(-rows % block, inner)])
    return padded.reshape(-1, block, inner // pair, pair).permute(0, 2, 1, 3).contiguous()


def tiny_args() -> ModelArgs:
    """The tiny preset with a vocabulary of 512, resolved."""
    return replace(PRESETS["tiny"], vocab_size=512)
