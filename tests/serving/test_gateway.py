"""The OpenAI gateway driven by the official openai client, over a fake backend.

FakeBackend and the helpers here are also used by the other test_gateway_*
modules.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest

from qwen_vllm.chat.react import OBSERVATION_STOP
from qwen_vllm.chat.vocab import STOP_TOKEN_IDS
from qwen_vllm.serving.client import (
    BackendError,
    ModelDetails,
    UnknownModelError,
    WorkerInfo,
)
from qwen_vllm.serving.gateway import create_app
from qwen_vllm.serving.protocol import (
    GenerateChunk,
    GenerateParams,
    Logprobs,
    TokenCandidate,
    Usage,
)
from qwen_vllm.serving.settings import GatewaySettings, build_settings
from tests.constraint_check import accepts

MODEL = "qwen-demo"
KEY = "sk-test-key-1"
BASE = "http://gateway"
CALL_REPLY = (
    "Thought: I should look up the weather.\n"
    "Action: get_weather\n"
    'Action Input: {"city": "Paris"}'
)
FINAL_REPLY = " I now know the final answer.\nFinal Answer: It is sunny in Paris."
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}


@dataclass
class Reply:
    """What the fake worker generates for one request."""

    text: str = "Hello! How can I help?"
    finish_reason: str = "stop"
    error_code: int = 0
    piece: int = 4  # characters per streamed chunk
    fail_after: int | None = None  # stream: an error chunk after this many chunks
    hang_after: int | None = None  # stream: stall forever after this many chunks
    prompt_tokens: int = 7
    logprobs: Logprobs | None = None  # every chunk's, instead of made-up ones


class ManualClock:
    """A monotonic clock that moves only when the test moves it."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeBackend:
    """Scripted stand-in for ControllerClient; records what it was asked."""

    def __init__(self, models: tuple[str, ...] = (MODEL,), context: int = 2048):
        self.models = list(models)
        self.context = context
        self.replies: list[Reply] = []  # used in order, then Reply()
        self.respond: Callable[[GenerateParams], Reply] | None = None
        self.error: BackendError | None = None  # raised by every call
        self.gate: asyncio.Event | None = None  # generate() waits for it
        self.calls: list[GenerateParams] = []
        self.closed: list[str | None] = []  # streams closed before their end
        self.worker_list = [
            WorkerInfo(address="http://w1:1", model_names=[MODEL], queue_length=3),
            WorkerInfo(address="http://w2:2", model_names=[MODEL], healthy=False),
        ]

    def _reply(self, model: str, params: GenerateParams) -> Reply:
        if self.error is not None:
            raise self.error
        if model not in self.models:
            raise UnknownModelError(model)
        self.calls.append(params)
        if self.respond is not None:
            return self.respond(params)
        return self.replies.pop(0) if self.replies else Reply()

    @staticmethod
    def _output(reply: Reply, params: GenerateParams) -> str:
        text = reply.text
        for stop in params.stop_strings():  # as the worker does
            if stop in text:
                text = text[: text.index(stop)]
        return text

    @staticmethod
    def _chunk(reply: Reply, params: GenerateParams, text: str, final: bool):
        """The worker's chunk for `text` generated so far.

        Tokens are two characters each, logprob -0.25 (-1.0 in the prompt).
        With echo, the prompt's text and tokens come first, as the worker
        lists them: the first token has no logprob.
        """
        prompt = params.prompt if params.echo and params.prompt else ""
        logprobs = reply.logprobs
        if params.logprobs is not None and logprobs is None:
            logprobs = Logprobs()
            for in_output, part in enumerate((prompt, text)):
                logprob = -0.25 if in_output else -1.0
                for start in range(0, len(part), 2):
                    token = part[start : start + 2]
                    first = not in_output and start == 0
                    logprobs.tokens.append(token)
                    logprobs.token_logprobs.append(None if first else logprob)
                    logprobs.top_logprobs.append(
                        None if first else {token: logprob, "zz": -3.0}
                    )
        completion = len(text) // 2 + 1
        return GenerateChunk(
            text=prompt + text,
            usage=Usage(
                prompt_tokens=reply.prompt_tokens,
                completion_tokens=completion,
                total_tokens=reply.prompt_tokens + completion,
            ),
            finish_reason=reply.finish_reason if final else None,
            logprobs=logprobs,
        )

    async def list_models(self) -> list[str]:
        if self.error is not None:
            raise self.error
        return list(self.models)

    async def model_details(self, model: str) -> ModelDetails:
        if self.error is not None:
            raise self.error
        if model not in self.models:
            raise UnknownModelError(model)
        return ModelDetails(context_length=self.context)

    async def workers(self) -> list[WorkerInfo]:
        return self.worker_list

    async def generate(self, model: str, params: GenerateParams) -> GenerateChunk:
        reply = self._reply(model, params)
        if self.gate is not None:
            await self.gate.wait()
        if reply.error_code:
            return GenerateChunk(
                text="worker says no",
                error_code=reply.error_code,
                finish_reason="error",
            )
        return self._chunk(reply, params, self._output(reply, params), True)

    async def generate_stream(
        self, model: str, params: GenerateParams
    ) -> AsyncIterator[GenerateChunk]:
        reply = self._reply(model, params)
        finished = False
        try:
            if reply.error_code and not reply.fail_after:
                yield GenerateChunk(
                    text="worker says no",
                    error_code=reply.error_code,
                    finish_reason="error",
                )
                finished = True
                return
            output = self._output(reply, params)
            ends = list(range(reply.piece, len(output), reply.piece)) + [len(output)]
            for count, end in enumerate(ends):
                if count == reply.fail_after:
                    yield GenerateChunk(
                        text="the engine died",
                        error_code=reply.error_code or 50001,
                        finish_reason="error",
                    )
                    finished = True
                    return
                if count == reply.hang_after:
                    await asyncio.Event().wait()
                yield self._chunk(reply, params, output[:end], end == len(output))
                await asyncio.sleep(0)
            finished = True
        finally:
            if not finished:
                self.closed.append(params.request_id)


