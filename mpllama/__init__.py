"""mpllama: model-parallel inference for LLaMA-family checkpoints on Ray."""

from .config import SamplingParams
from .errors import CheckpointError, ConfigError, MpllamaError, PromptError, WorkerError

__all__ = [
    "LLM",
    "SamplingParams",
    "MpllamaError",
    "ConfigError",
    "CheckpointError",
    "PromptError",
    "WorkerError",
]


def __getattr__(name: str):  # LLM pulls in Ray; import it only when asked for
    if name == "LLM":
        from .api import LLM

        return LLM
    raise AttributeError(name)
