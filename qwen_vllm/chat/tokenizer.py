"""The Qwen v1 tokenizer as a Hugging Face fast tokenizer, without remote code.

Qwen v1 ships a tiktoken vocabulary (``qwen.tiktoken``: base64 token and rank
per line) and remote code to read it. Here the ranks become a byte-level BPE
for the ``tokenizers`` library, so vLLM gets an ordinary fast tokenizer (its
incremental detokenizer, thread pool and multiprocess pickling all apply).

Why the conversion gives tiktoken's ids: tiktoken merges, at each step, the
adjacent pair whose concatenation has the lowest rank (leftmost on ties), and
returns a piece that is itself a token without merging at all. A BPE whose
merges are every split of every token into two tokens, ordered by the merged
token's rank, with ``ignore_merges`` on, does the same; the two could only
part where two different splits of one token are mergeable at once, which
none of about a million fuzzed strings produced. The reference NFC-normalizes
input with Python's ``unicodedata``; the ``tokenizers`` NFC tables are older
(they leave Unicode 14 marks such as U+0898 unordered), so Python normalizes
first here too and the backend's own NFC only serves direct backend users.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import shutil
import tempfile
import unicodedata
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers
from tokenizers import pre_tokenizers as pre
from tokenizers.models import BPE
from transformers import BatchEncoding, TokenizersBackend

from qwen_vllm.chat import chatml
from qwen_vllm.chat.vocab import (
    ENDOFTEXT,
    NUM_BPE_TOKENS,
    SPECIAL_TOKENS,
    SPLIT_PATTERN,
    VOCAB_FILE_NAME,
    VOCAB_SIZE,
    packaged_vocab_file,
)

logger = logging.getLogger(__name__)


def load_tiktoken_ranks(vocab_file: str | os.PathLike[str]) -> dict[bytes, int]:
    """The BPE ranks of a qwen.tiktoken file (base64 token, rank per line)."""
    ranks: dict[bytes, int] = {}
    with open(vocab_file, "rb") as f:
        for line in f:
            if line.strip():
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
    # The special tokens take the ids right after the BPE ranks.
    if sorted(ranks.values()) != list(range(NUM_BPE_TOKENS)):
        raise ValueError(
            f"{vocab_file} is not a Qwen v1 vocabulary: expected the ranks "
            f"0..{NUM_BPE_TOKENS - 1}, each once, got {len(ranks)} tokens."
        )
    return ranks


def byte_level_alphabet() -> list[str]:
    """The character the ByteLevel pre-tokenizer writes for each byte value."""
    # Printable bytes stand for themselves; the rest move above U+00FF so every
    # byte is one visible, non-space character.
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    alphabet, shifted = [], 0
    for byte in range(256):
        if byte in printable:
            alphabet.append(chr(byte))
        else:
            alphabet.append(chr(0x100 + shifted))
            shifted += 1
    return alphabet


_BYTE_OF_CHAR = {char: byte for byte, char in enumerate(byte_level_alphabet())}


def bpe_merges(ranks: Mapping[bytes, int]) -> list[tuple[bytes, bytes]]:
    """Every split of every token into two tokens, by the merged token's rank.

    tiktoken may join any two adjacent tokens whose concatenation is a token,
    not only the pair the vocabulary was trained with, so every such split
    must be a merge. Splits of one token are ordered by their parts' ranks.
    """
    merges: list[tuple[int, int, int, bytes, bytes]] = []
    for token, rank in ranks.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            left_rank, right_rank = ranks.get(left), ranks.get(right)
            if left_rank is not None and right_rank is not None:
                merges.append((rank, left_rank, right_rank, left, right))
    merges.sort()
    return [(left, right) for _, _, _, left, right in merges]


def build_backend(ranks: Mapping[bytes, int]) -> Tokenizer:
    """The fast tokenizer for Qwen's ranks, special tokens included."""
    alphabet = byte_level_alphabet()

    def text(token: bytes) -> str:
        return "".join(alphabet[byte] for byte in token)

    model = BPE(
        vocab={text(token): rank for token, rank in ranks.items()},
        merges=[(text(left), text(right)) for left, right in bpe_merges(ranks)],
        ignore_merges=True,
    )
    backend = Tokenizer(model)
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre.Sequence(
        [
            pre.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
            pre.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    # normalized=True matches special tokens after NFC, as the reference does.
    backend.add_special_tokens(
        [AddedToken(token, special=True, normalized=True) for token in SPECIAL_TOKENS]
    )
    _check_backend(backend)
    return backend


def tokenizer_cache_path(vocab_file: str | os.PathLike[str]) -> Path:
    """Where the converted tokenizer.json of this vocabulary is cached."""
    digest = hashlib.sha256(Path(vocab_file).read_bytes()).hexdigest()
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root, "qwen_vllm", "tokenizers", f"{digest}.json")


def load_backend(vocab_file: str | os.PathLike[str]) -> Tokenizer:
    """The fast tokenizer of a qwen.tiktoken file, converted once and cached."""
    cache_file = tokenizer_cache_path(vocab_file)
    if cache_file.is_file():
        try:
            backend = Tokenizer.from_file(str(cache_file))
            _check_backend(backend)
            return backend
        except Exception as exc:
            logger.warning(
                "Rebuilding the unusable tokenizer cache %s: %s", cache_file, exc
            )
    backend = build_backend(load_tiktoken_ranks(vocab_file))
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        # Several processes may convert at once; each publishes a whole file.
        fd, tmp = tempfile.mkstemp(dir=cache_file.parent, suffix=".tmp")
        os.close(fd)
        try:
            backend.save(tmp)
            os.replace(tmp, cache_file)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError as exc:
        logger.warning(
            "Could not cache the converted tokenizer (%s): each start converts "
            "it again (seconds). Point XDG_CACHE_HOME at a writable directory.",
            exc,
        )
    return backend


def _check_backend(backend: Tokenizer) -> None:
    if backend.get_vocab_size(with_added_tokens=True) != VOCAB_SIZE or any(
        backend.token_to_id(token) != token_id
        for token, token_id in SPECIAL_TOKENS.items()
    ):
        raise ValueError(
            "not a Qwen v1 tokenizer (vocabulary size or special ids differ)"
        )


def _plain_view(backend: Tokenizer) -> Tokenizer:
    # Shares the BPE model (no copy of the vocabulary) but knows no special
    # tokens. It is never mutated, so concurrent encodes are safe, unlike
    # toggling encode_special_tokens on the shared backend.
    plain = Tokenizer(backend.model)
    plain.normalizer = backend.normalizer
    plain.pre_tokenizer = backend.pre_tokenizer
    plain.decoder = backend.decoder
    return plain


def _nfc(value: Any) -> Any:
    if isinstance(value, str):
        return unicodedata.normalize("NFC", value)
    if isinstance(value, list | tuple):
        return type(value)(_nfc(item) for item in value)
    return value


class QWenTokenizer(TokenizersBackend):
    """Qwen v1's tokenizer: ids identical to the reference tiktoken tokenizer.

    Loads from a checkpoint directory holding ``qwen.tiktoken`` (the
    ``auto_map`` of a real checkpoint's tokenizer_config.json is ignored, so
    no remote code runs). Special-token text in ``encode``/``__call__`` input
    becomes the special id, like the reference default; ``encode_plain``
    treats it as text. ``apply_chat_template`` with the built-in ChatML
    template builds ids structurally, so message text cannot forge turns.
    """

    vocab_files_names = {"vocab_file": VOCAB_FILE_NAME}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file: str | os.PathLike[str] | None = None, **kwargs: Any):
        tokenizer_file = kwargs.pop("tokenizer_file", None)
        # Left by TokenizersBackend.convert_to_native_format; the backend is
        # built here instead.
        for unused in ("tokenizer_object", "vocab", "merges", "merges_file"):
            kwargs.pop(unused, None)
        if vocab_file is None and tokenizer_file and os.path.isfile(tokenizer_file):
            self._tokenizer = Tokenizer.from_file(tokenizer_file)
        else:
            if vocab_file is None:
                # Every Qwen v1 size shares this vocabulary.
                vocab_file = packaged_vocab_file()
                logger.info("No %s given; using %s", VOCAB_FILE_NAME, vocab_file)
            vocab_file = str(vocab_file)
            self._tokenizer = load_backend(vocab_file)
        kwargs.setdefault("eos_token", ENDOFTEXT)
        # Qwen has no padding token; padded positions are masked anyway.
        kwargs.setdefault("pad_token", ENDOFTEXT)
        # Every id from 151643 up is special, as in the reference decode.
        kwargs.setdefault(
            "extra_special_tokens", [t for t in SPECIAL_TOKENS if t != ENDOFTEXT]
        )
        kwargs.setdefault("chat_template", chatml.CHAT_TEMPLATE)
        super().__init__(vocab_file=vocab_file, **kwargs)
        self._plain_tokenizer = _plain_view(self._tokenizer)

    @classmethod
    def convert_to_native_format(
        cls, trust_remote_code: bool = False, **kwargs: Any
    ) -> dict[str, Any]:
        # The base class would parse tokenizer.json or guess at vocab files;
        # __init__ reads qwen.tiktoken itself.
        return kwargs

    @classmethod
    def _patch_mistral_regex(
        cls, tokenizer: Tokenizer, *args: Any, **kwargs: Any
    ) -> Tokenizer:
        # The base class probes the Hub and warns about a Mistral regex for
        # any large vocabulary whose config.json lacks transformers_version.
        return tokenizer

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_plain_tokenizer", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.__dict__["_plain_tokenizer"] = _plain_view(self._tokenizer)

    def encode_plain(self, text: str) -> list[int]:
        """Ids of text with special-token strings encoded as plain text.

        Like the reference ``encode(text, allowed_special=set(),
        disallowed_special=())``. Thread-safe.
        """
        if not text:
            return []
        return self._plain_tokenizer.encode(_nfc(text), add_special_tokens=False).ids

    def decode_tokens_bytes(self, ids: list[int]) -> list[bytes]:
        """The raw bytes of each token, like tiktoken's method of that name.

        A token may hold part of a UTF-8 character, which decode() cannot
        show. Special tokens give their text.
        """
        # Special tokens are printable ASCII, which the alphabet keeps as is.
        return [
            bytes(_BYTE_OF_CHAR[char] for char in token)
            for token in self.convert_ids_to_tokens(ids)
        ]

    def _encode_plus(
        self, text: Any, text_pair: Any = None, **kwargs: Any
    ) -> BatchEncoding:
        return super()._encode_plus(
            text=_nfc(text), text_pair=_nfc(text_pair), **kwargs
        )

    def apply_chat_template(
        self,
        conversation: Any,
        tools: list[Any] | None = None,
        documents: list[Any] | None = None,
        chat_template: str | None = None,
        add_generation_prompt: bool = False,
        continue_final_message: bool = False,
        tokenize: bool = True,
        padding: bool | str = False,
        truncation: bool = False,
        max_length: int | None = None,
        return_tensors: Any = None,
        return_dict: bool = True,
        return_assistant_tokens_mask: bool = False,
        tokenizer_kwargs: dict[str, Any] | None = None,
        max_window_size: int | None = None,
        **kwargs: Any,
    ) -> Any:
        """ChatML built by qwen_vllm.chat.chatml unless another template is asked.

        Text goes through encode_plain and control tokens are inserted as ids,
        so typed ``<|im_end|>`` stays text. ``max_window_size`` trims old turns
        like Qwen's make_context (off by default). Tools are written into
        Qwen's ReAct prompt (chat.react), tool calls and results into its
        transcript, which continues after a result; documents and template
        variables are ignored.
        """
        template = self.get_chat_template(chat_template, tools)
        if template != chatml.CHAT_TEMPLATE or return_assistant_tokens_mask:
            return super().apply_chat_template(
                conversation,
                tools=tools,
                documents=documents,
                chat_template=chat_template,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
                tokenize=tokenize,
                padding=padding,
                truncation=truncation,
                max_length=max_length,
                return_tensors=return_tensors,
                return_dict=return_dict,
                return_assistant_tokens_mask=return_assistant_tokens_mask,
                tokenizer_kwargs=tokenizer_kwargs,
                **kwargs,
            )
        if add_generation_prompt and continue_final_message:
            raise ValueError(
                "add_generation_prompt and continue_final_message exclude each "
                "other: one opens a new assistant message, the other continues "
                "the last one."
            )
        batched = bool(conversation) and not isinstance(conversation[0], Mapping)
        conversations = conversation if batched else [conversation]
        if tools:
            conversations, continue_final_message = _with_react_tools(
                conversations, tools, continue_final_message
            )
            add_generation_prompt = add_generation_prompt and not continue_final_message
        if not tokenize:
            texts = [
                chatml.render_prompt(
                    messages,
                    add_generation_prompt,
                    continue_final_message=continue_final_message,
                )
                for messages in conversations
            ]
            return texts if batched else texts[0]
        ids = [
            chatml.build_prompt_ids(
                messages,
                self.encode_plain,
                max_window_size,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
            )
            for messages in conversations
        ]
        if truncation and max_length is not None:
            ids = [self._truncated(seq, max_length) for seq in ids]
        if not (return_dict or padding or return_tensors):
            return ids if batched else ids[0]
        data = {"input_ids": ids, "attention_mask": [[1] * len(seq) for seq in ids]}
        encoded = BatchEncoding(
            data if batched else {key: value[0] for key, value in data.items()}
        )
        if padding:
            encoded = self.pad(encoded, padding=padding, max_length=max_length)
        if return_tensors:
            encoded.convert_to_tensors(return_tensors, prepend_batch_axis=not batched)
        return encoded if return_dict else encoded["input_ids"]

    def _truncated(self, ids: list[int], max_length: int) -> list[int]:
        if len(ids) <= max_length:
            return ids
        return ids[-max_length:] if self.truncation_side == "left" else ids[:max_length]

    def save_vocabulary(
        self, save_directory: str, filename_prefix: str | None = None
    ) -> tuple[str, ...]:
        if not getattr(self, "vocab_file", None):
            return ()
        name = (f"{filename_prefix}-" if filename_prefix else "") + VOCAB_FILE_NAME
        target = os.path.join(save_directory, name)
        if os.path.abspath(self.vocab_file) != os.path.abspath(target):
            shutil.copyfile(self.vocab_file, target)
        return (target,)


def _with_react_tools(
    conversations: list[Any], tools: list[Any], continue_final_message: bool
) -> tuple[list[Any], bool]:
    """Conversations rewritten for ReAct with `tools` (OpenAI definitions)."""
    from qwen_vllm.chat.react import ToolSpec, build_react_prompt

    specs = [ToolSpec.from_tool(tool) for tool in tools]
    prompts = [build_react_prompt(messages, specs) for messages in conversations]
    continues = any(prompt.continue_final_message for prompt in prompts)
    return [p.messages for p in prompts], continue_final_message or continues
