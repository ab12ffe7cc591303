"""Qwen's ReAct function calling: the prompt, the stop word and the parsers.

Qwen v1 chat models call tools by ReAct prompting, not by special tokens. The
tool descriptions and the "Question / Thought / Action / Action Input /
Observation / Final Answer" instructions go before the last user question;
the model answers::

    Thought: I should look up the weather.
    Action: get_weather
    Action Input: {"city": "Paris"}

and stops on the extra stop word "Observation:". The tool's result is
written back into the same assistant turn as "\\nObservation: {result}", then
"\\nThought:" is appended and the model continues that open turn (ChatML's
continue-final-message rendering) until it writes "Final Answer: ...".

One rule decides what an output means, for whole outputs and for streams
(so both agree). A marker counts only at the start of the text or of a line.
Text before the first marker is content. If "Action:" comes before any
"Final Answer:" and "Action Input:" follows it, the output is a tool call
whose message content is the thought before the action. Otherwise the text
after the first "Final Answer:" is the content. Anything else (no action
input, output cut short mid-thought) is returned as the raw text.

Pure Python: the gateway and web UI import this module.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from qwen_vllm.chat.chatml import message_text

OBSERVATION_STOP = "Observation:"
# What the prompt ends with when the model continues after a tool result.
THOUGHT_PREFIX = "Thought:"

_THOUGHT, _ACTION, _INPUT, _OBSERVATION, _FINAL = (
    "Thought",
    "Action",
    "Action Input",
    "Observation",
    "Final Answer",
)
_MARKER_NAMES = (_THOUGHT, _ACTION, _INPUT, _OBSERVATION, _FINAL)
_MARKER = re.compile(
    r"(?:^|\n)("
    + "|".join(re.escape(n) for n in sorted(_MARKER_NAMES, key=len)[::-1])
    + r"):"
)
_MARKER_TEXTS = tuple(f"{name}:" for name in _MARKER_NAMES)
_LINE_MARKER_TEXTS = tuple("\n" + text for text in _MARKER_TEXTS)
# A marker not seen yet starts at most this far from the end of the text.
_LONGEST_MARKER = max(len(text) for text in _LINE_MARKER_TEXTS)
_FENCE = re.compile(r"^```[\w-]*\n?(.*?)\n?```$", re.DOTALL)
_FINAL_THOUGHT = "Thought: I now know the final answer."


class ReactFormatError(ValueError):
    """A conversation that cannot be written as a ReAct transcript."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class ToolSpec:
    """A tool as the prompt describes it, in either of the forms Qwen's server
    takes: OpenAI's (name, description, parameters as a JSON Schema) or
    Qwen's own (name_for_model, name_for_human, description_for_model,
    parameters as a list of {name, description, required, schema})."""

    name: str  # what the model writes after "Action:"
    description: str = ""
    # As the client sent them: the prompt shows them unchanged.
    parameters: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None
    human_name: str = ""  # "name_for_human"; the model name when not given

    @classmethod
    def from_function(cls, function: Mapping[str, Any] | Any) -> ToolSpec:
        """From a function definition (`tools[].function`, `functions[]`) in
        either form, a mapping or a pydantic model of one."""
        function = _as_mapping(function)
        name = function.get("name_for_model") or function["name"]
        return cls(
            name=name,
            description=function.get("description_for_model")
            or function.get("description")
            or "",
            parameters=function.get("parameters"),
            human_name=function.get("name_for_human") or name,
        )

    @classmethod
    def from_tool(cls, tool: Mapping[str, Any] | Any) -> ToolSpec:
        """From an OpenAI tool (`tools[]`) or function definition, a mapping or
        a pydantic model of one."""
        tool = _as_mapping(tool)
        return cls.from_function(tool.get("function") or tool)

    @property
    def arguments_schema(self) -> Mapping[str, Any]:
        """The JSON Schema that an "Action Input" must satisfy."""
        if not self.parameters:
            return NO_ARGUMENTS
        if isinstance(self.parameters, Mapping):
            return self.parameters
        return parameter_list_schema(self.parameters)


NO_ARGUMENTS: Mapping[str, Any] = {
    "type": "object",
    "properties": {},
    "additionalProperties": False,
}
# What the prompt shows for a tool defined without parameters.
_NO_PARAMETERS_SHOWN: Mapping[str, Any] = {"type": "object", "properties": {}}


