"""RankWorker without Ray: a one-rank set-up, a batch, and the rank in every log line."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from mpllama import checkpoint
from mpllama.config import SamplingParams
from mpllama.generate import Request
from mpllama.tokenizer import Tokenizer
from mpllama.worker import RankSpec, RankWorker, configure_rank_logging


def spec_for(ckpt: Path, world: int = 1) -> RankSpec:
    tok = Tokenizer(ckpt / "tokenizer.model")
    args = checkpoint.resolve_vocab(checkpoint.read_params(ckpt), tok.n_words)
    return RankSpec(
        checkpoint_dir=str(ckpt),
        args=args,
        tokenizer_proto=tok.model_proto,
        world_size=world,
        max_batch_size=2,
        max_seq_len=32,
    )


def test_one_rank_worker_sets_up_and_generates(
    tiny_ckpts: dict[int, Path], single_rank: None
) -> None:
    worker = RankWorker(0, spec_for(tiny_ckpts[2]))  # 2 shards merged onto one rank
    info = worker.setup("127.0.0.1", 0, "127.0.0.1")
    assert (info["device"], info["dtype"], info["backend"]) == ("cpu", "float32", "gloo")
    ids = worker.tokenizer.encode("Hello", bos=True, eos=False)
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    done = worker.generate([Request(ids, params), Request(ids, params), Request(ids, params)])
    assert len(done) == 3 and all(len(c.token_ids) == 3 for c in done)
    assert done[0].token_ids == done[2].token_ids  # the third ran in a second chunk
    assert worker.memory()["peak_rss_mb"] > 0


def test_generate_before_setup_is_an_error(tiny_ckpt: Path) -> None:
    worker = RankWorker(0, spec_for(tiny_ckpt))
    with pytest.raises(RuntimeError, match="before setup"):
        worker.generate([])


def test_rank_logging_puts_the_rank_in_every_line(capfd: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    before_handlers, before_level = list(root.handlers), root.level
    try:
        configure_rank_logging(3)
        configure_rank_logging(3)  # idempotent: one handler, not two
        logging.getLogger("mpllama.test").info("hello from a rank")
        lines = [ln for ln in capfd.readouterr().err.splitlines() if "hello from" in ln]
        assert len(lines) == 1 and lines[0].startswith("[rank 3] ")
    finally:
        root.handlers[:] = before_handlers
        root.setLevel(before_level)
