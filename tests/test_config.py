"""ModelArgs from real params.json files, SamplingParams checks, strict YAML job loading."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from helpers import LLAMA3_RELEASES

from mpllama.config import (
    JobConfig,
    ModelConfig,
    ParallelConfig,
    RunConfig,
    RuntimeConfig,
    SamplingParams,
    load_run_config,
    parse_overrides,
    run_config_from_dict,
)
from mpllama.errors import ConfigError
from mpllama.model_args import ModelArgs

# ------------------------------------------------------------------ released params.json

# The files Meta ships, written out literally.
LLAMA1_7B = {
    "dim": 4096,
    "multiple_of": 256,
    "n_heads": 32,
    "n_layers": 32,
    "norm_eps": 1e-06,
    "vocab_size": -1,
}
LLAMA2_7B = {
    "dim": 4096,
    "multiple_of": 256,
    "n_heads": 32,
    "n_layers": 32,
    "norm_eps": 1e-05,
    "vocab_size": -1,
}
LLAMA2_13B = {
    "dim": 5120,
    "multiple_of": 256,
    "n_heads": 40,
    "n_layers": 40,
    "norm_eps": 1e-05,
    "vocab_size": -1,
}
LLAMA2_70B = {
    "dim": 8192,
    "multiple_of": 4096,
    "ffn_dim_multiplier": 1.3,
    "n_heads": 64,
    "n_kv_heads": 8,
    "n_layers": 80,
    "norm_eps": 1e-05,
    "vocab_size": -1,
}
CODELLAMA_7B = {
    "dim": 4096,
    "n_layers": 32,
    "n_heads": 32,
    "multiple_of": 256,
    "ffn_dim_multiplier": 1.0,
    "norm_eps": 1e-5,
    "rope_theta": 1000000,
    "vocab_size": 32016,
}
CODELLAMA_34B = {
    "dim": 8192,
    "n_layers": 48,
    "n_heads": 64,
    "n_kv_heads": 8,
    "multiple_of": 256,
    "ffn_dim_multiplier": 1.0,
    "norm_eps": 1e-5,
    "rope_theta": 1000000,
    "vocab_size": 32000,
}

# name: (params, ffn_dim, kv_heads, head_dim, rope_theta, vocab_size, norm_eps)
RELEASED = {
    "llama1-7b": (LLAMA1_7B, 11008, 32, 128, 10000.0, -1, 1e-6),
    "llama2-7b": (LLAMA2_7B, 11008, 32, 128, 10000.0, -1, 1e-5),
    "llama2-13b": (LLAMA2_13B, 13824, 40, 128, 10000.0, -1, 1e-5),
    "llama2-70b": (LLAMA2_70B, 28672, 8, 128, 10000.0, -1, 1e-5),
    "codellama-7b": (CODELLAMA_7B, 11008, 32, 128, 1e6, 32016, 1e-5),
    "codellama-34b": (CODELLAMA_34B, 22016, 8, 128, 1e6, 32000, 1e-5),
}


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_released_params(name: str) -> None:
    params, ffn_dim, kv_heads, head_dim, theta, vocab, eps = RELEASED[name]
    args = ModelArgs.from_params(dict(params))
    assert args.ffn_dim == ffn_dim
    assert args.kv_heads == kv_heads
    assert args.head_dim == head_dim
    assert args.rope_theta == theta and isinstance(args.rope_theta, float)
    assert args.vocab_size == vocab
    assert args.norm_eps == eps
    for key, value in params.items():
        assert getattr(args, key) == value, key
    # to_params is the inverse: optional keys stay absent when params.json lacks them.
    again = ModelArgs.from_params(args.to_params())
    assert again == args
    assert ("n_kv_heads" in args.to_params()) == ("n_kv_heads" in params)


def test_missing_keys_take_meta_defaults() -> None:
    args = ModelArgs.from_params({"dim": 256, "n_layers": 2, "n_heads": 4})
    assert args.n_kv_heads is None and args.kv_heads == 4
    assert args.rope_theta == 10000.0 and args.vocab_size == -1
    assert args.ffn_dim_multiplier is None


def test_unknown_params_key_is_named() -> None:
    with pytest.raises(ConfigError, match=r"my/params\.json: unknown key.*'moe_experts'"):
        ModelArgs.from_params({**LLAMA2_7B, "moe_experts": 16}, "my/params.json")


def test_llama_3_1_params_load_with_scaled_rope() -> None:
    args = ModelArgs.from_params(
        {**LLAMA2_7B, "n_kv_heads": 8, "vocab_size": 128256, "use_scaled_rope": True}
    )
    assert args.use_scaled_rope and args.rope_scaling_factor == 8.0
    assert ModelArgs.from_params(LLAMA2_7B).rope_scaling_factor is None
    assert args.to_params()["use_scaled_rope"] is True
    assert "use_scaled_rope" not in ModelArgs.from_params(LLAMA2_7B).to_params()


@pytest.mark.parametrize(
    "dim, n_layers, factor", [(2048, 16, 32.0), (3072, 28, 32.0), (4096, 32, 8.0), (2048, 28, 8.0)]
)
def test_rope_scale_factor_follows_meta_rule(dim: int, n_layers: int, factor: float) -> None:
    # Llama 3.2 1B (2048 x 16) and 3B (3072 x 28) were trained with 32, everything else 8.
    args = ModelArgs(dim=dim, n_layers=n_layers, n_heads=16, use_scaled_rope=True)
    assert args.rope_scaling_factor == factor


def test_rope_scale_factor_setting_overrides_the_rule() -> None:
    args = ModelArgs(dim=2048, n_layers=16, n_heads=16, use_scaled_rope=True, rope_scale_factor=8)
    assert args.rope_scaling_factor == 8
    with pytest.raises(ConfigError, match="rope_scale_factor must be >= 1"):
        ModelArgs.from_params({**LLAMA2_7B, "use_scaled_rope": True, "rope_scale_factor": 0.5})


@pytest.mark.parametrize(
    "key, variant",
    [
        ("quantization_args", "quantized"),
        ("lora_args", "QLoRA"),
        ("vision_chunk_size", "Vision"),
    ],
)
def test_meta_variants_are_refused_by_name(key: str, variant: str) -> None:
    with pytest.raises(ConfigError, match=f"{variant}.*{key}.*not support"):
        ModelArgs.from_params({**LLAMA2_7B, key: {"group_size": 32}}, "my/params.json")


@pytest.mark.parametrize(
    "key, value",
    [
        ("dim", "4096"),
        ("n_layers", 32.5),
        ("norm_eps", "1e-5"),
        ("n_kv_heads", True),
        ("ffn_dim_multiplier", [1.3]),
    ],
)
def test_wrong_params_type_names_the_key(key: str, value: object) -> None:
    with pytest.raises(ConfigError) as info:
        ModelArgs.from_params({**LLAMA2_70B, key: value}, "70b/params.json")
    assert f"70b/params.json.{key}: {value!r} is not" in str(info.value)


@pytest.mark.parametrize(
    "change, words",
    [
        ({"n_kv_heads": 3}, "n_kv_heads=3"),
        ({"n_heads": 0}, "n_heads"),
        ({"dim": 4100}, "dim=4100"),
        ({"vocab_size": 0}, "vocab_size"),
        ({"norm_eps": 0.0}, "norm_eps"),
    ],
)
def test_impossible_params(change: dict, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        ModelArgs.from_params({**LLAMA2_70B, **change})


def test_params_must_be_an_object() -> None:
    with pytest.raises(ConfigError, match="expected a JSON object, got list"):
        ModelArgs.from_params([4096])  # type: ignore[arg-type]


# --------------------------------------------------------------------- SamplingParams


@pytest.mark.parametrize(
    "kwargs, shown",
    [
        ({"max_tokens": 0}, "0"),
        ({"max_tokens": -3}, "-3"),
        ({"temperature": -0.5}, "-0.5"),
        ({"temperature": float("inf")}, "inf"),
        ({"temperature": float("nan")}, "nan"),
        ({"top_p": 0.0}, "0.0"),
        ({"top_p": 1.5}, "1.5"),
        ({"top_p": -0.1}, "-0.1"),
        ({"top_k": -1}, "-1"),
        ({"seed": -7}, "-7"),
        ({"presence_penalty": 2.5}, "2.5"),
        ({"presence_penalty": -2.01}, "-2.01"),
        ({"frequency_penalty": -3}, "-3"),
        ({"repetition_penalty": 0}, "0"),
        ({"repetition_penalty": -1.0}, "-1.0"),
        ({"logit_bias": {5: 100.5}}, "100.5"),
        ({"logit_bias": {-1: 1.0}}, "-1"),
        ({"min_tokens": -1}, "-1"),
        ({"min_tokens": 17}, "17"),  # more than max_tokens (16)
        ({"top_logprobs": 21}, "21"),
        ({"top_logprobs": -1}, "-1"),
    ],
)
def test_sampling_value_errors_show_the_value(kwargs: dict, shown: str) -> None:
    (name,) = kwargs
    with pytest.raises(ValueError, match=name) as info:
        SamplingParams(**kwargs)
    assert shown in str(info.value)


@pytest.mark.parametrize(
    "kwargs, shown",
    [
        ({"max_tokens": "16"}, "'16'"),
        ({"max_tokens": 2.5}, "2.5"),
        ({"max_tokens": True}, "True"),
        ({"temperature": "hot"}, "'hot'"),
        ({"top_k": 1.0}, "1.0"),
        ({"seed": "1"}, "'1'"),
        ({"stop": ["ok", 3]}, "3"),
        ({"ignore_eos": 1}, "1"),
        ({"logprobs": "yes"}, "'yes'"),
        ({"presence_penalty": "1"}, "'1'"),
        ({"min_tokens": 1.0}, "1.0"),
        ({"logit_bias": [1, 2]}, "[1, 2]"),
        ({"logit_bias": {"a": 1}}, "'a'"),
        ({"logit_bias": {1: "big"}}, "'big'"),
        ({"logit_bias": {1: True}}, "True"),
    ],
)
def test_sampling_type_errors_show_the_value(kwargs: dict, shown: str) -> None:
    (name,) = kwargs
    with pytest.raises(TypeError, match=name) as info:
        SamplingParams(**kwargs)
    assert shown in str(info.value)


def test_empty_stop_string_is_refused() -> None:
    with pytest.raises(ValueError, match="stop strings must not be empty"):
        SamplingParams(stop=["a", ""])


def test_stop_becomes_a_tuple() -> None:
    assert SamplingParams(stop="\n").stop == ("\n",)
    assert SamplingParams(stop=["a", "bc"]).stop == ("a", "bc")
    assert SamplingParams(stop=("x",)).stop == ("x",)
    assert SamplingParams().stop == ()
    hash(SamplingParams(stop=["a"]))  # frozen and hashable once the list is a tuple


def test_ints_become_floats() -> None:
    p = SamplingParams(temperature=1, top_p=1)
    assert isinstance(p.temperature, float) and isinstance(p.top_p, float)


@pytest.mark.parametrize(
    "kwargs, greedy",
    [
        ({}, False),
        ({"temperature": 0}, True),
        ({"temperature": 0.0, "top_k": 5}, True),
        ({"temperature": 0.7, "top_k": 1}, True),
        ({"temperature": 1e-4}, False),
        ({"top_k": 2}, False),
        ({"top_p": 1e-6}, False),
    ],
)
def test_greedy_property(kwargs: dict, greedy: bool) -> None:
    assert SamplingParams(**kwargs).greedy is greedy


def test_replace_validates() -> None:
    p = SamplingParams(max_tokens=4)
    assert p.replace(top_k=3) == SamplingParams(max_tokens=4, top_k=3)
    with pytest.raises(ValueError, match="-1"):
        p.replace(top_k=-1)


# ------------------------------------------------------------------- run settings


@pytest.mark.parametrize(
    "cls, kwargs, words",
    [
        (ParallelConfig, {"model_parallel_size": 0}, "model_parallel_size.*0"),
        (ParallelConfig, {"backend": "mpi"}, "backend.*'mpi'"),
        (ParallelConfig, {"placement_strategy": "pack"}, "placement_strategy.*'pack'"),
        (ParallelConfig, {"cpus_per_rank": 0}, "cpus_per_rank.*0"),
        (ParallelConfig, {"call_timeout_s": -1.0}, "call_timeout_s.*-1"),
        (ParallelConfig, {"heartbeat_timeout_s": 0}, "heartbeat_timeout_s.*0"),
        (ParallelConfig, {"max_restarts": -1}, "max_restarts.*-1"),
        (RuntimeConfig, {"device": "tpu"}, "device.*'tpu'"),
        (RuntimeConfig, {"dtype": "fp16"}, "dtype.*'fp16'"),
        (RuntimeConfig, {"cpu_linear": "mkl"}, "cpu_linear.*'mkl'"),
        (RuntimeConfig, {"max_batch_size": 0}, "max_batch_size.*0"),
        (RuntimeConfig, {"max_seq_len": 1}, "max_seq_len.*1"),
        (JobConfig, {"on_bad_line": "ignore"}, "on_bad_line.*'ignore'"),
        # YAML's .inf and .nan: an infinite KV budget crashed sizing the cache, a NaN
        # timeout converting it; -1 GPUs waited 60 s for a placement that cannot be.
        (RuntimeConfig, {"kv_cache_memory_gb": float("inf")}, "kv_cache_memory_gb.*finite"),
        (ParallelConfig, {"placement_timeout_s": float("nan")}, "placement_timeout_s.*finite"),
        (ParallelConfig, {"cpus_per_rank": float("inf")}, "cpus_per_rank.*finite"),
        (ParallelConfig, {"gpus_per_rank": -1.0}, "gpus_per_rank.*-1"),
        (ParallelConfig, {"restart_backoff_s": -5.0}, "restart_backoff_s.*-5"),
        (ModelConfig, {"rope_scale_factor": float("nan")}, "rope_scale_factor.*finite"),
    ],
)
def test_run_settings_reject_impossible_values(cls: type, kwargs: dict, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        cls(**kwargs)


def test_heartbeat_timeout_is_its_own_setting(tmp_path: Path) -> None:
    # How long a silent rank may stay silent is not how long a collective may wait.
    assert ParallelConfig().heartbeat_timeout_s == 60.0
    path = write(tmp_path, "parallel:\n  heartbeat_timeout_s: 5\n")
    cfg = load_run_config(path, ["parallel.collective_timeout_s=120"])
    assert cfg.parallel.heartbeat_timeout_s == 5.0
    assert isinstance(cfg.parallel.heartbeat_timeout_s, float)
    assert cfg.parallel.collective_timeout_s == 120.0
    with pytest.raises(ConfigError, match="heartbeat_timeout_s.*'soon'"):
        load_run_config(path, ["parallel.heartbeat_timeout_s=soon"])


# ---------------------------------------------------------------------------- YAML

FULL_JOB = """\
model:
  checkpoint_dir: ckpt/tiny
  tokenizer_path: ../tok/tokenizer.model
