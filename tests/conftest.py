"""Shared fixtures: tiny checkpoints made by the project's own writer, one local Ray
runtime for the whole session, and a one-rank process group for in-process model tests."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Exactness is checked in float32 (the references, transformers' and Meta's, are): the
# default dtype, bf16 on a CPU with bf16 instructions, is tested where a test says so.
os.environ.setdefault("MPLLAMA_DTYPE", "float32")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Tests that start their own Ray cluster run last, after the shared runtime's users.
    items.sort(key=lambda item: item.get_closest_marker("own_ray") is not None)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "own_ray: starts its own Ray runtime; runs last")


@pytest.fixture(scope="session")
def ckpt_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ckpt")


def _make(root: Path, name: str, parts: int) -> Path:
    from mpllama.offline.fixtures import init_checkpoint

    out = root / name
    if not (out / "params.json").exists():
        init_checkpoint(out, "tiny", parts=parts, seed=0)
    return out


@pytest.fixture(scope="session")
def tiny_ckpt(ckpt_root: Path) -> Path:
    """The tiny preset (GQA, 2 layers), sharded 2 ways, with its own tokenizer."""
    return _make(ckpt_root, "tiny2", 2)


@pytest.fixture(scope="session")
def tiny_ckpts(ckpt_root: Path) -> dict[int, Path]:
    """The same weights sharded 1, 2 and 4 ways."""
    return {n: _make(ckpt_root, f"tiny{n}", n) for n in (1, 2, 4)}


@pytest.fixture(scope="session")
def llama3_ckpt(ckpt_root: Path) -> Path:
    """The llama3-tiny preset (Meta's real tiktoken tokenizer, vocab 128256), one shard."""
    pytest.importorskip("llama_models")
    from mpllama.offline.fixtures import init_llama3_checkpoint

    out = ckpt_root / "llama3"
    if not (out / "params.json").exists():
        init_llama3_checkpoint(out, parts=1, seed=0)
    return out


@pytest.fixture(scope="session")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tokenizer freshly trained by the project's own trainer (the stdlib corpus)."""
    from mpllama.offline.fixtures import train_tokenizer

    return train_tokenizer(tmp_path_factory.mktemp("tok") / "nested" / "tokenizer.model")


@pytest.fixture(scope="session")
def tok(model_path: Path):
    """That tokenizer, as mpllama wraps it (test modules may define their own ``tok``)."""
    from mpllama.tokenizer import Tokenizer

    return Tokenizer(model_path)


@pytest.fixture(scope="session")
def sp(model_path: Path):
    """That tokenizer, as sentencepiece itself loads it."""
    from sentencepiece import SentencePieceProcessor

    return SentencePieceProcessor(model_file=str(model_path))


@pytest.fixture(scope="session")
def single_rank() -> None:
    """A one-rank Gloo group with fairscale state, for in-process model tests."""
    import torch

    from mpllama.rank import dist

    # Tiny models gain nothing from a second thread, and on a busy machine OpenMP's
    # threads wait on each other for a core: one thread keeps these tests quick.
    torch.set_num_threads(1)
    dist.init_single("gloo")


@pytest.fixture(scope="session")
def ray_runtime():
    """The session's local Ray runtime, started on first use (ray.init costs seconds)."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=8, include_dashboard=False, logging_level="WARNING")
    return ray


@pytest.fixture(params=["avx512", "amx"])
def products_on(request: pytest.FixtureRequest) -> Iterator[str]:
    """A product test on each path the bf16 and int8 kernels have: AVX-512's dot products,
    and AMX's tiles where the CPU has them (``library()`` runs them on the tiles there)."""
    from mpllama.rank import cpu_kernels

    default = cpu_kernels.amx_on()
    on = request.param == "amx"
    if cpu_kernels.set_amx(on) != on:
        cpu_kernels.set_amx(default)
        pytest.skip("this CPU has no AMX tiles mpllama can use")
    try:
        yield request.param
    finally:
        cpu_kernels.set_amx(default)