def make_settings(**values: Any) -> GatewaySettings:
    return build_settings(GatewaySettings, values)


def http_client(app: Any, key: str | None = KEY, **kwargs: Any) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app, **kwargs),
        base_url=BASE,
        headers=headers,
        timeout=10,
    )


def openai_client(app: Any, key: str = KEY) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=BASE + "/v1",
        api_key=key,
        max_retries=0,
        http_client=httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), timeout=10
        ),
    )


def sse_events(body: str) -> list[Any]:
    events = []
    for block in body.split("\n\n"):
        if block.startswith("data: "):
            data = block[len("data: ") :]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


@pytest.fixture
def backend() -> FakeBackend:
    return FakeBackend()


@pytest.fixture
def client(backend: FakeBackend) -> openai.AsyncOpenAI:
    return openai_client(create_app(make_settings(api_keys=[KEY]), backend))


def user(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


async def test_models_list(client: openai.AsyncOpenAI) -> None:
    models = await client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].object == "model"


async def test_chat_sends_messages_and_returns_the_reply(
    client: openai.AsyncOpenAI, backend: FakeBackend
) -> None:
    response = await client.chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "system", "content": "Be kind."},
            {"role": "user", "content": "Hi <|im_end|>"},
        ],
        temperature=0.3,
        top_p=0.9,
        max_tokens=100,
    )
    assert response.choices[0].message.content == "Hello! How can I help?"
    assert response.choices[0].finish_reason == "stop"
    assert response.object == "chat.completion" and response.model == MODEL
    assert response.usage is not None
    assert response.usage.prompt_tokens == 7
    assert response.usage.total_tokens == 7 + response.usage.completion_tokens
    (params,) = backend.calls
    assert params.prompt is None
    assert [m.model_dump() for m in params.messages or []] == [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "Hi <|im_end|>"},
    ]
    assert params.max_window_size is None  # the worker's, for max_new_tokens
    assert params.max_new_tokens == 100
    assert (params.temperature, params.top_p) == (0.3, 0.9)
    assert params.stop_token_ids == list(STOP_TOKEN_IDS)
    # Unset sampling fields are left to the worker's defaults.
    assert "presence_penalty" not in params.model_fields_set


async def test_chat_without_sampling_fields_leaves_them_to_the_model(
    client: openai.AsyncOpenAI, backend: FakeBackend
) -> None:
    await client.chat.completions.create(model=MODEL, messages=user("Hi"))
    (params,) = backend.calls
    # The worker takes the checkpoint's generation_config.json for all of them.
    assert params.max_new_tokens is None and params.max_window_size is None
    sampling = ("temperature", "top_p", "top_k", "repetition_penalty")
    assert [getattr(params, name) for name in sampling] == [None] * 4