parallel:
  model_parallel_size: 2
  backend: gloo
  placement_strategy: SPREAD
  cpus_per_rank: 2
  call_timeout_s: 30
  max_restarts: 0
runtime:
  device: cpu
  dtype: float32
  max_batch_size: 4
  max_seq_len: 128
  seed: 7
sampling:
  max_tokens: 32
  temperature: 0.7
  top_p: 0.9
  top_k: 40
  stop: ["\\n\\n", "###"]
  logprobs: true
job:
  input: prompts.jsonl
  output: /abs/out.jsonl
  on_bad_line: skip
  progress: false
"""


def write(folder: Path, text: str, name: str = "job.yaml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text)
    return path


def test_full_job_file_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path / "jobs", FULL_JOB)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # relative paths must not depend on the current folder
    cfg = load_run_config(path)
    folder = (tmp_path / "jobs").resolve()
    assert cfg.model.checkpoint_dir == str(folder / "ckpt/tiny")
    assert Path(cfg.model.tokenizer_path).resolve() == (tmp_path / "tok/tokenizer.model").resolve()
    assert cfg.job.input == str(folder / "prompts.jsonl")
    assert cfg.job.output == "/abs/out.jsonl"
    assert cfg.parallel == ParallelConfig(
        model_parallel_size=2,
        backend="gloo",
        placement_strategy="SPREAD",
        cpus_per_rank=2.0,
        call_timeout_s=30.0,
        max_restarts=0,
    )
    assert isinstance(cfg.parallel.cpus_per_rank, float)
    assert cfg.runtime == RuntimeConfig(
        device="cpu", dtype="float32", max_batch_size=4, max_seq_len=128, seed=7
    )
    assert cfg.sampling == SamplingParams(
        max_tokens=32, temperature=0.7, top_p=0.9, top_k=40, stop=("\n\n", "###"), logprobs=True
    )
    assert cfg.job == JobConfig(
        input=str(folder / "prompts.jsonl"),
        output="/abs/out.jsonl",
        on_bad_line="skip",
        progress=False,
    )


def test_empty_file_and_empty_sections_give_defaults(tmp_path: Path) -> None:
    assert load_run_config(write(tmp_path, "")) == RunConfig()
    assert load_run_config(write(tmp_path, "runtime:\nsampling: {}\n")) == RunConfig()


def test_single_stop_string_in_yaml(tmp_path: Path) -> None:
    cfg = load_run_config(write(tmp_path, "sampling:\n  stop: END\n"))
    assert cfg.sampling.stop == ("END",)


def test_stop_token_ids_in_yaml_and_code(tmp_path: Path) -> None:
    cfg = load_run_config(write(tmp_path, "sampling:\n  stop_token_ids: [128009, 7]\n"))
    assert cfg.sampling.stop_token_ids == (128009, 7)
    assert SamplingParams(stop_token_ids=[3]).stop_token_ids == (3,)
    assert SamplingParams().stop_token_ids == ()
    hash(SamplingParams(stop_token_ids=[3]))
    with pytest.raises(ValueError, match=r"stop_token_ids must be token ids.*\[-1\]"):
        SamplingParams(stop_token_ids=[-1])
    for bad, words in [("[a]", "'a' is not an integer"), ("5", "expected a list of integers")]:
        with pytest.raises(ConfigError, match=rf"sampling\.stop_token_ids: {words}"):
            load_run_config(write(tmp_path, f"sampling:\n  stop_token_ids: {bad}\n"))


def test_home_and_env_vars_expand(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MPLLAMA_TEST_MODELS", str(tmp_path / "models"))
    cfg = load_run_config(
        write(tmp_path / "a", "model:\n  checkpoint_dir: $MPLLAMA_TEST_MODELS/7b\n")
    )
    assert cfg.model.checkpoint_dir == str(tmp_path / "models/7b")


@pytest.mark.parametrize(
    "text, words",
    [
        ("modle:\n  checkpoint_dir: x\n", r"unknown section.*'modle'"),
        ("runtime:\n  max_batch: 4\n", r"runtime: unknown key.*'max_batch'"),
        ("sampling:\n  temprature: 0.5\n", r"sampling: unknown key.*'temprature'"),
        (
            "runtime:\n  max_batch_size: four\n",
            r"runtime\.max_batch_size: 'four' is not an integer",
        ),
        ("runtime:\n  max_batch_size: 4.5\n", r"runtime\.max_batch_size: 4\.5"),
        ("sampling:\n  logprobs: 1\n", r"sampling\.logprobs: 1 is not true/false"),
        ("sampling:\n  stop: [1, 2]\n", r"sampling\.stop"),
        ("parallel:\n  cpus_per_rank: '2'\n", r"parallel\.cpus_per_rank: '2'"),
        ("runtime:\n  max_batch_size: 0\n", r"runtime: max_batch_size must be >= 1, got 0"),
        ("sampling:\n  top_p: 1.5\n", r"sampling: top_p .* got 1\.5"),
        ("parallel:\n  backend: mpi\n", r"parallel: backend .*'mpi'"),
        ("runtime: 4\n", r"section 'runtime' must be a mapping"),
        ("- a\n- b\n", r"expected a mapping of sections"),
        ("runtime: [unclosed\n", r"not valid YAML"),
    ],
)
def test_bad_yaml_names_file_and_key(tmp_path: Path, text: str, words: str) -> None:
    path = write(tmp_path, text, "bad-job.yaml")
    with pytest.raises(ConfigError, match=words) as info:
        load_run_config(path)
    assert str(path) in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot read config file .*nope\.yaml"):
        load_run_config(tmp_path / "nope.yaml")


# ------------------------------------------------------------------------ overrides


def test_parse_overrides() -> None:
    got = parse_overrides(
        [
            "runtime.seed=3",
            'sampling.stop=["\\n", "###"]',
            "sampling.temperature=0",
            "model.tokenizer_path=",
            "job.input = a=b.jsonl",
            "runtime.dtype=float16",
        ]
    )
    assert got == {
        "runtime": {"seed": 3, "dtype": "float16"},
        "sampling": {"stop": ["\n", "###"], "temperature": 0},
        "model": {"tokenizer_path": None},
        "job": {"input": "a=b.jsonl"},  # only the first '=' splits
    }
    assert parse_overrides(None) == {} == parse_overrides([])


@pytest.mark.parametrize("item", ["runtime.seed", "seed=3", "runtime.=3", ".seed=3"])
def test_parse_overrides_rejects_malformed(item: str) -> None:
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_overrides([item])


def test_overrides_win_over_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path / "jobs", FULL_JOB)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    cfg = load_run_config(
        path,
        [
            "runtime.seed=11",
            "sampling.temperature=0",
            "job.input=mine.jsonl",
            "parallel.backend=auto",
        ],
    )
    assert cfg.runtime.seed == 11
    assert cfg.runtime.max_batch_size == 4  # the rest of the section is kept
    assert cfg.sampling.temperature == 0.0 and cfg.sampling.greedy
    assert cfg.sampling.top_k == 40
    assert cfg.parallel.backend == "auto" and cfg.parallel.placement_strategy == "SPREAD"
    # An override's relative path is the user's, so it resolves from the current folder.
    assert cfg.job.input == str(cwd.resolve() / "mine.jsonl")
    assert cfg.model.checkpoint_dir == str((tmp_path / "jobs").resolve() / "ckpt/tiny")


def test_dict_overrides_and_new_sections(tmp_path: Path) -> None:
    path = write(tmp_path, "runtime:\n  seed: 2\n")
    cfg = load_run_config(path, {"runtime": {"seed": 5}, "sampling": {"max_tokens": 3}})
    assert cfg.runtime.seed == 5 and cfg.sampling.max_tokens == 3


def test_override_into_an_empty_section(tmp_path: Path) -> None:
    # `sampling:` with nothing under it is a valid (empty) section in the file...
    path = write(tmp_path, "sampling:\n")
    assert load_run_config(path).sampling == SamplingParams()
    # ...so --set must be able to fill it.
    assert load_run_config(path, ["sampling.max_tokens=3"]).sampling.max_tokens == 3


@pytest.mark.parametrize(
    "item, words",
    [
        ("runtime.max_batch_size=0", r"runtime: max_batch_size must be >= 1"),
        ("runtime.seeds=3", r"runtime: unknown key.*'seeds'"),
        ("runtim.seed=3", r"unknown section.*'runtim'"),
        ("sampling.top_k=many", r"sampling\.top_k: 'many' is not an integer"),
    ],
)
def test_bad_overrides_are_config_errors(tmp_path: Path, item: str, words: str) -> None:
    path = write(tmp_path, "runtime:\n  seed: 2\n")
    with pytest.raises(ConfigError, match=words):
        load_run_config(path, [item])


def test_run_config_from_dict_defaults() -> None:
    cfg = run_config_from_dict({"sampling": {"temperature": 0}})
    assert cfg.sampling.greedy and cfg.runtime == RuntimeConfig()
    assert math.isclose(cfg.sampling.top_p, 1.0)


# ---------------------------------------------------------------------- serve section


def test_serve_section_defaults_and_yaml(tmp_path: Path) -> None:
    from mpllama.config import ServeConfig

    assert RunConfig().serve == ServeConfig()
    assert ServeConfig().host == "127.0.0.1"  # never the network unless asked
    text = (
        "model:\n  checkpoint_dir: ckpt\nserve:\n  host: 0.0.0.0\n  port: 9000\n  replicas: 2\n"
        "  model_name: llama\n  api_key: sk-1\n  max_queued_requests: 0\n"
    )
    cfg = load_run_config(write(tmp_path, text), ["serve.port=9001"])
    assert cfg.serve == ServeConfig(
        host="0.0.0.0",
        port=9001,
        replicas=2,
        model_name="llama",
        api_key="sk-1",
        max_queued_requests=0,
    )


def test_serve_api_key_stays_out_of_repr() -> None:

    cfg = run_config_from_dict({"serve": {"api_key": "sk-secret"}})
    assert cfg.serve.api_key == "sk-secret"
    assert "sk-secret" not in repr(cfg)


def test_serve_api_key_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from mpllama.config import api_key_from_env

    monkeypatch.delenv("MPLLAMA_API_KEY", raising=False)
    assert api_key_from_env() is None
    monkeypatch.setenv("MPLLAMA_API_KEY", "sk-env")
    assert api_key_from_env() == "sk-env"


@pytest.mark.parametrize(
    "values, words",
    [
        ({"port": 0}, "port.*0"),
        ({"port": 70000}, "port.*70000"),
        ({"replicas": 0}, "replicas.*0"),
        ({"max_queued_requests": -1}, "max_queued_requests.*-1"),
        ({"host": ""}, "host"),
        ({"api_key": ""}, "api_key"),
        ({"port": "8000"}, r"serve\.port: '8000' is not an integer"),
        ({"hostname": "x"}, r"unknown key\(s\) \['hostname'\]"),
    ],
)
def test_serve_section_rejects_bad_values(values: dict, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        run_config_from_dict({"serve": values})


TEMPLATES = Path(__file__).resolve().parent.parent / "configs" / "models"


def test_every_model_template_loads() -> None:
    names = sorted(p.stem for p in TEMPLATES.glob("*.yaml"))
    assert set(LLAMA3_RELEASES) - {"llama3-70b"} <= set(names)
    for name in names:
        load_run_config(TEMPLATES / f"{name}.yaml")


@pytest.mark.parametrize("name", sorted(set(LLAMA3_RELEASES) - {"llama3-70b"}))
def test_llama3_templates_fit_their_release(name: str) -> None:
    from mpllama.shard_axes import check_model_parallel

    cfg = load_run_config(TEMPLATES / f"{name}.yaml")
    args = ModelArgs.from_params(LLAMA3_RELEASES[name].to_params())
    mp = cfg.parallel.model_parallel_size
    assert mp is not None
    check_model_parallel(args, mp)  # raises when the template's rank count cannot split it
    assert cfg.runtime.max_seq_len <= (8192 if name == "llama3-8b" else 131072)
    # The factor the README and the template promise: 32 for 3.2 1B/3B only.
    expected = None if name == "llama3-8b" else 32.0 if name.startswith("llama3.2") else 8.0
    assert args.rope_scaling_factor == expected


def test_penalties_logit_bias_and_min_tokens_in_yaml_and_code(tmp_path: Path) -> None:
    text = (
        "sampling:\n  presence_penalty: 0.5\n  frequency_penalty: -1\n"
        "  repetition_penalty: 1.2\n  min_tokens: 4\n  logit_bias: {7: 5, '12': -100}\n"
    )
    cfg = load_run_config(write(tmp_path, text))
    assert cfg.sampling == SamplingParams(
        presence_penalty=0.5,
        frequency_penalty=-1.0,
        repetition_penalty=1.2,
        min_tokens=4,
        logit_bias={7: 5.0, 12: -100.0},
    )
    assert isinstance(cfg.sampling.frequency_penalty, float)
    assert all(isinstance(v, float) for v in cfg.sampling.logit_bias.values())
    # JSON's string keys, as OpenAI clients send them; the dict is copied, not shared.
    bias = {"3": 1}
    p = SamplingParams(logit_bias=bias)
    assert p.logit_bias == {3: 1.0} and p.adjusts_logits and not SamplingParams().adjusts_logits
    bias["4"] = 2
    assert p.logit_bias == {3: 1.0}
    hash(p)  # still hashable: logit_bias is left out of the hash
    assert p == SamplingParams(logit_bias={3: 1.0}) != SamplingParams(logit_bias={3: 2.0})
    over = load_run_config(write(tmp_path, ""), ["sampling.logit_bias={9: 1}"]).sampling
    assert over.logit_bias == {9: 1.0}
    with pytest.raises(ConfigError, match=r"sampling\.logit_bias: key 'x' is not an integer"):
        load_run_config(write(tmp_path, "sampling:\n  logit_bias: {x: 1}\n"))
    with pytest.raises(ConfigError, match=r"presence_penalty must be in \[-2, 2\]"):
        load_run_config(write(tmp_path, "sampling:\n  presence_penalty: 9\n"))


def test_top_logprobs_needs_logprobs() -> None:
    assert SamplingParams(logprobs=True, top_logprobs=20).top_logprobs == 20
    with pytest.raises(ValueError, match="top_logprobs needs logprobs=True"):
        SamplingParams(top_logprobs=2)


def test_dtype_left_out_is_mpllama_dtype_else_auto(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MPLLAMA_DTYPE", raising=False)
    assert RuntimeConfig().dtype == "auto"
    monkeypatch.setenv("MPLLAMA_DTYPE", "bfloat16")
    assert RuntimeConfig().dtype == "bfloat16"
    assert RuntimeConfig(dtype="float32").dtype == "float32"  # YAML and keywords win
    monkeypatch.setenv("MPLLAMA_DTYPE", "float64")
    with pytest.raises(ConfigError, match="dtype"):
        RuntimeConfig()
