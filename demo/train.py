"""Train the demo checkpoint in demo/model: a small Llama that writes English about Python.

    .venv/bin/python demo/train.py                       # the committed model (see README)
    .venv/bin/python demo/train.py --steps 100 --threads 1 --out /tmp/try   # a quick trial

The text is what every Python install carries: the language reference behind
``help("for")`` (``pydoc_data.topics``) and the docstrings of the standard library. 5% of
the documents are held out and scored at the end (loss per token and perplexity). The
run is seeded: the same Python (the text changes between versions), torch and flags give
the same files, with one thread or two (checked bit for bit).

The model is mpllama's architecture (``mpllama/rank/model.py``: RMSNorm, interleaved RoPE,
grouped-query attention, SwiGLU) written here again in plain torch, because mpllama's
own model is inference-only (no autograd, cache-addressed forward). Its state dict has
Meta's keys, so ``weights.write_checkpoint`` saves it as two shards; the script then
loads those shards with mpllama's model and checks that both give the same logits.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import inspect
import io
import math
import pkgutil
import random
import re
import sys
import time
import types
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mpllama import checkpoint, shard_axes
from mpllama.config import SamplingParams
from mpllama.model_args import ModelArgs
from mpllama.offline.fixtures import train_tokenizer
from mpllama.protocol import Request
from mpllama.rank import dist, weights
from mpllama.rank.model import Transformer, materialize
from mpllama.rank.rope import apply_rope, rope_table
from mpllama.rank.runner import Runner
from mpllama.tokenizer import Tokenizer

# ------------------------------------------------------------------------------ text

# Importing these has side effects (a browser, a print, a window), or their text is not
# prose; pydoc_data is read separately.
_SKIP_MODULES = {
    "antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "lib2to3",
    "ensurepip", "distutils", "readline", "pydoc_data", "encodings",
}  # fmt: skip
_RULE = re.compile(r"^([*=\-~^+#])\1{2,}$")  # a heading's underline: ***, ===, ---
_VERBATIM = re.compile(r"^(\s|[|+]|>>>|\.\.\.)")  # code, a table row, a doctest line
_BULLET = re.compile(r"^([*+\-]|\d+\.|\(?[a-z0-9]\))\s")


def stdlib_modules() -> list[types.ModuleType]:
    """Every importable standard-library module and submodule, tests and ``__main__``
    scripts left out, in name order."""
    out = []
    for name in sorted(n for n in sys.stdlib_module_names if n not in _SKIP_MODULES):
        if name.startswith("_"):
            continue
        try:
            module = importlib.import_module(name)
        except Exception:  # absent on this platform (winreg, msvcrt) or this build
            continue
        out.append(module)
        for info in pkgutil.walk_packages(getattr(module, "__path__", []), name + "."):
            parts = info.name.split(".")
            if any(p in ("test", "tests", "idle_test") or p.startswith("_") for p in parts):
                continue
            try:
                out.append(importlib.import_module(info.name))
            except Exception:  # e.g. asyncio.windows_events on Linux
                continue
    return out


def documents() -> list[str]:
    """The reference manual's topics, then the docstrings of the standard library (each
    module, and each class, function and method it defines), each once, in a fixed order."""
    from pydoc_data.topics import topics

    docs: dict[str, None] = {topics[k]: None for k in sorted(topics)}
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")  # deprecated modules and members warn when touched
        for module in stdlib_modules():
            docs[inspect.getdoc(module) or ""] = None
            for name, member in sorted(vars(module).items()):
                if name.startswith("__") or getattr(member, "__module__", None) != module.__name__:
                    continue  # defined elsewhere: its own module adds it
                if not (inspect.isclass(member) or inspect.isroutine(member)):
                    continue
                docs[inspect.getdoc(member) or ""] = None
                if inspect.isclass(member):
                    for attr, value in sorted(vars(member).items()):
                        if not attr.startswith("__") and (
                            inspect.isroutine(value) or isinstance(value, property)
                        ):
                            docs[inspect.getdoc(value) or ""] = None
    return [unwrap(d) for d in docs if len(d) >= 40]


def unwrap(doc: str) -> str:
    """Join the hard-wrapped lines of each prose paragraph into one line, so the model
    learns sentences rather than where a 70-column wrap falls. Indented blocks (code,
    grammar, list bodies), tables, doctest sessions, headings and list items keep their
    lines."""
    paragraphs = []
    for para in re.split(r"\n\s*\n", doc.strip()):
        lines = para.split("\n")
        if any(_VERBATIM.match(line) for line in lines) or _RULE.match(lines[-1].strip()):
            paragraphs.append(para)
            continue
        joined = [lines[0]]
        for line in lines[1:]:
            if _BULLET.match(line):
                joined.append(line)
            else:
                joined[-1] += " " + line
        paragraphs.append("\n".join(joined))
    return "\n\n".join(paragraphs)


def split(docs: list[str], held_out: float, seed: int) -> tuple[list[str], list[str]]:
    """Whole documents, drawn at random, until ``held_out`` of the characters are set aside."""
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    budget = held_out * sum(map(len, docs))
    test: set[int] = set()
    for i in order:
        if budget <= 0:
            break
        test.add(i)
        budget -= len(docs[i])
    return [d for i, d in enumerate(docs) if i not in test], [docs[i] for i in sorted(test)]


def token_stream(tok: Tokenizer, docs: list[str]) -> torch.Tensor:
    """Every document as <s> text </s>, one after another: [N] int64. A prompt is encoded
    with <s> first, so the model learns what a document's opening looks like."""
    ids: list[int] = []
    for doc in docs:
        ids += tok.encode(doc, bos=True, eos=True)
    return torch.tensor(ids, dtype=torch.long)


