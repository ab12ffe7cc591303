"""Worker logprobs (protocol.Logprobs) in OpenAI's chat and completion shapes.

Workers that send no `candidates` (FastChat's) get each candidate's bytes
from its text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from qwen_vllm.serving.protocol import Logprobs, TokenCandidate


@dataclass(frozen=True)
class TokenLogprob:
    token: str
    logprob: float | None  # None: the prompt's first token
    bytes: list[int]
    top: tuple[TokenCandidate, ...]  # best first


def parse_logprobs(raw: Logprobs | None) -> list[TokenLogprob]:
    if raw is None:
        return []
    entries = []
    for index, token in enumerate(raw.tokens):
        entries.append(
            TokenLogprob(
                token,
                _at(raw.token_logprobs, index),
                _at(raw.token_bytes, index) or list(token.encode()),
                tuple(_candidates(raw, index)),
            )
        )
    return entries


def _at(values: list[Any] | None, index: int) -> Any:
    return values[index] if values is not None and index < len(values) else None


def _candidates(raw: Logprobs, index: int) -> list[TokenCandidate]:
    listed = _at(raw.candidates, index)
    if listed is not None:
        return listed
    by_text = _at(raw.top_logprobs, index) or {}
    return [
        TokenCandidate(token=text, logprob=logprob, bytes=list(text.encode()))
        for text, logprob in sorted(by_text.items(), key=lambda item: -item[1])
    ]


def chat_logprobs(entries: Sequence[TokenLogprob], top: int) -> dict[str, Any]:
    return {
        "content": [
            {
                "token": e.token,
                "logprob": e.logprob,
                "bytes": e.bytes,
                "top_logprobs": [c.model_dump() for c in e.top[:top]],
            }
            for e in entries
        ]
    }


def completion_logprobs(
    entries: Sequence[TokenLogprob], top: int, start_offset: int
) -> dict[str, Any]:
    offsets, position = [], start_offset
    for entry in entries:
        offsets.append(position)
        position += len(entry.token)
    return {
        "tokens": [e.token for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [_top_by_text(e, top) for e in entries],
        "text_offset": offsets,
    }


def _top_by_text(entry: TokenLogprob, top: int) -> dict[str, float] | None:
    """The `top` best candidates and, as OpenAI adds it, the token itself."""
    if not top or entry.logprob is None:
        return None
    by_text: dict[str, float] = {}
    for candidate in entry.top[:top]:  # a text shared by several keeps the best
        by_text.setdefault(candidate.token, candidate.logprob)
    by_text.setdefault(entry.token, entry.logprob)
    return by_text
