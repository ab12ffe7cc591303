"""The Qwen v1 vocabulary: special tokens, stop ids and the BPE file."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable
from pathlib import Path

VOCAB_FILE_NAME = "qwen.tiktoken"
NUM_BPE_TOKENS = 151643

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
EXTRA_TOKENS = tuple(f"<|extra_{i}|>" for i in range(205))
SPECIAL_TOKENS: dict[str, int] = {
    token: NUM_BPE_TOKENS + i
    for i, token in enumerate((ENDOFTEXT, IM_START, IM_END, *EXTRA_TOKENS))
}
ENDOFTEXT_ID = SPECIAL_TOKENS[ENDOFTEXT]
IM_START_ID = SPECIAL_TOKENS[IM_START]
IM_END_ID = SPECIAL_TOKENS[IM_END]
# Generation ends on any of these; without them Qwen v1 chat never stops.
STOP_TOKEN_IDS: tuple[int, ...] = (ENDOFTEXT_ID, IM_START_ID, IM_END_ID)
VOCAB_SIZE = NUM_BPE_TOKENS + len(SPECIAL_TOKENS)

# The same pre-tokenization regex as the published Qwen tokenizer.
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_PACKAGES_WITH_VOCAB = (
    ("dashscope", ("resources", VOCAB_FILE_NAME)),
    ("qwen_agent", ("utils", VOCAB_FILE_NAME)),
)


def packaged_vocab_file() -> Path:
    """The real qwen.tiktoken as shipped inside an installed PyPI package."""
    for package, parts in _PACKAGES_WITH_VOCAB:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            continue
        for root in spec.submodule_search_locations:
            candidate = Path(root).joinpath(*parts)
            if candidate.is_file():
                return candidate
    raise FileNotFoundError(
        f"No {VOCAB_FILE_NAME} found: install the 'dashscope' package "
        "(pip install dashscope), which ships the real Qwen vocabulary."
    )


def with_chatml_stops(ids: Iterable[int] = ()) -> list[int]:
    """ids, then each ChatML stop id not among them: the stop ids of a
    checkpoint's generation config, a request, or the engine's sampling."""
    given = list(dict.fromkeys(ids))
    return given + [i for i in STOP_TOKEN_IDS if i not in given]
