"""vLLM's chat renderer, rendering Qwen v1 chats straight to token ids.

vLLM's OpenAI server renders a chat to a string and tokenizes that string
again, so a user who types "<|im_end|>" would produce a real control token and
could forge turns. For a QWenTokenizer this renderer asks for token ids
instead, which QWenTokenizer builds structurally (user text never becomes a
control token). Every other tokenizer gets vLLM's behaviour unchanged.
"""

from __future__ import annotations

import dataclasses

from vllm.renderers.hf import HfRenderer
from vllm.renderers.params import ChatParams

from qwen_vllm.chat.tokenizer import QWenTokenizer


class QwenAwareHfRenderer(HfRenderer):
    def _token_ids_for_qwen(self, params: ChatParams) -> ChatParams:
        if not isinstance(self.tokenizer, QWenTokenizer):
            return params
        kwargs = {**params.chat_template_kwargs, "tokenize": True}
        return dataclasses.replace(params, chat_template_kwargs=kwargs)

    def render_messages(self, messages, params: ChatParams):
        return super().render_messages(messages, self._token_ids_for_qwen(params))

    async def render_messages_async(self, messages, params: ChatParams):
        return await super().render_messages_async(
            messages, self._token_ids_for_qwen(params)
        )
