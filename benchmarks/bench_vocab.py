"""The llama3 part of the bench: a Llama-3-shaped model (vocabulary 128256, random
weights) decoding a full batch, each decode step's time split into forward, logits
(the output layer and moving the logits to the lead) and sampling.

The ranks run the engine's own per-step code (``Runner`` on the lead, ``follow`` on the
others) in processes of their own, without Ray, so each piece can be timed on the lead:
the output layer by module hooks, the logits' gather by wrapping it, sampling by
wrapping ``Runner._sample``. "forward" is the rest of the step (the layers, the plan
broadcast and scheduling); at MP=2 each row is the best of two alternated runs. Two
baselines from the same run: the logits all-gathered to every rank (what the engine did
before gathering them to the lead only), and sampling by a full sort and
``torch.multinomial`` over the whole vocabulary (the sampler before).

The weights are random and made on each rank for its own slice: the numbers are about
time, not text, so no checkpoint is written or loaded.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from mpllama.config import SamplingParams
from mpllama.model_args import LLAMA3_VOCAB_SIZE, ModelArgs
from mpllama.protocol import Request
from mpllama.rank import dist
from mpllama.rank import model as model_module
from mpllama.rank.layers import onednn_unsupported
from mpllama.rank.model import Transformer, materialize
from mpllama.rank.runner import Runner
from mpllama.rank.sampling import greedy, top_k_filter, top_p_filter
from mpllama.rank.step_plan import follow

# The repo's "small" preset's dims with Llama 3's vocabulary, GQA and scaled RoPE.
LLAMA3_MODEL = ModelArgs(
    dim=512,
    n_layers=8,
    n_heads=8,
    n_kv_heads=4,
    multiple_of=64,
    norm_eps=1e-5,
    rope_theta=500000.0,
    use_scaled_rope=True,
    vocab_size=LLAMA3_VOCAB_SIZE,
)
QUICK_LLAMA3_MODEL = ModelArgs(
    dim=128,
    n_layers=2,
    n_heads=8,
    n_kv_heads=2,
    multiple_of=32,
    norm_eps=1e-5,
    rope_theta=500000.0,
    use_scaled_rope=True,
    vocab_size=LLAMA3_VOCAB_SIZE,
)
SETTINGS = {
    "greedy": SamplingParams(temperature=0),
    "T=0.8 top_p=0.9": SamplingParams(temperature=0.8, top_p=0.9),
    "top_k=50": SamplingParams(top_k=50),
}
PROMPT_LEN = 16
ROUNDS = 2  # of each way of moving the logits, at MP=2
SHM_SLOT_CAP = 8 << 20  # as a rank sizes its shared-memory slots (rank_setup.py)


@dataclass(frozen=True)
class Job:
    args: ModelArgs
    rows: int
    steps: int  # decode steps timed per setting
    tokenizer: str
    threads: int
    seed: int
    shm: bool = True  # MP=2: collectives through shared memory (else Gloo, as across nodes)


def tokenizer_path() -> Path:
    """Meta's real Llama 3 tokenizer.model, shipped in llama-models (the test extra)."""
    import llama_models.llama3.tokenizer as meta

    return Path(meta.__file__).parent / "tokenizer.model"


def random_model(args: ModelArgs, seed: int) -> Transformer:
    """The model with random weights in this rank's slice shapes. The output layer is
    scaled for logits of standard deviation about 4: top-p 0.9 at T=0.8 then keeps tens
    to a hundred-odd tokens, as with a trained model; at 2 (a flatter, untrained-looking
    row, see ``per_row_sampling``) it keeps about 14000."""
    model = Transformer(args)
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, meta in model.state_dict().items():
        if meta.dim() == 1:
            state[key] = torch.ones(meta.shape)
        else:
            state[key] = torch.randn(meta.shape, generator=gen) / meta.shape[-1] ** 0.5
            if key == "output.weight":
                state[key] *= 4.0
    model = materialize(model, state, torch.device("cpu"), torch.float32)
    if onednn_unsupported(torch.device("cpu"), torch.float32) is None:
        model.pack_linears()  # as a CPU worker does
    return model


class Clock:
    """Seconds spent in each piece during the timed steps."""

    def __init__(self) -> None:
        self.on = False
        self.spent = {"step": 0.0, "output": 0.0, "gather": 0.0, "sampling": 0.0}
        self.steps = 0
        self._t0 = 0.0

    def add(self, what: str, seconds: float) -> None:
        if self.on:
            self.spent[what] += seconds

    def wrap(self, what: str, fn):  # noqa: ANN001, ANN202 - any callable
        def timed(*a, **k):  # noqa: ANN002, ANN003, ANN202
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.add(what, time.perf_counter() - t0)

        return timed

    def time_output_layer(self, model: Transformer) -> None:
        def pre(*_: object) -> None:
            self._t0 = time.perf_counter()

        def post(*_: object) -> None:
            self.add("output", time.perf_counter() - self._t0)

        model.output.register_forward_pre_hook(pre)
        model.output.register_forward_hook(post)


