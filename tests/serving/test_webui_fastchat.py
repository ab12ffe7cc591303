"""FastChat's own web UI (`python -m fastchat.serve.gradio_web_server`) against
a FastChat-protocol controller, driven in a real headless Chromium.

It runs from a cached virtualenv with Gradio 5 (see fastchat_webui.py); the
first run builds it (about two minutes here). By default the controller and
worker are fakes speaking FastChat's protocol; set
QWEN_VLLM_TEST_CONTROLLER_URL to test against a running controller instead
(e.g. the one `qwen-vllm serve` started, without an internal token).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.serving.fastchat_webui import (
    FakeFastChatWorker,
    controller_url_from_env,
    fastchat_webui,
    fastchat_webui_python,
)
from tests.serving.webui_page import (
    CHROMIUM,
    CHROMIUM_MISSING,
    FastChatPage,
    chromium_context,
    keep_on_loopback,
)

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=CHROMIUM_MISSING),
    pytest.mark.timeout(1800),
]

ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts" / "webui"
MODEL = "qwen-v1-demo"
ANSWER = "你好！I am Qwen, streamed through FastChat's web UI. " * 3
QUESTION = "Who are you? 你是谁？"


@pytest.fixture(scope="module")
def controller() -> Iterator[tuple[str, FakeFastChatWorker | None]]:
    url = controller_url_from_env()
    if url is not None:
        yield url, None
        return
    with FakeFastChatWorker(MODEL, ANSWER, delay=0.05) as fake:
        yield fake.controller_url, fake


def test_fastchat_web_ui_lists_our_model_and_streams(
    controller: tuple[str, FakeFastChatWorker | None], tmp_path: Path
) -> None:
    url, fake = controller
    models = httpx.post(url + "/list_models", timeout=10).json()["models"]
    assert models
    python = fastchat_webui_python()
    with (
        fastchat_webui(url, workdir=tmp_path, python=python) as web_url,
        chromium_context() as context,
    ):
        blocked = keep_on_loopback(context)
        chat = FastChatPage.open(context, web_url, timeout=60)
        assert chat.selected_model() in models
        assert set(chat.model_choices()) >= set(models)

        chat.send(QUESTION)
        if fake is None:  # a real model: any answer will do
            states = chat.watch_answer(lambda text: len(text) > 0 and "▌" not in text)
        else:
            states = chat.watch_answer(lambda text: text == ANSWER.strip())
            partial = [s for s in states if s and s != ANSWER.strip()]
            assert partial, states
        path = ARTIFACTS / "fastchat-web-ui.png"
        chat.screenshot(path)
        print(f"screenshot: {path}")
        print(f"blocked (FastChat's CDN script and web fonts): {blocked}")

    if fake is not None:
        [request] = fake.requests
        assert request["model"] == MODEL
        # FastChat renders Qwen's ChatML itself (conv template qwen-7b-chat).
        assert request["prompt"].endswith(
            f"<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n"
        )
        assert request["stop_token_ids"] == [151643, 151644, 151645]
