"""Dialogs and the two chat formats: Llama 2's ``[INST]``/``<<SYS>>`` template for
sentencepiece models, and Llama 3's header tokens for tiktoken models. A tokenizer's
``encode_dialog`` picks the one its model was trained with; callers never choose.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal, TypedDict

from .errors import PromptError

if TYPE_CHECKING:
    from .tokenizer import Tokenizer

Role = Literal["system", "user", "assistant", "tool"]


class Message(TypedDict):
    role: Role
    content: str


Dialog = list[Message]


def _check_messages(dialog: Any, roles: tuple[str, ...], fmt: str) -> None:
    """The checks both formats share: a non-empty list of {role, content} dicts with
    known roles, a system message only first."""
    if not isinstance(dialog, list):
        raise PromptError(f"a dialog must be a list of messages, got {type(dialog).__name__}")
    if not dialog:
        raise PromptError(
            "dialog is empty; expected [optional system message,] user, assistant, ..., user"
        )
    for i, msg in enumerate(dialog):
        if not (
            isinstance(msg, dict)
            and isinstance(msg.get("role"), str)
            and isinstance(msg.get("content"), str)
        ):
            raise PromptError(
                f"message {i}: expected a dict with str 'role' and 'content', got {msg!r:.80}"
            )
        role = msg["role"]
        if role == "tool" and role not in roles:
            raise PromptError(
                f"message {i}: the {fmt} chat format has no 'tool' role; tool messages need a "
                "Llama 3.x model (whose chat format writes them as `ipython` turns)"
            )
        if role not in roles:
            raise PromptError(f"message {i}: unknown role {role!r}; expected one of {roles}")
        if role == "system" and i != 0:
            raise PromptError(
                f"message {i}: a system message may only be the first message of a dialog"
            )


# ------------------------------------------------------------------------ Llama 2

# Meta's Llama 2 chat format, exactly as its reference ``chat_completion`` builds it.
B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
SPECIAL_TAGS = [B_INST, E_INST, "<<SYS>>", "<</SYS>>"]
LLAMA2_ROLES = ("system", "user", "assistant")


def check_llama2(dialog: Dialog) -> None:
    """Raise PromptError, naming the message index, unless ``dialog`` fits the Llama 2
    template: an optional system message, then user and assistant turns in alternation,
    ending on a user turn the model is to answer."""
    _check_messages(dialog, LLAMA2_ROLES, "Llama 2")
    start = 1 if dialog[0]["role"] == "system" else 0
    for i, msg in enumerate(dialog):
        for tag in SPECIAL_TAGS:
            if tag in msg["content"]:
                raise PromptError(
                    f"message {i} contains {tag!r}; the tags {SPECIAL_TAGS} are reserved "
                    "for the chat template and may not appear in message content"
                )
        if i >= start:
            expected = "user" if (i - start) % 2 == 0 else "assistant"
            if msg["role"] != expected:
                raise PromptError(
                    f"message {i}: expected role {expected!r}, got {msg['role']!r}; after the "
                    "optional system message, roles must alternate user, assistant, user, ..."
                )
    if dialog[-1]["role"] != "user":
        raise PromptError(
            f"message {len(dialog) - 1}: the last message is from the "
            f"{dialog[-1]['role']}; a dialog must end with a user message for the model to answer"
        )


check_dialog = check_llama2  # the name callers of the Llama 2-only version know


def encode_llama2(tokenizer: Tokenizer, dialog: Dialog) -> list[int]:
    """The prompt tokens for ``dialog``, as Meta's Llama 2 ``chat_completion`` makes them."""
    check_llama2(dialog)
    turns = [msg["content"] for msg in dialog]
    if dialog[0]["role"] == "system":
        # Llama 2 has no system turn: the system text rides inside the first user turn.
        turns = [B_SYS + turns[0].strip() + E_SYS + turns[1].strip(), *turns[2:]]
    tokens: list[int] = []
    # check_llama2 made turns odd in number: (user, answer) pairs, then the last user turn.
    for user, answer in zip(turns[:-1:2], turns[1::2], strict=True):
        tokens += tokenizer.encode(
            f"{B_INST} {user.strip()} {E_INST} {answer.strip()} ", bos=True, eos=True
        )
    tokens += tokenizer.encode(f"{B_INST} {turns[-1].strip()} {E_INST}", bos=True, eos=False)
    return tokens


# ------------------------------------------------------------------------ Llama 3

LLAMA3_ROLES = ("system", "user", "assistant", "tool")
_HEADER_NAMES = {"tool": "ipython"}  # Meta writes the tool role's turns as `ipython`


def check_llama3(dialog: Dialog) -> None:
    """Raise PromptError, naming the message index, unless ``dialog`` fits the Llama 3
    format: an optional system message, then user, assistant and tool turns in any order
    (as Meta's ChatFormat takes them), ending on a turn the model answers (user or tool).
    Message content is text: special-token text in it stays text, so no tag is refused."""
    _check_messages(dialog, LLAMA3_ROLES, "Llama 3")
    last = dialog[-1]["role"]
    if last not in ("user", "tool"):
        raise PromptError(
            f"message {len(dialog) - 1}: the last message is from the {last}; a dialog must "
            "end with a user (or tool) message for the model to answer"
        )


def encode_llama3(tokenizer: Tokenizer, dialog: Dialog) -> list[int]:
    """The prompt tokens for ``dialog``, as Meta's Llama 3 ``ChatFormat.encode_dialog_prompt``
    makes them: <|begin_of_text|>, then per message a header, the content as it is (not
    stripped) and <|eot_id|>, then an open assistant header for the answer."""
    check_llama3(dialog)
    special = tokenizer.special_ids

    def header(role: str) -> list[int]:
        return [
            special["<|start_header_id|>"],
            *tokenizer.encode(_HEADER_NAMES.get(role, role), bos=False, eos=False),
            special["<|end_header_id|>"],
            *tokenizer.encode("\n\n", bos=False, eos=False),
        ]

    tokens = [special["<|begin_of_text|>"]]
    for msg in dialog:
        tokens += header(msg["role"])
        tokens += tokenizer.encode(msg["content"], bos=False, eos=False)
        tokens.append(special["<|eot_id|>"])
    return tokens + header("assistant")
