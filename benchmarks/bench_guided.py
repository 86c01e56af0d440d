"""The guided part of the bench: what constrained decoding (``SamplingParams.guided``, a
nested JSON schema) costs the lead per decode step, at 1 row and a full batch, on the
bench's ~110M model (its sentencepiece vocabulary) and on a Llama-3-shaped one
(vocabulary 128256, random weights, Meta's tokenizer); where the guided time goes; and
what compiling the schema costs.

The lead's own ``Runner`` runs in this process at MP=1 (a one-rank Gloo group, no Ray),
so a step is the engine's step and nothing else. Every configuration decodes the same
prompts greedily with the same settings (EOS ignored), its rows plain or guided; the
schema forces far more output than the timed steps (a fixed-length array of records,
every string and number bounded: random weights would spin a free one forever), so no
row ends while timed, which is checked.

The machine is shared and noisy, so the configurations run side by side: one Runner
each, on its own slots of the model's KV caches, stepped in turn (a step of each, then
again). Each reports the median of its step times, and its ratio to plain at the same
rows is the median of the ratios of steps taken one after the other: a burst of
someone else's work then lands on both sides of a ratio instead of deciding it.

Where the guided time goes comes from a second such run with wrappers around the pieces
(monkeypatched; the headline numbers are taken without them), means per step:

  forward  ``execute``: the model's forward
  masks    llguidance computing the guided rows' bitmasks (the worker thread, during
           the forward: it costs the step only by competing for the cores)
  unpack   the bitmasks to additive float32 rows (the same thread, the same overlap)
  wait     the step waiting for those rows after the forward (``Future.result``)
  copy     the guided rows' logits copied out: ``_pick`` less the adds and the argmax
  add      adding the mask rows to them (``Tensor.add_`` inside ``_pick``)
  argmax   picking the tokens (``next_tokens``, ``greedy``)
  consume  the matchers' ``consume_token``, once per guided row, in ``Sequence.advance``
  other    the rest of the step: scheduling, the plan, detokenizing, events

Worker times are wall time in that thread, which shares two cores and the GIL with the
forward; the same pieces are then timed alone, on the live matchers of the full guided
batch, nothing running beside them.
"""

from __future__ import annotations

import math
import random
import statistics
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from bench_vocab import LLAMA3_MODEL, QUICK_LLAMA3_MODEL, random_model, tokenizer_path
from bench_workloads import random_prompt

from mpllama import checkpoint, shard_axes
from mpllama.config import SamplingParams
from mpllama.guided import Guided
from mpllama.model_args import ModelArgs
from mpllama.protocol import Request
from mpllama.rank import dist, weights
from mpllama.rank import runner as runner_module
from mpllama.rank.constrain import Grammars
from mpllama.rank.layers import onednn_unsupported
from mpllama.rank.model import Transformer, materialize
from mpllama.rank.runner import Runner
from mpllama.rank.sampling import greedy
from mpllama.tokenizer import Tokenizer

PROMPT_LEN = 16
WARMUP = 2  # decode steps before the timed ones
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "pets": {"type": "array", "items": {"enum": ["cat", "dog", "fish"]}, "maxItems": 3},
        "home": {
            "type": "object",
            "properties": {
                "city": {"enum": ["Paris", "Lima", "Oslo"]},
                "floor": {"type": "integer", "minimum": 0, "maximum": 99},
            },
            "required": ["city", "floor"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "pets", "home"],
    "additionalProperties": False,
}
# Nested: objects, arrays, enums, integers, bounded strings; six records of at least
# ~40 tokens each, far more than the timed steps.
SCHEMA = {
    "type": "object",
    "properties": {
        "people": {"type": "array", "items": PERSON, "minItems": 6, "maxItems": 6},
        "total": {"type": "integer", "minimum": 0, "maximum": 1000},
    },
    "required": ["people", "total"],
    "additionalProperties": False,
}
PIECES = ("forward", "masks", "worker", "wait", "pick", "add", "argmax", "consume")
SHOWN = ("step", "forward", "masks", "unpack", "wait", "copy", "add", "argmax", "consume")


