"""ChatML, the Qwen v1 chat format: the one place it is rendered.

A conversation becomes a list of pieces: control token ids (``<|im_start|>``,
``<|im_end|>``) and plain-text strings. Plain text is encoded with no special
tokens recognised, so a user who types ``<|im_end|>`` gets those characters,
not a turn boundary. Every string piece is encoded on its own, as Qwen's
reference ``make_context`` does (role, newline and content are separate
calls): encoding the joined string gives different ids where a newline meets
whitespace, so only the piece-wise ids match what the models were tuned on.

Layout, with a default system message when the first message is not one::

    <|im_start|>system\\n{system}<|im_end|>
    \\n<|im_start|>{role}\\n{content}<|im_end|>    one per further message
    \\n<|im_start|>assistant\\n                    the generation prompt

Messages need not alternate: each renders as one block in order. Roles other
than system/user/assistant (``function``, ``tool``, ...) are written verbatim
as their role name; turning tool results into ReAct "Observation:" text is the
ReAct layer's job, done before rendering.

Pure Python on purpose: the gateway and web UI import this module.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from qwen_vllm.chat.vocab import IM_END_ID, IM_START_ID, SPECIAL_TOKENS

DEFAULT_SYSTEM = "You are a helpful assistant."
DEFAULT_MAX_WINDOW_SIZE = 6144

Piece = int | str
EncodePlain = Callable[[str], list[int]]
Turn = tuple[str, str]

# Renders the same text as render_prompt(), for code that only knows Jinja
# (vLLM's and transformers' template machinery). Every tag strips the
# whitespace around it, so the layout of this source never reaches the output
# whatever trim_blocks/lstrip_blocks settings the environment uses.
CHAT_TEMPLATE = r"""
{%- set default_system = messages | length == 0 or messages[0]['role'] != 'system' -%}
{%- if default_system -%}
    {{- '<|im_start|>system\nYou are a helpful assistant.<|im_end|>' -}}
{%- endif -%}
{%- for message in messages -%}
    {%- if default_system or not loop.first -%}
        {{- '\n' -}}
    {%- endif -%}
    {{- '<|im_start|>' + message['role'] + '\n' -}}
    {%- if message['content'] is string -%}
        {{- message['content'] -}}
    {%- elif message['content'] -%}
        {{- message['content'] | selectattr('type', 'equalto', 'text')
            | map(attribute='text') | join('\n') -}}
    {%- endif -%}
    {{- '<|im_end|>' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '\n<|im_start|>assistant\n' -}}
{%- endif -%}
"""

_TOKEN_TEXT = {token_id: text for text, token_id in SPECIAL_TOKENS.items()}
# Role names are written as plain text; a newline in one would forge a header.
_ROLE = re.compile(r"[\w-]+")
_GENERATION_PROMPT: tuple[Piece, ...] = ("\n", IM_START_ID, "assistant", "\n")


def message_text(content: Any) -> str:
    """The text of an OpenAI-style message content: a string, None or text parts.

    Text parts are joined with newlines, as vLLM flattens them.
    """
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for part in content:
        if not isinstance(part, Mapping) or part.get("type") != "text":
            kind = part.get("type") if isinstance(part, Mapping) else type(part)
            raise ValueError(f"ChatML messages carry only text, got a {kind!r} part")
        texts.append(part["text"])
    return "\n".join(texts)


def render_pieces(
    messages: Iterable[Mapping[str, Any]],
    add_generation_prompt: bool = True,
    *,
    continue_final_message: bool = False,
) -> list[Piece]:
    """The conversation as control token ids and plain-text strings.

    With continue_final_message the last message is left open (no
    ``<|im_end|>``) so the model continues it, and no generation prompt is
    added.
    """
    return _pieces(
        _conversation(messages), add_generation_prompt, continue_final_message
    )


def render_text(pieces: Iterable[Piece]) -> str:
    """The ChatML string, control tokens written as their text."""
    return "".join(_TOKEN_TEXT[p] if isinstance(p, int) else p for p in pieces)


def render_prompt(
    messages: Iterable[Mapping[str, Any]],
    add_generation_prompt: bool = True,
    *,
    continue_final_message: bool = False,
) -> str:
    """The ChatML string of a conversation (what CHAT_TEMPLATE renders)."""
    return render_text(
        render_pieces(
            messages,
            add_generation_prompt,
            continue_final_message=continue_final_message,
        )
    )


def encode_pieces(pieces: Iterable[Piece], encode_plain: EncodePlain) -> list[int]:
    """Token ids of pieces; encode_plain must not recognise special tokens."""
    ids: list[int] = []
    for piece in pieces:
        if isinstance(piece, int):
            ids.append(piece)
        elif piece:
            ids.extend(encode_plain(piece))
    return ids


def trim_messages(
    messages: Iterable[Mapping[str, Any]],
    encode_plain: EncodePlain,
    max_window_size: int | None = DEFAULT_MAX_WINDOW_SIZE,
) -> list[dict[str, str]]:
    """The messages kept under max_window_size tokens, oldest dropped first.

    The rule generalises the reference make_context. The system message (the
    default one if none leads) is always kept, and so is the current turn: the
    last user message and everything after it. Earlier messages are grouped
    into turns, each a user message with the replies that follow it (messages
    before the first user message form a turn of their own). Walking turns
    newest first, a turn is kept while system tokens + its tokens (one newline
    per message included) + the tokens already kept stay below
    max_window_size; the first turn that does not fit is dropped with every
    older one. For alternating user/assistant history this is exactly the
    reference rule. None disables trimming.
    """
    turns = _trim(_conversation(messages), _memoized(encode_plain), max_window_size)
    return [{"role": role, "content": content} for role, content in turns]


def build_prompt_ids(
    messages: Iterable[Mapping[str, Any]],
    encode_plain: EncodePlain,
    max_window_size: int | None = DEFAULT_MAX_WINDOW_SIZE,
    *,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
) -> list[int]:
    """Prompt token ids, trimmed as trim_messages() describes."""
    encode = _memoized(encode_plain)
    turns = _trim(_conversation(messages), encode, max_window_size)
    return encode_pieces(
        _pieces(turns, add_generation_prompt, continue_final_message), encode
    )


def make_context(
    query: str,
    history: Sequence[tuple[str, str]] | None = None,
    system: str = DEFAULT_SYSTEM,
    *,
    encode_plain: EncodePlain,
    max_window_size: int | None = DEFAULT_MAX_WINDOW_SIZE,
) -> tuple[str, list[int]]:
    """Qwen's reference make_context for chat_format "chatml": (raw_text, ids)."""
    messages = [{"role": "system", "content": system}]
    for user_text, assistant_text in history or ():
        messages.append({"role": "user", "content": user_text})
        messages.append({"role": "assistant", "content": assistant_text})
    messages.append({"role": "user", "content": query})
    encode = _memoized(encode_plain)
    pieces = _pieces(
        _trim(_conversation(messages), encode, max_window_size), True, False
    )
    return render_text(pieces), encode_pieces(pieces, encode)


