"""The web UI in a real headless Chromium, over a scripted fake backend.

The app runs under uvicorn on a free loopback port in a background thread;
the page is driven through tests/serving/webui_page.py, which works against
any running web UI. Screenshots go to artifacts/webui/ in the repository.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from qwen_vllm.serving.client import ControllerUnavailableError, NoWorkerError
from qwen_vllm.serving.protocol import ErrorCode
from qwen_vllm.serving.settings import WebUISettings
from qwen_vllm.serving.webui import create_app
from tests.serving.webui_fakes import (
    ANSWER_END,
    MARKDOWN_ANSWER,
    MODEL,
    OTHER_MODEL,
    Script,
    ScriptedBackend,
    ThreadedServer,
)
from tests.serving.webui_page import (
    CHROMIUM,
    CHROMIUM_MISSING,
    ChatPage,
    chromium_context,
    keep_on_loopback,
    wait_until,
)

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=CHROMIUM_MISSING),
    pytest.mark.timeout(300),
]

ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts" / "webui"
PASSWORD = "open sesame"
ROOT_PATH = "/qwen/chat"
STREAM_DELAY = 0.04  # seconds between chunks: slow enough to watch
LONG_ANSWER = "这是一个很长的回答。This answer goes on and on. " * 200


class UIServer(ThreadedServer):
    """The web UI over a fake backend, served in a background thread."""

    def __init__(self, settings: WebUISettings, backend: ScriptedBackend) -> None:
        super().__init__(create_app(settings, backend))


def settings(**values: object) -> WebUISettings:
    return WebUISettings(**values)


@pytest.fixture(scope="module")
def backend() -> ScriptedBackend:
    return ScriptedBackend(models=(MODEL, OTHER_MODEL))


@pytest.fixture(autouse=True)
def fresh_backend(backend: ScriptedBackend) -> None:
    backend.models[:] = [MODEL, OTHER_MODEL]
    backend.scripts.clear()
    backend.calls.clear()
    backend.list_error = None
    backend.default = Script(text=MARKDOWN_ANSWER, delay=STREAM_DELAY)


@pytest.fixture(scope="module")
def server(backend: ScriptedBackend) -> Iterator[UIServer]:
    with UIServer(settings(), backend) as running:
        yield running


@pytest.fixture(scope="module")
def browser() -> Iterator[tuple]:
    with chromium_context() as context:
        blocked = keep_on_loopback(context)
        yield context, blocked
        assert blocked == [], f"the page tried to leave loopback: {blocked}"


@pytest.fixture
def chat(browser: tuple, server: UIServer) -> Iterator[ChatPage]:
    context, _ = browser
    page = ChatPage.open(context, server.url())
    try:
        yield page
    finally:
        page.page.close()


def shot(chat: ChatPage, name: str) -> None:
    path = chat.screenshot(ARTIFACTS / f"{name}.png")
    print(f"screenshot: {path}")


def finished(text: str) -> bool:
    return ANSWER_END in text


def test_streams_markdown_answer(chat: ChatPage, backend: ScriptedBackend) -> None:
    assert chat.model_choices() == sorted([MODEL, OTHER_MODEL])
    chat.select_model(OTHER_MODEL)
    chat.select_model(MODEL)
    chat.send("用 Python 写一个快速排序 (quicksort)")
    states = chat.watch_answer(finished)
    partial = [s for s in states if s and not finished(s)]
    assert partial, f"no partial answer was seen: {states}"
    chat.wait_idle()

    assert chat.user_messages() == ["用 Python 写一个快速排序 (quicksort)"]
    answer = chat.page.locator("#chatbot [data-testid=bot]").last
    assert "def quicksort(items):" in answer.locator("pre code").inner_text()
    assert "快速排序 Quicksort" in answer.locator("h2").inner_text()
    assert answer.locator("strong", has_text="分治").count() == 1
    assert chat.page.locator("#message textarea").input_value() == ""
    shot(chat, "streamed-answer")

    model, params = backend.calls[-1]
    assert model == MODEL
    assert [(m.role, m.content) for m in params.messages] == [
        ("system", "You are a helpful assistant."),
        ("user", "用 Python 写一个快速排序 (quicksort)"),
    ]


def test_system_prompt_history_and_clear(
    chat: ChatPage, backend: ScriptedBackend
) -> None:
    backend.default = Script(text="Short answer. 简短的回答。", delay=0.01)
    chat.send("first question")
    chat.wait_for_answer(lambda text: "简短的回答" in text)
    chat.wait_idle()

    chat.set_system_prompt("You are Qwen. 请用中文回答。")
    chat.send("second question")
    chat.wait_for_answer(lambda text: "回答" in text)
    chat.wait_idle()
    _, params = backend.calls[-1]
    assert [(m.role, m.content) for m in params.messages] == [
        ("system", "You are Qwen. 请用中文回答。"),
        ("user", "first question"),
        ("assistant", "Short answer. 简短的回答。"),
        ("user", "second question"),
    ]

    chat.clear()
    wait_until(lambda: not chat.user_messages() and not chat.answers(), 10, "clear")
    chat.send("after clearing")
    chat.wait_for_answer(lambda text: "回答" in text)
    chat.wait_idle()
    _, params = backend.calls[-1]
    assert [m.role for m in params.messages] == ["system", "user"]
    assert params.messages[-1].content == "after clearing"


def test_stop_interrupts_a_long_answer(
    chat: ChatPage, backend: ScriptedBackend
) -> None:
    backend.next_script(Script(text=LONG_ANSWER, delay=0.05))
    aborted = backend.aborted
    chat.send("Tell me a long story")
    chat.wait_for_answer(lambda text: "on and on" in text)
    chat.stop()
    assert backend.stream_closed.wait(10), "the upstream stream was not closed"
    wait_until(lambda: backend.aborted == aborted + 1, 10, "the abort")
    chat.wait_idle(10)
    frozen = chat.current_answer()
    time.sleep(1.0)
    assert chat.current_answer() == frozen
    assert 0 < len(frozen) < len(LONG_ANSWER) / 2
    shot(chat, "stopped")

    # The UI keeps working; the stopped answer stays in the history.
    backend.default = Script(text="Next answer.", delay=0.01)
    chat.send("next")
    chat.wait_for_answer(lambda text: text == "Next answer.")
    _, params = backend.calls[-1]
    assert params.messages[1].content == "Tell me a long story"
    assert params.messages[2].content.startswith("这是一个很长的回答")


def test_errors_are_shown_and_the_chat_recovers(
    chat: ChatPage, backend: ScriptedBackend
) -> None:
    backend.default = Script(text="Back to normal. 恢复正常。", delay=0.01)
    backend.next_script(Script(raises=NoWorkerError("No healthy worker right now.")))
    chat.send("anyone there?")
    text = chat.wait_for_answer(lambda text: "Error" in text)
    assert "No worker is serving" in text
    chat.wait_idle()
    shot(chat, "no-worker-error")

    # The worker dies mid-answer: the partial answer and the error stay.
    backend.next_script(
        Script(
            text="I was about to say something important",
            fail_after=3,
            delay=0.05,
        )
    )
    chat.send("say something")
    text = chat.wait_for_answer(lambda text: "Error" in text)
    assert text.startswith("I was about")
    assert "failed while answering" in text

    backend.next_script(
        Script(
            fail_after=0,
            error_code=ErrorCode.CONTEXT_OVERFLOW,
            error_text="This model's maximum context length is 2048 tokens.",
        )
    )
    chat.send("x " * 3000)
    text = chat.wait_for_answer(lambda text: "Error" in text)
    assert "too long" in text and "2048" in text
    chat.wait_idle()

    chat.send("are you back?")
    text = chat.wait_for_answer(lambda text: "恢复正常" in text)
    assert "Error" not in text
    _, params = backend.calls[-1]
    # Failed turns are shown but never sent back to the model.
    assert [m.role for m in params.messages] == ["system", "user"]
    assert len(chat.answers()) == 4
    shot(chat, "recovered")


def test_regenerate_replaces_the_last_answer(
    chat: ChatPage, backend: ScriptedBackend
) -> None:
    backend.next_script(Script(text="First try.", delay=0.01))
    backend.next_script(Script(text="Second try.", delay=0.01))
    chat.send("question")
    chat.wait_for_answer(lambda text: text == "First try.")
    chat.wait_idle()
    chat.regenerate()
    chat.wait_for_answer(lambda text: text == "Second try.")
    chat.wait_idle()
    assert chat.user_messages() == ["question"]
    assert chat.answers() == ["Second try."]
    first, second = backend.calls[-2][1], backend.calls[-1][1]
    assert first.messages == second.messages


def test_model_list_refresh(chat: ChatPage, backend: ScriptedBackend) -> None:
    backend.models.append("qwen-v1-new")
    chat.refresh_models()
    wait_until(lambda: "qwen-v1-new" in chat.model_choices(), 10, "the new model", 0.3)
    backend.list_error = ControllerUnavailableError("connection refused")
    chat.refresh_models()
    wait_until(lambda: "controller" in chat.status(), 10, "the status")
    assert chat.selected_model() == MODEL  # the picker keeps its choice
    backend.list_error = None
    chat.refresh_models()
    wait_until(lambda: chat.status() == "", 10, "the status to clear")


def test_password_protection(browser: tuple, backend: ScriptedBackend) -> None:
    context, _ = browser
    backend.default = Script(text="Logged in. 已登录。", delay=0.01)
    with UIServer(settings(webui_password=PASSWORD), backend) as server:
        page = context.new_page()
        try:
            chat = ChatPage(page, server.url())
            page.goto(chat.base_url)
            chat.wait_for_login_form()
            assert page.locator("#message").count() == 0
            chat.login("qwen", "wrong password")
            page.get_by_text("Incorrect Credentials").wait_for(timeout=10_000)
            assert page.locator("#message").count() == 0
            shot(chat, "login")

            chat.login("qwen", PASSWORD)
            chat.wait_ready()
            chat.send("hello")
            assert "已登录" in chat.wait_for_answer(lambda text: "已登录" in text)
        finally:
            page.close()


def test_served_under_root_path(browser: tuple, backend: ScriptedBackend) -> None:
    context, _ = browser
    with UIServer(settings(webui_root_path=ROOT_PATH), backend) as server:
        seen: list[str] = []
        chat = ChatPage(context.new_page(), server.url(ROOT_PATH + "/"))
        try:
            chat.page.on("request", lambda request: seen.append(request.url))
            chat.page.goto(chat.base_url)
            chat.wait_ready()
            chat.send("hello from behind the ingress")
            states = chat.watch_answer(finished)
            assert any(s and not finished(s) for s in states)
            shot(chat, "root-path")
        finally:
            chat.page.close()
    prefix = server.url(ROOT_PATH + "/")
    # Gradio's index.html links its PWA manifest as "/manifest.json" whatever
    # the root path (the manifest names its icon relative to itself); behind
    # an ingress those two requests just fail, the page does not need them.
    pwa = (server.url("/manifest.json"), server.url("/static/img/logo_nosize.svg"))
    outside = [url for url in seen if not url.startswith(prefix) and url not in pwa]
    assert seen and not outside, outside