@dataclass(frozen=True)
class Subject:
    """A model to decode on, with its tokenizer."""

    name: str
    model: Transformer
    tokenizer: Tokenizer
    prompt_ids: int  # prompts draw ids below this (no special tokens)

    @property
    def vocab(self) -> int:
        return self.model.args.vocab_size


@dataclass(frozen=True)
class Config:
    rows: int
    guided: int  # how many of the rows: every other one for half

    @property
    def label(self) -> str:
        return "plain" if not self.guided else "guided" if self.guided == self.rows else "half"


@dataclass
class Lane:
    """One configuration's Runner, on its own slots of the shared caches."""

    config: Config
    runner: Runner
    texts: dict[str, str]  # the guided rows' text so far
    ended: int = 0  # rows that finished (none should, before the timed steps end)
    times: list[float] = field(default_factory=list)  # seconds of each timed step


# ------------------------------------------------------------------------ models


def bench_subject(ckpt: Path) -> Subject:
    """The bench's random checkpoint, loaded as a worker loads it."""
    args = checkpoint.read_params(ckpt)
    state = weights.load_rank_state(checkpoint.find_shards(ckpt), args, 0, 1)
    model = materialize(Transformer(args), state, torch.device("cpu"), torch.float32)
    if onednn_unsupported(torch.device("cpu"), torch.float32) is None:
        model.pack_linears()  # as a CPU worker does
    tok = Tokenizer(checkpoint.find_tokenizer(ckpt))
    return Subject(f"bench model {param_millions(args):.0f}M", model, tok, args.vocab_size)


def llama3_subject(args: ModelArgs, seed: int) -> Subject:
    model = random_model(args, seed)  # packed already
    name = f"Llama-3-shaped {param_millions(args):.0f}M"
    return Subject(name, model, Tokenizer(tokenizer_path()), 128000)


def param_millions(args: ModelArgs) -> float:
    return sum(math.prod(shape) for shape in shard_axes.full_shapes(args).values()) / 1e6


# ------------------------------------------------------------------------ decoding


