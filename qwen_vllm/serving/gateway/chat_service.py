"""/v1/chat/completions: OpenAI chat requests to worker params and back.

Messages go to the worker as role/content pairs (it renders ChatML itself).
Tools and the legacy functions go through Qwen's ReAct prompting
(qwen_vllm.chat.react): the prompt carries the tool block, "Observation:"
becomes a stop word, and replies are parsed into content or a tool call,
whole or while streaming.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from qwen_vllm.chat.constraints import ANY_TEXT, tool_choice_format
from qwen_vllm.chat.react import (
    ReactFormatError,
    ReactOutput,
    ReactPrompt,
    ReactStreamParser,
    ToolCall,
    ToolSpec,
    build_react_prompt,
    parse_react_output,
)
from qwen_vllm.serving.gateway.errors import bad_request
from qwen_vllm.serving.gateway.logprobs import (
    TokenLogprob,
    chat_logprobs,
    parse_logprobs,
)
from qwen_vllm.serving.gateway.openai_models import (
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessageOut,
    FunctionCallOut,
    NamedFunction,
    NamedToolChoice,
    ToolCallOut,
)
from qwen_vllm.serving.gateway.planning import (
    Plan,
    answer_format,
    check_limits,
    choice_params,
    constrained,
    sampling_fields,
    usable_context,
)
from qwen_vllm.serving.gateway.results import finish_reason
from qwen_vllm.serving.gateway.service import GenerationService
from qwen_vllm.serving.gateway.streaming import StreamState
from qwen_vllm.serving.protocol import GenerateChunk, GenerateParams, Usage


@dataclass(frozen=True)
class ToolPlan:
    tools: list[ToolSpec]  # described in the prompt; empty: no ReAct prompt
    # "auto", "required" or a named function, as constraints.tool_choice_format
    # takes it; None: no tool may be called.
    choice: str | dict[str, Any] | None = None
    legacy: bool = False  # answer with `function_call`, not `tool_calls`

    def constraint(
        self, answer: dict[str, Any] | None, continues_thought: bool
    ) -> dict[str, Any] | None:
        """The output format: a ReAct step with tools, else the answer's."""
        if self.choice is None:
            return answer
        return tool_choice_format(
            self.tools,
            self.choice,
            answer=answer or ANY_TEXT,
            continues_thought=continues_thought,
        )


@dataclass(frozen=True)
class ChatPlan(Plan):
    react: ReactPrompt
    tools: ToolPlan


def plan_tools(request: ChatCompletionRequest) -> ToolPlan:
    if request.tools and request.functions:
        raise bad_request(
            "Send either tools or the legacy functions, not both.", "functions"
        )
    legacy = request.functions is not None and request.tools is None
    if legacy:
        definitions = request.functions or []
        choice: str | NamedToolChoice | NamedFunction | None = request.function_call
        param = "function_call"
    else:
        definitions = [tool.function for tool in request.tools or []]
        choice = request.tool_choice
        param = "tool_choice"
    specs = [ToolSpec.from_function(d) for d in definitions]
    names = [spec.name for spec in specs]
    if len(set(names)) != len(names):
        raise bad_request(
            "Tool names must be unique.", "functions" if legacy else "tools"
        )
    if choice is None:
        choice = "auto" if specs else "none"
    if choice == "none":
        return ToolPlan([], legacy=legacy)
    if not specs:
        raise bad_request(f"{param} {choice!r} needs tools to choose from.", param)
    if isinstance(choice, str):  # "auto" or "required"
        return ToolPlan(specs, choice, legacy=legacy)
    name = choice.function.name if isinstance(choice, NamedToolChoice) else choice.name
    if name not in names:
        raise bad_request(f"{param} names {name!r}, which is not a tool.", param)
    named = {"type": "function", "function": {"name": name}}
    return ToolPlan(specs, named, legacy=legacy)


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class ChatService(
    GenerationService[ChatCompletionRequest, ChatPlan, ChatCompletionResponse]
):
    prompt_param = "messages"

    async def plan(self, request: ChatCompletionRequest) -> ChatPlan:
        max_tokens, max_param = request.max_tokens, "max_tokens"
        if request.max_completion_tokens is not None:  # OpenAI's newer name
            max_tokens, max_param = (
                request.max_completion_tokens,
                "max_completion_tokens",
            )
        check_limits(request, max_tokens, self.settings, max_param)
        if request.top_logprobs is not None and not request.logprobs:
            raise bad_request("top_logprobs needs logprobs: true.", "top_logprobs")
        tools = plan_tools(request)
        messages = [m.model_dump(exclude_none=True) for m in request.messages]
        try:
            react = build_react_prompt(messages, tools.tools)
        except ReactFormatError as exc:
            raise bad_request(str(exc), exc.param) from exc
        # The worker keeps the model's window of history (max_window_size).
        await usable_context(self.backend, request.model, max_tokens, max_param)
        stop = request.stop_list() + [
            s for s in react.stop if s not in request.stop_list()
        ]
        top_logprobs = (request.top_logprobs or 0) if request.logprobs else None
        fields = sampling_fields(request, max_tokens, stop, top_logprobs)
        if react.continue_final_message:
            fields["continue_final_message"] = True
        output = tools.constraint(answer_format(request), react.continue_final_message)
        if output is not None:
            fields["structured_outputs"] = constrained(output)
        base = GenerateParams(
            model=request.model,
            messages=react.messages,
            **fields,
        )
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        return ChatPlan(
            request_id=request_id,
            params=list(choice_params(base, request_id, request.n, request.seed)),
            top_logprobs=top_logprobs,
            react=react,
            tools=tools,
        )

    def response(
        self,
        request: ChatCompletionRequest,
        plan: ChatPlan,
        chunks: list[GenerateChunk],
        usage: Usage,
    ) -> ChatCompletionResponse:
        return ChatCompletionResponse(
            id=plan.request_id,
            model=request.model,
            choices=[_choice(plan, index, chunk) for index, chunk in enumerate(chunks)],
            usage=usage,
        )

    def stream_state(
        self, request: ChatCompletionRequest, plan: ChatPlan
    ) -> _ChatStream:
        return _ChatStream(request, plan, self.prompt_param)


