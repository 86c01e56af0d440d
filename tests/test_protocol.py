"""What crosses the Ray boundary: no torch on the driver's side of it, the one request
check, and the one seed rule."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from mpllama.config import SamplingParams
from mpllama.protocol import Request, check_request, derive_seed

DEMO_MODEL = Path(__file__).resolve().parents[1] / "demo" / "model"


def test_driver_side_modules_do_not_import_torch() -> None:
    """The torch boundary is the folder: every module directly under ``mpllama/`` (the
    driver side: API, engine, router, server, jobs, CLI) imports without torch or
    fairscale; they live in ``mpllama/rank/`` (the ranks' processes) and
    ``mpllama/offline/`` (checkpoint writers). Ray stays out of the CLI's parser too."""
    package = Path(__file__).resolve().parents[1] / "mpllama"
    driver = sorted(f"mpllama.{p.stem}" for p in package.glob("*.py") if p.stem != "__main__")
    assert "mpllama.engine" in driver and "mpllama.server" in driver
    code = (
        "import importlib, sys\n"
        "import mpllama.cli\n"
        "mpllama.cli.build_parser()\n"
        "assert 'ray' not in sys.modules, 'the CLI parser imported ray'\n"
        f"for name in {driver!r}:\n"
        "    importlib.import_module(name)\n"
        "from mpllama import checkpoint\n"
        f"tokenizer, args, shards = checkpoint.inspect({str(DEMO_MODEL)!r}, None)\n"
        "checkpoint.check_shards(shards, args)\n"
        "heavy = [m for m in ('torch', 'fairscale') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_check_request() -> None:
    assert check_request(Request("a", [1, 2, 3]), 8, 512) is None
    assert "no tokens" in check_request(Request("a", []), 8, 512)
    assert "max_seq_len is 3" in check_request(Request("a", [1, 2, 3]), 3, 512)
    assert "[512, -1]" in check_request(Request("a", [1, 512, 5, -1]), 8, 512)
    assert "True" in check_request(Request("a", [1, True]), 8, 512)  # bools are not ids
    far = SamplingParams(stop_token_ids=(5, 512, 900))
    assert "stop_token_ids [512, 900]" in check_request(Request("a", [1], far), 8, 512)
    assert check_request(Request("a", [1], SamplingParams(stop_token_ids=(511,))), 8, 512) is None
    biased = SamplingParams(logit_bias={511: 1.0, 512: 2.0})
    assert "logit_bias token id(s) [512]" in check_request(Request("a", [1], biased), 8, 512)
    assert check_request(Request("a", [1], SamplingParams(logit_bias={511: 1})), 8, 512) is None


def test_budget_is_max_tokens_capped_by_the_context_left() -> None:
    request = Request("a", [1] * 10, SamplingParams(max_tokens=50))
    assert request.budget(64) == 50
    assert request.budget(20) == 10


def test_derive_seed_is_stable_and_spreads() -> None:
    assert derive_seed(1, 0) == derive_seed(1, 0)
    assert derive_seed(1, 7) == derive_seed(1, "7")  # a job's id 7 and "7" are one request
    seeds = {derive_seed(s, k) for s in range(3) for k in range(100)}
    assert len(seeds) == 300
    assert all(0 <= s < 2**63 for s in seeds)
