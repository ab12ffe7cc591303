"""Qwen ReAct prompting and parsing (qwen_vllm.chat.react)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qwen_vllm.chat.react import (
    OBSERVATION_STOP,
    THOUGHT_PREFIX,
    ReactFormatError,
    ReactStreamParser,
    ToolCall,
    ToolSpec,
    build_react_prompt,
    parse_react_output,
    tools_instruction,
)

WEATHER = ToolSpec(
    "get_weather",
    "Current weather of a city.",
    {"type": "object", "properties": {"city": {"type": "string"}}},
)
TIME = ToolSpec("get_time", "Local time of a city.", None)
CALL_TEXT = (
    "Thought: I should look up the weather.\n"
    "Action: get_weather\n"
    'Action Input: {"city": "Paris"}'
)
CALL = {
    "id": "call_1",
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
}


def stream(text: str, sizes: list[int], prefix: str = "", **kwargs):
    parser = ReactStreamParser(prefix, **kwargs)
    deltas, start = [], 0
    for size in sizes:
        deltas.append(parser.feed(text[start : start + size]))
        start += size
    deltas.append(parser.feed(text[start:]))
    return deltas, parser.finish()


# The prompt


def test_instruction_lists_every_tool_in_the_react_format() -> None:
    # Written from the prompt format of Qwen's OpenAI-style server.
    text = tools_instruction([WEATHER, TIME])
    assert text.startswith(
        "Answer the following questions as best you can. "
        "You have access to the following APIs:\n\n"
        "get_weather: Call this tool to interact with the get_weather API. "
        "What is the get_weather API useful for? Current weather of a city. "
        'Parameters: {"type": "object", "properties": {"city": {"type": '
        '"string"}}}\n\nget_time:'
    )
    for line in (
        "Question: the input question you must answer",
        "Thought: you should always think about what to do",
        "Action: the action to take, should be one of [get_weather, get_time]",
        "Action Input: the input to the action",
        "Observation: the result of the action",
        "Final Answer: the final answer to the original input question",
    ):
        assert "\n" + line + "\n" in text
    assert text.endswith("\n\nBegin!")


# A function in Qwen's own form, as the Qwen repository's examples send it.
SEARCH = {
    "name_for_human": "谷歌搜索",
    "name_for_model": "google_search",
    "description_for_model": (
        "谷歌搜索是一个通用搜索引擎。 Format the arguments as a JSON object."
    ),
    "parameters": [
        {
            "name": "search_query",
            "description": "搜索关键词或短语",
            "required": True,
            "schema": {"type": "string"},
        },
        {"name": "page", "description": "页码", "type": "integer"},
    ],
}


def test_qwen_form_functions_render_as_qwens_server_renders_them() -> None:
    spec = ToolSpec.from_function(SEARCH)
    weather = ToolSpec.from_function(
        {"name": "get_weather", "description": "Weather.", "parameters": {}}
    )
    assert tools_instruction([spec, weather]) == (
        "Answer the following questions as best you can. You have access to the "
        "following APIs:\n"
        "\n"
        "google_search: Call this tool to interact with the 谷歌搜索 API. What is "
        "the 谷歌搜索 API useful for? 谷歌搜索是一个通用搜索引擎。 Format the "
        "arguments as a JSON object. Parameters: "
        '[{"name": "search_query", "description": "搜索关键词或短语", '
        '"required": true, "schema": {"type": "string"}}, '
        '{"name": "page", "description": "页码", "type": "integer"}]\n'
        "\n"
        "get_weather: Call this tool to interact with the get_weather API. What "
        "is the get_weather API useful for? Weather. Parameters: {}\n"
        "\n"
        "Use the following format:\n"
        "\n"
        "Question: the input question you must answer\n"
        "Thought: you should always think about what to do\n"
        "Action: the action to take, should be one of [google_search, "
        "get_weather]\n"
        "Action Input: the input to the action\n"
        "Observation: the result of the action\n"
        "... (this Thought/Action/Action Input/Observation can be repeated zero "
        "or more times)\n"
        "Thought: I now know the final answer\n"
        "Final Answer: the final answer to the original input question\n"
        "\n"
        "Begin!"
    )


def test_qwen_parameter_lists_become_the_schema_of_the_arguments() -> None:
    spec = ToolSpec.from_function(SEARCH)
    assert spec.arguments_schema == {
        "type": "object",
        "properties": {"search_query": {"type": "string"}, "page": {"type": "integer"}},
        "required": ["search_query"],
    }
    no_arguments = {"type": "object", "properties": {}, "additionalProperties": False}
    for empty in (None, {}, []):
        assert ToolSpec("f", parameters=empty).arguments_schema == no_arguments
    # A name_for_model alone names the tool for the model and for humans.
    only_model_name = ToolSpec.from_function({"name_for_model": "f"})
    assert (only_model_name.name, only_model_name.human_name) == ("f", "f")


def test_instruction_goes_before_the_last_user_question_only() -> None:
    prompt = build_react_prompt(
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "\nWeather in Paris?  "},
        ],
        [WEATHER],
    )
    messages = prompt.messages
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[1]["content"] == "Hi"
    assert messages[2]["content"] == (
        "Thought: I now know the final answer.\nFinal Answer: Hello!"
    )
    assert messages[3]["content"] == (
        tools_instruction([WEATHER]) + "\n\nQuestion: Weather in Paris?"
    )
    assert prompt.stop == (OBSERVATION_STOP,)
    assert prompt.tool_calls_allowed and not prompt.continue_final_message


def test_without_tools_messages_pass_through() -> None:
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "a"}]},
        {"role": "assistant", "content": "b"},
    ]
    prompt = build_react_prompt(messages)
    assert prompt.messages == [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
    ]
    assert prompt.stop == () and not prompt.parse_output


def test_tool_round_trip_continues_the_assistant_turn() -> None:
    prompt = build_react_prompt(
        [
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": "I should look up the weather.",
                "tool_calls": [CALL],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 21 C"},
        ],
        [WEATHER],
    )
    assert prompt.messages[-1] == {
        "role": "assistant",
        "content": CALL_TEXT + "\nObservation: Sunny, 21 C\nThought:",
    }
    assert prompt.continue_final_message
    assert prompt.output_prefix == THOUGHT_PREFIX
    # What the model wrote is read back as exactly that call.
    assert parse_react_output(CALL_TEXT).tool_call == ToolCall(
        "get_weather", '{"city": "Paris"}'
    )


def test_multi_step_and_legacy_function_messages() -> None:
    prompt = build_react_prompt(
        [
            {"role": "user", "content": "Weather and time in Paris?"},
            {
                "role": "assistant",
                "content": None,
                "function_call": {"name": "get_weather", "arguments": "{}"},
            },
            {"role": "function", "name": "get_weather", "content": "Sunny"},
            {
                "role": "assistant",
                "content": "Thought: Now the time.",
                "function_call": {"name": "get_time", "arguments": "{}"},
            },
            {"role": "function", "name": "get_time", "content": "10:00"},
            {"role": "assistant", "content": "Sunny, and it is 10:00."},
            {"role": "user", "content": "Thanks"},
        ],
        [WEATHER, TIME],
    )
    assert [m["role"] for m in prompt.messages] == ["user", "assistant", "user"]
    assert prompt.messages[1]["content"] == (
        "Thought: I should use get_weather.\nAction: get_weather\n"
        "Action Input: {}\nObservation: Sunny\n"
        "Thought: Now the time.\nAction: get_time\nAction Input: {}\n"
        "Observation: 10:00\n"
        "Thought: I now know the final answer.\nFinal Answer: Sunny, and it is 10:00."
    )
    assert prompt.messages[0]["content"] == "Weather and time in Paris?"
    assert prompt.messages[2]["content"].endswith("\n\nQuestion: Thanks")
    assert not prompt.continue_final_message


def test_tool_history_with_tools_switched_off_still_renders() -> None:
    prompt = build_react_prompt(
        [
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": "Look it up.", "tool_calls": [CALL]},
            {"role": "tool", "content": "Rain"},
        ]
    )
    assert "Answer the following" not in prompt.messages[0]["content"]
    assert prompt.messages[1]["content"].endswith("Observation: Rain\nThought:")
    assert prompt.stop == () and not prompt.tool_calls_allowed
    assert prompt.parse_output  # the continuation still ends in "Final Answer:"


def test_the_prompt_is_qwens_for_every_tool_choice() -> None:
    # Which tool may be called is the output constraint's job: the prompt
    # carries no extra instruction Qwen was not trained on.
    prompt = build_react_prompt([{"role": "user", "content": "Hi"}], [WEATHER])
    content = prompt.messages[0]["content"]
    assert "You must" not in content
    assert content.endswith("Begin!\n\nQuestion: Hi")


@pytest.mark.parametrize(
    ("messages", "param"),
    [
        (
            [{"role": "user", "content": "x"}, {"role": "tool", "content": "r"}],
            "messages[1]",
        ),
        ([{"role": "narrator", "content": "x"}], "messages[0].role"),
        ([{"role": "user", "content": [{"type": "image_url"}]}], "messages[0].content"),
        ([], "messages"),
        ([{"role": "system", "content": "only"}], "messages"),
    ],
)
def test_conversations_that_cannot_be_rendered(messages, param) -> None:
    with pytest.raises(ReactFormatError) as raised:
        build_react_prompt(messages, [WEATHER])
    assert raised.value.param == param


# Whole outputs


def test_parse_tool_call_keeps_the_thought_aside() -> None:
    output = parse_react_output(CALL_TEXT + "\nObservation: made up")
    assert output.tool_call == ToolCall("get_weather", '{"city": "Paris"}')
    assert output.thought == "I should look up the weather."
    assert output.content == "I should look up the weather."


@pytest.mark.parametrize(
    ("text", "prefix", "content"),
    [
        ("Thought: easy.\nFinal Answer: 42", "", "42"),
        (" I now know the final answer.\nFinal Answer: Sunny.", "Thought:", "Sunny."),
        ("Just text, no markers.", "", "Just text, no markers."),
        ("Final Answer:42", "", "42"),
        ("Sure.\nFinal Answer: 42", "", "Sure.\n42"),
        ("Thought: cut short by max_tokens", "", "Thought: cut short by max_tokens"),
        ("Thought: x\nAction: get_weather", "", "Thought: x\nAction: get_weather"),
        ("Thought: x\nFinal Answer: use Action: y", "", "use Action: y"),
        ("no Action: marker mid-line", "", "no Action: marker mid-line"),
    ],
)
def test_parse_final_content(text: str, prefix: str, content: str) -> None:
    output = parse_react_output(text, prefix)
    assert output.tool_call is None
    assert output.content == content


def test_parse_arguments_in_a_code_fence_and_without_tools() -> None:
    fenced = 'Action: get_weather\nAction Input: ```json\n{"city": "Rome"}\n```'
    assert parse_react_output(fenced).tool_call == ToolCall(
        "get_weather", '{"city": "Rome"}'
    )
    text = "Thought: x\nAction: get_weather\nAction Input: {}"
    output = parse_react_output(text, tool_calls_allowed=False)
    assert output.tool_call is None and output.content == text


# Streams


def test_stream_holds_markup_and_yields_the_call_at_the_end() -> None:
    deltas, end = stream(CALL_TEXT, [1] * len(CALL_TEXT))
    assert "".join(deltas) == ""
    assert end.content_delta == "I should look up the weather."
    assert end.output.tool_call == ToolCall("get_weather", '{"city": "Paris"}')
    assert json.loads(end.output.tool_call.arguments) == {"city": "Paris"}


def test_stream_emits_the_final_answer_as_it_comes() -> None:
    text = " I now know the final answer.\nFinal Answer: It is sunny in Paris."
    marker = text.index("\nFinal Answer:")
    parser = ReactStreamParser(THOUGHT_PREFIX)
    assert parser.feed(text[: marker - 5]) == ""  # still thinking
    assert parser.feed(text[marker - 5 : marker + 10]) == ""  # marker incomplete
    assert parser.feed(text[marker + 10 : marker + 20]) == "It is"
    assert parser.feed(text[marker + 20 :]) == " sunny in Paris."
    end = parser.finish()
    assert end.content_delta == "" and end.output.tool_call is None


def test_stream_plain_text_flows_but_not_possible_marker_starts() -> None:
    parser = ReactStreamParser()
    assert parser.feed("Hello") == "Hello"
    assert parser.feed("\nAct") == ""  # could become "\nAction:"
    assert parser.feed("ually, no.") == "\nActually, no."
    assert parser.feed("\n") == ""
    assert parser.feed("\n") == "\n"
    assert parser.feed("Th") == ""
    assert parser.finish().content_delta == "\nTh"
    start = ReactStreamParser()
    assert start.feed("Thou") == ""
    assert start.feed("sands") == "Thousands"


def test_stream_lead_text_then_tool_call() -> None:
    text = "Let me check.\nAction: get_weather\nAction Input: {}"
    deltas, end = stream(text, [5] * 20)
    assert "".join(deltas) == "Let me check."
    assert end.content_delta == ""
    assert end.output.tool_call == ToolCall("get_weather", "{}")


def test_stream_cut_short_releases_the_raw_text() -> None:
    deltas, end = stream("Thought: I was cut", [3, 3, 3])
    assert "".join(deltas) == ""
    assert end.content_delta == "Thought: I was cut"
    assert end.output.tool_call is None


PIECES = [
    "Thought:",
    " ",
    "x",
    "\n",
    "Action:",
    " get_weather",
    "Action Input:",
    ' {"a": 1}',
    "Final Answer:",
    "Observation:",
    "Final",
    " Answer",
    "Act",
    "ion",
    "Hello",
    "\n\n",
    "```",
]


@settings(max_examples=300, deadline=None, database=None)
@given(
    text=st.lists(st.sampled_from(PIECES), max_size=14).map("".join),
    cuts=st.lists(st.integers(min_value=0, max_value=6), max_size=30),
    prefix=st.sampled_from(["", THOUGHT_PREFIX]),
)
def test_stream_agrees_with_whole_output(text: str, cuts: list[int], prefix: str):
    deltas, end = stream(text, cuts, prefix)
    whole = parse_react_output(text, prefix)
    assert end.output == whole
    assert "".join(deltas) + end.content_delta == whole.content
