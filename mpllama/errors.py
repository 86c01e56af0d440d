"""The errors a user of mpllama can meet. Each says what was wrong, what was expected
and how to fix it; plain argument mistakes stay ValueError/TypeError."""

from __future__ import annotations


class MpllamaError(Exception):
    """Base of every error mpllama raises on purpose."""


class ConfigError(MpllamaError, ValueError):
    """A setting (YAML, CLI flag, constructor argument or params.json) is invalid."""


class CheckpointError(MpllamaError):
    """A checkpoint folder, shard, params.json or tokenizer cannot be used."""


class PromptError(MpllamaError, ValueError):
    """A prompt or chat dialog cannot be run (too long, empty, forbidden tags)."""


class WorkerError(MpllamaError):
    """A model-parallel rank failed: raised, died or stopped answering.

    Carries the rank, the method the driver called and the remote traceback, so the
    failure on one rank is visible from the driver instead of hanging the others.
    """

    def __init__(
        self,
        message: str,
        *,
        rank: int | None = None,
        method: str | None = None,
        remote_traceback: str | None = None,
    ) -> None:
        self.rank = rank
        self.method = method
        self.remote_traceback = remote_traceback
        text = message
        if remote_traceback:
            text = f"{message}\n--- traceback from rank {rank} ---\n{remote_traceback.rstrip()}"
        super().__init__(text)


class PlacementError(MpllamaError):
    """Ray could not place the ranks: the cluster lacks the resources asked for."""


class RuntimeLostError(MpllamaError):
    """The local Ray runtime mpllama started died under it (its GCS or raylet killed):
    requests in flight failed; a new ``LLM`` starts a fresh runtime."""
