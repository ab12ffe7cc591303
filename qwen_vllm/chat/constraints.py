"""Output constraints: JSON answers and Qwen's ReAct tool calls, as grammars.

A constraint is an xgrammar structural tag (a JSON document that vLLM's
structured outputs compile into a token mask), so decoding can only produce
text that parses. Every constrained region is bounded or ends where its
grammar ends, so a constrained answer also terminates:

- JSON allows at most one whitespace character in a row (unbounded
  whitespace lets a model pad forever inside an object);
- a ReAct thought is one line of at most THOUGHT_MAX_CHARS characters;
- a tool without parameters takes the empty object.

Strings are as long as the model makes them unless the schema bounds them
(maxLength, enum, pattern).

The ReAct grammar keeps Qwen's format exactly (the prompt is unchanged)::

    Thought: <one line>
    Action: <one of the allowed tool names>
    Action Input: <JSON valid against that tool's parameters>

and with "auto" the alternative "Final Answer: <text or the answer's JSON>"
after the thought. Pure Python: the gateway imports this module.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from qwen_vllm.chat.react import THOUGHT_PREFIX, ToolSpec

THOUGHT_MAX_CHARS = 400
_JSON_MAX_WHITESPACE = 1
ANY_OBJECT: Mapping[str, Any] = {"type": "object"}
# A final answer in free text.
ANY_TEXT: Mapping[str, Any] = {"type": "any_text"}


def json_format(schema: Mapping[str, Any] | bool = ANY_OBJECT) -> dict[str, Any]:
    """JSON valid against `schema` (a JSON Schema, or True for any value)."""
    return {
        "type": "json_schema",
        "json_schema": schema if isinstance(schema, bool) else _bounded_strings(schema),
        "max_whitespace_cnt": _JSON_MAX_WHITESPACE,
    }


_STRING_CHARACTER = r'[^\x00-\x1f"\\]'


def _bounded_strings(schema: Any) -> Any:
    """`schema` with each length-bounded string spelled as a pattern.

    xgrammar (0.2.8) writes a string with minLength/maxLength as characters
    that may include raw control characters, which JSON forbids (a tab inside
    the quotes fails json.loads); a pattern of the same length over JSON's
    unescaped characters is written correctly.
    """
    if isinstance(schema, list):
        return [_bounded_strings(item) for item in schema]
    if not isinstance(schema, Mapping):
        return schema
    out = {key: _bounded_strings(value) for key, value in schema.items()}
    types = out.get("type")
    is_string = types == "string" or (isinstance(types, list) and "string" in types)
    bounded = "minLength" in out or "maxLength" in out
    if is_string and bounded and not {"pattern", "format", "enum", "const"} & set(out):
        low, high = out.pop("minLength", 0), out.pop("maxLength", "")
        out["pattern"] = f"^{_STRING_CHARACTER}{{{low},{high}}}$"
    return out


def _text(value: str) -> dict[str, Any]:
    return {"type": "const_string", "value": value}


def _sequence(*elements: dict[str, Any]) -> dict[str, Any]:
    return {"type": "sequence", "elements": list(elements)}


def _one_of(elements: list[dict[str, Any]]) -> dict[str, Any]:
    return elements[0] if len(elements) == 1 else {"type": "or", "elements": elements}


def _action(tool: ToolSpec) -> dict[str, Any]:
    return _sequence(
        _text(f"Action: {tool.name}\nAction Input: "),
        json_format(tool.arguments_schema),
    )


def react_format(
    tools: Sequence[ToolSpec],
    *,
    answer: Mapping[str, Any] | None = None,
    continues_thought: bool = False,
) -> dict[str, Any]:
    """A thought, then an action with one of `tools` or, if `answer` is given
    (ANY_TEXT or a json_format), a final answer in that format.

    `continues_thought`: the prompt already ends with "Thought:" (the turn
    after a tool result), so the output starts inside the thought.
    """
    if not tools:
        raise ValueError("a ReAct constraint needs at least one tool")
    thought = {"type": "any_text", "excludes": ["\n"], "max_chars": THOUGHT_MAX_CHARS}
    lead = [thought] if continues_thought else [_text(f"{THOUGHT_PREFIX} "), thought]
    steps = [_action(tool) for tool in tools]
    if answer is not None:
        steps.append(_sequence(_text("Final Answer: "), dict(answer)))
    return _sequence(*lead, _text("\n"), _one_of(steps))


def tool_choice_format(
    tools: Sequence[ToolSpec],
    choice: str | Mapping[str, Any],
    *,
    answer: Mapping[str, Any] = ANY_TEXT,
    continues_thought: bool = False,
) -> dict[str, Any]:
    """The ReAct step that an OpenAI `tool_choice` allows over `tools`.

    "auto": a call of any tool or a final answer in `answer` (ANY_TEXT or a
    json_format); "required": a call of any tool; a named function
    ({"type": "function", "function": {"name": ...}}): a call of that tool.
    A name that is not one of `tools` is a ValueError: never widened.
    """
    if choice == "auto":
        return react_format(tools, answer=answer, continues_thought=continues_thought)
    if choice == "required":
        return react_format(tools, continues_thought=continues_thought)
    if not isinstance(choice, Mapping):
        raise ValueError(f"unknown tool_choice {choice!r}")
    name = (choice.get("function") or {}).get("name")
    named = [tool for tool in tools if tool.name == name]
    if not named:
        raise ValueError(f"tool_choice names {name!r}, which is not a tool")
    return react_format(named, continues_thought=continues_thought)


def structural_tag(format: dict[str, Any]) -> str:
    """The structural tag vLLM takes (StructuredOutputsParams.structural_tag)."""
    return json.dumps({"type": "structural_tag", "format": format}, ensure_ascii=False)