def rank_main(job: Job, port: int, rank: int, world: int, out: mp.Queue) -> None:
    try:
        out.put((rank, _rank_main(job, port, rank, world)))
    except BaseException as exc:
        out.put((rank, f"{type(exc).__name__}: {exc}"))
        raise


def _rank_main(job: Job, port: int, rank: int, world: int) -> dict | None:
    dist.set_threads(job.threads)
    args = job.args
    if world == 1:
        dist.init_single()
    else:
        slice_bytes = 4 * max(job.rows * PROMPT_LEN * args.dim, job.rows * args.vocab_size // world)
        dist.init_ranks(
            rank, world, "127.0.0.1", port, "gloo", "127.0.0.1", 60.0,
            shm_bytes=min(SHM_SLOT_CAP, slice_bytes) if job.shm else 0,
        )  # fmt: skip
    model = random_model(args, job.seed + rank)
    model.setup_slots(job.rows, PROMPT_LEN + job.steps + 8)
    clock = Clock()
    clock.time_output_layer(model)
    gather = model_module.gather_to_lead
    results: dict = {}
    # Alternated, the best of ROUNDS kept: the machine is shared, and a burst of someone
    # else's work during one mode's runs would otherwise decide the comparison.
    for where in ("all ranks", "lead only") * (ROUNDS if world > 1 else 1):
        # Before: every rank all-gathers the logits (the follower drops them).
        model_module.gather_to_lead = clock.wrap(
            "gather", dist.all_gather if where == "all ranks" else gather
        )
        for name, params in SETTINGS.items():
            if rank != 0:
                follow(model, model.slots, dist.broadcast_plan)
                continue
            ms = lead_run(model, job, params, clock, world)
            best = results.get((where, name))
            if best is None or ms["step"] < best["step"]:
                results[(where, name)] = ms
    if rank == 0 and world == 1:  # a forward of its own: the other ranks have stopped
        results["per_row"] = per_row_sampling(model, job)
    dist.teardown()
    return results if rank == 0 else None


def lead_run(
    model: Transformer, job: Job, params: SamplingParams, clock: Clock, world: int
) -> dict[str, float]:
    """A full batch decoding ``job.steps`` steps after a warm-up step; ms per step."""
    from mpllama.tokenizer import load_tokenizer

    tok = load_tokenizer(job.tokenizer)
    runner = Runner(model, tok, job.rows * PROMPT_LEN, dist.broadcast_plan if world > 1 else None)
    runner._sample = clock.wrap("sampling", runner._sample)  # type: ignore[method-assign]
    rng = random.Random(job.seed)
    settings = params.replace(max_tokens=job.steps + 2, ignore_eos=True)
    runner.add(
        Request(f"r{i}", [rng.randrange(128000) for _ in range(PROMPT_LEN)], settings, seed=i)
        for i in range(job.rows)
    )
    runner.step()  # every prompt in one prefill step
    runner.step()  # a warm-up decode step
    clock.spent = dict.fromkeys(clock.spent, 0.0)
    clock.on = True
    for _ in range(job.steps):
        t0 = time.perf_counter()
        runner.step()
        clock.add("step", time.perf_counter() - t0)
    clock.on = False
    while runner.has_work:
        runner.step()
    runner.stop()
    ms = {k: 1e3 * v / job.steps for k, v in clock.spent.items()}
    ms["logits"] = ms["output"] + ms["gather"]
    ms["forward"] = ms["step"] - ms["logits"] - ms["sampling"]
    return ms


def old_sample(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator) -> torch.Tensor:
    """The sampler before: a full sort for top-p, multinomial over every entry."""
    scaled = logits.float() / params.temperature
    scaled = top_p_filter(top_k_filter(scaled, params.top_k), params.top_p)
    return torch.multinomial(torch.softmax(scaled, dim=-1), 1, generator=gen)[0]


def per_row_sampling(model: Transformer, job: Job) -> dict[str, tuple[float, float]]:
    """Microseconds per row to pick a token from this model's logits, before and now."""
    from mpllama.rank.sampling import next_tokens

    tokens = torch.randint(0, 128000, (job.rows, 1), generator=torch.Generator().manual_seed(1))
    slots = torch.arange(job.rows)
    logits = model(tokens, slots, torch.zeros_like(slots), logits_at=torch.zeros_like(slots))
    out = {}
    cases = [(name, params, logits) for name, params in SETTINGS.items()]
    cases.append(("T=0.8 top_p=0.9, flat", SETTINGS["T=0.8 top_p=0.9"], logits / 2))
    for name, params, rows in cases:
        gens = [torch.Generator().manual_seed(i) for i in range(job.rows)]
        before = best_of(3, old_sampler, rows, params, gens)
        now = best_of(3, next_tokens, rows, [params] * job.rows, gens)
        kept = 1 if params.greedy else mean_kept(rows, params)
        out[name] = (1e6 * before / job.rows, 1e6 * now / job.rows, kept)
    return out


def mean_kept(logits: torch.Tensor, params: SamplingParams) -> float:
    from mpllama.rank.sampling import kept_tokens

    sizes = [
        kept_tokens(row.float() / params.temperature, params.top_k, params.top_p)[0].numel()
        for row in logits
    ]
    return sum(sizes) / len(sizes)


def old_sampler(logits: torch.Tensor, params: SamplingParams, gens: list[torch.Generator]) -> None:
    if params.greedy:
        greedy(logits)
        return
    for row, gen in enumerate(gens):
        old_sample(logits[row], params, gen)


def best_of(n: int, fn, *args: object) -> float:  # noqa: ANN001
    best = float("inf")
    for _ in range(n):
        t0 = time.perf_counter()
        fn(*args)
        best = min(best, time.perf_counter() - t0)
    return best


def run(job: Job, world: int) -> dict:
    """Rank 0's results of ``job`` on ``world`` processes."""
    store = dist.open_store("127.0.0.1", world + 1, 60.0) if world > 1 else None
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = store.port if store is not None else 0
    procs = [ctx.Process(target=rank_main, args=(job, port, r, world, out)) for r in range(world)]
    for p in procs:
        p.start()
    results: dict = {}
    deadline = time.monotonic() + 1800
    while len(results) < world:
        try:
            rank, value = out.get(timeout=5)
            results[rank] = value
        except queue.Empty:
            dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            if dead or time.monotonic() > deadline:
                for p in procs:
                    p.kill()
                raise RuntimeError(f"a rank died (exit codes {dead}) or timed out") from None
    for p in procs:
        p.join(timeout=60)
    failed = {rank: value for rank, value in results.items() if isinstance(value, str)}
    if failed:
        raise RuntimeError(f"ranks failed: {failed}")
    return results[0]


def part(quick: bool, seed: int, rows: int = 32) -> None:
    args = QUICK_LLAMA3_MODEL if quick else LLAMA3_MODEL
    steps = 8 if quick else 32
    cores = os.cpu_count() or 1
    print(
        f"\n== llama3: Llama-3-shaped model (dim={args.dim} n_layers={args.n_layers} "
        f"n_heads={args.n_heads} n_kv_heads={args.n_kv_heads}, vocab {args.vocab_size}, "
        f"random weights), {rows} rows x {steps} decode steps; ms per step (lower is better);"
        " logits = the output layer + (gather), moving them to the lead"
    )
    print(
        f"  {'ranks':<6}{'via':<5}{'logits gathered to':<20}{'sampling':<18}"
        f"{'step':>8}{'forward':>9}{'logits':>8}{'(gather)':>9}{'sampling':>9}"
    )
    per_row = None
    for world, shm in ((1, True), (2, True), (2, False)):
        threads = max(1, cores // world)
        job = Job(args, rows, steps, str(tokenizer_path()), threads, seed, shm)
        results = run(job, world)
        per_row = results.get("per_row", per_row)
        via = "-" if world == 1 else "shm" if shm else "gloo"
        for where in ("all ranks", "lead only") if world > 1 else ("all ranks",):
            label = "-" if world == 1 else where + (" (before)" if where == "all ranks" else "")
            for name in SETTINGS:
                ms = results[(where, name)]
                print(
                    f"  {world:<6}{via:<5}{label:<20}{name:<18}{ms['step']:8.2f}"
                    f"{ms['forward']:9.2f}{ms['logits']:8.2f}{ms['gather']:9.2f}"
                    f"{ms['sampling']:9.2f}"
                )
    print(
        "  sampling alone, us per row on this model's logits (one rank; before: full sort "
        "+ multinomial over every entry; flat: the logits halved)"
    )
    print(f"  {'':<26}{'kept':>8}{'before':>10}{'now':>10}{'before/now':>12}")
    for name, (before, now, kept) in per_row.items():
        print(f"  {name:<26}{kept:8.0f}{before:10.0f}{now:10.0f}{before / now:11.1f}x")