async def test_max_length_counts_prompt_and_answer_as_qwens_server(
    client: openai.AsyncOpenAI, backend: FakeBackend
) -> None:
    total = {"extra_body": {"max_length": 300}}
    await client.chat.completions.create(model=MODEL, messages=user("Hi"), **total)
    await client.completions.create(model=MODEL, prompt="Hi", **total)
    # max_tokens wins, as HF's max_new_tokens does over max_length
    await client.chat.completions.create(
        model=MODEL, messages=user("Hi"), max_tokens=5, **total
    )
    chat, completion, both = backend.calls
    assert (chat.max_length, chat.max_new_tokens) == (300, None)
    assert (completion.max_length, completion.max_new_tokens) == (300, None)
    assert (both.max_length, both.max_new_tokens) == (None, 5)


async def test_chat_stream_deltas_add_up_and_report_usage(
    client: openai.AsyncOpenAI,
) -> None:
    stream = await client.chat.completions.create(
        model=MODEL,
        messages=user("Hi"),
        stream=True,
        stream_options={"include_usage": True},
    )
    content, finish, usage, roles = "", None, None, []
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            roles += [choice.delta.role] if choice.delta.role else []
            content += choice.delta.content or ""
            finish = choice.finish_reason or finish
    assert roles == ["assistant"]
    assert content == "Hello! How can I help?"
    assert finish == "stop"
    assert usage is not None and usage.prompt_tokens == 7


async def test_completions_plain_echo_and_stream(
    client: openai.AsyncOpenAI, backend: FakeBackend
) -> None:
    backend.replies = [Reply(" world", finish_reason="length"), Reply(" world")] * 2
    plain = await client.completions.create(model=MODEL, prompt="Hello", max_tokens=5)
    assert plain.choices[0].text == " world"
    assert plain.choices[0].finish_reason == "length"
    assert backend.calls[0].prompt == "Hello" and backend.calls[0].messages is None
    assert not backend.calls[0].echo
    echoed = await client.completions.create(model=MODEL, prompt="Hello", echo=True)
    assert echoed.choices[0].text == "Hello world"
    stream = await client.completions.create(
        model=MODEL, prompt="Hello", echo=True, stream=True
    )
    texts, finishes = [], []
    async for chunk in stream:
        texts.append(chunk.choices[0].text)
        finishes.append(chunk.choices[0].finish_reason)
    assert "".join(texts) == "Hello world"
    assert finishes[-1] == "length" and set(finishes[:-1]) == {None}


async def test_completions_batch_of_prompts_with_n(
    client: openai.AsyncOpenAI, backend: FakeBackend
) -> None:
    backend.respond = lambda params: Reply(f"[{params.prompt}:{params.seed}]")
    response = await client.completions.create(
        model=MODEL, prompt=["a", "b"], n=2, seed=10
    )
    assert [c.text for c in response.choices] == [
        "[a:10]",
        "[a:11]",
        "[b:12]",
        "[b:13]",
    ]
    assert [c.index for c in response.choices] == [0, 1, 2, 3]
    assert response.usage is not None
    assert response.usage.prompt_tokens == 2 * 7  # each prompt counted once


