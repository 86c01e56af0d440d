"""Every setting mpllama has, as frozen dataclasses, and the strict YAML loader. (A
model's own shape, params.json, is ``model_args.ModelArgs``: not a setting.)

Defaults live here and nowhere else: YAML overrides them, the CLI's ``--set`` overrides
YAML. No torch, no Ray: the driver, the CLI and the tests read settings without either.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError
from .sampling_params import SamplingParams
from .typecheck import build

# ------------------------------------------------------------------------ run settings

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "float16", "bfloat16")
CPU_LINEARS = ("auto", "onednn", "torch")
QUANTIZATIONS = ("none", "int8", "int4")
QUANT_GROUP_SIZES = (32, 64, 128, 256)  # what torch's int4 kernels take
# quant_group_size: auto takes the first that divides every int4 weight's input on every
# rank: 128 for Llama's widths, as GPTQ/AWQ and torchao default (4.25 bits a weight with
# its bf16 scale and zero, against 5 at 32); the demo model's 96-input shards take 32.
AUTO_GROUP_SIZES = (128, 64, 32)
BACKENDS = ("auto", "gloo", "nccl")
PLACEMENT_STRATEGIES = ("auto", "PACK", "STRICT_PACK", "SPREAD", "STRICT_SPREAD")
REPLICA_PLACEMENTS = ("spread", "pack")


@dataclass(frozen=True)
class ModelConfig:
    checkpoint_dir: str = ""
    tokenizer_path: str | None = None  # None = tokenizer.model beside the shards, or one up
    # RoPE scaling factor for a use_scaled_rope checkpoint. None = Meta's rule: 32 for the
    # Llama 3.2 1B and 3B shapes, 8 for every other Llama 3.1+ (see ModelArgs).
    rope_scale_factor: float | None = None

    def __post_init__(self) -> None:
        _finite(self)
        if self.rope_scale_factor is not None and self.rope_scale_factor < 1:
            raise ConfigError(
                f"rope_scale_factor must be >= 1 (or null for Meta's rule), got "
                f"{self.rope_scale_factor}"
            )


@dataclass(frozen=True)
class ParallelConfig:
    model_parallel_size: int | None = None  # None = the checkpoint's shard count
    backend: str = "auto"  # auto = nccl when the rank has a GPU and torch has NCCL, else gloo
    # Gloo ranks that share a machine meet in shared memory for the per-step collectives
    # (tens of microseconds instead of a TCP round trip); false = Gloo for everything.
    shm_collectives: bool = True
    # One gang's ranks: auto = STRICT_PACK (one node) when a node can hold them, else PACK.
    placement_strategy: str = "auto"
    replicas: int | str = 1  # independent gangs (data parallel); "auto" = as many as fit
    replica_placement: str = "spread"  # spread = gangs on different nodes where they can
    ray_address: str | None = None  # None = $RAY_ADDRESS, else a local Ray for this run
    # Also the rank's thread count (Ray sets OMP_NUM_THREADS). None = the machine's cores
    # shared equally among the ranks when mpllama starts the local Ray itself, else 1.
    cpus_per_rank: float | None = None
    gpus_per_rank: float | None = None  # None = 1 when the cluster has GPUs, else 0
    placement_timeout_s: float = 60.0
    call_timeout_s: float = 600.0  # longest a rank may take to set up
    collective_timeout_s: float = 60.0  # a rank waiting this long on a peer gives up
    # A rank whose heartbeat (answered on its own thread, even mid-step) goes unanswered
    # this long is declared stopped (SIGSTOP, a frozen VM, a starved process).
    heartbeat_timeout_s: float = 60.0
    max_restarts: int = 2  # gang rebuilds after a rank failure before giving up
    restart_backoff_s: float = 1.0

    def __post_init__(self) -> None:
        _finite(self)
        if self.model_parallel_size is not None and self.model_parallel_size < 1:
            raise ConfigError(f"model_parallel_size must be >= 1, got {self.model_parallel_size}")
        _one_of("backend", self.backend, BACKENDS)
        _one_of("placement_strategy", self.placement_strategy, PLACEMENT_STRATEGIES)
        _one_of("replica_placement", self.replica_placement, REPLICA_PLACEMENTS)
        if self.replicas != "auto" and not (
            isinstance(self.replicas, int) and not isinstance(self.replicas, bool)
        ):
            raise ConfigError(f"replicas must be a number >= 1 or 'auto', got {self.replicas!r}")
        if isinstance(self.replicas, int) and self.replicas < 1:
            raise ConfigError(f"replicas must be >= 1 or 'auto', got {self.replicas}")
        if self.cpus_per_rank is not None and self.cpus_per_rank <= 0:
            raise ConfigError(f"cpus_per_rank must be > 0, got {self.cpus_per_rank}")
        for name in (
            "placement_timeout_s",
            "call_timeout_s",
            "collective_timeout_s",
            "heartbeat_timeout_s",
        ):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0 seconds, got {getattr(self, name)}")
        if self.max_restarts < 0:
            raise ConfigError(f"max_restarts must be >= 0, got {self.max_restarts}")
        if self.restart_backoff_s < 0:
            raise ConfigError(f"restart_backoff_s must be >= 0, got {self.restart_backoff_s}")
        if self.gpus_per_rank is not None and self.gpus_per_rank < 0:
            raise ConfigError(f"gpus_per_rank must be >= 0, got {self.gpus_per_rank}")


@dataclass(frozen=True)
class RuntimeConfig:
    device: str = "auto"  # auto = cuda when the rank has a GPU, else cpu
    # auto = bf16 (or fp16) on GPU; on a CPU bf16 where it has bf16 instructions, else
    # float32 (dist.resolve_dtype). Left out, MPLLAMA_DTYPE decides (the tests: float32).
    dtype: str = field(default_factory=lambda: os.environ.get("MPLLAMA_DTYPE") or "auto")
    max_batch_size: int = 8  # requests running at once (more wait)
    max_seq_len: int = 512  # most positions of one request: prompt plus generated tokens
    # The KV cache is a pool of blocks of kv_block_size positions; a request holds the
    # blocks it fills. Its size per rank: kv_cache_memory_gb, or by default what
    # max_batch_size requests at max_seq_len would fill, up to 90% of free memory.
    kv_cache_memory_gb: float | None = None
    kv_block_size: int = 16
    # Full blocks are kept after their request ends and shared by any later prompt that
    # starts with the same tokens (chat turns, system prompts, n > 1).
    prefix_caching: bool = True
    # Most prompt tokens prefilled per step: bigger prefills faster, smaller stalls the
    # running requests less (each step waits for its prefill).
    prefill_chunk_tokens: int = 512
    # The kernel behind a CPU rank's linear layers: onednn prepacks each weight once for
    # oneDNN (faster than torch's default where measured: benchmarks/RESULTS.md); torch is the
    # plain F.linear; auto = onednn wherever the build and the dtype allow it.
    cpu_linear: str = "auto"
    # Linear weights quantized on load, on each rank (a checkpoint `mpllama quantize`
    # wrote is already quantized and runs so): int8 per output row, activations quantized
    # per token; int4 weight-only, group-wise along the input, quant_group_size weights
    # per scale and zero (auto: 128 where every rank's weights take it, else 64 or 32).
    # The embedding and the output layer: int8 per row with either method.
    quantization: str = "none"
    quant_group_size: int | str = "auto"
    seed: int = 1

    def __post_init__(self) -> None:
        _finite(self)
        _one_of("device", self.device, DEVICES)
        _one_of("dtype", self.dtype, DTYPES)
        _one_of("cpu_linear", self.cpu_linear, CPU_LINEARS)
        _one_of("quantization", self.quantization, QUANTIZATIONS)
        if self.quant_group_size != "auto" and self.quant_group_size not in QUANT_GROUP_SIZES:
            raise ConfigError(
                f"quant_group_size must be auto or one of {list(QUANT_GROUP_SIZES)}, got "
                f"{self.quant_group_size!r}"
            )
        if self.max_batch_size < 1:
            raise ConfigError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.max_seq_len < 2:
            raise ConfigError(f"max_seq_len must be >= 2, got {self.max_seq_len}")
        if self.prefill_chunk_tokens < 1:
            raise ConfigError(f"prefill_chunk_tokens must be >= 1, got {self.prefill_chunk_tokens}")
        if self.kv_block_size < 1:
            raise ConfigError(f"kv_block_size must be >= 1, got {self.kv_block_size}")
        if self.kv_cache_memory_gb is not None and not self.kv_cache_memory_gb > 0:
            raise ConfigError(f"kv_cache_memory_gb must be > 0, got {self.kv_cache_memory_gb}")


@dataclass(frozen=True)
class JobConfig:
    input: str | None = None  # JSONL, one request per line
    output: str | None = None  # JSONL, one result per line, appended as requests finish
    on_bad_line: str = "stop"  # stop | skip (skipped lines are reported, never silent)
    progress: bool | None = None  # None = a progress bar only when stderr is a terminal

    def __post_init__(self) -> None:
        _one_of("on_bad_line", self.on_bad_line, ("stop", "skip"))


@dataclass(frozen=True)
class ServeConfig:
    """``mpllama serve``: where it listens, how many gangs answer, who may call it."""

    host: str = "127.0.0.1"  # 0.0.0.0 opens it to the network: set an api_key then
    port: int = 8000
    replicas: int = 1  # Ray Serve replicas, each one model-parallel gang
    model_name: str | None = None  # the name clients send; None = the checkpoint folder's
    # None = $MPLLAMA_API_KEY; neither set = no key asked for. Kept out of repr (and logs).
    api_key: str | None = field(default=None, repr=False)
    max_queued_requests: int = 64  # per replica, waiting to run; more get 429
    # On Ctrl-C or SIGTERM: how long requests in flight may take to finish (new ones are
    # refused meanwhile) before they are cut off and the server exits.
    drain_timeout_s: float = 5.0

    def __post_init__(self) -> None:
        _finite(self)
        if not self.host:
            raise ConfigError("host must be an address to bind, e.g. 127.0.0.1 or 0.0.0.0")
        if not 1 <= self.port <= 65535:
            raise ConfigError(f"port must be in 1..65535, got {self.port}")
        if self.replicas < 1:
            raise ConfigError(f"replicas must be >= 1, got {self.replicas}")
        if self.model_name == "" or self.api_key == "":
            raise ConfigError("model_name and api_key must be non-empty strings, or null")
        if self.max_queued_requests < 0:
            raise ConfigError(f"max_queued_requests must be >= 0, got {self.max_queued_requests}")
        if not 0 <= self.drain_timeout_s <= 600:
            raise ConfigError(
                f"drain_timeout_s must be in 0..600 seconds, got {self.drain_timeout_s}"
            )


def api_key_from_env() -> str | None:
    """The key ``mpllama serve`` asks for when serve.api_key is unset: $MPLLAMA_API_KEY
    (an environment variable keeps the secret out of YAML files and job listings)."""
    return os.environ.get("MPLLAMA_API_KEY") or None


@dataclass(frozen=True)
class RunConfig:
    """One YAML job file: everything a run needs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    sampling: SamplingParams = field(default_factory=SamplingParams)
    job: JobConfig = field(default_factory=JobConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "parallel": ParallelConfig,
    "runtime": RuntimeConfig,
    "sampling": SamplingParams,
    "job": JobConfig,
    "serve": ServeConfig,
}
PATH_KEYS = {
    ("model", "checkpoint_dir"),
    ("model", "tokenizer_path"),
    ("job", "input"),
    ("job", "output"),
}


