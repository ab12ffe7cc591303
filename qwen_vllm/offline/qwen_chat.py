"""`QwenChat`: the Qwen README's `model.chat()` API on vLLM.

    chat = QwenChat()                      # the demo model; or QwenChat("Qwen-7B-Chat")
    response, history = chat.chat("你好")
    response, history = chat.chat("Tell me more", history=history)
    for delta in chat.chat_stream("Write a poem"):  # the new text each time
        print(delta, end="", flush=True)
    for text in chat.chat_stream_cumulative("Write a poem"):  # all so far, as HF
        show(text)
    answers = chat.chat_batch(["Hi", "Bonjour", "你好"])

Prompts are ChatML token ids built structurally (qwen_vllm.chat.chatml), so a
user's text never becomes a control token; generation stops on the ChatML
stop ids; batches run with paged attention and continuous batching.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from contextlib import closing
from pathlib import Path
from typing import Any

from qwen_vllm.chat.chatml import DEFAULT_SYSTEM, build_prompt_ids
from qwen_vllm.chat.vocab import with_chatml_stops
from qwen_vllm.model.generation_defaults import GenerationDefaults

History = list[tuple[str, str]]
# A batch item: a query, or a (query, history) pair.
BatchItem = str | tuple[str, Sequence[tuple[str, str]]]


class QwenChat:
    def __init__(
        self,
        model: str | Path | None = None,
        tensor_parallel_size: int = 1,
        *,
        system: str = DEFAULT_SYSTEM,
        max_window_size: int | None = None,
        **engine_kwargs: Any,
    ) -> None:
        from vllm.engine.arg_utils import EngineArgs
        from vllm.v1.engine.llm_engine import LLMEngine

        from qwen_vllm.checkpoints.demo import default_demo_dir, ensure_demo_model

        model_dir = (
            Path(model) if model is not None else ensure_demo_model(default_demo_dir())
        )
        args = EngineArgs(
            model=str(model_dir),
            tensor_parallel_size=tensor_parallel_size,
            **engine_kwargs,
        )
        self.engine = LLMEngine.from_engine_args(args)
        self.tokenizer = self.engine.get_tokenizer()
        self.system = system
        # The checkpoint's generation_config.json (top_p, repetition_penalty,
        # max_new_tokens, max_window_size), as the served model uses them.
        self.defaults = GenerationDefaults.of(self.engine.model_config)
        self.max_window_size = max_window_size or self.defaults.window(
            self.engine.model_config.max_model_len, None
        )
        self._ids = itertools.count()

    def chat(
        self,
        query: str,
        history: Sequence[tuple[str, str]] | None = None,
        system: str | None = None,
        **sampling: Any,
    ) -> tuple[str, History]:
        """One reply to query, and the history extended by this turn."""
        (response,) = self.chat_batch([(query, history or [])], system, **sampling)
        return response, [*(history or []), (query, response)]

    def chat_stream(
        self,
        query: str,
        history: Sequence[tuple[str, str]] | None = None,
        system: str | None = None,
        **sampling: Any,
    ) -> Iterator[str]:
        """The reply in pieces as the model produces them: each item is the
        text new since the last, so joined they make the reply.

        HF's `model.chat_stream` yields the whole reply so far instead; that is
        `chat_stream_cumulative`. Leaving the loop early stops the generation.
        """
        from vllm.sampling_params import RequestOutputKind

        params = self.sampling_params(output_kind=RequestOutputKind.DELTA, **sampling)
        request_id = self._submit(query, history or [], system, params)
        try:
            while True:
                for output in self.engine.step():
                    if output.request_id != request_id:
                        continue
                    if output.outputs[0].text:
                        yield output.outputs[0].text
                    if output.finished:
                        return
        finally:
            if self.engine.has_unfinished_requests():
                self.engine.abort_request([request_id])

    def chat_stream_cumulative(
        self,
        query: str,
        history: Sequence[tuple[str, str]] | None = None,
        system: str | None = None,
        **sampling: Any,
    ) -> Iterator[str]:
        """The reply so far, each time it grows, as HF's `model.chat_stream`
        yields it; the last item is the whole reply."""
        text = ""
        with closing(self.chat_stream(query, history, system, **sampling)) as deltas:
            for delta in deltas:
                text += delta
                yield text

    def chat_batch(
        self, items: Sequence[BatchItem], system: str | None = None, **sampling: Any
    ) -> list[str]:
        """Replies to many conversations at once (continuous batching)."""
        outputs = self.generate(items, system, **sampling)
        return [output.outputs[0].text for output in outputs]

    def generate(
        self, items: Sequence[BatchItem], system: str | None = None, **sampling: Any
    ) -> list[Any]:
        """vLLM's finished RequestOutputs (token ids, finish reasons), in order."""
        params = self.sampling_params(**sampling)
        order: dict[str, int] = {}
        for index, item in enumerate(items):
            query, history = (item, []) if isinstance(item, str) else item
            order[self._submit(query, history, system, params)] = index
        results: list[Any] = [None] * len(items)
        pending = set(order)
        while pending:
            for output in self.engine.step():
                if output.finished and output.request_id in pending:
                    pending.discard(output.request_id)
                    results[order[output.request_id]] = output
        return results

    def sampling_params(self, **overrides: Any):
        """The checkpoint's defaults, the caller's overrides, the ChatML stops."""
        from vllm import SamplingParams

        values = {
            **self.defaults.sampling,
            "max_tokens": self.defaults.max_new_tokens,  # None: the context's rest
            **overrides,
        }
        extra_stops = values.pop("stop_token_ids", None) or []
        return SamplingParams(
            **values,
            stop_token_ids=with_chatml_stops(extra_stops),
            skip_special_tokens=True,
        )

    def prompt_ids(
        self,
        query: str,
        history: Sequence[tuple[str, str]],
        system: str | None = None,
    ) -> list[int]:
        messages = [
            {"role": "system", "content": self.system if system is None else system}
        ]
        for user_text, assistant_text in history:
            messages += [
                {"role": "user", "content": user_text},
                {"role": "assistant", "content": assistant_text},
            ]
        messages.append({"role": "user", "content": query})
        return build_prompt_ids(
            messages, self.tokenizer.encode_plain, self.max_window_size
        )

    def _submit(self, query, history, system, params) -> str:
        request_id = f"chat-{next(self._ids)}"
        prompt = {"prompt_token_ids": self.prompt_ids(query, history, system)}
        self.engine.add_request(request_id, prompt, params)
        return request_id

    def close(self) -> None:
        self.engine.engine_core.shutdown()

    def __enter__(self) -> QwenChat:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