def _conversation(messages: Iterable[Mapping[str, Any]]) -> list[Turn]:
    turns: list[Turn] = []
    for message in messages:
        role = message["role"]
        if not isinstance(role, str) or not _ROLE.fullmatch(role):
            raise ValueError(
                f"Invalid ChatML role {role!r}: use letters, digits, '_' or '-'."
            )
        turns.append((role, message_text(message.get("content"))))
    if not turns or turns[0][0] != "system":
        turns.insert(0, ("system", DEFAULT_SYSTEM))
    return turns


def _message_pieces(turn: Turn) -> list[Piece]:
    role, content = turn
    return [IM_START_ID, role, "\n", content, IM_END_ID]


def _pieces(
    turns: Sequence[Turn], add_generation_prompt: bool, continue_final_message: bool
) -> list[Piece]:
    pieces: list[Piece] = []
    for index, turn in enumerate(turns):
        if index:
            pieces.append("\n")
        pieces.extend(_message_pieces(turn))
    if continue_final_message:
        pieces.pop()
    elif add_generation_prompt:
        pieces.extend(_GENERATION_PROMPT)
    return pieces


def _trim(
    turns: list[Turn], encode: EncodePlain, max_window_size: int | None
) -> list[Turn]:
    if max_window_size is None:
        return turns
    system, body = turns[0], turns[1:]
    users = [index for index, (role, _) in enumerate(body) if role == "user"]
    current = users[-1] if users else max(len(body) - 1, 0)
    groups: list[list[Turn]] = []
    for turn in body[:current]:
        if turn[0] == "user" or not groups:
            groups.append([turn])
        else:
            groups[-1].append(turn)

    def cost(group: list[Turn]) -> int:
        return sum(
            len(encode_pieces(["\n", *_message_pieces(turn)], encode)) for turn in group
        )

    budget = max_window_size - len(encode_pieces(_message_pieces(system), encode))
    used, first_kept = 0, len(groups)
    for index in range(len(groups) - 1, -1, -1):
        group_cost = cost(groups[index])
        if used + group_cost >= budget:
            break
        used += group_cost
        first_kept = index
    kept = [turn for group in groups[first_kept:] for turn in group]
    return [system, *kept, *body[current:]]


def _memoized(encode_plain: EncodePlain) -> EncodePlain:
    # Trimming measures the turns it keeps; the cache spares encoding them twice.
    cache: dict[str, list[int]] = {}

    def encode(text: str) -> list[int]:
        ids = cache.get(text)
        if ids is None:
            ids = cache[text] = encode_plain(text)
        return ids

    return encode