async def test_n_choices_get_their_own_seeds(
    client: openai.AsyncOpenAI, backend: FakeBackend
) -> None:
    backend.respond = lambda params: Reply(f"answer {params.seed}")
    response = await client.chat.completions.create(
        model=MODEL, messages=user("Hi"), n=3, seed=7
    )
    assert [c.message.content for c in response.choices] == [
        "answer 7",
        "answer 8",
        "answer 9",
    ]
    assert len({p.request_id for p in backend.calls}) == 3
    assert response.usage is not None
    assert response.usage.prompt_tokens == 7
    assert response.usage.completion_tokens == 3 * (len("answer 7") // 2 + 1)

    backend.calls.clear()
    stream = await client.chat.completions.create(
        model=MODEL, messages=user("Hi"), n=3, seed=7, stream=True
    )
    texts = ["", "", ""]
    async for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts == ["answer 7", "answer 8", "answer 9"]


async def test_n_without_seed_leaves_seeds_to_the_worker(
    client: openai.AsyncOpenAI, backend: FakeBackend
) -> None:
    await client.chat.completions.create(model=MODEL, messages=user("Hi"), n=2)
    assert [p.seed for p in backend.calls] == [None, None]


async def test_stop_strings_reach_the_worker(
    client: openai.AsyncOpenAI, backend: FakeBackend
) -> None:
    backend.replies = [Reply("one two END three"), Reply("one two END three")]
    single = await client.chat.completions.create(
        model=MODEL, messages=user("count"), stop="END"
    )
    assert single.choices[0].message.content == "one two "
    assert backend.calls[0].stop == ["END"]
    several = await client.completions.create(
        model=MODEL, prompt="count", stop=["two", "END"]
    )
    assert several.choices[0].text == "one "
    assert backend.calls[1].stop == ["two", "END"]


async def test_penalties_top_k_and_logprobs(
    client: openai.AsyncOpenAI, backend: FakeBackend
) -> None:
    backend.replies = [Reply("abcd"), Reply("abcd")]
    chat = await client.chat.completions.create(
        model=MODEL,
        messages=user("Hi"),
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        logprobs=True,
        top_logprobs=1,
        extra_body={"top_k": 20, "repetition_penalty": 1.1},
    )
    params = backend.calls[0]
    assert (params.presence_penalty, params.frequency_penalty) == (0.5, -0.5)
    assert (params.top_k, params.repetition_penalty, params.logprobs) == (20, 1.1, 1)
    content = chat.choices[0].logprobs.content
    assert [t.token for t in content] == ["ab", "cd"]
    assert content[0].logprob == -0.25
    assert [t.token for t in content[0].top_logprobs] == ["ab"]
    completion = await client.completions.create(model=MODEL, prompt="x", logprobs=2)
    logprobs = completion.choices[0].logprobs
    assert logprobs.tokens == ["ab", "cd"]
    assert logprobs.token_logprobs == [-0.25, -0.25]
    assert logprobs.top_logprobs == [
        {"ab": -0.25, "zz": -3.0},
        {"cd": -0.25, "zz": -3.0},
    ]
    assert logprobs.text_offset == [0, 2]


# The fake worker's tokens: the prompt "xyz" is "xy" "z", the output "ab" "cd".
ECHOED_LOGPROBS = {
    "tokens": ["xy", "z", "ab", "cd"],
    # The prompt's first token has nothing before it to predict it.
    "token_logprobs": [None, -1.0, -0.25, -0.25],
    "top_logprobs": [
        None,
        {"z": -1.0, "zz": -3.0},
        {"ab": -0.25, "zz": -3.0},
        {"cd": -0.25, "zz": -3.0},
    ],
    "text_offset": [0, 2, 3, 5],  # over the echoed text
}


async def test_echo_lists_the_prompts_tokens_first(
    client: openai.AsyncOpenAI, backend: FakeBackend
) -> None:
    backend.replies = [Reply("abcd"), Reply("abcd", piece=2)]
    completion = await client.completions.create(
        model=MODEL, prompt="xyz", logprobs=2, echo=True
    )
    assert backend.calls[0].echo and backend.calls[0].logprobs == 2
    choice = completion.choices[0]
    assert choice.text == "xyzabcd"
    assert choice.logprobs.model_dump() == ECHOED_LOGPROBS
    stream = await client.completions.create(
        model=MODEL, prompt="xyz", logprobs=2, echo=True, stream=True
    )
    text, streamed = "", {key: [] for key in ECHOED_LOGPROBS}
    async for chunk in stream:
        piece = chunk.choices[0]
        text += piece.text
        if piece.logprobs:
            for key, values in piece.logprobs.model_dump().items():
                streamed[key] += values
    assert text == "xyzabcd"
    assert streamed == ECHOED_LOGPROBS


def candidate(token: str, logprob: float, raw: bytes) -> TokenCandidate:
    return TokenCandidate(token=token, logprob=logprob, bytes=list(raw))


async def test_chat_logprobs_keep_candidates_with_the_same_text(
    client: openai.AsyncOpenAI, backend: FakeBackend
) -> None:
    # "é" sampled as its two UTF-8 bytes. The first byte decodes to "", as
    # does the runner-up (the first byte of "€"): one key in FastChat's dict.
    logprobs = Logprobs(
        tokens=["", "é"],
        token_logprobs=[-0.1, -0.05],
        top_logprobs=[{"": -0.1, "e": -3.0}, {"é": -0.05}],
        token_bytes=[[0xC3], [0xA9]],
        candidates=[
            [
                candidate("", -0.1, b"\xc3"),
                candidate("", -2.5, b"\xe2"),
                candidate("e", -3.0, b"e"),
            ],
            [candidate("é", -0.05, b"\xa9")],
        ],
    )
    expected = [
        ("", -0.1, [0xC3], [("", -0.1, [0xC3]), ("", -2.5, [0xE2])]),
        ("é", -0.05, [0xA9], [("é", -0.05, [0xA9])]),
    ]

    def entries(content) -> list:
        return [
            (
                c.token,
                c.logprob,
                c.bytes,
                [(t.token, t.logprob, t.bytes) for t in c.top_logprobs],
            )
            for c in content
        ]

    backend.replies = [Reply("é", logprobs=logprobs)] * 2
    chat = await client.chat.completions.create(
        model=MODEL, messages=user("Hi"), logprobs=True, top_logprobs=2
    )
    assert entries(chat.choices[0].logprobs.content) == expected
    stream = await client.chat.completions.create(
        model=MODEL, messages=user("Hi"), logprobs=True, top_logprobs=2, stream=True
    )
    content = []
    async for chunk in stream:
        for choice in chunk.choices:
            content += choice.logprobs.content if choice.logprobs else []
    assert entries(content) == expected


async def test_streamed_logprobs_cover_every_token_once(
    client: openai.AsyncOpenAI, backend: FakeBackend
) -> None:
    backend.replies = [Reply("abcdefghij", piece=4)]
    stream = await client.chat.completions.create(
        model=MODEL, messages=user("Hi"), logprobs=True, stream=True
    )
    tokens = []
    async for chunk in stream:
        for choice in chunk.choices:
            if choice.logprobs and choice.logprobs.content:
                tokens += [t.token for t in choice.logprobs.content]
    assert tokens == ["ab", "cd", "ef", "gh", "ij"]


# Function calling


async def test_tool_call_round_trip(
    client: openai.AsyncOpenAI, backend: FakeBackend
) -> None:
    backend.replies = [Reply(CALL_REPLY), Reply(FINAL_REPLY)]
    messages: list[Any] = user("What is the weather in Paris?")
    first = await client.chat.completions.create(
        model=MODEL, messages=messages, tools=[WEATHER_TOOL]
    )
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls or []
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert choice.message.content == "I should look up the weather."

    sent = backend.calls[0]
    assert OBSERVATION_STOP in (sent.stop or [])
    question = (sent.messages or [])[-1].content
    assert "You have access to the following APIs" in question
    assert "get_weather: Call this tool" in question
    assert question.endswith("Question: What is the weather in Paris?")

    messages += [
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 21 C"},
    ]
    second = await client.chat.completions.create(
        model=MODEL, messages=messages, tools=[WEATHER_TOOL]
    )
    assert second.choices[0].message.content == "It is sunny in Paris."
    assert second.choices[0].finish_reason == "stop"
    assert not second.choices[0].message.tool_calls
    resent = backend.calls[1]
    assert (resent.messages or [])[-1].content == (
        CALL_REPLY + "\nObservation: Sunny, 21 C\nThought:"
    )
    assert resent.continue_final_message is True


async def test_streamed_tool_call_round_trip(
    client: openai.AsyncOpenAI, backend: FakeBackend
) -> None:
    backend.replies = [Reply(CALL_REPLY, piece=3), Reply(FINAL_REPLY, piece=5)]
    stream = await client.chat.completions.create(
        model=MODEL,
        messages=user("Weather in Paris?"),
        tools=[WEATHER_TOOL],
        tool_choice="auto",
        stream=True,
    )
    content, finish, calls = "", None, {}
    async for chunk in stream:
        for choice in chunk.choices:
            content += choice.delta.content or ""
            finish = choice.finish_reason or finish
            for delta in choice.delta.tool_calls or []:
                call = calls.setdefault(delta.index, {"name": "", "arguments": ""})
                call["id"] = delta.id or call.get("id")
                call["name"] += delta.function.name or ""
                call["arguments"] += delta.function.arguments or ""
    assert "Action" not in content and "Thought" not in content
    assert content == "I should look up the weather."
    assert finish == "tool_calls"
    assert calls[0]["name"] == "get_weather"
    assert json.loads(calls[0]["arguments"]) == {"city": "Paris"}

    # The SDK's own stream accumulator reads the same call.
    messages: list[Any] = user("Weather in Paris?")
    backend.replies = [Reply(CALL_REPLY, piece=2), Reply(FINAL_REPLY, piece=5)]
    async with client.chat.completions.stream(
        model=MODEL, messages=messages, tools=[WEATHER_TOOL]
    ) as sdk_stream:
        final = await sdk_stream.get_final_completion()
    message = final.choices[0].message
    (call,) = message.tool_calls or []
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}

    messages += [
        message.model_dump(
            exclude_none=True, include={"role", "content", "tool_calls"}
        ),
        {"role": "tool", "tool_call_id": call.id, "content": "Sunny"},
    ]
    stream = await client.chat.completions.create(
        model=MODEL, messages=messages, tools=[WEATHER_TOOL], stream=True
    )
    pieces, finish = [], None
    async for chunk in stream:
        for choice in chunk.choices:
            assert not choice.delta.tool_calls
            if choice.delta.content:
                pieces.append(choice.delta.content)
            finish = choice.finish_reason or finish
    assert "".join(pieces) == "It is sunny in Paris."
    assert len(pieces) > 1  # streamed, not released at the end
    assert finish == "stop"


