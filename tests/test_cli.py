"""The ``mpllama`` command: help, check, init-checkpoint, reshard, convert, generate, run."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from mpllama.checkpoint import find_shards, read_params
from mpllama.cli import main
from mpllama.rank.weights import load_rank_state

COMMANDS = ["run", "generate", "chat", "init-checkpoint", "convert", "reshard", "quantize", "check"]


@pytest.mark.parametrize("command", COMMANDS)
def test_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    assert f"mpllama {command}" in capsys.readouterr().out


def test_usage_error_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["reshard", "only-one-arg"])
    assert info.value.code == 2


def error_line(capsys: pytest.CaptureFixture[str], command: str) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"mpllama {command}: error: ")
    return lines[0]


def test_check_good(tiny_ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(tiny_ckpt), "--mp", "4"]) == 0
    out = capsys.readouterr().out
    assert "ok" in out and "shards:    2" in out and "--mp 4: ok" in out
    assert "embedding split by model dimension" in out
    assert "release:   LLaMA 1/2 (RoPE scaling: none)" in out
    assert "(sentencepiece, 512 pieces = vocab_size)" in out


def test_check_and_convert_llama3(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("llama_models", reason="Meta's tokenizer.model for Llama 3")
    meta, hf, back = tmp_path / "meta", tmp_path / "hf", tmp_path / "back"
    assert main(["init-checkpoint", str(meta), "--preset", "llama3-tiny", "--mp", "2"]) == 0
    assert main(["convert", str(meta), str(hf), "--to", "hf"]) == 0
    assert main(["convert", str(hf), str(back), "--to", "meta", "--mp", "2"]) == 0
    capsys.readouterr()
    for folder in (meta, back):  # vocabulary-parallel shards, written by both
        assert main(["check", str(folder), "--mp", "4"]) == 0
        out = capsys.readouterr().out
        assert "release:   Llama 3.1/3.3 (RoPE scaling: factor 8)" in out
        assert "(tiktoken, 128256 pieces = vocab_size)" in out
        assert "--mp 4: ok" in out
        assert "embedding split by vocabulary" in out
    original, converted = full_state(meta), full_state(back)
    assert original.keys() == converted.keys()
    for key, value in original.items():
        assert torch.equal(value, converted[key]), key

    # Meta's rule says 32 for the Llama 3.2 1B/3B shapes; a params.json may say it too.
    params = json.loads((meta / "params.json").read_text())
    (meta / "params.json").write_text(json.dumps({**params, "rope_scale_factor": 32.0}))
    assert main(["check", str(meta)]) == 0
    assert "release:   Llama 3.2 (RoPE scaling: factor 32)" in capsys.readouterr().out
    (meta / "params.json").write_text(json.dumps({**params, "use_scaled_rope": False}))
    assert main(["check", str(meta)]) == 0
    assert "release:   Llama 3 (RoPE scaling: none)" in capsys.readouterr().out


def test_check_incompatible_mp(tiny_ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(tiny_ckpt), "--mp", "3"]) == 1
    assert "model_parallel_size=3" in error_line(capsys, "check")


@pytest.fixture()
def broken(tiny_ckpt: Path, tmp_path: Path) -> Path:
    out = tmp_path / "broken"
    shutil.copytree(tiny_ckpt, out)
    return out


@pytest.mark.parametrize(
    "damage, expect",
    [
        ("drop_last_shard", "does not match params.json"),
        ("truncate_shard", "cannot read shard"),
        ("bad_params", "not valid JSON"),
        ("no_tokenizer", "no tokenizer found"),
        ("unknown_key", "unknown key"),
    ],
)
def test_check_broken(
    broken: Path, damage: str, expect: str, capsys: pytest.CaptureFixture[str]
) -> None:
    if damage == "drop_last_shard":
        (broken / "consolidated.01.pth").unlink()  # 1 shard left, of half the width
    elif damage == "truncate_shard":
        shard = broken / "consolidated.00.pth"
        shard.write_bytes(shard.read_bytes()[:1000])
    elif damage == "bad_params":
        (broken / "params.json").write_text("{dim: 1")
    elif damage == "no_tokenizer":
        (broken / "tokenizer.model").unlink()
    elif damage == "unknown_key":
        params = json.loads((broken / "params.json").read_text())
        (broken / "params.json").write_text(json.dumps({**params, "moe": 8}))
    assert main(["check", str(broken)]) == 1
    assert expect in error_line(capsys, "check")


def test_console_script_error(tmp_path: Path) -> None:
    exe = Path(sys.executable).with_name("mpllama")
    proc = subprocess.run(
        [str(exe), "check", str(tmp_path / "nope")], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith("mpllama check: error: checkpoint folder")
    assert len(proc.stderr.strip().splitlines()) == 1


def full_state(folder: Path) -> dict[str, torch.Tensor]:
    return load_rank_state(find_shards(folder), read_params(folder), 0, 1)


def test_init_checkpoint_and_reshard_round_trip(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    assert main(["init-checkpoint", str(a), "--preset", "tiny", "--mp", "2", "--seed", "3"]) == 0
    assert len(find_shards(a)) == 2
    before = (a / "consolidated.00.pth").stat().st_mtime_ns
    assert main(["init-checkpoint", str(a), "--mp", "4", "--if-missing"]) == 0
    assert (a / "consolidated.00.pth").stat().st_mtime_ns == before  # left alone
    assert len(find_shards(a)) == 2

    assert main(["reshard", str(a), "--mp", "4", str(b)]) == 0
    assert main(["reshard", str(b), str(c), "--mp", "1"]) == 0
    assert len(find_shards(b)) == 4 and len(find_shards(c)) == 1
    assert (b / "tokenizer.model").read_bytes() == (a / "tokenizer.model").read_bytes()
    assert main(["check", str(b)]) == 0
    original, merged = full_state(a), full_state(c)
    assert original.keys() == merged.keys()
    for key in original:
        assert torch.equal(original[key], merged[key]), key
    assert main(["reshard", str(a), "--mp", "3", str(tmp_path / "d")]) == 1
    error_line(capsys, "reshard")


def test_reshard_reads_the_vocabulary_from_the_shards_where_params_say_minus_one(
    tiny_ckpt: Path, tmp_path: Path
) -> None:
    """Meta's LLaMA 1 and 2 params.json say vocab_size -1; reshard takes the vocabulary
    the shards hold (it failed their shapes against -1), as convert and check do."""
    src = tmp_path / "src"
    shutil.copytree(tiny_ckpt, src)
    params = json.loads((src / "params.json").read_text())
    vocab, params["vocab_size"] = params["vocab_size"], -1
    (src / "params.json").write_text(json.dumps(params))
    assert main(["reshard", str(src), str(tmp_path / "one"), "--mp", "1"]) == 0
    assert read_params(tmp_path / "one").vocab_size == vocab
    original, merged = full_state(tiny_ckpt), full_state(tmp_path / "one")
    for key in original:
        assert torch.equal(original[key], merged[key]), key


@pytest.mark.parametrize("command", ["reshard", "quantize"])
def test_a_checkpoint_written_where_its_tokenizer_already_is(
    command: str, tiny_ckpt: Path, tmp_path: Path
) -> None:
    """LLaMA 2's downloads keep tokenizer.model one folder above the model's; writing into
    that folder leaves the tokenizer where it is (copying it onto itself failed after
    every shard was written)."""
    src = tmp_path / "llama-2-7b"
    shutil.copytree(tiny_ckpt, src)
    (src / "tokenizer.model").rename(tmp_path / "tokenizer.model")
    extra = ["--mp", "1"] if command == "reshard" else ["--to", "int8"]
    assert main([command, str(src), str(tmp_path), *extra]) == 0
    assert main(["check", str(tmp_path)]) == 0


def test_reshard_keeps_llama3_vocabulary_split(tmp_path: Path) -> None:
    from mpllama.checkpoint import detect_embedding_axis, read_shapes

    a, b, c, d = (tmp_path / n for n in "abcd")
    assert main(["init-checkpoint", str(a), "--preset", "llama3-tiny", "--mp", "2"]) == 0
    assert main(["reshard", str(a), "--mp", "1", str(b)]) == 0
    assert main(["reshard", str(b), "--mp", "4", str(c)]) == 0  # one shard: the tokenizer says
    assert main(["reshard", str(c), "--mp", "2", str(d)]) == 0
    args = read_params(a)
    for folder, parts in ((a, 2), (c, 4), (d, 2)):
        shards = find_shards(folder)
        assert len(shards) == parts
        assert detect_embedding_axis(shards, args) == 0, folder
        assert read_shapes(shards[0])["tok_embeddings.weight"] == (128256 // parts, args.dim)
    original, back = full_state(a), full_state(d)
    for key in original:
        assert torch.equal(original[key], back[key]), key


def test_convert_round_trip(
    tiny_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    hf, meta = tmp_path / "hf", tmp_path / "meta"
    assert main(["convert", str(tiny_ckpt), str(hf), "--to", "hf"]) == 0
    assert (hf / "config.json").is_file()
    assert main(["convert", str(hf), str(meta), "--to", "meta"]) == 1
    assert "--mp" in error_line(capsys, "convert")
    assert main(["convert", str(hf), str(meta), "--to", "meta", "--mp", "4"]) == 0
    original, back = full_state(tiny_ckpt), full_state(meta)
    for key in original:
        assert torch.equal(original[key], back[key]), key


def write_job(tmp_path: Path, ckpt: Path) -> Path:
    rows = [{"id": i, "prompt": f"Prompt number {i}"} for i in range(5)]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = tmp_path / "job.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "model": {"checkpoint_dir": str(ckpt)},
                "parallel": {"cpus_per_rank": 0.5, "backend": "gloo"},
                "runtime": {"device": "cpu", "max_batch_size": 4, "max_seq_len": 64},
                "sampling": {"temperature": 0, "max_tokens": 4},
                "job": {"input": "in.jsonl", "output": "out/results.jsonl"},
            }
        )
    )
    return path


def test_generate_and_run(
    tmp_path: Path, tiny_ckpt: Path, ray_runtime: object, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_job(tmp_path, tiny_ckpt)
    assert (
        main(
            [
                "generate",
                "--config",
                str(path),
                "--prompt",
                "Hello",
                "--prompt",
                "World",
                "--set",
                "sampling.max_tokens=3",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "--- [0] Hello" in out and "--- [1] World" in out

    assert main(["run", str(path), "--set", "sampling.max_tokens=2"]) == 0
    out = capsys.readouterr().out
    results = tmp_path / "out" / "results.jsonl"
    assert f"results: {results}" in out and "5 request(s): 5 run now" in out
    lines = [json.loads(x) for x in results.read_text().splitlines()]
    assert sorted(r["id"] for r in lines) == list(range(5))
    assert all(r["completion_tokens"] <= 2 for r in lines)


def mpllama(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mpllama.cli", *args], capture_output=True, text=True, timeout=180
    )


def test_generate_from_a_checkpoint_folder_keeps_the_console_quiet(
    tiny_ckpt: Path, ray_runtime: Any
) -> None:
    address = ray_runtime.get_runtime_context().gcs_address
    args = ["generate", str(tiny_ckpt), "--prompt", "Hello", "--mp", "2", "--max-tokens", "4"]
    args += ["--temperature", "0", "--set", "parallel.cpus_per_rank=0.5"]
    args += ["--set", f"parallel.ray_address={address}"]
    quiet, verbose = mpllama(*args), mpllama("-v", *args)
    assert quiet.returncode == 0 and verbose.returncode == 0, quiet.stderr + verbose.stderr
    assert quiet.stdout.strip() and quiet.stdout == verbose.stdout  # greedy: the same text
    # A 2-rank start at the default level: the completion, and not a line from fairscale
    # (which announces its groups with print() on rank 0) or from any rank.
    chatter = [
        line
        for line in (quiet.stdout + quiet.stderr).splitlines()
        if "initializing" in line or "RankActor" in line or "[rank " in line
    ]
    assert not chatter and not quiet.stderr.strip(), quiet.stdout + quiet.stderr
    # -v brings it back, through the ranks' logs.
    assert "fairscale: initializing model parallel with size 2" in verbose.stderr, verbose.stderr
    assert "[rank 1]" in verbose.stderr


def test_generate_needs_exactly_one_model(
    tiny_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["generate", "--prompt", "Hi"]) == 1
    assert "give a checkpoint folder or a YAML" in error_line(capsys, "generate")
    job = write_job(tmp_path, tiny_ckpt)
    assert main(["generate", str(tiny_ckpt), "--config", str(job), "--prompt", "Hi"]) == 1
    assert "not both" in error_line(capsys, "generate")
    assert main(["generate", str(tmp_path / "nowhere"), "--prompt", "Hi"]) == 1
    assert "no such checkpoint folder or YAML file" in error_line(capsys, "generate")
    assert main(["generate", str(tmp_path), "--prompt", "Hi", "--mp", "0"]) == 1
    assert "model_parallel_size" in error_line(capsys, "generate")


def test_run_reports_bad_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", str(tmp_path / "missing.yaml")]) == 1
    assert "cannot read config file" in error_line(capsys, "run")
    path = write_job(tmp_path, tmp_path)
    assert main(["run", str(path), "--set", "runtime.max_batch_size=0"]) == 1
    assert "max_batch_size" in error_line(capsys, "run")
