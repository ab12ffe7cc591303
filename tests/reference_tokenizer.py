"""The reference Qwen v1 tokenizer (qwen_agent's, on tiktoken), for tests.

qwen_agent's package ``__init__`` pulls in agent, audio and GUI dependencies
that a serving install does not have; only its tokenizer module is needed, so
that one file is loaded with a stand-in for the single qwen_agent module it
imports (its logger). Nothing of qwen_vllm is used here.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import sys
import types
from pathlib import Path

import qwen_vllm.chat.vocab

# Facts of the published vocabulary, restated rather than imported.
IM_START_ID, IM_END_ID = 151644, 151645


class ReferenceTokenizer:
    """qwen_agent's QWenTokenizer over the packaged qwen.tiktoken."""

    def __init__(self, vocab_file: str | Path | None = None) -> None:
        module = _load_module()
        self.vocab_file = Path(vocab_file or qwen_vllm.chat.vocab.packaged_vocab_file())
        self.impl = module.QWenTokenizer(str(self.vocab_file))

    def encode(self, text: str) -> list[int]:
        """Special-token text becomes the special id (the reference default)."""
        return self._ids(self.impl.tokenize(text, allowed_special="all"))

    def encode_plain(self, text: str) -> list[int]:
        """Special-token text stays text, as make_context encodes turns."""
        return self._ids(
            self.impl.tokenize(text, allowed_special=set(), disallowed_special=())
        )

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.impl._decode(ids, skip_special_tokens=skip_special_tokens)

    def _ids(self, tokens: list[bytes | str]) -> list[int]:
        ids = self.impl.convert_tokens_to_ids(tokens)
        assert None not in ids
        return ids


def reference_chat_ids(reference, turns, generation_prompt=True):
    """ChatML ids written from the format facts: each piece encoded alone."""
    nl = reference.encode_plain("\n")
    ids = []
    for index, (role, content) in enumerate(turns):
        if index:
            ids += nl
        ids += [IM_START_ID, *reference.encode_plain(role), *nl]
        ids += [*reference.encode_plain(content), IM_END_ID]
    if generation_prompt:
        ids += [*nl, IM_START_ID, *reference.encode_plain("assistant"), *nl]
    return ids


@functools.cache
def reference_tokenizer() -> ReferenceTokenizer:
    """One shared instance: building the tiktoken encoding takes a second."""
    return ReferenceTokenizer()


def _load_module() -> types.ModuleType:
    spec = importlib.util.find_spec("qwen_agent")
    assert spec is not None and spec.submodule_search_locations
    root = Path(next(iter(spec.submodule_search_locations)))
    stand_ins = {
        "qwen_agent": types.ModuleType("qwen_agent"),
        "qwen_agent.log": types.ModuleType("qwen_agent.log"),
    }
    stand_ins["qwen_agent"].__path__ = [str(root)]
    stand_ins["qwen_agent.log"].logger = logging.getLogger("qwen_agent")
    saved = {name: sys.modules.get(name) for name in stand_ins}
    sys.modules.update(stand_ins)
    try:
        file_spec = importlib.util.spec_from_file_location(
            "_reference_tokenization_qwen", root / "utils" / "tokenization_qwen.py"
        )
        assert file_spec is not None and file_spec.loader is not None
        module = importlib.util.module_from_spec(file_spec)
        file_spec.loader.exec_module(module)
    finally:
        for name, previous in saved.items():
            if previous is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = previous
    return module