async def test_legacy_functions(
    client: openai.AsyncOpenAI, backend: FakeBackend
) -> None:
    function = WEATHER_TOOL["function"]
    backend.replies = [Reply(CALL_REPLY), Reply(CALL_REPLY), Reply(FINAL_REPLY)]
    response = await client.chat.completions.create(
        model=MODEL, messages=user("Weather?"), functions=[function]
    )
    choice = response.choices[0]
    assert choice.finish_reason == "function_call"
    assert choice.message.function_call is not None
    assert choice.message.function_call.name == "get_weather"
    assert json.loads(choice.message.function_call.arguments) == {"city": "Paris"}
    assert not choice.message.tool_calls

    stream = await client.chat.completions.create(
        model=MODEL,
        messages=user("Weather?"),
        functions=[function],
        function_call={"name": "get_weather"},
        stream=True,
    )
    name, arguments, finish = "", "", None
    async for chunk in stream:
        for c in chunk.choices:
            if c.delta.function_call:
                name += c.delta.function_call.name or ""
                arguments += c.delta.function_call.arguments or ""
            finish = c.finish_reason or finish
    assert (name, finish) == ("get_weather", "function_call")
    assert json.loads(arguments) == {"city": "Paris"}
    assert "You must" not in (backend.calls[1].messages or [])[-1].content
    assert accepts(backend.calls[1].structured_outputs, CALL_REPLY)

    followup = await client.chat.completions.create(
        model=MODEL,
        messages=[
            *user("Weather?"),
            {
                "role": "assistant",
                "content": None,
                "function_call": {
                    "name": "get_weather",
                    "arguments": '{"city": "Paris"}',
                },
            },
            {"role": "function", "name": "get_weather", "content": "Sunny"},
        ],
        functions=[function],
    )
    assert followup.choices[0].message.content == "It is sunny in Paris."


