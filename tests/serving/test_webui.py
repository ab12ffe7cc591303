"""The web UI's service layer and app wiring, without a browser."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from typing import Any

import gradio as gr
import pytest
from fastapi.testclient import TestClient

from qwen_vllm.chat.chatml import DEFAULT_SYSTEM
from qwen_vllm.serving.client import (
    BackendError,
    ControllerUnavailableError,
    NoWorkerError,
    UnknownModelError,
    WorkerError,
    WorkerTimeoutError,
)
from qwen_vllm.serving.protocol import ChatDefaults, ErrorCode
from qwen_vllm.serving.settings import WebUISettings
from qwen_vllm.serving.webui import (
    ChatOptions,
    ChatSession,
    Turn,
    build_params,
    create_app,
)
from qwen_vllm.serving.webui.app import StripPrefixMiddleware, normalized_root_path
from qwen_vllm.serving.webui.session import describe_backend_error
from qwen_vllm.serving.webui.ui import ChatHandlers, render
from tests.conftest import free_port
from tests.serving.webui_fakes import (
    MARKDOWN_ANSWER,
    MODEL,
    OTHER_MODEL,
    Script,
    ScriptedBackend,
)

OPTIONS = ChatOptions(model=MODEL)
SETTINGS = (MODEL, "Be brief.", 0.3, 0.9, 128)  # the page's settings inputs


async def collect(
    session: ChatSession,
    history: list[Turn],
    question: str,
    options: ChatOptions = OPTIONS,
) -> list[Turn]:
    return [turn async for turn in session.answer(history, question, options)]


def roles_and_texts(params: Any) -> list[tuple[str, str]]:
    return [(m.role, m.content) for m in params.messages]


# Requests


def test_params_carry_system_history_and_sampling() -> None:
    history = [
        Turn("你好", "你好！有什么可以帮你？"),
        Turn("broken", "half an ans", error="The worker failed."),
        Turn("stopped before any output"),
        Turn("what is 2+2?", "4"),
    ]
    options = ChatOptions(
        model=MODEL, system="Be brief.", temperature=0.2, top_p=0.5, max_new_tokens=99
    )
    params = build_params(history, "and 3+3?", options)
    assert roles_and_texts(params) == [
        ("system", "Be brief."),
        ("user", "你好"),
        ("assistant", "你好！有什么可以帮你？"),
        ("user", "what is 2+2?"),
        ("assistant", "4"),
        ("user", "and 3+3?"),
    ]
    assert params.model == MODEL
    assert (params.temperature, params.top_p, params.max_new_tokens) == (0.2, 0.5, 99)
    assert params.max_window_size is None  # the model's, kept by the worker
    assert params.prompt is None  # ChatML is the worker's job


def test_params_defaults() -> None:
    params = build_params([], "hi", ChatOptions(model=MODEL, system=""))
    assert roles_and_texts(params) == [("system", DEFAULT_SYSTEM), ("user", "hi")]


# Answers


async def test_answer_streams_the_growing_text() -> None:
    backend = ScriptedBackend()
    backend.default = Script(text=MARKDOWN_ANSWER, piece=7)
    states = await collect(ChatSession(backend), [], "quicksort?")
    texts = [turn.answer for turn in states]
    assert len(texts) > 10
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:], strict=False))
    assert states[-1] == Turn("quicksort?", MARKDOWN_ANSWER)
    assert backend.finished == 1 and backend.aborted == 0
    model, params = backend.calls[0]
    assert model == MODEL and params.messages[-1].content == "quicksort?"


async def test_answer_cut_at_max_tokens_is_marked() -> None:
    backend = ScriptedBackend()
    backend.default = Script(text="partial", finish_reason="length")
    final = (await collect(ChatSession(backend), [], "q"))[-1]
    assert final.truncated and final.answered
    assert "max tokens" in render([final])[-1]["content"]["text"]


async def test_worker_dying_mid_answer_keeps_the_partial_text() -> None:
    backend = ScriptedBackend()
    backend.default = Script(text="Once upon a time", piece=4, fail_after=2)
    final = (await collect(ChatSession(backend), [], "story"))[-1]
    assert final.answer == "Once upo"
    assert "failed while answering" in final.error
    assert "stream broke off" in final.error
    assert not final.answered


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (ErrorCode.CONTEXT_OVERFLOW, "too long"),
        (ErrorCode.PARAM_OUT_OF_RANGE, "out of range"),
        (ErrorCode.CONTROLLER_WORKER_TIMEOUT, "failed while answering"),
        (ErrorCode.CUDA_OUT_OF_MEMORY, "out of memory"),
        (ErrorCode.RATE_LIMIT, "RATE_LIMIT 42901"),
        (12345, "error 12345"),
    ],
)
async def test_error_chunks_become_readable_errors(code: int, expected: str) -> None:
    backend = ScriptedBackend()
    backend.default = Script(fail_after=0, error_code=code, error_text="details")
    final = (await collect(ChatSession(backend), [], "q"))[-1]
    assert expected in final.error and "details" in final.error
    assert final.answer == ""


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (NoWorkerError("none healthy"), "No worker is serving"),
        (UnknownModelError(MODEL), "is not served"),
        (ControllerUnavailableError("down"), "controller cannot be reached"),
        (WorkerTimeoutError("600 s"), "did not answer in time"),
        (WorkerError("3 tried"), "failed"),
        (BackendError("odd"), "request failed"),
    ],
)
async def test_backend_errors_are_shown_and_the_next_answer_works(
    error: BackendError, expected: str
) -> None:
    backend = ScriptedBackend()
    backend.next_script(Script(raises=error))
    session = ChatSession(backend)
    [failed] = await collect(session, [], "hello?")
    assert expected in failed.error
    assert failed.error == describe_backend_error(error, MODEL)

    final = (await collect(session, [failed], "again"))[-1]
    assert final.error is None and final.answer == Script().text
    assert roles_and_texts(backend.calls[-1][1])[1:] == [("user", "again")]


async def test_unknown_model_and_no_model() -> None:
    session = ChatSession(ScriptedBackend())
    [unknown] = await collect(session, [], "q", ChatOptions(model="nope"))
    assert "is not served" in unknown.error
    [unset] = await collect(session, [], "q", ChatOptions(model=""))
    assert "No model is selected" in unset.error


async def test_max_tokens_must_leave_room_for_the_prompt() -> None:
    backend = ScriptedBackend(context=1024)
    options = ChatOptions(model=MODEL, max_new_tokens=1024)
    [final] = await collect(ChatSession(backend), [], "q", options)
    assert "below the model's context length of 1024" in final.error
    assert backend.calls == []


async def test_unknown_context_still_answers() -> None:
    backend = ScriptedBackend(context=None)
    await collect(ChatSession(backend), [], "q")
    assert backend.calls[0][1].max_window_size is None


async def test_empty_answer_and_unexpected_failures_end_with_an_error() -> None:
    backend = ScriptedBackend()
    backend.default = Script(text="")
    [empty] = (await collect(ChatSession(backend), [], "q"))[-1:]
    assert "empty answer" in empty.error

    class Broken(ScriptedBackend):
        def generate_stream(self, model, params):
            raise RuntimeError("bug")

    [broken] = await collect(ChatSession(Broken()), [], "q")
    assert "Unexpected error" in broken.error and "bug" in broken.error


async def test_cancelling_the_answer_closes_the_worker_stream() -> None:
    backend = ScriptedBackend()
    backend.default = Script(text="x" * 1000, piece=1, delay=0.01)
    session = ChatSession(backend)
    seen: list[Turn] = []

    async def consume() -> None:
        async for turn in session.answer([], "q", OPTIONS):
            seen.append(turn)

    task = asyncio.create_task(consume())
    async with asyncio.timeout(10):
        while len(seen) < 3:
            await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert backend.aborted == 1 and backend.finished == 0

    # Closing the iterator between chunks (Gradio's /cancel does) too.
    answers = session.answer([], "q", OPTIONS)
    await anext(answers)
    await answers.aclose()
    assert backend.aborted == 2


# Rendering and handlers


def test_render_keeps_markdown_and_shows_errors() -> None:
    code = "```python\n    indented()\n```"
    turns = [
        Turn("  indented question", code),
        Turn("q2", "partial", error="It broke."),
        Turn("q3", error="No worker."),
        Turn("pending"),
    ]
    shown = [(m["role"], m["content"]["text"]) for m in render(turns)]
    assert shown == [
        ("user", "  indented question"),
        ("assistant", code),
        ("user", "q2"),
        ("assistant", "partial\n\n⚠️ **Error:** It broke."),
        ("user", "q3"),
        ("assistant", "⚠️ **Error:** No worker."),
        ("user", "pending"),
    ]
    assert all(m["content"]["type"] == "text" for m in render(turns))


def handlers_for(backend: ScriptedBackend) -> ChatHandlers:
    session = ChatSession(backend)
    return ChatHandlers(lambda: session)


async def test_send_handler_clears_the_textbox_and_streams() -> None:
    backend = ScriptedBackend()
    backend.default = Script(text="Hello there", piece=5)
    handlers = handlers_for(backend)
    updates = [u async for u in handlers.send("  hi  ", [], *SETTINGS)]
    textbox, history, chatbot = updates[0]
    assert textbox == "" and history == [Turn("hi")] and len(chatbot) == 1
    assert all(u[0] == gr.skip() for u in updates[1:])  # typing goes on
    assert updates[-1][1] == [Turn("hi", "Hello there")]
    assert updates[-1][2] == render([Turn("hi", "Hello there")])
    _, params = backend.calls[0]
    assert roles_and_texts(params) == [("system", "Be brief."), ("user", "hi")]
    assert (params.temperature, params.top_p, params.max_new_tokens) == (0.3, 0.9, 128)

    [(_, history, _)] = [u async for u in handlers.send("   ", [Turn("a", "b")])]
    assert history == [Turn("a", "b")] and len(backend.calls) == 1


async def test_regenerate_handler_answers_the_last_question_again() -> None:
    backend = ScriptedBackend()
    backend.next_script(Script(text="second"))
    handlers = handlers_for(backend)
    history = [Turn("q1", "a1"), Turn("q2", "first")]
    updates = [u async for u in handlers.regenerate(history, *SETTINGS)]
    assert updates[0][0] == [Turn("q1", "a1"), Turn("q2")]
    assert updates[-1][0] == [Turn("q1", "a1"), Turn("q2", "second")]
    assert roles_and_texts(backend.calls[0][1])[1:] == [
        ("user", "q1"),
        ("assistant", "a1"),
        ("user", "q2"),
    ]
    assert [u async for u in handlers.regenerate([], *SETTINGS)] == [([], [])]
    assert ChatHandlers.clear() == ([], [])


async def test_refresh_models_handler() -> None:
    backend = ScriptedBackend(models=(OTHER_MODEL, MODEL))
    handlers = handlers_for(backend)
    dropdown, status = await handlers.refresh_models(None)
    assert dropdown.choices == [(MODEL, MODEL), (OTHER_MODEL, OTHER_MODEL)]
    assert dropdown.value == MODEL and status == ""
    dropdown, _ = await handlers.refresh_models(OTHER_MODEL)
    assert dropdown.value == OTHER_MODEL

    backend.models.clear()
    dropdown, status = await handlers.refresh_models(MODEL)
    assert dropdown.choices == [] and dropdown.value is None
    assert "No model is being served" in status

    backend.list_error = ControllerUnavailableError("down")
    dropdown, status = await handlers.refresh_models(MODEL)
    assert "controller cannot be reached" in status
    assert dropdown == gr.skip()  # the picker keeps its value


async def test_model_defaults_handler_sets_the_sliders() -> None:
    backend = ScriptedBackend()
    handlers = handlers_for(backend)
    # FastChat's workers send no defaults: the sliders stay as they are.
    assert await handlers.model_defaults(MODEL) == (gr.skip(),) * 3
    assert await handlers.model_defaults(None) == (gr.skip(),) * 3
    backend.chat_defaults = ChatDefaults(temperature=0.6, top_p=0.5, max_new_tokens=24)
    assert await handlers.model_defaults(MODEL) == (0.6, 0.5, 24)
    # Kept inside the sliders' ranges; no max_new_tokens: the page's own.
    backend.chat_defaults = ChatDefaults(temperature=3.0, top_p=0.0)
    assert await handlers.model_defaults(MODEL) == (2.0, 0.05, 512)
    backend.chat_defaults = ChatDefaults(max_new_tokens=100_000)
    assert (await handlers.model_defaults(MODEL))[2] == 8192
    # A model no worker serves: nothing changes.
    assert await handlers.model_defaults(OTHER_MODEL) == (gr.skip(),) * 3


# The app


def gradio_call(client: TestClient, api_name: str, *data: Any) -> list[Any]:
    """Run one Gradio event through its HTTP API; its final outputs."""
    prefix = "/gradio_api/call/" + api_name
    event_id = client.post(prefix, json={"data": list(data)}).json()["event_id"]
    text = client.get(f"{prefix}/{event_id}").text
    kind, _, payload = text.strip().rpartition("data: ")
    assert "event: complete" in kind, text
    return json.loads(payload)


def test_app_serves_the_page_and_health() -> None:
    with TestClient(create_app(WebUISettings(), ScriptedBackend())) as client:
        assert client.get("/health").json() == {"status": "ok"}
        assert client.get("/").status_code == 200
        config = client.get("/config").json()
        assert config["title"] == "Qwen chat"
        ids = {c["props"].get("elem_id") for c in config["components"]}
        assert {"model", "chatbot", "message", "send", "stop", "clear"} <= ids
        _, status = gradio_call(client, "refresh_models", None)
        assert status == ""


def test_app_requires_the_password_when_set() -> None:
    settings = WebUISettings(webui_password="s3cret")
    with TestClient(create_app(settings, ScriptedBackend())) as client:
        assert client.get("/config").status_code == 401
        bad = client.post("/login", data={"username": "qwen", "password": "nope"})
        assert bad.status_code >= 400
        assert client.get("/config").status_code == 401
        good = client.post("/login", data={"username": "qwen", "password": "s3cret"})
        assert good.status_code == 200
        assert client.get("/config").status_code == 200


@pytest.mark.parametrize("root_path", ["/qwen/chat", "qwen/chat/", "/qwen/chat/"])
def test_app_honours_the_root_path(root_path: str) -> None:
    settings = WebUISettings(webui_root_path=root_path)
    with TestClient(create_app(settings, ScriptedBackend())) as client:
        # Behind an ingress that keeps the prefix and one that strips it.
        for path in ("/qwen/chat/config", "/config"):
            config = client.get(path).json()
            assert config["root"].endswith("/qwen/chat"), config["root"]
        assert client.get("/qwen/chat/").status_code == 200
        assert client.get("/qwen/chatter/").status_code == 404


def test_root_path_normalization_and_prefix_stripping() -> None:
    assert normalized_root_path("") == normalized_root_path(" / ") == ""
    assert normalized_root_path("a/b/") == "/a/b"
    seen: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(scope["path"])

    middleware = StripPrefixMiddleware(app, "/ui")
    for path in ("/ui", "/ui/", "/ui/x", "/uix", "/x"):
        asyncio.run(middleware({"type": "http", "path": path}, None, None))
    assert seen == ["/", "/", "/x", "/uix", "/x"]


def test_default_backend_is_a_controller_client_made_in_the_lifespan() -> None:
    # Nothing listens on this port: the page says the controller is down.
    settings = WebUISettings(controller_address=f"http://127.0.0.1:{free_port()}")
    with TestClient(create_app(settings)) as client:
        _, status = gradio_call(client, "refresh_models", None)
        assert "controller cannot be reached" in status


def test_import_loads_no_engine_modules() -> None:
    code = (
        "import sys, qwen_vllm.serving.webui\n"
        "heavy = sorted(m for m in sys.modules "
        "if m.split('.')[0] in ('vllm', 'torch', 'transformers'))\n"
        "print(','.join(heavy))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert result.stdout.strip() == ""