def _choice(plan: ChatPlan, index: int, chunk: GenerateChunk) -> ChatChoice:
    output = _parse(plan.react, chunk.text)
    logprobs = None
    if plan.top_logprobs is not None:
        logprobs = chat_logprobs(parse_logprobs(chunk.logprobs), plan.top_logprobs)
    call = output.tool_call
    if call is None:
        message = ChatMessageOut(content=output.content)
        reason = finish_reason(chunk)
    elif plan.tools.legacy:
        message = ChatMessageOut(
            content=output.content or None,
            function_call=FunctionCallOut(name=call.name, arguments=call.arguments),
        )
        reason = finish_reason(chunk, "function_call")
    else:
        message = ChatMessageOut(
            content=output.content or None,
            tool_calls=[
                ToolCallOut(
                    id=new_call_id(),
                    function=FunctionCallOut(name=call.name, arguments=call.arguments),
                )
            ],
        )
        reason = finish_reason(chunk, "tool_calls")
    return ChatChoice(
        index=index, message=message, logprobs=logprobs, finish_reason=reason
    )


class _ChatStream(StreamState[ChatCompletionRequest, ChatPlan]):
    """A streamed chat response: deltas, with ReAct output parsed as it comes."""

    object_name = "chat.completion.chunk"

    def __init__(
        self, request: ChatCompletionRequest, plan: ChatPlan, prompt_param: str
    ) -> None:
        super().__init__(request, plan, prompt_param)
        react = plan.react
        self.parsers = [
            ReactStreamParser(
                react.output_prefix, tool_calls_allowed=react.tool_calls_allowed
            )
            if react.parse_output
            else None
            for _ in self.finished
        ]

    def delta(
        self,
        index: int,
        delta: dict[str, Any] | None = None,
        *,
        finish: str | None = None,
    ) -> str:
        return self.choice_event(index, {"delta": delta or {}}, finish=finish)

    def opening(self) -> list[str]:
        return [
            self.delta(index, {"role": "assistant", "content": ""})
            for index in range(len(self.finished))
        ]

    def visible_text(self, index: int, text: str) -> str:
        parser = self.parsers[index]
        return parser.feed(text) if parser is not None else text

    def output(self, text: str) -> dict[str, Any]:
        return {"delta": {"content": text}}

    def format_logprobs(
        self, index: int, entries: list[TokenLogprob], top: int
    ) -> dict[str, Any]:
        return chat_logprobs(entries, top)

    def finish(self, index: int, chunk: GenerateChunk) -> list[str]:
        parser = self.parsers[index]
        events = []
        call: ToolCall | None = None
        if parser is not None:
            end = parser.finish()
            if end.content_delta:
                events.append(self.delta(index, {"content": end.content_delta}))
            call = end.output.tool_call
        if call is None:
            events.append(self.delta(index, finish=finish_reason(chunk)))
        elif self.plan.tools.legacy:
            function = {"name": call.name, "arguments": call.arguments}
            events.append(self.delta(index, {"function_call": function}))
            events.append(
                self.delta(index, finish=finish_reason(chunk, "function_call"))
            )
        else:
            tool_call = {
                "index": 0,
                "id": new_call_id(),
                "type": "function",
                "function": {"name": call.name, "arguments": call.arguments},
            }
            events.append(self.delta(index, {"tool_calls": [tool_call]}))
            events.append(self.delta(index, finish=finish_reason(chunk, "tool_calls")))
        return events


def _parse(react: ReactPrompt, text: str) -> ReactOutput:
    if not react.parse_output:
        return ReactOutput(text)
    return parse_react_output(
        text, react.output_prefix, tool_calls_allowed=react.tool_calls_allowed
    )
