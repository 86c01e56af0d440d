"""Structured outputs: what a request's text must match (``Guided``), and the checks on
it. No torch: the driver, the server and the job reader build and check them; the lead
rank turns them into token masks (``constrain.py``).

The grammar engine is llguidance (Rust, no Python dependencies): it compiles JSON
schemas, regular expressions and Lark grammars (GBNF is converted to Lark), builds its
token trie from tiktoken's ranks or from a token-bytes list (sentencepiece), and
computes a 128k-entry token mask in tens of microseconds while releasing the GIL, so the
lead computes the next step's masks while the forward runs. xgrammar was the other
choice; it takes the same inputs but needs a Hugging Face tokenizer object to build its
vocabulary and brings torch-side kernels mpllama does not need on a CPU.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from .typecheck import check_types

KINDS = ("json_schema", "json", "regex", "grammar", "choice")

# JSON is written compactly, as Python's json.dumps writes it: with free whitespace a
# model (a weak one above all) can loop on spaces and newlines until max_tokens. A
# schema's own "x-guidance" options override these (llguidance's order).
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass(frozen=True)
class Guided:
    """What the generated text must match: exactly one of the fields.

    ``json_schema``: a JSON schema (a dict, or its JSON text); ``json``: any JSON object;
    ``regex``: a regular expression (Rust's syntax) matching the whole text; ``grammar``:
    a context-free grammar, in Lark (llguidance's dialect) or llama.cpp's GBNF;
    ``choice``: one of these strings, exactly.

    The request ends (finish reason "stop") once the grammar is complete and can take
    nothing more, or when the model ends it where the grammar allows; else at
    ``max_tokens`` ("length"), the text then a prefix of a match. A grammar that does not
    compile is a per-request error, found by ``problem()``.
    """

    json_schema: dict[str, Any] | str | None = field(default=None, hash=False)
    json: bool = False
    regex: str | None = None
    grammar: str | None = None
    choice: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.choice, list):
            object.__setattr__(self, "choice", tuple(self.choice))
        check_types(self, "Guided")
        given = [k for k in KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise ValueError(
                f"guided takes exactly one of {', '.join(KINDS)}; got "
                f"{', '.join(given) if given else 'none'}"
            )
        if self.choice is not None and (not self.choice or "" in self.choice):
            raise ValueError("guided choice must be a non-empty list of non-empty strings")

    @classmethod
    def of(cls, value: Guided | dict[str, Any]) -> Guided:
        """From a ``Guided`` or its dict form (YAML, JSON, keyword arguments)."""
        if isinstance(value, Guided):
            return value
        if not isinstance(value, dict):
            raise TypeError(f"guided must be a mapping such as {{'regex': '...'}}, got {value!r}")
        unknown = sorted(set(value) - set(KINDS))
        if unknown:
            raise ValueError(f"guided: unknown key(s) {unknown}; allowed keys: {list(KINDS)}")
        return cls(**value)

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) not in (None, False))

    @cached_property
    def lark(self) -> str:
        """The llguidance grammar (its JSON form) for this constraint. Raises ValueError
        when the input is not even well formed (a schema that is not JSON)."""
        from llguidance import LLMatcher
        from llguidance.gbnf_to_lark import any_to_lark

        if self.json_schema is not None:
            schema = self.json_schema
            if isinstance(schema, str):
                try:
                    schema = json.loads(schema)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"guided json_schema is not JSON: {exc}") from None
            if not isinstance(schema, dict):
                raise ValueError(f"guided json_schema must be a JSON object, got {schema!r}")
            return LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
        if self.json:
            return LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)
        if self.regex is not None:
            return LLMatcher.grammar_from_regex(self.regex)
        if self.choice is not None:
            # Lark string literals: JSON's escaping of a string is Lark's.
            return LLMatcher.grammar_from_lark(
                "start: " + " | ".join(json.dumps(c) for c in self.choice)
            )
        assert self.grammar is not None
        try:
            lark = any_to_lark(self.grammar)
        except Exception as exc:  # the converter raises bare Exceptions with a message
            raise ValueError(f"guided grammar: not valid GBNF: {exc}") from None
        return LLMatcher.grammar_from_lark(lark)

    def problem(self) -> str | None:
        """Why this constraint cannot run (llguidance's own message), or None. Worked out
        once per ``Guided``: the server, the driver and the lead rank all ask (the answer
        travels with the object when it is pickled to the rank)."""
        return self._problem

    @cached_property
    def _problem(self) -> str | None:
        from llguidance import LLMatcher

        try:
            grammar = self.lark
        except ValueError as exc:
            return str(exc)
        message = LLMatcher.validate_grammar(grammar)
        if message and not message.startswith("WARNING"):
            return f"guided {self.kind} does not compile: {message.strip()}"
        return None