def make_lanes(
    subject: Subject, grammars: Grammars, configs: list[Config], steps: int, seed: int
) -> list[Lane]:
    """A Runner per configuration, its requests queued, all sharing ``grammars`` (one
    llguidance tokenizer per model). The model's caches must hold every lane's rows."""
    plain = SamplingParams(temperature=0, max_tokens=WARMUP + steps + 16, ignore_eos=True)
    guided = plain.replace(guided=Guided(json_schema=SCHEMA))
    lanes, first_slot = [], 0
    for c in configs:
        runner = Runner(subject.model, subject.tokenizer, c.rows * PROMPT_LEN)
        runner.grammars = grammars
        runner.free = list(range(first_slot, first_slot + c.rows))  # sorted: a valid heap
        first_slot += c.rows
        rng = random.Random(seed)  # the same prompts in every configuration
        prompts = [random_prompt(rng, PROMPT_LEN, subject.prompt_ids) for _ in range(c.rows)]
        # A half-guided batch's guided rows alternate with plain ones, as a server's would:
        # their logits are gathered out of the batch, not sliced.
        chosen = range(0, c.rows, c.rows // max(c.guided, 1))[: c.guided]
        runner.add(
            Request(f"r{i}", prompt, guided if i in chosen else plain, seed=i)
            for i, prompt in enumerate(prompts)
        )
        lanes.append(Lane(c, runner, {f"r{i}": "" for i in chosen}))
    return lanes


def race(lanes: list[Lane], steps: int, timers: Timers | None = None) -> None:
    """Step the lanes in turn: a prefill, WARMUP decode steps, then ``steps`` timed."""
    for step in range(1 + WARMUP + steps):
        for lane in lanes:
            timed = step > WARMUP
            if timers is not None:
                timers.current = lane.config if timed else None
            t0 = time.perf_counter()
            events = lane.runner.step()
            if timed:
                lane.times.append(time.perf_counter() - t0)
            for e in events:
                lane.ended += e.finish_reason is not None
                if e.id in lane.texts:
                    lane.texts[e.id] += e.text
    if timers is not None:
        timers.current = None


def median_ms(lane: Lane) -> float:
    return 1e3 * statistics.median(lane.times)


def ratio(lane: Lane, base: Lane) -> float:
    """The median over rounds of ``lane``'s step time over ``base``'s in the same round."""
    return statistics.median(a / b for a, b in zip(lane.times, base.times, strict=True))


# ------------------------------------------------------------------------ wrappers


class Timers:
    """Seconds per piece per configuration, charged to ``current`` (the lane stepping,
    None outside timed steps). The worker thread adds too, only while the step that
    submitted its work waits for it; the GIL keeps each ``+=`` whole."""

    def __init__(self, configs: list[Config]) -> None:
        self.current: Config | None = None
        self.spent = {c: dict.fromkeys(PIECES, 0.0) for c in configs}

    def wrap(self, what: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                if self.current is not None:
                    self.spent[self.current][what] += time.perf_counter() - t0

        return timed


class TimedExecutor:
    """llguidance's executor with its mask computation timed; it is handed our matcher
    wrappers and passes llguidance the matchers themselves."""

    def __init__(self, inner: Any, timers: Timers) -> None:
        self.inner = inner
        self.compute = timers.wrap("masks", inner.unsafe_compute_mask_ptr)

    def unsafe_compute_mask_ptr(self, pairs: list[tuple[Any, int]], *rest: Any) -> None:
        self.compute([(getattr(m, "inner", m), i) for m, i in pairs], *rest)


class TimedMatcher:
    """An LLMatcher with ``consume_token`` timed; everything else passes through."""

    def __init__(self, inner: Any, timers: Timers) -> None:
        self.inner = inner
        self.consume_token = timers.wrap("consume", inner.consume_token)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def timed_grammars(subject: Subject, timers: Timers) -> Grammars:
    """A grammar engine whose pieces report to ``timers``. A first (untimed) submit makes
    its worker thread and executor, then the executor is wrapped."""
    g = Grammars(subject.tokenizer, subject.vocab)
    g.submit([g.matcher(Guided(json_schema=SCHEMA))]).result()
    g._executor = TimedExecutor(g._executor, timers)  # type: ignore[assignment]
    g._masks = timers.wrap("worker", g._masks)  # type: ignore[method-assign]
    make, submit = g.matcher, g.submit
    g.matcher = lambda guided: TimedMatcher(make(guided), timers)  # type: ignore[method-assign]

    def timed_submit(matchers: list[Any]) -> Future[torch.Tensor]:
        future = submit(matchers)
        future.result = timers.wrap("wait", future.result)  # type: ignore[method-assign]
        return future

    g.submit = timed_submit  # type: ignore[method-assign]
    return g


@contextmanager
def instrumented(lanes: list[Lane], timers: Timers) -> Iterator[None]:
    """The runners' forward, token picking and mask adds timed while the lanes run.
    ``Tensor.add_`` is wrapped only inside ``_pick``, where only the mask rows use it."""
    saved = {name: getattr(runner_module, name) for name in ("execute", "next_tokens", "greedy")}
    runner_module.execute = timers.wrap("forward", saved["execute"])
    runner_module.next_tokens = timers.wrap("argmax", saved["next_tokens"])
    runner_module.greedy = timers.wrap("argmax", saved["greedy"])
    add = torch.Tensor.add_
    timed_add = timers.wrap("add", add)
    for lane in lanes:
        pick = lane.runner._pick

        def timed_pick(*args: Any, pick: Callable[..., list[int]] = pick) -> list[int]:
            torch.Tensor.add_ = timed_add  # type: ignore[method-assign]
            try:
                return pick(*args)
            finally:
                torch.Tensor.add_ = add  # type: ignore[method-assign]

        lane.runner._pick = timers.wrap("pick", timed_pick)  # type: ignore[method-assign]
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(runner_module, name, fn)


def breakdown(spent: dict[str, float], lane: Lane) -> dict[str, float]:
    """ms per step of each piece in SHOWN, and ``other``, the step's unaccounted rest."""
    steps = len(lane.times)
    ms = {k: 1e3 * v / steps for k, v in spent.items()}
    ms["step"] = 1e3 * sum(lane.times) / steps
    ms["unpack"] = ms["worker"] - ms["masks"]
    ms["copy"] = ms["pick"] - ms["add"] - ms["argmax"]
    ms["other"] = ms["step"] - ms["forward"] - ms["wait"] - ms["pick"] - ms["consume"]
    return ms


def alone_ms(grammars: Grammars, lane: Lane, vocab: int) -> dict[str, float]:
    """The guided pieces of a full guided batch, timed alone, in ``_masks`` and
    ``_pick``'s order, on its live matchers and fresh random logits (as a forward leaves
    them): median ms of 9."""
    matchers = [s.guide for s in lane.runner.running if s.guide is not None]
    n, words = len(matchers), grammars.words
    executor = grammars._executor
    assert executor is not None  # made by the steps' submits
    bits = torch.zeros((n, words), dtype=torch.int32)
    pairs = [(m, i) for i, m in enumerate(matchers)]
    times: dict[str, list[float]] = {k: [] for k in ("masks", "unpack", "copy", "add", "argmax")}
    for _ in range(9):
        logits = torch.randn(n, vocab)
        t0 = time.perf_counter()
        executor.unsafe_compute_mask_ptr(pairs, bits.data_ptr(), words * 4, n)
        t1 = time.perf_counter()
        masks = grammars._masks(matchers)  # llguidance again, then the unpack
        t2 = time.perf_counter()
        adjusted = logits[list(range(n))]
        t3 = time.perf_counter()
        for row, mask in zip(adjusted, masks, strict=True):
            row.add_(mask)
        t4 = time.perf_counter()
        greedy(adjusted)
        t5 = time.perf_counter()
        spans = (t1 - t0, (t2 - t1) - (t1 - t0), t3 - t2, t4 - t3, t5 - t4)
        for k, dt in zip(times, spans, strict=True):
            times[k].append(dt)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


# ------------------------------------------------------------------------ compile


def compile_ms(subject: Subject) -> tuple[dict[str, float], Grammars]:
    """ms to build the llguidance tokenizer, then to compile the schema (``.lark``), make
    its matcher and compute its first mask: the first time (a new Grammars: the mask
    starts its worker thread) and again (best of 3, a fresh ``Guided`` each time).
    Returns the Grammars too, its tokenizer built."""
    g = Grammars(subject.tokenizer, subject.vocab)

    def once() -> tuple[float, float, float]:
        t0 = time.perf_counter()
        guided = Guided(json_schema=SCHEMA)
        guided.lark  # noqa: B018 - a cached_property: computing it is the point
        t1 = time.perf_counter()
        matcher = g.matcher(guided)
        t2 = time.perf_counter()
        g.submit([matcher]).result()
        return t1 - t0, t2 - t1, time.perf_counter() - t2

    t0 = time.perf_counter()
    g.ll_tokenizer  # noqa: B018 - a property that builds it on first use
    tokenizer = time.perf_counter() - t0
    first = once()
    again = min((once() for _ in range(3)), key=sum)
    ms = {"tokenizer": tokenizer, "lark": first[0], "matcher": first[1], "mask": first[2]}
    ms.update({"lark again": again[0], "matcher again": again[1], "mask again": again[2]})
    return {k: 1e3 * v for k, v in ms.items()}, g


# ------------------------------------------------------------------------ the part


def part(quick: bool, seed: int, rows: int, ckpt: Path) -> dict[str, float]:
    """Print the guided part; return guided / plain ms per step at ``rows`` rows, every
    row guided, per model (for the targets)."""
    dist.init_single("gloo")
    steps = 24 if quick else 40
    configs = [Config(1, 0), Config(1, 1), Config(rows, 0), Config(rows, rows)]
    configs.append(Config(rows, rows // 2))
    print(
        f"\n== guided: rows guided by a nested JSON schema (SamplingParams.guided, "
        f"llguidance masks) against the same rows plain; greedy, the lead's Runner "
        f"in-process (MP=1), the configurations stepped in turn; ms per step: median of "
        f"{steps} decode steps (lower is better); vs plain: median of the step-by-step "
        f"ratios to plain at the same rows"
    )
    ratios: dict[str, float] = {}
    loaders: list[Callable[[], Subject]] = [
        lambda: bench_subject(ckpt),
        lambda: llama3_subject(QUICK_LLAMA3_MODEL if quick else LLAMA3_MODEL, seed),
    ]
    for load in loaders:
        subject = load()
        ratios[subject.name] = one_model(subject, configs, steps, seed)
        del subject
    return ratios


def one_model(subject: Subject, configs: list[Config], steps: int, seed: int) -> float:
    top = max(c.rows for c in configs)
    full, full_plain = Config(top, top), Config(top, 0)
    subject.model.setup_slots(sum(c.rows for c in configs), PROMPT_LEN + 1 + WARMUP + steps + 16)
    compiled, grammars = compile_ms(subject)
    print(
        f"  {subject.name}, vocabulary {subject.vocab}. Schema compile, ms: llguidance "
        f"tokenizer {compiled['tokenizer']:.0f}, then lark {compiled['lark']:.1f} + matcher "
        f"{compiled['matcher']:.1f} + first mask {compiled['mask']:.1f}; again (tokenizer "
        f"built) {compiled['lark again']:.1f} + {compiled['matcher again']:.1f} + "
        f"{compiled['mask again']:.1f}"
    )
    race(make_lanes(subject, grammars, configs[-1:], WARMUP, seed), WARMUP)  # first-run costs
    lanes = make_lanes(subject, grammars, configs, steps, seed)
    race(lanes, steps)
    by_config = {lane.config: lane for lane in lanes}
    print(f"    {'rows':>4} {'':<7} {'ms/step':>8} {'vs plain':>9}")
    for lane in lanes:
        c = lane.config
        vs = ratio(lane, by_config[Config(c.rows, 0)])
        note = f"  ({lane.ended} rows ended early)" if lane.ended else ""
        print(f"    {c.rows:>4} {c.label:<7} {median_ms(lane):8.2f} {vs:8.3f}x{note}")
    overhead = ratio(by_config[full], by_config[full_plain])
    verdict = "met" if overhead <= 1.1 else "NOT met"
    print(f"    goal: guided / plain <= 1.10x at {full.rows} rows: {overhead:.3f}x, {verdict}")
    # Before the next run reuses these lanes' cache slots (the matchers keep their state).
    alone = alone_ms(grammars, by_config[full], subject.vocab)

    timers = Timers(configs)
    timed = timed_grammars(subject, timers)
    lanes = make_lanes(subject, timed, configs, steps, seed)
    with instrumented(lanes, timers):
        race(lanes, steps, timers)
    print(
        "    where the time goes, ms per step (means, a second run with wrappers; masks and "
        "unpack: wall time in the worker thread, during the forward)"
    )
    print(f"    {'rows':>4} {'':<7}" + "".join(f"{h:>8}" for h in SHOWN) + f"{'other':>8}")
    for lane in lanes:
        ms = breakdown(timers.spent[lane.config], lane)
        line = "".join(f"{ms[h]:8.2f}" for h in (*SHOWN, "other"))
        print(f"    {lane.config.rows:>4} {lane.config.label:<7}{line}")
    print(
        f"    alone, {full.rows} guided rows (nothing running beside them), ms: "
        + ", ".join(f"{k} {v:.2f}" for k, v in alone.items())
    )
    text = next(iter(by_config[full].texts.values()))
    print(f"    a guided row after {1 + WARMUP + steps} tokens: {text[:80]!r}...")
    timed.close()
    grammars.close()
    return overhead
