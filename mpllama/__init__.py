"""mpllama: model-parallel inference for LLaMA-family checkpoints on Ray."""

from .config import SamplingParams
from .errors import CheckpointError, ConfigError, MpllamaError, PromptError, WorkerError

__all__ = [
    "LLM",
    "AsyncLLM",
    "RequestOutput",
    "SamplingParams",
    "MpllamaError",
    "ConfigError",
    "CheckpointError",
    "PromptError",
    "WorkerError",
]


def __getattr__(name: str):  # the clients pull in Ray; import them only when asked for
    if name in ("LLM", "RequestOutput"):
        from . import api

        return getattr(api, name)
    if name == "AsyncLLM":
        from .async_llm import AsyncLLM

        return AsyncLLM
    raise AttributeError(name)
