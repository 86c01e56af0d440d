"""The ``mpllama`` command: run, generate, chat, serve, init-checkpoint, convert, reshard,
check.

The CLI has no defaults of its own: an option left out is not passed on, so the
dataclass (or function) default applies. Errors are one line on stderr with exit code 1
(2 for usage errors, from argparse); ``--debug`` shows the traceback.

Stopping: SIGTERM and SIGINT (Ctrl-C) stop ``run``, ``generate`` and ``serve`` the same
way, whether sent to the process or to its whole process group: the first one unwinds
the command through its cleanup (``serve`` drains, then removes everything it started;
``run`` keeps what finished, so a rerun resumes), later ones are ignored meanwhile. A
stopped ``serve`` exits 0 (stopping is how a server ends); ``run`` and ``generate`` exit
128 + the signal's number (130 for SIGINT, 143 for SIGTERM), as a shell reports them.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .cli_checkpoints import (
    cmd_check,
    cmd_convert,
    cmd_init_checkpoint,
    cmd_quantize,
    cmd_reshard,
)
from .errors import MpllamaError
from .signals import Stop, stopped_by_signals

if TYPE_CHECKING:
    from .config import RunConfig

log = logging.getLogger(__name__)

_SHOWN_RESULTS = 3  # results `mpllama run` prints after the summary


# ------------------------------------------------------------------------ commands


def cmd_run(ns: argparse.Namespace) -> int:
    from .config import load_run_config
    from .jobs import run_job

    config = load_run_config(ns.job, ns.set)
    with stopped_by_signals():
        if config.job.input and _is_parquet(config.job.input):
            return _run_dataset(config)
        try:
            summary = run_job(config)
        except KeyboardInterrupt:
            if config.job.output:
                print(
                    f"mpllama run: stopped; finished results are in {config.job.output}, "
                    "run the job again to resume",
                    file=sys.stderr,
                    flush=True,
                )
            raise
    print(f"results: {summary.output}")
    print(f"summary: {summary.describe()}")
    for record in _head(summary.output, _SHOWN_RESULTS):
        shown = record.get("text", "") if "error" not in record else f"ERROR {record['error']}"
        print(f"  [{record['id']}] {_one_line(shown)}")
    return 0


def _run_dataset(config: RunConfig) -> int:
    from .data import run_dataset

    stats = run_dataset(config)
    print(f"results: {stats['output']} (Parquet)")
    print(
        f"summary: {stats['rows']} row(s), {stats['errors']} error(s), "
        f"{stats['completion_tokens']} token(s) in {stats['wall_s']}s"
    )
    return 0


def _is_parquet(path: str) -> bool:
    """A Parquet file, or a folder of them: such jobs run through Ray Data."""
    p = Path(path)
    return p.suffix == ".parquet" or (p.is_dir() and any(p.glob("*.parquet")))


def cmd_generate(ns: argparse.Namespace) -> int:
    from .api import LLM

    config = _model_config(ns)
    with stopped_by_signals(), LLM(config=config) as llm:
        outputs = llm.generate(ns.prompt, llm.config.sampling)
    for i, out in enumerate(outputs):
        if len(outputs) > 1:
            print(f"--- [{i}] {_one_line(ns.prompt[i])}")
        print(out.text)
    return 0


def cmd_chat(ns: argparse.Namespace) -> int:
    from .chat import Chat, sigint_for_the_main_thread_only

    config = _model_config(ns)
    print(f"mpllama chat: starting {config.model.checkpoint_dir} ...", flush=True)
    # The imports too: numpy's import starts an OpenBLAS thread.
    with sigint_for_the_main_thread_only():
        from .async_llm import AsyncLLM

        llm = AsyncLLM(config=config)
    with llm:
        Chat(llm, ns.system).run()
    return 0


def _model_config(ns: argparse.Namespace) -> RunConfig:
    """generate/chat settings: a YAML, or a checkpoint folder with the dataclass
    defaults; then --set, then the flags (--mp, --max-tokens, --temperature)."""
    from .config import load_run_config, parse_overrides, run_config_from_dict
    from .errors import ConfigError

    source = ns.source
    if getattr(ns, "config", None) is not None:
        if source is not None:
            raise ConfigError(f"give {source} or --config {ns.config}, not both")
        source = ns.config
    if source is None:
        raise ConfigError(
            f"which model? give a checkpoint folder or a YAML: mpllama {ns.command} "
            "CHECKPOINT_OR_YAML ..."
        )
    overrides = parse_overrides(ns.set)
    for section, key, value in (
        ("parallel", "model_parallel_size", ns.mp),
        ("sampling", "max_tokens", ns.max_tokens),
        ("sampling", "temperature", ns.temperature),
    ):
        if value is not None:
            overrides.setdefault(section, {})[key] = value
    path = Path(source)
    if path.is_dir():  # a checkpoint folder, as `vllm complete` takes a model
        overrides["model"] = {**overrides.get("model", {}), "checkpoint_dir": str(path)}
        return run_config_from_dict(overrides, "--set")
    if not path.exists():
        raise ConfigError(f"{source}: no such checkpoint folder or YAML file")
    return load_run_config(path, overrides)


def cmd_serve(ns: argparse.Namespace) -> int:
    from .config import load_run_config
    from .deploy import Server

    config = load_run_config(ns.job, ns.set)
    server = Server(config)
    if config.serve.host not in ("127.0.0.1", "localhost", "::1") and server.api_key is None:
        print(
            f"mpllama serve: warning: listening on {config.serve.host} without an API key "
            "(set MPLLAMA_API_KEY or serve.api_key)",
            file=sys.stderr,
        )
    # SIGTERM (`kill`, `ray job stop`, a container or systemd stop) stops as Ctrl-C does,
    # during start-up too.
    with stopped_by_signals() as stopping:
        try:
            url = server.start()
            print(
                f"mpllama serve: model {server.model_name!r} ready at {url}/v1 "
                "(OpenAI API; Ctrl-C to stop)",
                flush=True,
            )
            while (lost := server.wait_lost(3600)) is None:
                pass
            raise lost  # Ray died under the server: an error, not a stop
        except KeyboardInterrupt:
            print(
                f"mpllama serve: shutting down (requests in flight get up to "
                f"{config.serve.drain_timeout_s:g}s)",
                flush=True,
            )
        finally:
            stopping.set()  # a second signal must not cut the cleanup short
            server.close()
    print("mpllama serve: stopped", flush=True)
    return 0


# ------------------------------------------------------------------------ parser


def build_parser() -> argparse.ArgumentParser:
    # --debug/-v work before or after the subcommand; SUPPRESS keeps a subparser from
    # resetting what the main parser already read.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="show tracebacks and debug logs",
    )
    common.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=argparse.SUPPRESS,
        help="log progress at INFO level",
    )

    parser = argparse.ArgumentParser(
        prog="mpllama", description="Model-parallel LLaMA inference on Ray."
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress at INFO level")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, func: Any, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common], help=help, description=help)
        p.set_defaults(func=func)
        return p

    set_help = "override a setting of the YAML, e.g. --set runtime.seed=3 (repeatable)"

    p = add(
        "run",
        cmd_run,
        "Run a YAML batch job: JSONL requests in, JSONL results out "
        "(resumable: ids already in the output are skipped).",
    )
    p.add_argument("job", metavar="JOB.yaml", help="the job file")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help=set_help)

    source_help = (
        "a checkpoint folder (Meta shards, params.json, tokenizer.model), or a job/model "
        "YAML (its model, parallel, runtime, sampling sections)"
    )

    def add_model_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--mp", type=int, metavar="N", help="model-parallel ranks")
        p.add_argument("--max-tokens", type=int, metavar="N", help="longest completion")
        p.add_argument("--temperature", type=float, metavar="T", help="0 = greedy")
        p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help=set_help)

    p = add("generate", cmd_generate, "Complete one-off prompts and print them to stdout.")
    p.add_argument("source", nargs="?", metavar="CHECKPOINT_OR_YAML", help=source_help)
    p.add_argument("--config", metavar="X.yaml", help="a job/model YAML (instead of the above)")
    p.add_argument(
        "--prompt", action="append", required=True, metavar="TEXT", help="a prompt (repeatable)"
    )
    add_model_options(p)

    p = add(
        "chat",
        cmd_chat,
        "Chat in the terminal (the model's chat format: Llama 2 [INST] or Llama 3 headers), "
        "answers streamed as they are made: "
        "Ctrl-C stops an answer, /reset clears the conversation, /exit leaves.",
    )
    p.add_argument("source", metavar="CHECKPOINT_OR_YAML", help=source_help)
    p.add_argument("--system", metavar="TEXT", help="a system prompt for the conversation")
    add_model_options(p)

    p = add(
        "serve",
        cmd_serve,
        "Serve the model over an OpenAI-compatible HTTP API (Ray Serve; one model-parallel "
        "gang per replica) until Ctrl-C or SIGTERM.",
    )
    p.add_argument(
        "job",
        metavar="SERVE.yaml",
        help="model, parallel, runtime, sampling (request defaults) and serve sections",
    )
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help=set_help)

    from .model_args import PRESETS

    p = add(
        "init-checkpoint",
        cmd_init_checkpoint,
        "Write a seeded random checkpoint (with its own tokenizer) for tests and demos.",
    )
    p.add_argument("out", metavar="OUT", help="folder to write")
    p.add_argument("--preset", choices=sorted(PRESETS), help="model size")
    p.add_argument("--mp", type=int, metavar="N", help="number of model-parallel shards")
    p.add_argument("--seed", type=int, help="weight seed")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="weight dtype")
    p.add_argument("--vocab-size", type=int, help="tokenizer pieces to train")
    p.add_argument(
        "--if-missing", action="store_true", help="do nothing when OUT already holds a checkpoint"
    )

    p = add(
        "convert", cmd_convert, "Convert between a Hugging Face safetensors folder and Meta shards."
    )
    p.add_argument("src", metavar="SRC", help="folder to read")
    p.add_argument("out", metavar="OUT", help="folder to write")
    p.add_argument("--to", required=True, choices=["meta", "hf"], help="format to write")
    p.add_argument("--mp", type=int, metavar="N", help="shards to write (--to meta)")

    p = add(
        "reshard",
        cmd_reshard,
        "Rewrite a Meta checkpoint with another number of shards (holds the full model in memory).",
    )
    p.add_argument("dir", metavar="DIR", help="checkpoint folder to read")
    p.add_argument("out", metavar="OUT", help="folder to write")
    p.add_argument("--mp", type=int, required=True, metavar="N", help="shards to write")

    p = add(
        "quantize",
        cmd_quantize,
        "Write a quantized copy of a checkpoint (int8 or int4 linear weights plus their "
        "scales), shard by shard; it loads without re-quantizing and reshards like any other.",
    )
    p.add_argument("src", metavar="CKPT", help="full-precision checkpoint folder to read")
    p.add_argument("out", metavar="OUT", help="folder to write")
    p.add_argument("--to", required=True, choices=["int8", "int4"], help="what to quantize to")
    p.add_argument(
        "--group-size",
        type=int,
        default=None,
        metavar="N",
        help="int4: weights per scale and zero along the input (32, 64, 128 or 256; "
        "default: 128 where every shard's weights take it, else 64 or 32)",
    )

    p = add(
        "check",
        cmd_check,
        "Validate a checkpoint and its tokenizer without starting Ray: shards, keys, "
        "shapes, params.json, vocabulary.",
    )
    p.add_argument("dir", metavar="DIR", help="checkpoint folder")
    p.add_argument(
        "--tokenizer",
        metavar="PATH",
        help="tokenizer.model (default: beside the shards or one folder up)",
    )
    p.add_argument(
        "--mp", type=int, metavar="N", help="also check that N model-parallel ranks can run it"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if ns.debug else logging.INFO if ns.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return ns.func(ns)
    except KeyboardInterrupt as exc:
        signum = exc.signum if isinstance(exc, Stop) else signal.SIGINT
        print(
            f"mpllama {ns.command}: stopped by {signal.Signals(signum).name}",
            file=sys.stderr,
        )
        return 128 + signum
    except (MpllamaError, ValueError, TypeError, OSError) as exc:
        if ns.debug:
            traceback.print_exc()
        message = str(exc).strip().splitlines()
        line = message[0] if message else type(exc).__name__
        hint = "" if ns.debug or len(message) <= 1 else " (--debug shows the details)"
        print(f"mpllama {ns.command}: error: {line}{hint}", file=sys.stderr)
        return 1


def _head(path: Path, n: int) -> list[dict[str, Any]]:
    out = []
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if len(out) == n:
                    break
                out.append(json.loads(line))
    except (OSError, json.JSONDecodeError):
        pass
    return out


def _one_line(text: str, width: int = 100) -> str:
    # A random demo model emits control bytes: keep the terminal sane.
    flat = "".join(c if c.isprintable() else "?" for c in " ".join(text.split()))
    return flat if len(flat) <= width else flat[: width - 3] + "..."


if __name__ == "__main__":
    sys.exit(main())
