"""Web UIs against the real stack of `qwen-vllm serve` (demo model), in
Debian's headless Chromium: ours, then FastChat's own, then ours again while
no worker is alive (the error shows; the UI recovers when Ray restarts them)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from tests.serving.fastchat_webui import fastchat_webui
from tests.serving.webui_page import (
    ChatPage,
    FastChatPage,
    chromium_context,
    keep_on_loopback,
    wait_until,
)

pytestmark = [pytest.mark.slow, pytest.mark.browser]

ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts" / "webui-stack"
ANSWER_TIMEOUT = 60.0


def select_with_defaults(chat: ChatPage, model: str) -> None:
    """Pick `model` and wait for the settings to show its defaults: the
    demo's generation_config.json has a Qwen -Chat release's top_p 0.8 and
    max_new_tokens 512 (temperature unset: 1.0)."""
    chat.select_model(model)
    wait_until(
        lambda: chat.sampling_settings() == (1.0, 0.8, 512),
        ANSWER_TIMEOUT,
        "the model's defaults in the settings",
    )


def test_chat_streams_from_the_real_workers(stack):
    with chromium_context() as context:
        keep_on_loopback(context)
        chat = ChatPage.open(context, stack.webui, timeout=ANSWER_TIMEOUT)
        assert stack.model in chat.model_choices()
        select_with_defaults(chat, stack.model)
        chat.set_max_tokens(40)
        chat.record_answer_states()
        chat.send("你好，请写一段关于 vLLM 的介绍。")
        answer = chat.wait_for_answer(
            lambda text: len(text) > 0 and not chat.is_generating()
        )
        assert answer and "Error" not in answer
        # Streamed: the page showed the answer growing, in several updates,
        # before it was complete (the cut-off note comes with the last one).
        generated = answer.split("(cut off at the max tokens limit)")[0].rstrip()
        states = chat.recorded_answer_states()
        partial = {s for s in states if 0 < len(s) < len(generated)}
        assert len(partial) >= 2, states[:5]
        chat.screenshot(ARTIFACTS / "streamed-answer.png")

        before = [w["requests_total"] for w in _healths(stack)]
        chat.set_system_prompt("You answer in one short sentence.")
        chat.send("Hello again")
        chat.wait_idle()
        assert len(chat.answers()) == 2
        after = [w["requests_total"] for w in _healths(stack)]
        assert sum(after) == sum(before) + 1
        chat.clear()
        wait_until(lambda: chat.messages() == [], 10, "the chat to be cleared")


def test_fastchat_web_ui_serves_our_model(stack, tmp_path):
    with (
        fastchat_webui(stack.controller, workdir=tmp_path) as url,
        chromium_context() as context,
    ):
        keep_on_loopback(context)
        page = FastChatPage.open(context, url, timeout=ANSWER_TIMEOUT)
        assert page.selected_model() == stack.model
        page.send("Hi")
        answer = page.wait_for_answer(lambda text: len(text.strip("▌ ")) > 0)
        assert answer
        page.screenshot(ARTIFACTS / "fastchat-web-ui.png")


def _healths(stack) -> list[dict]:
    return [httpx.get(f"{u}/health", timeout=5).json() for u in stack.worker_urls()]


def test_no_worker_shows_an_error_and_the_ui_recovers(stack):
    with chromium_context() as context:
        keep_on_loopback(context)
        chat = ChatPage.open(context, stack.webui, timeout=ANSWER_TIMEOUT)
        select_with_defaults(chat, stack.model)
        chat.set_max_tokens(8)
        for health in _healths(stack):
            os.kill(health["pid"], signal.SIGKILL)
        deadline = time.monotonic() + 10
        while any(w["healthy"] for w in stack.workers()):
            assert time.monotonic() < deadline, "dead workers still routable"
            time.sleep(0.2)
        chat.send("Is anyone there?")
        error = chat.wait_for_answer(lambda text: "Error" in text)
        assert "worker" in error.lower()
        chat.screenshot(ARTIFACTS / "no-worker-error.png")

        deadline = time.monotonic() + 300
        while sum(w["healthy"] for w in stack.workers()) < 2:
            assert time.monotonic() < deadline, "workers did not come back"
            time.sleep(1)
        chat.send("And now?")
        answer = chat.wait_for_answer(
            lambda text: len(text) > 0 and not chat.is_generating()
        )
        assert "Error" not in answer
        chat.screenshot(ARTIFACTS / "recovered.png")