# ----------------------------------------------------------------------------- model
# mpllama.rank.model's Transformer again, trainable: same maths, same parameter names, no
# KV cache and no parallel layers. x [B,T,dim]; cis [1,T,head_dim/2] complex.


def _linear(n_in: int, n_out: int) -> nn.Linear:
    return nn.Linear(n_in, n_out, bias=False)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


class Attention(nn.Module):
    def __init__(self, a: ModelArgs) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = a.n_heads, a.kv_heads, a.head_dim
        self.wq = _linear(a.dim, a.n_heads * a.head_dim)
        self.wk = _linear(a.dim, a.kv_heads * a.head_dim)
        self.wv = _linear(a.dim, a.kv_heads * a.head_dim)
        self.wo = _linear(a.n_heads * a.head_dim, a.dim)

    def forward(self, x: torch.Tensor, cis: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q = apply_rope(self.wq(x).view(B, T, self.n_heads, self.head_dim), cis)
        k = apply_rope(self.wk(x).view(B, T, self.n_kv_heads, self.head_dim), cis)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        out = F.scaled_dot_product_attention(  # [B,H,T,D]
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            is_causal=True,
            enable_gqa=self.n_heads != self.n_kv_heads,
        )
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    def __init__(self, a: ModelArgs) -> None:
        super().__init__()
        self.w1 = _linear(a.dim, a.ffn_dim)
        self.w2 = _linear(a.ffn_dim, a.dim)
        self.w3 = _linear(a.dim, a.ffn_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, a: ModelArgs, dropout: float) -> None:
        super().__init__()
        self.dropout = dropout
        self.attention = Attention(a)
        self.feed_forward = FeedForward(a)
        self.attention_norm = RMSNorm(a.dim, a.norm_eps)
        self.ffn_norm = RMSNorm(a.dim, a.norm_eps)

    def forward(self, x: torch.Tensor, cis: torch.Tensor) -> torch.Tensor:
        # Dropout on what each branch adds: the model sees the same text many times over.
        drop = self.dropout if self.training else 0.0
        h = x + F.dropout(self.attention(self.attention_norm(x), cis), drop)
        return h + F.dropout(self.feed_forward(self.ffn_norm(h)), drop)


class TrainableLlama(nn.Module):
    def __init__(self, a: ModelArgs, max_seq_len: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.tok_embeddings = nn.Embedding(a.vocab_size, a.dim)
        self.layers = nn.ModuleList(Block(a, dropout) for _ in range(a.n_layers))
        self.norm = RMSNorm(a.dim, a.norm_eps)
        self.output = _linear(a.dim, a.vocab_size)
        self.register_buffer(
            "rope", rope_table(a.head_dim, max_seq_len, a.rope_theta, torch.device("cpu")),
            persistent=False,
        )  # fmt: skip
        # GPT-2's init: small normal weights, the two projections that write into the
        # residual stream scaled down by depth so its variance does not grow with layers.
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = (
                    0.02 / math.sqrt(2 * a.n_layers)
                    if name.endswith(("wo.weight", "w2.weight"))
                    else 0.02
                )
                nn.init.normal_(p, std=std)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B,T] -> logits [B,T,V]."""
        cis = self.rope[: tokens.shape[1]][None]
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h, cis)
        return self.output(self.norm(h))


# -------------------------------------------------------------------------- training


def batch(
    stream: torch.Tensor, size: int, seq_len: int, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``size`` random windows of the stream: inputs [B,T] and the next tokens [B,T]."""
    starts = torch.randint(len(stream) - seq_len - 1, (size,), generator=gen)
    rows = torch.stack([stream[s : s + seq_len + 1] for s in starts.tolist()])
    return rows[:, :-1], rows[:, 1:]


@torch.no_grad()
def evaluate(model: nn.Module, stream: torch.Tensor, seq_len: int) -> float:
    """Mean loss per token (nats) over the stream, cut into consecutive windows."""
    model.eval()
    windows = range((len(stream) - 1) // seq_len)
    total, count = 0.0, 0
    for i in range(0, len(windows), 16):
        idx = windows[i : i + 16]
        x = torch.stack([stream[j * seq_len : (j + 1) * seq_len] for j in idx])
        y = torch.stack([stream[j * seq_len + 1 : (j + 1) * seq_len + 1] for j in idx])
        logits = model(x)
        total += F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
        count += y.numel()
    model.train()
    return total / count


def lr_at(step: int, cfg: argparse.Namespace) -> float:
    """Linear warm-up, then a cosine down to a tenth of the peak."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def train(
    model: nn.Module, data: torch.Tensor, held: torch.Tensor, cfg: argparse.Namespace
) -> None:
    decay = [p for p in model.parameters() if p.dim() == 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=cfg.lr,
        betas=(0.9, 0.95),
    )
    gen = torch.Generator().manual_seed(cfg.seed)
    started, smooth = time.perf_counter(), None
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        x, y = batch(data, cfg.batch, cfg.seq_len, gen)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        smooth = loss.item() if smooth is None else 0.95 * smooth + 0.05 * loss.item()
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            elapsed = time.perf_counter() - started
            held_loss = evaluate(model, held, cfg.seq_len)
            print(
                f"step {step + 1:5d}/{cfg.steps}  lr {lr_at(step, cfg):.2e}  train {smooth:.3f}"
                f"  held-out {held_loss:.3f}  {elapsed / 60:5.1f} min",
                flush=True,
            )


# ---------------------------------------------------------------------------- saving


def save(model: nn.Module, args: ModelArgs, out: Path, dtype: torch.dtype) -> None:
    """Write two Meta shards + params.json beside tokenizer.model, and load the saved
    (rounded) weights back into ``model`` so that what is scored is what is shipped."""
    trained = model.state_dict()
    shapes = shard_axes.full_shapes(args)
    if set(trained) != set(shapes):
        raise RuntimeError(f"key mismatch with Meta's layout: {sorted(set(trained) ^ set(shapes))}")
    state = {k: trained[k].detach().to(dtype).contiguous() for k in shapes}
    weights.write_checkpoint(out, args, state, parts=2)
    model.load_state_dict({k: v.float() for k, v in state.items()})


def check_with_mpllama(
    model: nn.Module, out: Path, held: torch.Tensor, cfg: argparse.Namespace
) -> None:
    """Load the shards as mpllama does and check that its logits equal the trainer's,
    then print greedy continuations of a few prompts through mpllama's Runner."""
    dist.init_single("gloo")
    args = checkpoint.read_params(out)
    state = weights.load_rank_state(checkpoint.find_shards(out), args, 0, 1)
    mp = materialize(Transformer(args), state, torch.device("cpu"), torch.float32)
    mp.setup_slots(4, cfg.seq_len)
    x = held[: cfg.seq_len][None]
    with torch.no_grad():
        model.eval()
        ours = model(x)
    theirs = mp(x, torch.tensor([0]), torch.tensor([0]))
    diff = (ours - theirs).abs().max().item()
    print(f"mpllama vs trainer logits: max |diff| = {diff:.2e}")
    if diff > 1e-3:
        raise RuntimeError("mpllama's model disagrees with the trainer: the twin has drifted")
    tok = Tokenizer(out / "tokenizer.model")
    runner = Runner(mp, tok, cfg.seq_len)
    prompts = ['The "for" statement is used to', "A dictionary maps", "Return True if"]
    greedy = SamplingParams(temperature=0, max_tokens=40)
    runner.add([Request(p, tok.encode(p, bos=True, eos=False), greedy) for p in prompts])
    texts = dict.fromkeys(prompts, "")
    while runner.has_work:
        for e in runner.step():
            texts[e.id] += e.text
    for prompt, text in texts.items():
        print(f"greedy: {prompt} [{text!r}]")


# ------------------------------------------------------------------------------- main


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "model")
    p.add_argument("--threads", type=int, default=2, help="torch threads (1 while iterating)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--dim", type=int, default=192)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--held-out", type=float, default=0.05)
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--fp32", action="store_true", help="save float32 weights (default float16)")
    cfg = p.parse_args()

    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    cfg.out.mkdir(parents=True, exist_ok=True)

    docs = documents()
    digest = hashlib.sha256("\0".join(docs).encode()).hexdigest()[:12]
    train_docs, held_docs = split(docs, cfg.held_out, cfg.seed)
    print(
        f"text: {len(docs)} documents, {sum(map(len, docs)) / 1e6:.2f}M characters (sha256 "
        f"{digest}, Python {sys.version.split()[0]}); {len(held_docs)} held out"
    )
    # The tokenizer learns from the training documents only, one line per sentence.
    tok_path = train_tokenizer(cfg.out / "tokenizer.model", cfg.vocab, "\n".join(train_docs))
    tok = Tokenizer(tok_path)
    data, held = token_stream(tok, train_docs), token_stream(tok, held_docs)
    held_chars = sum(map(len, held_docs))
    print(
        f"tokens: {len(data)} train, {len(held)} held out ({held_chars / len(held):.2f} chars/token)"
    )

    args = ModelArgs(
        dim=cfg.dim,
        n_layers=cfg.layers,
        n_heads=cfg.heads,
        n_kv_heads=cfg.kv_heads,
        vocab_size=tok.n_words,
        multiple_of=32,
        norm_eps=1e-5,
    )
    model = TrainableLlama(args, cfg.seq_len, cfg.dropout)
    n_params = sum(p.numel() for p in model.parameters())
    seen = cfg.steps * cfg.batch * cfg.seq_len
    print(
        f"model: {args}, {n_params / 1e6:.2f}M parameters; {cfg.steps} steps x {cfg.batch} x "
        f"{cfg.seq_len} = {seen / 1e6:.1f}M tokens ({seen / len(data):.1f} epochs), "
        f"{cfg.threads} thread(s)"
    )
    started = time.perf_counter()
    train(model, data, held, cfg)
    minutes = (time.perf_counter() - started) / 60

    dtype = torch.float32 if cfg.fp32 else torch.float16
    save(model, args, cfg.out, dtype)
    loss = evaluate(model, held, cfg.seq_len)
    bits_per_char = loss / math.log(2) * len(held) / held_chars
    print(
        f"trained in {minutes:.1f} min on {cfg.threads} thread(s); held-out loss {loss:.3f} "
        f"per token, perplexity {math.exp(loss):.1f}, {bits_per_char:.3f} bits/char "
        f"(saved {str(dtype).removeprefix('torch.')} weights)"
    )
    sizes = {f.name: f.stat().st_size for f in sorted(cfg.out.iterdir())}
    print("files: " + ", ".join(f"{n} {s / 1e6:.2f} MB" for n, s in sizes.items()))
    check_with_mpllama(model, cfg.out, held, cfg)


if __name__ == "__main__":
    main()
