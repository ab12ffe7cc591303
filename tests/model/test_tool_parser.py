"""The qwen-react tool parser for plain `vllm serve`, on vLLM's own request model:
the constraint it sets for each tool_choice, and calls read whole or streamed."""

from __future__ import annotations

import json

import pytest
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

from qwen_vllm.model.tool_parser import QwenReactToolParser
from tests.constraint_check import accepts

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "when": {"type": "object"}},
                "required": ["city"],
            },
        },
    },
    # A tool whose name is also a tool_choice keyword.
    {"type": "function", "function": {"name": "required"}},
]
WEATHER_CALL = (
    'Thought: Look it up.\nAction: get_weather\nAction Input: {"city": "Paris", '
    '"when": {"day": 1}}'
)
REQUIRED_CALL = "Thought: x\nAction: required\nAction Input: {}"


def request(tool_choice: object) -> ChatCompletionRequest:
    return ChatCompletionRequest(
        model="qwen",
        messages=[{"role": "user", "content": "Weather in Paris?"}],
        tools=TOOLS,
        tool_choice=tool_choice,
    )


def constraint_of(tool_choice: object) -> dict:
    adjusted = QwenReactToolParser(None).adjust_request(request(tool_choice))
    return {"structural_tag": adjusted.structured_outputs.structural_tag}


@pytest.mark.parametrize(
    ("tool_choice", "weather", "required_tool", "answer"),
    [
        ("auto", True, True, True),
        ("required", True, True, False),
        ({"type": "function", "function": {"name": "get_weather"}}, True, False, 0),
        ({"type": "function", "function": {"name": "required"}}, False, True, 0),
    ],
)
def test_each_tool_choice_allows_exactly_its_steps(
    tool_choice: object, weather: bool, required_tool: bool, answer: bool
) -> None:
    allowed = constraint_of(tool_choice)
    assert accepts(allowed, WEATHER_CALL) == weather
    assert accepts(allowed, REQUIRED_CALL) == required_tool
    assert accepts(allowed, "Thought: I know.\nFinal Answer: Sunny.") == answer


def test_no_constraint_without_tools_to_call() -> None:
    adjusted = QwenReactToolParser(None).adjust_request(request("none"))
    assert adjusted.structured_outputs is None


def stream(parser: QwenReactToolParser, text: str, req: ChatCompletionRequest):
    """Feeds `text` one character at a time, as vLLM calls the parser."""
    for end in range(1, len(text) + 1):
        delta = parser.extract_tool_calls_streaming(
            text[: end - 1], text[:end], text[end - 1], [], [], [], req
        )
        yield end, delta


def test_a_streamed_call_is_sent_once_when_its_arguments_are_whole() -> None:
    req = request("required")
    whole = QwenReactToolParser(None).extract_tool_calls(WEATHER_CALL, req)
    content, calls = "", []
    for end, delta in stream(QwenReactToolParser(None), WEATHER_CALL, req):
        if delta is None:
            continue
        content += delta.content or ""
        for call in delta.tool_calls:
            calls.append((end, call.function.name, call.function.arguments))
    # The inner "}" closes an object but not the arguments: no call there.
    assert calls == [
        (len(WEATHER_CALL), "get_weather", whole.tool_calls[0].function.arguments)
    ]
    assert json.loads(calls[0][2]) == {"city": "Paris", "when": {"day": 1}}
    assert content == (whole.content or "")


def test_a_streamed_final_answer_is_content() -> None:
    req = request("auto")
    text = "Thought: I know.\nFinal Answer: Sunny {today}."
    deltas = [d for _, d in stream(QwenReactToolParser(None), text, req) if d]
    assert all(not d.tool_calls for d in deltas)
    assert "".join(d.content or "" for d in deltas) == "Sunny {today}."