def parameter_list_schema(parameters: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Qwen's list of parameters as the JSON Schema of an object.

    Each item names one property; its type is its `schema` (Qwen's examples)
    or a bare `type`; `required: true` makes it required.
    """
    properties: dict[str, Any] = {}
    required = []
    for item in parameters:
        schema = item.get("schema")
        if schema is None and "type" in item:
            schema = {"type": item["type"]}
        properties[item["name"]] = dict(schema or {})
        if item.get("required"):
            required.append(item["name"])
    return {"type": "object", "properties": properties, "required": required}


def _as_mapping(definition: Mapping[str, Any] | Any) -> Mapping[str, Any]:
    if isinstance(definition, Mapping):
        return definition
    return definition.model_dump()


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI's `function.arguments`


@dataclass(frozen=True)
class ReactPrompt:
    """What to send to the worker for a conversation, and how to read the reply."""

    messages: list[dict[str, str]]
    # The last message is an open assistant turn the model must continue.
    continue_final_message: bool = False
    # Prompt text the output continues; parsers read prefix + output.
    output_prefix: str = ""
    stop: tuple[str, ...] = ()
    tool_calls_allowed: bool = False

    @property
    def parse_output(self) -> bool:
        return self.tool_calls_allowed or bool(self.output_prefix)


@dataclass(frozen=True)
class ReactOutput:
    content: str
    tool_call: ToolCall | None = None
    thought: str = ""


@dataclass(frozen=True)
class ReactStreamEnd:
    content_delta: str  # content not yet emitted by feed()
    output: ReactOutput  # the same as parse_react_output() of the whole text


def tools_instruction(tools: Sequence[ToolSpec]) -> str:
    """The tool block and ReAct instructions placed before the user's question,
    worded as Qwen's own OpenAI-style server words them.

    The same for every tool_choice: which tools may be called is enforced by
    the output constraint (qwen_vllm.chat.constraints), not by extra words
    in a prompt Qwen was not trained on.
    """
    descriptions = "\n\n".join(_describe(tool) for tool in tools)
    names = ", ".join(tool.name for tool in tools)
    lines = [
        "Answer the following questions as best you can. "
        "You have access to the following APIs:",
        "",
        descriptions,
        "",
        "Use the following format:",
        "",
        "Question: the input question you must answer",
        "Thought: you should always think about what to do",
        f"Action: the action to take, should be one of [{names}]",
        "Action Input: the input to the action",
        "Observation: the result of the action",
        "... (this Thought/Action/Action Input/Observation can be repeated zero "
        "or more times)",
        "Thought: I now know the final answer",
        "Final Answer: the final answer to the original input question",
        "",
        "Begin!",
    ]
    return "\n".join(lines)


def _describe(tool: ToolSpec) -> str:
    # Parameters exactly as sent, in whichever form; Qwen's own descriptions
    # carry any format hint ("Format the arguments as a JSON object.").
    parameters = json.dumps(
        _NO_PARAMETERS_SHOWN if tool.parameters is None else tool.parameters,
        ensure_ascii=False,
    )
    human = tool.human_name or tool.name
    return (
        f"{tool.name}: Call this tool to interact with the {human} API. "
        f"What is the {human} API useful for? {tool.description} "
        f"Parameters: {parameters}"
    )


def build_react_prompt(
    messages: Iterable[Mapping[str, Any]],
    tools: Sequence[ToolSpec] = (),
) -> ReactPrompt:
    """Rewrite OpenAI chat messages (with tool calls and results) for the worker.

    Without tools the conversation passes through, except that earlier tool
    calls and results still become ReAct text (tool_choice "none" with a tool
    history). Assistant messages carry tool calls as `tool_calls` or the
    legacy `function_call`; results come as role "tool" or "function".
    """
    out: list[dict[str, str]] = []
    transcript_open = False  # out[-1] is an assistant turn that tool use continues
    pending: list[ToolCall] = []
    last_role = ""
    for index, message in enumerate(messages):
        role = message.get("role")
        try:
            content = message_text(message.get("content"))
        except ValueError as exc:
            raise ReactFormatError(str(exc), f"messages[{index}].content") from exc
        if role == "developer":
            role = "system"
        if role in ("system", "user"):
            out.append({"role": role, "content": content})
            transcript_open, pending = False, []
        elif role == "assistant":
            calls = _calls_of(message, index)
            if calls:
                text = _action_text(_strip(content), calls[0])
                pending = calls[1:]
            elif tools:
                text = f"{_FINAL_THOUGHT}\nFinal Answer: {_strip(content)}"
            else:
                text = content
            if transcript_open:
                out[-1]["content"] += "\n" + text
            else:
                out.append({"role": "assistant", "content": text})
            transcript_open = bool(calls)
        elif role in ("tool", "function"):
            if not transcript_open:
                raise ReactFormatError(
                    f"A {role} message must follow an assistant message that "
                    "called a tool.",
                    f"messages[{index}]",
                )
            out[-1]["content"] += f"\n{OBSERVATION_STOP} {_strip(content)}"
            if pending:
                out[-1]["content"] += "\n" + _action_text("", pending.pop(0))
        else:
            raise ReactFormatError(
                f"Unsupported role {role!r}.", f"messages[{index}].role"
            )
        last_role = role
    if not out:
        raise ReactFormatError("messages must not be empty.", "messages")

    continue_final = last_role in ("tool", "function")
    if continue_final:
        out[-1]["content"] += "\n" + THOUGHT_PREFIX
    if tools:
        users = [i for i, m in enumerate(out) if m["role"] == "user"]
        if not users:
            raise ReactFormatError(
                "Tools need a user message to put the question in.", "messages"
            )
        question = out[users[-1]]
        instruction = tools_instruction(tools)
        question["content"] = (
            f"{instruction}\n\nQuestion: {_strip(question['content'])}"
        )
    return ReactPrompt(
        messages=out,
        continue_final_message=continue_final,
        output_prefix=THOUGHT_PREFIX if continue_final else "",
        stop=(OBSERVATION_STOP,) if tools else (),
        tool_calls_allowed=bool(tools),
    )


def _strip(text: str) -> str:
    return text.lstrip("\n").rstrip()


def _calls_of(message: Mapping[str, Any], index: int) -> list[ToolCall]:
    raw: list[Any] = list(message.get("tool_calls") or ())
    raw = [call.get("function") if isinstance(call, Mapping) else None for call in raw]
    if message.get("function_call"):
        raw.append(message["function_call"])
    calls = []
    for function in raw:
        if not isinstance(function, Mapping) or not function.get("name"):
            raise ReactFormatError(
                "A tool call needs a function name.", f"messages[{index}].tool_calls"
            )
        arguments = function.get("arguments") or "{}"
        if not isinstance(arguments, str):
            arguments = json.dumps(arguments, ensure_ascii=False)
        calls.append(ToolCall(function["name"], arguments))
    return calls


def _action_text(thought: str, call: ToolCall) -> str:
    if thought.startswith(THOUGHT_PREFIX):
        thought = thought[len(THOUGHT_PREFIX) :].strip()
    thought = thought or f"I should use {call.name}."
    return f"Thought: {thought}\nAction: {call.name}\nAction Input: {call.arguments}"


@dataclass(frozen=True)
class _Marker:
    name: str
    start: int  # where the marker's line starts ("\n" included)
    end: int  # just after its colon


def _scan(text: str, start: int = 0) -> list[_Marker]:
    return [
        _Marker(m.group(1), m.start(), m.end()) for m in _MARKER.finditer(text, start)
    ]


def _first(markers: Sequence[_Marker], name: str, after: int = -1) -> _Marker | None:
    return next((m for m in markers if m.name == name and m.start > after), None)


def _join(*parts: str) -> str:
    return "\n".join(part for part in parts if part)


def _lead(markers: Sequence[_Marker], prefix_len: int, output: str) -> str:
    return output[: max(0, markers[0].start - prefix_len)]


def _decide(
    text: str, prefix_len: int, markers: Sequence[_Marker], tool_calls_allowed: bool
) -> ReactOutput:
    output = text[prefix_len:]
    if not markers:
        return ReactOutput(output)
    lead = _lead(markers, prefix_len, output)
    final = _first(markers, _FINAL)
    action = _first(markers, _ACTION)
    if action is not None and (final is None or action.start < final.start):
        action_input = _first(markers, _INPUT, after=action.start)
        if action_input is None or not tool_calls_allowed:
            return ReactOutput(output)
        name = text[action.end : action_input.start].strip()
        after = next((m for m in markers if m.start > action_input.start), None)
        arguments = text[action_input.end : after.start if after else len(text)]
        if not name:
            return ReactOutput(output)
        thoughts = [m for m in markers if m.name == _THOUGHT and m.start < action.start]
        thought = text[thoughts[-1].end : action.start].strip() if thoughts else ""
        return ReactOutput(
            _join(lead, thought), ToolCall(name, _clean_arguments(arguments)), thought
        )
    if final is not None:
        return ReactOutput(_join(lead, _answer(text, final)))
    return ReactOutput(output)


def _answer(text: str, final: _Marker) -> str:
    answer = text[final.end :]
    return answer[1:] if answer.startswith(" ") else answer


def _clean_arguments(arguments: str) -> str:
    arguments = arguments.strip()
    fenced = _FENCE.match(arguments)
    return fenced.group(1).strip() if fenced else arguments


def parse_react_output(
    output: str, prefix: str = "", *, tool_calls_allowed: bool = True
) -> ReactOutput:
    """Read a whole model output; `prefix` is the prompt text it continues."""
    text = prefix + output
    return _decide(text, len(prefix), _scan(text), tool_calls_allowed)


class ReactStreamParser:
    """Turns a stream of text deltas into content deltas and, at the end, a call.

    feed() returns only text that no later output can turn into markup: plain
    text up to a possible marker start, and the answer after "Final Answer:".
    Thought/Action text is held back; finish() releases the rest as the same
    ReactOutput that parse_react_output() gives for the whole text.
    """

    def __init__(self, prefix: str = "", *, tool_calls_allowed: bool = True) -> None:
        self._text = prefix
        self._prefix_len = len(prefix)
        self._tool_calls_allowed = tool_calls_allowed
        self._markers: list[_Marker] = []
        self._scan_from = 0
        self._settled = False  # an action came first: nothing more until the end
        self._emitted = ""

    def feed(self, delta: str) -> str:
        self._text += delta
        if not self._settled:
            self._markers += _scan(self._text, self._scan_from)
            last_end = self._markers[-1].end if self._markers else 0
            self._scan_from = max(last_end, len(self._text) - _LONGEST_MARKER, 0)
        return self._release(self._safe_content())

    @property
    def in_action(self) -> bool:
        """An action came first: the rest is the call (held back until finish)."""
        return self._settled

    def output_so_far(self) -> ReactOutput:
        """What finish() would decide now, without releasing anything."""
        return _decide(
            self._text, self._prefix_len, _scan(self._text), self._tool_calls_allowed
        )

    def finish(self) -> ReactStreamEnd:
        output = self.output_so_far()
        if output.content.startswith(self._emitted):
            rest = output.content[len(self._emitted) :]
        else:  # cannot happen by construction; never repeat text already sent
            rest = ""
        self._emitted += rest
        return ReactStreamEnd(rest, output)

    def _release(self, safe: str) -> str:
        if len(safe) <= len(self._emitted):
            return ""
        delta = safe[len(self._emitted) :]
        self._emitted = safe
        return delta

    def _safe_content(self) -> str:
        text, markers = self._text, self._markers
        output = text[self._prefix_len :]
        if not markers:
            return output[: len(output) - _possible_marker_start(text)]
        lead = _lead(markers, self._prefix_len, output)
        final = _first(markers, _FINAL)
        action = _first(markers, _ACTION)
        if action is not None and (final is None or action.start < final.start):
            self._settled = True
            return lead
        if final is None or final.end == len(text):
            return lead  # a space right after the colon is not content
        return _join(lead, _answer(text, final))


def _possible_marker_start(text: str) -> int:
    """Length of the tail of `text` that may still grow into a marker."""
    newline = text.rfind("\n")
    if newline < 0:
        return len(text) if any(m.startswith(text) for m in _MARKER_TEXTS) else 0
    tail = text[newline:]
    return len(tail) if any(m.startswith(tail) for m in _LINE_MARKER_TEXTS) else 0