def ray_address_from_env() -> str | None:
    """The cluster a run joins when no ray_address is configured: $RAY_ADDRESS, as with
    Ray's own tools (``ray job submit`` sets it for the jobs it starts)."""
    return os.environ.get("RAY_ADDRESS") or None


def load_run_config(
    path: str | os.PathLike[str], overrides: list[str] | dict[str, dict[str, Any]] | None = None
) -> RunConfig:
    """Read a YAML job file strictly; relative paths resolve from the file's folder.

    ``overrides`` are ``section.key=value`` strings (values parsed as YAML) or a nested
    dict; they win over the file, and their relative paths resolve from the current folder.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections {sorted(SECTIONS)}")
    data = _resolve_paths(raw, path.parent.resolve(), str(path))
    extra = parse_overrides(overrides) if not isinstance(overrides, dict) else overrides or {}
    for section, values in _resolve_paths(extra, Path.cwd(), "--set").items():
        if data.get(section) is None:  # "sampling:" with nothing under it
            data[section] = {}
        if not isinstance(data[section], dict):
            raise ConfigError(f"{path}: section '{section}' must be a mapping")
        data[section] = {**data[section], **values}
    return run_config_from_dict(data, str(path))


def run_config_from_dict(data: dict[str, Any], source: str = "config") -> RunConfig:
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"{source}: unknown section(s) {unknown}; allowed: {sorted(SECTIONS)}")
    built = {}
    for name, cls in SECTIONS.items():
        section = data.get(name) or {}
        if not isinstance(section, dict):
            raise ConfigError(f"{source}: section '{name}' must be a mapping, got {section!r}")
        built[name] = build(cls, section, f"{source}: {name}")
    return RunConfig(**built)


def parse_overrides(items: list[str] | None) -> dict[str, dict[str, Any]]:
    """``["runtime.seed=3", "sampling.stop=[\"\\n\"]"]`` -> ``{"runtime": {"seed": 3}, ...}``."""
    out: dict[str, dict[str, Any]] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or not section or not name:
            raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. runtime.seed=3")
        try:
            parsed = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError:
            parsed = value
        out.setdefault(section, {})[name] = parsed
    return out


# ------------------------------------------------------------------------ checking


def _resolve_paths(data: dict[str, Any], base: Path, source: str) -> dict[str, Any]:
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    for section, key in PATH_KEYS:
        value = out.get(section, {}).get(key) if isinstance(out.get(section), dict) else None
        if isinstance(value, str) and value:
            expanded = Path(os.path.expanduser(os.path.expandvars(value)))
            out[section][key] = str(expanded if expanded.is_absolute() else base / expanded)
    return out


def _finite(section: object) -> None:
    """Every number of a section finite: YAML reads .inf and .nan as floats, and none of
    them means anything here (an infinite KV budget crashed sizing the cache)."""
    for f in dataclasses.fields(section):  # type: ignore[arg-type]
        value = getattr(section, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{f.name} must be a finite number, got {value}")


def _one_of(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {list(allowed)}, got {value!r}")