# A function in Qwen's own form, as the Qwen repository's examples send it.
QWEN_SEARCH = {
    "name_for_human": "谷歌搜索",
    "name_for_model": "google_search",
    "description_for_model": "谷歌搜索是一个通用搜索引擎。",
    "parameters": [
        {
            "name": "search_query",
            "description": "搜索关键词或短语",
            "required": True,
            "schema": {"type": "string"},
        }
    ],
}
SEARCH_REPLY = (
    "Thought: 我应该搜索。\nAction: google_search\n"
    'Action Input: {"search_query": "周杰伦"}'
)


async def test_functions_in_qwens_own_form(
    client: openai.AsyncOpenAI, backend: FakeBackend
) -> None:
    backend.replies = [Reply(SEARCH_REPLY), Reply(SEARCH_REPLY)]
    response = await client.chat.completions.create(
        model=MODEL, messages=user("谁是周杰伦"), functions=[QWEN_SEARCH]
    )
    call = response.choices[0].message.function_call
    assert call is not None and call.name == "google_search"
    assert json.loads(call.arguments) == {"search_query": "周杰伦"}
    question = (backend.calls[0].messages or [])[-1].content
    assert question.startswith(
        "Answer the following questions as best you can. You have access to the "
        "following APIs:\n\ngoogle_search: Call this tool to interact with the "
        "谷歌搜索 API. What is the 谷歌搜索 API useful for? 谷歌搜索是一个通用搜索"
        '引擎。 Parameters: [{"name": "search_query", "description": "搜索关键词'
        '或短语", "required": true, "schema": {"type": "string"}}]\n\n'
    )
    # Named, the call is constrained to the list's schema.
    await client.chat.completions.create(
        model=MODEL,
        messages=user("谁是周杰伦"),
        functions=[QWEN_SEARCH],
        function_call={"name": "google_search"},
    )
    constraint = backend.calls[1].structured_outputs
    assert accepts(constraint, SEARCH_REPLY)
    assert not accepts(
        constraint, 'Thought: x\nAction: google_search\nAction Input: {"page": 1}'
    )


