"""Constrained decoding on the lead rank: a grammar matcher per guided request, and each
step's token masks, computed in a worker thread while the forward runs.

llguidance fills one bit per token (``[n, ceil(V / 32)]`` int32 words) for all guided
rows at once, in parallel and without the GIL. The bits become an additive float32 row
(0 where allowed, ``MASKED`` where not) in the same thread, so the step only adds it to
the guided rows' logits: an add, branch-free, where ``masked_fill`` takes a branch per
entry and ran far slower (benchmarks/RESULTS.md, the guided part, has the costs). Unguided
rows never see any of it. Followers know nothing of grammars: the lead alone samples.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from functools import cached_property

import numpy as np
import torch
from llguidance import LLExecutor, LLMatcher, LLTokenizer, TokenizerWrapper

from ..guided import Guided
from ..tokenizer import Tokenizer

# What a masked-out token's logit gets added: its probability is then exactly 0 after any
# temperature (exp underflows) and argmax never picks it, while the allowed entries,
# added 0, keep their exact values. (-inf would need a select per entry: slower.)
MASKED = -1e30


class _Vocabulary:
    """What llguidance's TokenizerWrapper reads: every token's bytes, the special ids, and
    a tokenizer of bytes (used for forced text) whose tokens decode to those bytes."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int) -> None:
        self.tokenizer = tokenizer
        tokens = tokenizer.vocab_bytes()
        self.tokens = tokens + [b""] * (vocab_size - len(tokens))  # padded embedding rows
        self.special_token_ids = [i for i, t in enumerate(tokens) if t.startswith(b"\xff")]
        self.eos_token_id = tokenizer.eos_id
        self.bos_token_id = tokenizer.bos_id
        self.byte_ids = {
            t[0]: i for i, t in enumerate(tokens) if len(t) == 1 and tokenizer.token_bytes(i) == t
        }

    def __call__(self, data: bytes) -> list[int]:
        ids = self.tokenizer.encode(data.decode("utf-8", errors="replace"), bos=False, eos=False)
        if b"".join(self.tokens[i] for i in ids) == data:
            return ids
        # Sentencepiece reads a leading "▁" into the first word; spell it in byte pieces.
        return [self.byte_ids[b] for b in data]


class Grammars:
    """The lead's grammar engine for one model: its llguidance tokenizer (built on first
    use: about 0.5 s for 128k tokens), a matcher per guided request, and the masks."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.words = (vocab_size + 31) // 32  # int32 words of one row's bitmask
        self._executor: LLExecutor | None = None
        self._pool: ThreadPoolExecutor | None = None

    @cached_property
    def ll_tokenizer(self) -> LLTokenizer:
        # Only the lead's step loop asks (admitting a guided request): no lock.
        stops = sorted(self.tokenizer.stop_ids)
        vocabulary = _Vocabulary(self.tokenizer, self.vocab_size)
        return LLTokenizer(TokenizerWrapper(vocabulary), n_vocab=self.vocab_size, eos_token=stops)

    def matcher(self, guided: Guided) -> LLMatcher:
        """A fresh matcher for ``guided``; ValueError with llguidance's message when the
        grammar does not compile for this vocabulary."""
        matcher = LLMatcher(self.ll_tokenizer, guided.lark, log_level=0)
        if matcher.is_error():
            raise ValueError(f"guided {guided.kind} does not compile: {matcher.get_error()}")
        return matcher

    def submit(self, matchers: list[LLMatcher]) -> Future[torch.Tensor]:
        """Start computing the next token's masks of ``matchers`` (their current states):
        a future of the [n, vocab_size] float32 additive rows, in that order."""
        if self._pool is None:
            self._executor = LLExecutor()
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="mpllama-masks")
        return self._pool.submit(self._masks, matchers)

    def _masks(self, matchers: list[LLMatcher]) -> torch.Tensor:
        n = len(matchers)
        words = np.zeros((n, self.words), dtype=np.int32)
        assert self._executor is not None
        self._executor.unsafe_compute_mask_ptr(
            [(m, i) for i, m in enumerate(matchers)], words.ctypes.data, self.words * 4, n
        )
        # Token t is bit t % 32 of word t // 32: byte t // 8's bit t % 8, little-endian.
        bits = np.unpackbits(words.view(np.uint8), axis=-1, bitorder="little")
        allowed = torch.from_numpy(bits[:, : self.vocab_size])
        return allowed.to(torch.float32).sub_(1.0).mul_(-MASKED)

    def close(self) -> None:
        """End the mask thread (the runner stops)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
