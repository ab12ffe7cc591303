"""The output constraints accept exactly Qwen's ReAct steps and valid JSON
(checked by xgrammar, which vLLM compiles them with)."""

from __future__ import annotations

import pytest

from qwen_vllm.chat.constraints import (
    ANY_TEXT,
    THOUGHT_MAX_CHARS,
    json_format,
    react_format,
    structural_tag,
    tool_choice_format,
)
from qwen_vllm.chat.react import ToolSpec, parse_react_output
from tests.constraint_check import accepts

WEATHER = ToolSpec(
    "get_weather",
    "Current weather.",
    {
        "type": "object",
        "properties": {
            "city": {"type": "string"},
            "days": {"type": "integer", "minimum": 1, "maximum": 7},
        },
        "required": ["city"],
    },
)
CLOCK = ToolSpec("get_time")  # no parameters


def constraint(format: dict) -> dict:
    return {"structural_tag": structural_tag(format)}


REQUIRED = constraint(react_format([WEATHER, CLOCK]))
AUTO = constraint(react_format([WEATHER, CLOCK], answer=ANY_TEXT))
CALL = 'Thought: I should look.\nAction: get_weather\nAction Input: {"city": "Paris"}'


@pytest.mark.parametrize(
    ("text", "required", "auto"),
    [
        (CALL, True, True),
        ('Thought: x\nAction: get_weather\nAction Input: {"city":"P","days":7}', 1, 1),
        ("Thought: x\nAction: get_time\nAction Input: {}", True, True),
        ("Thought: I know.\nFinal Answer: It is sunny.\nTruly.", False, True),
        # a tool that is not offered, arguments the schema refuses
        ("Thought: x\nAction: get_news\nAction Input: {}", False, False),
        ('Thought: x\nAction: get_weather\nAction Input: {"days": 3}', False, False),
        ('Thought: x\nAction: get_weather\nAction Input: {"city":"P","days":9}', 0, 0),
        ('Thought: x\nAction: get_time\nAction Input: {"a": 1}', False, False),
        # a thought is one line, without Thought: no step
        ("Thought: a\nb\nAction: get_time\nAction Input: {}", False, False),
        ("Action: get_time\nAction Input: {}", False, False),
        ("Plain text.", False, False),
    ],
)
def test_react_steps(text: str, required: bool, auto: bool) -> None:
    assert accepts(REQUIRED, text) is bool(required)
    assert accepts(AUTO, text) is bool(auto)


def test_every_accepted_call_parses_as_that_call() -> None:
    output = parse_react_output(CALL)
    assert output.tool_call is not None
    assert output.tool_call.name == "get_weather"
    assert output.tool_call.arguments == '{"city": "Paris"}'


def test_the_thought_is_bounded() -> None:
    step = "\nAction: get_time\nAction Input: {}"
    assert accepts(REQUIRED, "Thought: " + "a" * THOUGHT_MAX_CHARS + step)
    assert not accepts(REQUIRED, "Thought: " + "a" * (THOUGHT_MAX_CHARS + 1) + step)


def test_after_a_tool_result_the_output_continues_the_thought() -> None:
    # The prompt ends with "Thought:": the output starts inside it.
    after = constraint(react_format([CLOCK], continues_thought=True))
    assert accepts(after, " I should ask.\nAction: get_time\nAction Input: {}")
    assert not accepts(after, " I know.\nFinal Answer: Noon.")


def test_a_json_answer_after_a_thought() -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}}
    auto = constraint(react_format([CLOCK], answer=json_format(schema)))
    assert accepts(auto, 'Thought: done\nFinal Answer: {"n": 3}')
    assert not accepts(auto, "Thought: done\nFinal Answer: three")


def test_json_whitespace_is_bounded() -> None:
    any_object = constraint(json_format())
    assert accepts(any_object, '{"a": [1, 2], "b": {"c": null}}')
    assert not accepts(any_object, '{"a":  1}')
    assert not accepts(any_object, "[1]")


def test_a_tool_needs_to_be_offered() -> None:
    with pytest.raises(ValueError, match="at least one tool"):
        react_format([])


def test_a_named_choice_is_never_widened() -> None:
    named = {"type": "function", "function": {"name": "get_time"}}
    only_clock = constraint(tool_choice_format([WEATHER, CLOCK], named))
    assert accepts(only_clock, "Thought: x\nAction: get_time\nAction Input: {}")
    assert not accepts(only_clock, CALL)
    unknown = {"type": "function", "function": {"name": "get_news"}}
    with pytest.raises(ValueError, match="'get_news', which is not a tool"):
        tool_choice_format([WEATHER, CLOCK], unknown)
    with pytest.raises(ValueError, match="unknown tool_choice 'get_time'"):
        tool_choice_format([WEATHER, CLOCK], "get_time")


def test_length_bounded_strings_are_json_strings() -> None:
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "minLength": 1, "maxLength": 4}},
        "required": ["name"],
    }
    answer = constraint(json_format(schema))
    assert accepts(answer, '{"name": "雨☀ab"}')
    assert not accepts(answer, '{"name": ""}')
    assert not accepts(answer, '{"name": "abcde"}')
    # JSON forbids raw control characters in a string (json.loads refuses).
    assert not accepts(answer, '{"name": "a\tb"}')
