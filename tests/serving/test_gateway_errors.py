"""Gateway errors, limits, metrics and disconnects, over raw HTTP."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import httpx
import openai
import pytest

from qwen_vllm.serving.client import (
    ControllerUnavailableError,
    NoWorkerError,
    WorkerError,
    WorkerTimeoutError,
)
from qwen_vllm.serving.gateway import create_app
from qwen_vllm.serving.gateway.errors import from_chunk
from qwen_vllm.serving.protocol import ErrorCode, GenerateChunk
from tests.serving.test_gateway import (
    KEY,
    MODEL,
    WEATHER_TOOL,
    FakeBackend,
    ManualClock,
    Reply,
    http_client,
    make_settings,
    openai_client,
    sse_events,
    user,
)

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


def chat_body(**overrides: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": user("Hi"), **overrides}


def assert_error(
    response: httpx.Response,
    status: int,
    error_type: str,
    param: str | None = None,
    mentions: str | None = None,
) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == error_type
    if param is not None:
        assert error["param"] == param
    if mentions is not None:
        assert mentions in error["message"]
    assert "Traceback" not in response.text
    return error


@pytest.fixture
def backend() -> FakeBackend:
    return FakeBackend()


@pytest.fixture
def app(backend: FakeBackend) -> Any:
    return create_app(make_settings(api_keys=[KEY], max_n=4), backend)


@pytest.mark.parametrize(
    ("overrides", "param"),
    [
        ({"temperature": -0.5}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_tokens": "many"}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"n": 0}, "n"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"stop": ["ok", ""]}, "stop"),
        ({"stop": 5}, "stop"),
        ({"messages": []}, "messages"),
        ({"messages": "Hi"}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"content": "x"}]}, "messages[0].role"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            "messages[0].content",
        ),
        ({"model": 7}, "model"),
        (
            {
                "tools": [
                    {"type": "function", "function": {"name": "f", "parameters": 1}}
                ]
            },
            "tools[0].function.parameters",
        ),
        (
            {
                "tools": [
                    {
                        "type": "function",
                        "function": {"name": "f", "parameters": {"type": "string"}},
                    }
                ]
            },
            "tools[0].function.parameters",
        ),
        (
            {"tools": [{"type": "function", "function": {"name": "bad name!"}}]},
            "tools[0].function.name",
        ),
        ({"tool_choice": "sometimes"}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        (
            {
                "tools": [WEATHER_TOOL],
                "tool_choice": {"type": "function", "function": {"name": "nope"}},
            },
            "tool_choice",
        ),
        ({"top_logprobs": 2}, "top_logprobs"),
        (
            {"messages": [{"role": "tool", "content": "r"}], "tools": [WEATHER_TOOL]},
            "messages[0]",
        ),
    ],
)
async def test_bad_chat_parameters_are_400_naming_them(
    app: Any, backend: FakeBackend, overrides: dict[str, Any], param: str
) -> None:
    async with http_client(app) as client:
        response = await client.post(CHAT, json=chat_body(**overrides))
    assert_error(response, 400, "invalid_request_error", param)
    assert not backend.calls


@pytest.mark.parametrize(
    ("overrides", "param"),
    [
        ({"prompt": [1, 2, 3]}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"logprobs": 50}, "logprobs"),
        ({"echo": "sometimes"}, "echo"),
    ],
)
async def test_bad_completion_parameters_are_400(
    app: Any, overrides: dict[str, Any], param: str
) -> None:
    async with http_client(app) as client:
        response = await client.post(
            COMPLETIONS, json={"model": MODEL, "prompt": "x", **overrides}
        )
    assert_error(response, 400, "invalid_request_error", param)


async def test_malformed_bodies_are_400_not_422(app: Any) -> None:
    async with http_client(app) as client:
        broken = await client.post(
            CHAT, content=b"{not json", headers={"content-type": "application/json"}
        )
        assert_error(broken, 400, "invalid_request_error", mentions="JSON")
        missing = await client.post(CHAT)
        assert_error(missing, 400, "invalid_request_error")
        array = await client.post(CHAT, json=[1, 2])
        assert_error(array, 400, "invalid_request_error")


async def test_unknown_fields_are_ignored(app: Any) -> None:
    async with http_client(app) as client:
        response = await client.post(
            CHAT,
            json=chat_body(
                frobnicate=True,
                user="u1",
                metadata={"k": "v"},
                service_tier="auto",
                # OpenAI fields at values that ask for nothing
                logit_bias={},
                store=False,
                modalities=["text"],
            ),
        )
        completion = await client.post(
            COMPLETIONS, json={"model": MODEL, "prompt": "x", "n": 2, "best_of": 2}
        )
    assert response.status_code == 200, response.text
    assert completion.status_code == 200, completion.text


@pytest.mark.parametrize(
    ("path", "field", "value"),
    [
        (CHAT, "logit_bias", {"1": 2}),
        (CHAT, "store", True),
        (CHAT, "modalities", ["text", "audio"]),
        (CHAT, "audio", {"voice": "alloy", "format": "wav"}),
        (CHAT, "prediction", {"type": "content", "content": "x"}),
        (CHAT, "reasoning_effort", "high"),
        (CHAT, "verbosity", "low"),
        (CHAT, "web_search_options", {"search_context_size": "low"}),
        (COMPLETIONS, "logit_bias", {"1": 2}),
        (COMPLETIONS, "suffix", "} return x"),
        (COMPLETIONS, "best_of", 3),
    ],
)
async def test_openai_fields_that_cannot_be_honoured_are_refused_by_name(
    app: Any, backend: FakeBackend, path: str, field: str, value: Any
) -> None:
    if path == CHAT:
        body = chat_body(**{field: value})
    else:
        body = {"model": MODEL, "prompt": "x", field: value}
    async with http_client(app) as client:
        response = await client.post(path, json=body)
    error = assert_error(response, 400, "invalid_request_error", field)
    assert "not supported" in error["message"] or field == "best_of", error
    assert not backend.calls


async def test_limits_on_n_and_max_tokens(app: Any, backend: FakeBackend) -> None:
    async with http_client(app) as client:
        too_many = await client.post(CHAT, json=chat_body(n=5))
        assert_error(too_many, 400, "invalid_request_error", "n", mentions="4")
        over_limit = await client.post(CHAT, json=chat_body(max_tokens=100_000))
        assert_error(over_limit, 400, "invalid_request_error", "max_tokens", "8192")
        newer_name = await client.post(CHAT, json=chat_body(max_completion_tokens=2048))
        assert_error(newer_name, 400, "invalid_request_error", "max_completion_tokens")
        over_context = await client.post(
            COMPLETIONS, json={"model": MODEL, "prompt": "x", "max_tokens": 4000}
        )
        assert_error(over_context, 400, "invalid_request_error", "max_tokens", "2048")
    assert not backend.calls


async def test_api_keys(app: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = "sk-wrong-secret"
    async with http_client(app, key=None) as client:
        assert (await client.get("/health")).json() == {"status": "ok"}
        for method, path in [
            ("GET", "/v1/models"),
            ("POST", CHAT),
            ("POST", COMPLETIONS),
            ("GET", "/metrics"),
            ("GET", "/openapi.json"),
        ]:
            missing = await client.request(method, path, json=chat_body())
            error = assert_error(missing, 401, "authentication_error")
            assert error["code"] == "invalid_api_key"
            assert missing.headers["www-authenticate"] == "Bearer"
        bad = await client.get(
            "/v1/models", headers={"Authorization": f"Bearer {wrong}"}
        )
        assert_error(bad, 401, "authentication_error")
        assert wrong not in bad.text
        basic = await client.get("/v1/models", headers={"Authorization": KEY})
        assert_error(basic, 401, "authentication_error")
        good = await client.get(
            "/v1/models", headers={"Authorization": f"Bearer {KEY}"}
        )
        assert good.status_code == 200
        schema = await client.get(
            "/openapi.json", headers={"Authorization": f"Bearer {KEY}"}
        )
        assert CHAT in schema.json()["paths"]
    assert KEY not in caplog.text and wrong not in caplog.text
    with pytest.raises(openai.AuthenticationError):
        await openai_client(app, key="sk-nope").models.list()


async def test_open_api_without_keys(backend: FakeBackend) -> None:
    async with http_client(create_app(make_settings(), backend), key=None) as client:
        assert (await client.get("/v1/models")).status_code == 200


PAGE = "https://chat.example.com"
PREFLIGHT = {
    "Access-Control-Request-Method": "POST",
    "Access-Control-Request-Headers": "authorization,content-type",
}


async def test_no_cross_origin_access_unless_asked(app: Any) -> None:
    async with http_client(app) as client:
        preflight = await client.options(CHAT, headers={"Origin": PAGE, **PREFLIGHT})
        chat = await client.post(CHAT, json=chat_body(), headers={"Origin": PAGE})
    assert "access-control-allow-origin" not in preflight.headers
    assert chat.status_code == 200
    assert "access-control-allow-origin" not in chat.headers  # the page cannot read


async def test_allowed_origins_may_call_with_a_key(backend: FakeBackend) -> None:
    settings = make_settings(api_keys=[KEY], allowed_origins=f"{PAGE},http://x.test")
    assert settings.allowed_origins == [PAGE, "http://x.test"]
    app = create_app(settings, backend)
    async with http_client(app) as client:
        preflight = await client.options(CHAT, headers={"Origin": PAGE, **PREFLIGHT})
        chat = await client.post(CHAT, json=chat_body(), headers={"Origin": PAGE})
        other = await client.options(
            CHAT, headers={"Origin": "https://evil.example", **PREFLIGHT}
        )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == PAGE
    assert chat.status_code == 200
    assert chat.headers["access-control-allow-origin"] == PAGE
    assert other.status_code == 400
    assert "access-control-allow-origin" not in other.headers
    # The key is still required: CORS lets a page ask, not skip the check.
    async with http_client(app, key=None) as client:
        keyless = await client.post(CHAT, json=chat_body(), headers={"Origin": PAGE})
    assert keyless.status_code == 401


async def test_unknown_model_is_404(app: Any) -> None:
    async with http_client(app) as client:
        chat = await client.post(CHAT, json=chat_body(model="gpt-9"))
        error = assert_error(chat, 404, "not_found_error", "model", "gpt-9")
        assert error["code"] == "model_not_found"
        stream = await client.post(CHAT, json=chat_body(model="gpt-9", stream=True))
        assert_error(stream, 404, "not_found_error", "model")
        completion = await client.post(
            COMPLETIONS, json={"model": "gpt-9", "prompt": "x"}
        )
        assert_error(completion, 404, "not_found_error", "model")
        route = await client.get("/v1/nothing-here")
        assert_error(route, 404, "not_found_error")


@pytest.mark.parametrize(
    ("error", "status", "error_type"),
    [
        (
            NoWorkerError("No healthy worker serves qwen-demo."),
            503,
            "service_unavailable_error",
        ),
        (ControllerUnavailableError("down"), 503, "service_unavailable_error"),
        (WorkerError("all workers failed"), 502, "server_error"),
        (WorkerTimeoutError("too slow"), 504, "timeout_error"),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
async def test_control_plane_failures(
    app: Any,
    backend: FakeBackend,
    error: Exception,
    status: int,
    error_type: str,
    stream: bool,
) -> None:
    backend.error = error  # type: ignore[assignment]
    async with http_client(app) as client:
        response = await client.post(CHAT, json=chat_body(stream=stream))
        assert_error(response, status, error_type, mentions=str(error))
        models = await client.get("/v1/models")
        assert_error(models, status, error_type)


async def test_control_plane_failure_after_model_check(
    app: Any, backend: FakeBackend
) -> None:
    # model_details answered, then the generation found no worker.
    original = backend.generate

    async def no_worker(model: str, params: Any) -> Any:
        raise NoWorkerError("every worker went away")

    backend.generate = no_worker  # type: ignore[method-assign]
    async with http_client(app) as client:
        response = await client.post(CHAT, json=chat_body())
    assert_error(response, 503, "service_unavailable_error", mentions="went away")
    backend.generate = original  # type: ignore[method-assign]


@pytest.mark.parametrize(
    ("code", "status", "param"),
    [
        (ErrorCode.CONTEXT_OVERFLOW, 400, "messages"),
        (ErrorCode.PARAM_OUT_OF_RANGE, 400, None),
        (ErrorCode.INTERNAL_ERROR, 502, None),
        (ErrorCode.CONTROLLER_WORKER_TIMEOUT, 504, None),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
async def test_worker_error_chunks_map_to_statuses(
    app: Any, backend: FakeBackend, code: int, status: int, param: str, stream: bool
) -> None:
    backend.replies = [Reply(error_code=code)]
    async with http_client(app) as client:
        response = await client.post(CHAT, json=chat_body(stream=stream))
    error = assert_error(response, status, response.json()["error"]["type"])
    assert error["message"] == "worker says no"
    assert error["param"] == param


@pytest.mark.parametrize("param", ["max_tokens", "max_length"])
def test_a_worker_refusing_a_length_names_it(param: str) -> None:
    text = f"{param} (9000) does not fit"
    chunk = GenerateChunk(text=text, error_code=ErrorCode.PARAM_OUT_OF_RANGE)
    error = from_chunk(chunk, "messages")
    assert (error.status, error.param, str(error)) == (400, param, text)


async def test_context_overflow_on_completions_names_the_prompt(
    app: Any, backend: FakeBackend
) -> None:
    backend.replies = [Reply(error_code=ErrorCode.CONTEXT_OVERFLOW)]
    async with http_client(app) as client:
        response = await client.post(COMPLETIONS, json={"model": MODEL, "prompt": "x"})
    assert_error(response, 400, "invalid_request_error", "prompt")


async def test_error_after_the_stream_started_is_an_sse_event(
    app: Any, backend: FakeBackend
) -> None:
    backend.replies = [Reply("a long answer that dies", fail_after=2)]
    async with http_client(app) as client:
        response = await client.post(CHAT, json=chat_body(stream=True))
    assert response.status_code == 200
    events = sse_events(response.text)
    assert events[-1] == "[DONE]"
    error = events[-2]["error"]
    assert error["type"] == "server_error" and error["message"] == "the engine died"
    assert (
        "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-2])
        == "a long a"
    )
    backend.replies = [Reply("a long answer that dies", fail_after=2)]
    stream = await openai_client(app).chat.completions.create(
        model=MODEL, messages=user("Hi"), stream=True
    )
    with pytest.raises(openai.APIError, match="the engine died"):
        async for _ in stream:
            pass


async def test_unexpected_exceptions_are_500_without_trace(
    app: Any, backend: FakeBackend
) -> None:
    async def explode(model: str) -> Any:
        raise RuntimeError("secret internals")

    backend.model_details = explode  # type: ignore[method-assign]
    async with http_client(app, raise_app_exceptions=False) as client:
        response = await client.post(CHAT, json=chat_body())
    assert_error(response, 500, "server_error")
    assert "secret internals" not in response.text


async def test_body_size_limit(backend: FakeBackend) -> None:
    app = create_app(make_settings(api_keys=[KEY], max_body_bytes=2000), backend)
    huge = chat_body(messages=user("x" * 5000))
    async with http_client(app) as client:
        declared = await client.post(CHAT, json=huge)
        assert_error(declared, 413, "invalid_request_error", mentions="2000")

        async def chunked() -> Any:
            payload = json.dumps(huge).encode()
            for start in range(0, len(payload), 500):
                yield payload[start : start + 500]

        streamed = await client.post(
            CHAT, content=chunked(), headers={"content-type": "application/json"}
        )
        assert "content-length" not in streamed.request.headers
        assert_error(streamed, 413, "invalid_request_error")
        small = await client.post(CHAT, json=chat_body())
        assert small.status_code == 200
    assert len(backend.calls) == 1


async def test_rate_limit_per_key(backend: FakeBackend) -> None:
    settings = make_settings(
        api_keys=[KEY, "sk-other"], burst_per_key=3, requests_per_second_per_key=0.01
    )
    # The limiter's clock stands still unless moved: nothing depends on how
    # fast the requests are served.
    clock = ManualClock()
    app = create_app(settings, backend, clock=clock)
    async with http_client(app) as client, http_client(app, "sk-other") as other:
        statuses = [(await client.get("/v1/models")).status_code for _ in range(5)]
        assert statuses == [200, 200, 200, 429, 429]
        limited = await client.get("/v1/models")
        error = assert_error(limited, 429, "rate_limit_error")
        assert error["code"] == "rate_limit_exceeded"
        # An empty bucket at 0.01 requests/s: a token in 100 s.
        assert limited.headers["retry-after"] == "100"
        # Another key has its own bucket; the unlimited paths stay open.
        assert (await other.get("/v1/models")).status_code == 200
        assert (await client.get("/health")).status_code == 200
        clock.advance(99.5)
        assert (await client.get("/v1/models")).status_code == 429
        clock.advance(0.5)
        assert (await client.get("/v1/models")).status_code == 200


async def test_anonymous_clients_share_one_bucket(backend: FakeBackend) -> None:
    app = create_app(
        make_settings(burst_per_key=2, requests_per_second_per_key=0.01),
        backend,
        clock=ManualClock(),
    )
    async with http_client(app, None) as a, http_client(app, None) as b:
        assert (await a.get("/v1/models")).status_code == 200
        assert (await b.get("/v1/models")).status_code == 200
        limited = await a.get("/v1/models")
    assert_error(limited, 429, "rate_limit_error")
    assert "retry-after" in limited.headers


async def test_concurrency_limit_per_key(backend: FakeBackend) -> None:
    app = create_app(make_settings(api_keys=[KEY], max_concurrent_per_key=1), backend)
    backend.gate = asyncio.Event()
    async with http_client(app) as client:
        first = asyncio.create_task(client.post(CHAT, json=chat_body()))
        for _ in range(200):  # until the first request waits in the backend
            if backend.calls:
                break
            await asyncio.sleep(0.01)
        second = await client.post(CHAT, json=chat_body())
        error = assert_error(second, 429, "rate_limit_error")
        assert error["code"] == "concurrency_limit_exceeded"
        assert second.headers["retry-after"] == "1"
        backend.gate.set()
        assert (await asyncio.wait_for(first, 5)).status_code == 200
        assert (await client.post(CHAT, json=chat_body())).status_code == 200


async def test_metrics_exposition(app: Any, backend: FakeBackend) -> None:
    async with http_client(app) as client:
        await client.post(CHAT, json=chat_body())
        stream = await client.post(CHAT, json=chat_body(stream=True))
        assert stream.status_code == 200
        await client.post(CHAT, json=chat_body(model="gpt-9"))
        await client.post(CHAT, json=chat_body(temperature=-1))
        text = (await client.get("/metrics")).text
    prefix = "qwen_vllm_gateway_"
    assert (
        prefix + 'requests_total{endpoint="/v1/chat/completions",model="qwen-demo",'
        'status="200"} 2.0'
    ) in text
    assert (
        prefix + 'requests_total{endpoint="/v1/chat/completions",model="",'
        'status="404"} 1.0'
    ) in text
    assert 'status="400"} 1.0' in text
    assert prefix + 'prompt_tokens_total{model="qwen-demo"} 14.0' in text
    assert prefix + 'completion_tokens_total{model="qwen-demo"}' in text
    assert prefix + 'time_to_first_token_seconds_count{model="qwen-demo"} 1.0' in text
    assert (
        prefix + 'request_duration_seconds_count{endpoint="/v1/chat/completions",'
        'model="qwen-demo"} 2.0'
    ) in text
    assert prefix + "requests_in_flight" in text
    assert prefix + 'worker_queue_length{worker="http://w1:1"} 3.0' in text
    assert prefix + 'worker_healthy{worker="http://w2:2"} 0.0' in text


async def test_each_app_has_its_own_registry(backend: FakeBackend) -> None:
    first, second = (create_app(make_settings(), backend) for _ in range(2))
    async with http_client(first, None) as client:
        await client.get("/v1/models")
    async with http_client(second, None) as client:
        text = (await client.get("/metrics")).text
    assert 'endpoint="/v1/models"' not in text


async def test_client_disconnect_closes_the_worker_stream(
    backend: FakeBackend,
) -> None:
    app = create_app(make_settings(), backend)
    backend.replies = [Reply("x" * 400, piece=4, hang_after=3)]
    body = json.dumps(chat_body(stream=True)).encode()
    disconnected = asyncio.Event()
    received: list[bytes] = []
    request_sent = False

    async def receive() -> dict[str, Any]:
        nonlocal request_sent
        if not request_sent:
            request_sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body":
            received.append(message.get("body", b""))
            if b"xxxx" in b"".join(received):
                disconnected.set()  # the client goes away mid-stream

    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": CHAT,
        "raw_path": CHAT.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }
    await asyncio.wait_for(app(scope, receive, send), timeout=5)
    assert disconnected.is_set()
    assert backend.closed == [backend.calls[0].request_id]
    assert b"[DONE]" not in b"".join(received)
