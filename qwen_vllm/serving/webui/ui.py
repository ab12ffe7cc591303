"""The Gradio page: components and thin event handlers over ChatSession.

The conversation lives in a gr.State as a list of Turns; the Chatbot only
displays it. Elements carry stable elem_ids (ELEMENT_IDS) for browser tests.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import Any

import gradio as gr

from qwen_vllm.chat.chatml import DEFAULT_SYSTEM
from qwen_vllm.serving.client import BackendError
from qwen_vllm.serving.webui.session import (
    PAGE_MAX_NEW_TOKENS,
    ChatOptions,
    ChatSession,
    Turn,
    describe_backend_error,
)

TITLE = "Qwen chat"
# Generations running at once per event; they are async, no thread each.
CONCURRENCY_LIMIT = 64
MAX_TOKENS_LIMIT = 8192
MIN_MAX_TOKENS = 16
MIN_TOP_P = 0.05

ELEMENT_IDS = {
    "model": "model",
    "refresh": "refresh-models",
    "status": "status",
    "chatbot": "chatbot",
    "message": "message",
    "send": "send",
    "stop": "stop",
    "regenerate": "regenerate",
    "clear": "clear",
    "system": "system-prompt",
    "temperature": "temperature",
    "top_p": "top-p",
    "max_tokens": "max-tokens",
}

CSS = """
#status p { margin: 0; }
"""

SessionSource = Callable[[], ChatSession]


def theme() -> gr.themes.Base:
    # System fonts only: Gradio's default themes fetch web fonts from Google.
    return gr.themes.Soft(
        font=["ui-sans-serif", "system-ui", "Noto Sans CJK SC", "sans-serif"],
        font_mono=["ui-monospace", "DejaVu Sans Mono", "monospace"],
    )


def render(turns: list[Turn]) -> list[dict[str, Any]]:
    """Chatbot messages for a conversation.

    Content goes in as {"type": "text"} parts: Gradio dedents plain strings
    (inspect.cleandoc), which would shift indented code.
    """
    messages: list[dict[str, Any]] = []
    for turn in turns:
        messages.append(_message("user", turn.user))
        text = turn.answer
        if turn.truncated:
            text += "\n\n*(cut off at the max tokens limit)*"
        if turn.error:
            text = (text + "\n\n" if text else "") + f"⚠️ **Error:** {turn.error}"
        if text:
            messages.append(_message("assistant", text))
    return messages


def _message(role: str, text: str) -> dict[str, Any]:
    return {"role": role, "content": {"type": "text", "text": text}}


def _options(
    model: str | None,
    system: str,
    temperature: float,
    top_p: float,
    max_tokens: float,
) -> ChatOptions:
    return ChatOptions(
        model=model or "",
        system=system.strip() or DEFAULT_SYSTEM,
        temperature=float(temperature),
        top_p=float(top_p),
        max_new_tokens=int(max_tokens),
    )


class ChatHandlers:
    """The page's event handlers; `session` returns the running app's
    ChatSession (it exists only once the app's lifespan started)."""

    def __init__(self, session: SessionSource) -> None:
        self.session = session

    async def refresh_models(self, current: str | None) -> tuple[Any, str]:
        """Dropdown update and status text."""
        try:
            models = await self.session().models()
        except BackendError as exc:
            return gr.skip(), f"⚠️ {describe_backend_error(exc, current or '')}"
        value = current if current in models else (models[0] if models else None)
        status = "" if models else "⚠️ No model is being served right now."
        return gr.Dropdown(choices=models, value=value), status

    async def model_defaults(self, model: str | None) -> tuple[Any, Any, Any]:
        """Temperature, top p and max tokens set to the model's defaults."""
        defaults = await self.session().chat_defaults(model) if model else None
        if defaults is None:
            return gr.skip(), gr.skip(), gr.skip()
        max_tokens = defaults.max_new_tokens or PAGE_MAX_NEW_TOKENS
        return (
            min(max(defaults.temperature, 0.0), 2.0),
            min(max(defaults.top_p, MIN_TOP_P), 1.0),
            min(max(max_tokens, MIN_MAX_TOKENS), MAX_TOKENS_LIMIT),
        )

    async def send(
        self, message: str, history: list[Turn] | None, *settings: Any
    ) -> AsyncIterator[tuple[Any, list[Turn], list[dict[str, Any]]]]:
        """Textbox, history and chatbot as the answer grows."""
        history = list(history or [])
        question = message.strip()
        if not question:
            yield gr.skip(), history, render(history)
            return
        pending = [*history, Turn(user=question)]
        yield "", pending, render(pending)
        answers = self.session().answer(history, question, _options(*settings))
        async with aclosing(answers):
            async for turn in answers:
                turns = [*history, turn]
                yield gr.skip(), turns, render(turns)

    async def regenerate(
        self, history: list[Turn] | None, *settings: Any
    ) -> AsyncIterator[tuple[list[Turn], list[dict[str, Any]]]]:
        """The last question answered again."""
        history = list(history or [])
        if not history:
            yield history, render(history)
            return
        earlier, question = history[:-1], history[-1].user
        pending = [*earlier, Turn(user=question)]
        yield pending, render(pending)
        answers = self.session().answer(earlier, question, _options(*settings))
        async with aclosing(answers):
            async for turn in answers:
                turns = [*earlier, turn]
                yield turns, render(turns)

    @staticmethod
    def clear() -> tuple[list[Turn], list[dict[str, Any]]]:
        return [], []


def build_blocks(session: SessionSource) -> gr.Blocks:
    """The page; `session` returns the ChatSession of the running app."""
    handlers = ChatHandlers(session)

    with gr.Blocks(title=TITLE, analytics_enabled=False, fill_height=True) as blocks:
        history = gr.State([])
        with gr.Row(equal_height=False):
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(
                    label=TITLE,
                    elem_id=ELEMENT_IDS["chatbot"],
                    height=560,
                    buttons=["copy", "copy_all"],
                    feedback_options=None,
                    placeholder="Ask anything, in English or 中文.",
                )
                with gr.Row():
                    textbox = gr.Textbox(
                        show_label=False,
                        placeholder="Type a message and press Enter",
                        elem_id=ELEMENT_IDS["message"],
                        scale=6,
                        lines=1,
                        max_lines=8,
                        autofocus=True,
                    )
                    send_btn = gr.Button(
                        "Send", variant="primary", elem_id=ELEMENT_IDS["send"], scale=1
                    )
                    stop_btn = gr.Button(
                        "Stop", variant="stop", elem_id=ELEMENT_IDS["stop"], scale=1
                    )
                with gr.Row():
                    regenerate_btn = gr.Button(
                        "Regenerate", elem_id=ELEMENT_IDS["regenerate"]
                    )
                    clear_btn = gr.Button("Clear", elem_id=ELEMENT_IDS["clear"])
            with gr.Column(scale=1, min_width=260):
                model = gr.Dropdown(
                    choices=[],
                    label="Model",
                    elem_id=ELEMENT_IDS["model"],
                    interactive=True,
                )
                refresh_btn = gr.Button(
                    "↻ Refresh models", elem_id=ELEMENT_IDS["refresh"], size="sm"
                )
                status = gr.Markdown("", elem_id=ELEMENT_IDS["status"])
                system = gr.Textbox(
                    value=DEFAULT_SYSTEM,
                    label="System prompt",
                    lines=3,
                    elem_id=ELEMENT_IDS["system"],
                )
                temperature = gr.Slider(
                    0.0,
                    2.0,
                    value=ChatOptions.temperature,
                    step=0.05,
                    label="Temperature",
                    elem_id=ELEMENT_IDS["temperature"],
                )
                top_p = gr.Slider(
                    MIN_TOP_P,
                    1.0,
                    value=ChatOptions.top_p,
                    step=0.05,
                    label="Top p",
                    elem_id=ELEMENT_IDS["top_p"],
                )
                max_tokens = gr.Slider(
                    MIN_MAX_TOKENS,
                    MAX_TOKENS_LIMIT,
                    value=ChatOptions.max_new_tokens,
                    step=16,
                    label="Max tokens",
                    elem_id=ELEMENT_IDS["max_tokens"],
                )

        settings = [model, system, temperature, top_p, max_tokens]
        blocks.load(handlers.refresh_models, [model], [model, status])
        refresh_btn.click(handlers.refresh_models, [model], [model, status])
        # A model's generation_config.json sets where the sliders start.
        model.change(handlers.model_defaults, [model], [temperature, top_p, max_tokens])
        chat_event = gr.on(
            [textbox.submit, send_btn.click],
            handlers.send,
            [textbox, history, *settings],
            [textbox, history, chatbot],
            concurrency_limit=CONCURRENCY_LIMIT,
        )
        regenerate_event = regenerate_btn.click(
            handlers.regenerate,
            [history, *settings],
            [history, chatbot],
            concurrency_limit=CONCURRENCY_LIMIT,
        )
        running = [chat_event, regenerate_event]
        stop_btn.click(None, None, None, cancels=running)
        gr.on(
            [clear_btn.click, chatbot.clear],
            handlers.clear,
            None,
            [history, chatbot],
            cancels=running,
            queue=False,
        )
    return blocks