async def test_a_call_cut_by_the_token_limit_finishes_with_length(
    client: openai.AsyncOpenAI, backend: FakeBackend
) -> None:
    cut = 'Thought: 搜索。\nAction: google_search\nAction Input: {"search_query": "周'
    backend.replies = [Reply(cut, finish_reason="length")] * 2
    whole = await client.chat.completions.create(
        model=MODEL, messages=user("谁是周杰伦"), functions=[QWEN_SEARCH]
    )
    assert whole.choices[0].finish_reason == "length"
    call = whole.choices[0].message.function_call
    assert call is not None and call.arguments == '{"search_query": "周'
    stream = await client.chat.completions.create(
        model=MODEL, messages=user("Weather?"), tools=[WEATHER_TOOL], stream=True
    )
    finishes = [c.finish_reason async for chunk in stream for c in chunk.choices]
    assert [f for f in finishes if f] == ["length"]


@pytest.mark.parametrize(
    ("function", "param", "says"),
    [
        ({"parameters": []}, "functions[0]", "needs a 'name'"),
        (
            {"name_for_model": "f", "parameters": [{"description": "x"}]},
            "functions[0].parameters",
            "parameters[0] needs a 'name'",
        ),
        (
            {"name_for_model": "f", "parameters": [{"name": "q", "required": "y"}]},
            "functions[0].parameters",
            "required must be true or false",
        ),
        (
            {"name_for_model": "f", "parameters": [{"name": "q", "schema": 7}]},
            "functions[0].parameters",
            "schema must be a JSON Schema",
        ),
        (
            {
                "name_for_model": "f",
                "parameters": [{"name": "q", "schema": {"type": "strin"}}],
            },
            "functions[0].parameters",
            "not a valid JSON Schema",
        ),
        (
            {"name_for_model": "f", "parameters": [{"name": "q"}, {"name": "q"}]},
            "functions[0].parameters",
            "parameter names must be unique",
        ),
    ],
)
async def test_bad_qwen_form_functions_are_named(
    client: openai.AsyncOpenAI, function: dict[str, Any], param: str, says: str
) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        await client.chat.completions.create(
            model=MODEL, messages=user("Hi"), functions=[function]
        )
    error = refused.value.body
    assert error["param"] == param and says in error["message"], error


async def test_tool_choice_none_and_named(
    client: openai.AsyncOpenAI, backend: FakeBackend
) -> None:
    other = {
        "type": "function",
        "function": {"name": "get_time", "parameters": {"type": "object"}},
    }
    backend.replies = [Reply(CALL_REPLY), Reply(CALL_REPLY)]
    plain = await client.chat.completions.create(
        model=MODEL,
        messages=user("Weather?"),
        tools=[WEATHER_TOOL, other],
        tool_choice="none",
    )
    # Without tools offered, ReAct-looking text is just content.
    assert plain.choices[0].message.content == CALL_REPLY
    assert plain.choices[0].finish_reason == "stop"
    assert backend.calls[0].messages[-1].content == "Weather?"
    assert not backend.calls[0].stop

    named = await client.chat.completions.create(
        model=MODEL,
        messages=user("Weather?"),
        tools=[WEATHER_TOOL, other],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    assert named.choices[0].message.tool_calls[0].function.name == "get_weather"
    prompt = backend.calls[1].messages[-1].content
    # Qwen's prompt lists every tool; the constraint allows only the named one.
    assert "[get_weather, get_time]" in prompt and "You must" not in prompt
    constraint = backend.calls[1].structured_outputs
    assert accepts(constraint, CALL_REPLY)
    assert not accepts(constraint, "Thought: t\nAction: get_time\nAction Input: {}")
    assert not accepts(constraint, "Thought: t\nFinal Answer: 42")
    assert backend.calls[0].structured_outputs is None
