"""A caller's inputs made into requests for one model, before anything runs: prompts
encoded (text, token ids or chat dialogs), each request checked as the ranks will check
it, seeded, and, with ``errors="return"``, a bad input turned into an error output
instead of failing the call. ``LLM`` holds one (``LLM.prompts``); ``AsyncLLM``, the batch
jobs, Ray Data and the server encode and check through it too. No Ray here.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from .config import SamplingParams
from .errors import PromptError
from .outputs import PartialOutput, check_errors_mode, per_request, token_list
from .protocol import Request, check_request, derive_seed
from .tokenizer import Dialog, Tokenizer


class Prompts:
    """One model's rules for inputs: its tokenizer, context (``max_seq_len``) and
    vocabulary, and the run's ``seed``, from which each request without a seed of its own
    gets one by its position in the call."""

    def __init__(self, tokenizer: Tokenizer, max_seq_len: int, vocab_size: int, seed: int) -> None:
        self.tokenizer = tokenizer
        self.max_seq_len = max_seq_len
        self.vocab_size = vocab_size
        self.seed = seed
        self._calls = itertools.count()  # numbers each call's request ids

    def _encode_dialogs(self, dialogs: Dialog | Sequence[Dialog]) -> list[list[int] | Exception]:
        if dialogs and isinstance(dialogs[0], dict):
            dialogs = [dialogs]  # type: ignore[list-item]
        out: list[list[int] | Exception] = []
        for i, dialog in enumerate(dialogs):
            try:
                out.append(self.tokenizer.encode_dialog(dialog))  # type: ignore[arg-type]
            except PromptError as exc:
                out.append(PromptError(f"dialog {i}: {exc}"))
        return out

    def requests(
        self,
        prompts: str | Sequence[str] | None,
        prompt_token_ids: Sequence[Sequence[int]] | None,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None,
        errors: str,
    ) -> list[PartialOutput]:
        check_errors_mode(errors)
        if (prompts is None) == (prompt_token_ids is None):
            raise ValueError("pass either prompts or prompt_token_ids (exactly one)")
        if isinstance(prompts, str):
            prompts = [prompts]
        texts: list[Any]
        ids: list[list[int] | Exception] = []
        if prompts is not None:
            if not isinstance(prompts, Sequence):
                raise TypeError(
                    f"prompts must be a string or a list of strings, got {type(prompts).__name__}"
                )
            texts = list(prompts)
            for i, p in enumerate(texts):
                ids.append(_attempt(self.encode, p, i))
        else:
            if isinstance(prompt_token_ids, (str, bytes)) or not isinstance(
                prompt_token_ids, Sequence
            ):
                raise TypeError("prompt_token_ids must be a list of lists of ints")
            texts = [None] * len(prompt_token_ids)
            ids = [_attempt(token_list, t, i) for i, t in enumerate(prompt_token_ids)]
        return self._entries(texts, ids, per_request(sampling_params, len(ids)), errors)

    def dialog_requests(
        self,
        dialogs: Dialog | Sequence[Dialog],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None,
        errors: str,
    ) -> list[PartialOutput]:
        check_errors_mode(errors)
        ids = self._encode_dialogs(dialogs)
        texts = [None] * len(ids)
        return self._entries(texts, ids, per_request(sampling_params, len(ids)), errors)

    def _entries(
        self,
        texts: list[Any],
        ids: list[list[int] | Exception],
        params: list[SamplingParams],
        errors: str,
    ) -> list[PartialOutput]:
        """One PartialOutput per input: a request to run, or (errors="return") a refusal.
        With errors="raise", the first bad input fails the call before anything runs."""
        call = next(self._calls)
        out = []
        for i, (text, t, p) in enumerate(zip(texts, ids, params, strict=True)):
            if not isinstance(t, Exception):
                request = Request(
                    f"{call}-{i}", t, p, p.seed if p.seed is not None else derive_seed(self.seed, i)
                )
                problem = self._problem(request)
                if problem is None:
                    out.append(
                        PartialOutput(i, text, request, self.echo_text(text, request), errors)
                    )
                    continue
                t = PromptError(f"prompt #{i}: {problem}")
            if errors == "raise":
                raise t
            out.append(
                PartialOutput.failed(i, text, ids[i] if isinstance(ids[i], list) else [], str(t))
            )
        return out

    def check(self, requests: list[Request], what: str = "prompt #{}") -> None:
        """Refuse the call, before anything runs, if any request could not run."""
        for i, r in enumerate(requests):
            problem = self._problem(r)
            if problem is not None:
                raise PromptError(f"{what.format(i)}: {problem}")

    def _problem(self, request: Request) -> str | None:
        """Why ``request`` cannot run on this model (the ranks' own check), or None."""
        return check_request(request, self.max_seq_len, self.vocab_size)

    def echo_text(self, prompt: str | None, request: Request) -> str:
        """What an echoing request's text starts with: its prompt."""
        if not request.params.echo:
            return ""
        return prompt if prompt is not None else self.tokenizer.decode(request.prompt_token_ids)

    def encode(self, prompt: Any, index: int = 0) -> list[int]:
        if not isinstance(prompt, str):
            raise TypeError(f"prompt #{index} must be a string, got {type(prompt).__name__}")
        if not prompt:
            raise PromptError(f"prompt #{index} is empty; give at least one character")
        return self.tokenizer.encode(prompt, bos=True, eos=False)


def _attempt(build: Any, value: Any, index: int) -> list[int] | Exception:
    """``build(value, index)``, or the input error it raised (kept for errors="return")."""
    try:
        return build(value, index)
    except (PromptError, TypeError) as exc:
        return exc
