"""Answers that parse, on the real stack, with the official openai client.

The demo model has random weights: unconstrained it writes gibberish, so
every valid answer here is the output constraint's work. Answers are checked
with jsonschema against the request's own schema.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest

pytestmark = pytest.mark.slow

SCHEMAS: list[dict[str, Any]] = [
    {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 12}},
        "required": ["name"],
    },
    {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 10},
            "days": {"type": "integer", "minimum": 1, "maximum": 7},
        },
        "required": ["city", "days"],
    },
    {
        "type": "object",
        "properties": {
            "unit": {"enum": ["celsius", "fahrenheit", "开尔文"]},
            "mood": {"type": "string", "enum": ["☀️ sunny", "雨", "niño"]},
        },
        "required": ["unit", "mood"],
    },
    {
        "type": "object",
        "properties": {
            "tags": {
                "type": "array",
                "items": {"type": "string", "maxLength": 6},
                "minItems": 1,
                "maxItems": 3,
            }
        },
        "required": ["tags"],
    },
    {
        "type": "object",
        "properties": {
            "point": {
                "type": "object",
                "properties": {
                    "x": {"type": "integer", "minimum": -100, "maximum": 100},
                    "y": {"type": "integer", "minimum": 0, "maximum": 9},
                },
                "required": ["x", "y"],
            },
            "label": {"type": "string", "maxLength": 8},
        },
        "required": ["point"],
    },
    {
        "type": "object",
        "properties": {
            "ok": {"type": "boolean"},
            "note": {"type": ["string", "null"], "maxLength": 5},
        },
        "required": ["ok", "note"],
    },
    {
        "type": "object",
        "properties": {
            "items": {
                "type": "array",
                "maxItems": 2,
                "items": {
                    "type": "object",
                    "properties": {
                        "id": {"type": "integer", "minimum": 0, "maximum": 999},
                        "名字": {"type": "string", "maxLength": 4},
                    },
                    "required": ["id", "名字"],
                },
            }
        },
        "required": ["items"],
    },
    {
        "type": "object",
        "properties": {"code": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{3}$"}},
        "required": ["code"],
    },
    {
        "type": "object",
        "properties": {
            "choice": {
                "anyOf": [
                    {"type": "integer", "minimum": 0, "maximum": 5},
                    {"const": "none"},
                ]
            }
        },
        "required": ["choice"],
    },
    {
        "type": "array",
        "items": {"type": "integer", "minimum": 0, "maximum": 50},
        "minItems": 2,
        "maxItems": 4,
    },
]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city.",
            "parameters": SCHEMAS[1],
        },
    },
    {
        "type": "function",
        "function": {
            "name": "search",
            "description": "Search the web.",
            "parameters": SCHEMAS[3],
        },
    },
    {"type": "function", "function": {"name": "get_time"}},
]
PARAMETERS = {
    tool["function"]["name"]: tool["function"].get("parameters")
    or {"type": "object", "properties": {}, "additionalProperties": False}
    for tool in TOOLS
}
# Bounds every constrained region: a thought is at most 400 characters.
MAX_TOKENS = 640


@pytest.fixture(scope="module")
def client(stack) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{stack.gateway}/v1",
        api_key=stack.api_key,
        max_retries=0,
        timeout=300,
    )


def run_all(calls: list[Callable[[], Any]]) -> list[Any]:
    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(lambda call: call(), calls))


def answer_format(schema: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "json_schema",
        "json_schema": {"name": "answer", "schema": schema, "strict": True},
    }


def stream_text(stream) -> tuple[str, str | None]:
    text, finish = "", None
    for chunk in stream:
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
    return text, finish


def test_200_json_schema_answers_all_parse_and_validate(stack, client):
    def ask(number: int) -> tuple[dict[str, Any], str, str | None]:
        schema = SCHEMAS[number % len(SCHEMAS)]
        common = {"model": stack.model, "max_tokens": MAX_TOKENS, "seed": number}
        response_format = answer_format(schema)
        prompt = f"Answer in JSON ({number})."
        kind = number % 4
        if kind == 0:  # the openai client sends it as vLLM's extension
            answer = client.completions.create(
                prompt=prompt, extra_body={"response_format": response_format}, **common
            )
            return schema, answer.choices[0].text, answer.choices[0].finish_reason
        messages = [{"role": "user", "content": prompt}]
        if kind == 1:
            stream = client.chat.completions.create(
                messages=messages,
                response_format=response_format,
                stream=True,
                **common,
            )
            return schema, *stream_text(stream)
        answer = client.chat.completions.create(
            messages=messages, response_format=response_format, **common
        )
        return (
            schema,
            answer.choices[0].message.content,
            answer.choices[0].finish_reason,
        )

    results = run_all([lambda n=n: ask(n) for n in range(200)])
    for schema, text, finish in results:
        assert finish == "stop", (finish, text)
        jsonschema.validate(json.loads(text), schema)


def test_json_object_answers_are_objects(stack, client):
    def ask(seed: int):
        return client.chat.completions.create(
            model=stack.model,
            messages=[{"role": "user", "content": "A JSON object, please."}],
            max_tokens=MAX_TOKENS,
            seed=seed,
            response_format={"type": "json_object"},
        ).choices[0]

    choices = run_all([lambda s=s: ask(s) for s in range(8)])
    # Keys and strings are unbounded here: an answer may run out of tokens,
    # but what is written is always JSON so far, and a finished one parses.
    finished = [c for c in choices if c.finish_reason == "stop"]
    for choice in finished:
        assert isinstance(json.loads(choice.message.content), dict)
    for choice in choices:
        assert choice.message.content.startswith("{")


def check_call(name: str | None, arguments: str, allowed: set[str]) -> str:
    assert name in allowed, (name, arguments)
    jsonschema.validate(json.loads(arguments), PARAMETERS[name])
    return name


def test_required_and_named_tool_choice_always_call_a_valid_tool(stack, client):
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    choices: list[tuple[Any, set[str]]] = [
        ("required", set(PARAMETERS)),
        *[({"type": "function", "function": {"name": n}}, {n}) for n in PARAMETERS],
    ]

    def ask(seed: int):
        tool_choice, allowed = choices[seed % len(choices)]
        answer = client.chat.completions.create(
            model=stack.model,
            messages=messages,
            tools=TOOLS,
            tool_choice=tool_choice,
            max_tokens=MAX_TOKENS,
            seed=seed,
        ).choices[0]
        assert answer.finish_reason == "tool_calls", answer
        (call,) = answer.message.tool_calls
        return check_call(call.function.name, call.function.arguments, allowed)

    names = run_all([lambda s=s: ask(s) for s in range(40)])
    assert set(names) == set(PARAMETERS)  # every tool was called, by name or not


def test_streamed_tool_calls_reassemble_to_the_same_call(stack, client):
    def ask(seed: int, stream: bool):
        return client.chat.completions.create(
            model=stack.model,
            messages=[{"role": "user", "content": "Search for cats."}],
            tools=TOOLS,
            tool_choice="required",
            max_tokens=MAX_TOKENS,
            seed=seed,
            temperature=0.8,
            stream=stream,
        )

    for seed in range(6):
        whole = ask(seed, False).choices[0]
        name, arguments, content, finish = None, "", "", None
        for chunk in ask(seed, True):
            for choice in chunk.choices:
                content += choice.delta.content or ""
                for call in choice.delta.tool_calls or ():
                    name = call.function.name or name
                    arguments += call.function.arguments or ""
                finish = choice.finish_reason or finish
        (call,) = whole.message.tool_calls
        assert (name, arguments, finish) == (
            call.function.name,
            call.function.arguments,
            "tool_calls",
        )
        assert content == (whole.message.content or "")
        check_call(name, arguments, set(PARAMETERS))


def test_auto_answers_are_a_valid_call_or_plain_content(stack, client):
    def ask(seed: int):
        return client.chat.completions.create(
            model=stack.model,
            messages=[{"role": "user", "content": "Hello!"}],
            tools=TOOLS,
            max_tokens=MAX_TOKENS,
            seed=seed,
        ).choices[0]

    answers = run_all([lambda s=s: ask(s) for s in range(24)])
    for answer in answers:
        if answer.finish_reason == "tool_calls":
            (call,) = answer.message.tool_calls
            check_call(call.function.name, call.function.arguments, set(PARAMETERS))
        else:
            # A final answer: its text, without any ReAct markup.
            assert answer.finish_reason in ("stop", "length"), answer
            assert not answer.message.tool_calls
            assert "Action Input:" not in (answer.message.content or "")
    assert {a.finish_reason for a in answers} >= {"tool_calls"}


def test_auto_with_a_json_answer_format(stack, client):
    schema = SCHEMAS[2]
    for seed in range(12):
        answer = client.chat.completions.create(
            model=stack.model,
            messages=[{"role": "user", "content": "How do you feel?"}],
            tools=TOOLS,
            response_format=answer_format(schema),
            max_tokens=MAX_TOKENS,
            seed=seed,
        ).choices[0]
        if answer.finish_reason == "tool_calls":
            (call,) = answer.message.tool_calls
            check_call(call.function.name, call.function.arguments, set(PARAMETERS))
        else:
            assert answer.finish_reason == "stop", answer
            jsonschema.validate(json.loads(answer.message.content), schema)


def test_legacy_function_call_by_name(stack, client):
    functions = [tool["function"] for tool in TOOLS]
    for seed in range(4):
        answer = client.chat.completions.create(
            model=stack.model,
            messages=[{"role": "user", "content": "Weather?"}],
            functions=functions,
            function_call={"name": "get_weather"},
            max_tokens=MAX_TOKENS,
            seed=seed,
        ).choices[0]
        assert answer.finish_reason == "function_call", answer
        call = answer.message.function_call
        check_call(call.name, call.arguments, {"get_weather"})


def test_a_schema_xgrammar_cannot_compile_is_a_400(stack, client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=stack.model,
            messages=[{"role": "user", "content": "Hi"}],
            max_tokens=8,
            response_format=answer_format(
                {"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}
            ),
        )
    assert "constraint" in caught.value.message or "schema" in caught.value.message


def test_the_readme_example_runs_as_written(stack, client):
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme[readme.index("**Answers that parse.**") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    scope: dict[str, Any] = {"client": client}
    exec(code.replace('"Qwen-14B-Chat"', repr(stack.model)), scope)
    assert scope["call"].name == "get_weather"
    jsonschema.validate(
        json.loads(scope["call"].arguments), scope["weather"]["function"]["parameters"]
    )
    jsonschema.validate(json.loads(scope["answer"]), scope["rating"])
