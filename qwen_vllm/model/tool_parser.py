"""Qwen v1's ReAct tool calls for plain `vllm serve`: `--tool-call-parser qwen-react`.

The same three parts as the gateway, from the same modules: the tokenizer's
chat template writes the tools into Qwen's ReAct prompt (chat.react), this
parser's adjust_request constrains decoding to a ReAct step for the request's
tool_choice (chat.constraints, as a structural tag for vLLM's structured
outputs), and the output is read by Qwen's ReAct rule (chat.react), whole or
while streaming. ReAct calls one tool per turn.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from vllm.entrypoints.generate.base.protocol import (
    DeltaFunctionCall,
    DeltaMessage,
    DeltaToolCall,
    ExtractedToolCallInformation,
    FunctionCall,
    ToolCall,
)
from vllm.renderers.chat_utils import make_tool_call_id
from vllm.sampling_params import StructuredOutputsParams
from vllm.tool_parsers.abstract_tool_parser import ToolParser

from qwen_vllm.chat.constraints import structural_tag, tool_choice_format
from qwen_vllm.chat.react import (
    THOUGHT_PREFIX,
    ReactStreamParser,
    ToolSpec,
    parse_react_output,
)


def continues_thought(messages: Sequence[Any]) -> bool:
    """After a tool result the prompt ends with "Thought:" (chat.react)."""
    if not messages:
        return False
    last = messages[-1]
    role = last.get("role") if isinstance(last, dict) else getattr(last, "role", "")
    return role in ("tool", "function")


class QwenReactToolParser(ToolParser):
    # Required and named calls are read from ReAct text, not vLLM's JSON list.
    supports_required_and_named = False

    def __init__(self, tokenizer: Any, tools: list | None = None) -> None:
        super().__init__(tokenizer, tools)
        self._stream: ReactStreamParser | None = None
        self._call_sent = False

    def adjust_request(self, request: Any) -> Any:
        specs = [ToolSpec.from_tool(tool) for tool in request.tools or ()]
        choice = request.tool_choice or "auto"
        if not specs or choice == "none" or request.structured_outputs is not None:
            return request
        if not isinstance(choice, str):  # a named function
            choice = choice.model_dump()
        output = tool_choice_format(
            specs, choice, continues_thought=continues_thought(request.messages)
        )
        request.structured_outputs = StructuredOutputsParams(
            structural_tag=structural_tag(output)
        )
        return request

    def _prefix(self, request: Any) -> str:
        return THOUGHT_PREFIX if continues_thought(request.messages) else ""

    def extract_tool_calls(
        self, model_output: str, request: Any
    ) -> ExtractedToolCallInformation:
        output = parse_react_output(model_output, self._prefix(request))
        call = output.tool_call
        if call is None:
            return ExtractedToolCallInformation(
                tools_called=False, tool_calls=[], content=output.content
            )
        return ExtractedToolCallInformation(
            tools_called=True,
            tool_calls=[
                ToolCall(
                    type="function",
                    function=FunctionCall(name=call.name, arguments=call.arguments),
                )
            ],
            content=output.content or None,
        )

    def extract_tool_calls_streaming(
        self,
        previous_text: str,
        current_text: str,
        delta_text: str,
        previous_token_ids: Sequence[int],
        current_token_ids: Sequence[int],
        delta_token_ids: Sequence[int],
        request: Any,
    ) -> DeltaMessage | None:
        if self._stream is None:
            self._stream = ReactStreamParser(self._prefix(request))
        content = self._stream.feed(delta_text)
        if self._call_sent:
            return None
        # The call is whole once its arguments are (a JSON object): a
        # constrained output ends right there, so its last delta sends it.
        if not (self._stream.in_action and current_text.rstrip().endswith("}")):
            return DeltaMessage(content=content) if content else None
        call = self._stream.output_so_far().tool_call
        if call is None or not _is_json(call.arguments):
            return DeltaMessage(content=content) if content else None
        content += self._stream.finish().content_delta  # the thought
        self._call_sent = True
        self.prev_tool_call_arr = [{"name": call.name, "arguments": call.arguments}]
        self.streamed_args_for_tool = [call.arguments]
        self.current_tool_id = 0
        return DeltaMessage(
            content=content or None,
            tool_calls=[
                DeltaToolCall(
                    index=0,
                    type="function",
                    id=make_tool_call_id(),
                    function=DeltaFunctionCall(
                        name=call.name, arguments=call.arguments
                    ).model_dump(exclude_none=True),
                )
            ],
        )


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True
