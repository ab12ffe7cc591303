"""OpenAI request and response bodies (chat, completions, models).

Unknown request fields are ignored; known ones are checked here, so a bad
value becomes a 400 naming the parameter. Streamed chunks are built as plain
dicts in the services: they need explicit nulls that these models omit.
"""

from __future__ import annotations

import time
from typing import Any, Literal

import jsonschema
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from qwen_vllm.chat.react import parameter_list_schema
from qwen_vllm.serving.protocol import Usage

_FUNCTION_NAME = r"^[A-Za-z0-9_-]{1,64}$"


def lone_surrogate(data: Any) -> tuple[str, str] | None:
    """(parameter path, character) of the first lone UTF-16 surrogate in data.

    JSON can spell one ("\\ud800") and Python decodes it, but it cannot be
    encoded as UTF-8: left in, it fails later, on the way to the worker or in
    the response, as a server error instead of the client's.
    """
    stack: list[tuple[str, Any]] = [("", data)]
    while stack:  # iterative: nesting depth is the client's choice
        path, value = stack.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as exc:
                return path or "body", value[exc.start]
        elif isinstance(value, dict):
            for key, item in value.items():
                # The path goes into the error message: it must encode itself.
                name = str(key).encode("utf-8", "backslashreplace").decode()
                where = f"{path}.{name}" if path else name
                stack += [(where, key), (where, item)]
        elif isinstance(value, list):
            stack.extend((f"{path}[{i}]", item) for i, item in enumerate(value))
    return None


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False


# vLLM's bound on the nesting of a structured-output schema
# (MAX_STRUCTURED_OUTPUT_JSON_NESTING); the constraint adds its own levels
# within the extra vLLM allows a structural tag.
MAX_SCHEMA_NESTING = 64


def _nests_deeper(value: Any, limit: int) -> bool:
    """Whether objects and arrays in `value` nest more than `limit` levels
    below it (iterative: the depth is the client's choice)."""
    level = [value] if isinstance(value, dict | list) else []
    for _ in range(limit + 1):
        level = [
            child
            for node in level
            for child in (node.values() if isinstance(node, dict) else node)
            if isinstance(child, dict | list)
        ]
        if not level:
            return False
    return True


def checked_json_schema(schema: Any) -> Any:
    """`schema` if it is a valid JSON Schema (by its own $schema draft)."""
    if _nests_deeper(schema, MAX_SCHEMA_NESTING - 1):  # as vLLM counts
        raise ValueError(
            "the JSON Schema is nested too deeply: objects and arrays may nest "
            f"at most {MAX_SCHEMA_NESTING} levels"
        )
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "".join(f"[{p!r}]" for p in exc.absolute_path)
        at = f" at {where}" if where else ""
        raise ValueError(f"not a valid JSON Schema: {exc.message}{at}") from None
    return schema


class JSONSchemaFormat(_Body):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    name: str = Field(pattern=_FUNCTION_NAME)
    description: str | None = None
    schema_: dict[str, Any] | bool = Field(default=True, alias="schema")
    # The answer follows the schema whether or not strict is set.
    strict: bool | None = None

    @field_validator("schema_")
    @classmethod
    def _valid_schema(cls, schema: dict[str, Any] | bool) -> dict[str, Any] | bool:
        return checked_json_schema(schema)


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError(
                "json_schema is required with type 'json_schema' and only then"
            )
        return self


_NOT_SUPPORTED = {
    "logit_bias": "token biases are not applied; leave it out",
    "store": "completions are not stored; leave it out or set false",
    "modalities": 'Qwen v1 answers in text only: ["text"]',
    "audio": "Qwen v1 answers in text only",
    "prediction": "predicted outputs are not used; leave it out",
    "reasoning_effort": "Qwen v1 is not a reasoning model; leave it out",
    "verbosity": "use max_tokens to bound an answer",
    "web_search_options": "the model has no web search; give it a tool",
}


class SamplingRequest(_Body):
    """Fields chat and completions share."""

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        found = lone_surrogate(data)
        if found is not None:
            raise PydanticCustomError(
                "invalid_unicode",
                "{param} contains a lone UTF-16 surrogate (U+{code}), which is "
                "not valid Unicode",
                {"param": found[0], "code": f"{ord(found[1]):04X}"},
            )
        return data

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    # Qwen's server: prompt and answer together, in tokens (HF generate's
    # max_length); max_tokens wins when both are set, as max_new_tokens does.
    max_length: int | None = Field(None, ge=2)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1, description="-1 or 0: no top-k cut.")
    n: int = Field(1, ge=1)
    # Signed 64-bit, as vllm serve takes it; choice i's seed + i then stays
    # within what the worker takes (protocol.SEED_MAX).
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    stop: str | list[str] | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0, le=2)
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    user: str | None = None
    # OpenAI fields that ask for what Qwen v1 on this server cannot do: a 400
    # naming the field unless left at a value that asks for nothing. Tags
    # that change no output (metadata, service_tier, prompt_cache_key,
    # safety_identifier) are accepted and ignored, as unknown fields are.
    logit_bias: dict[str, float] | None = None
    store: bool | None = None
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    web_search_options: dict[str, Any] | None = None

    @field_validator(*_NOT_SUPPORTED)
    @classmethod
    def _not_supported(cls, value: Any, info: ValidationInfo) -> Any:
        if value in (None, {}, False) or value == ["text"]:
            return value
        raise ValueError(f"not supported: {_NOT_SUPPORTED[info.field_name]}")

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: str | list[str] | None) -> list[str] | None:
        if value is None:
            return None
        stops = [value] if isinstance(value, str) else value
        if any(not stop for stop in stops):
            raise ValueError("stop sequences must not be empty")
        return stops

    def stop_list(self) -> list[str]:
        return list(self.stop or ())

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class TextPart(_Body):
    type: Literal["text"]
    text: str


class FunctionCall(_Body):
    name: str
    arguments: str | dict[str, Any] = ""


class ToolCallIn(_Body):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessageIn(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None
    function_call: FunctionCall | None = None


def _object_schema(schema: dict[str, Any]) -> dict[str, Any]:
    if schema.get("type", "object") != "object":
        raise ValueError("parameters must be a JSON Schema of type 'object'")
    properties = schema.get("properties", {})
    if not isinstance(properties, dict) or not all(
        isinstance(p, dict) for p in properties.values()
    ):
        raise ValueError("'properties' must map names to JSON Schemas")
    required = schema.get("required", [])
    if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
        raise ValueError("'required' must be a list of property names")
    return checked_json_schema(schema)


class FunctionDefinition(_Body):
    """A function in OpenAI's form (`tools[].function`)."""

    name: str = Field(pattern=_FUNCTION_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None

    @field_validator("parameters")
    @classmethod
    def _json_schema_object(
        cls, schema: dict[str, Any] | None
    ) -> dict[str, Any] | None:
        return None if schema is None else _object_schema(schema)


class LegacyFunctionDefinition(_Body):
    """A legacy `functions[]` entry, in OpenAI's form or in the one Qwen's own
    server also takes (name_for_model, name_for_human, description_for_model,
    parameters as a list of {name, description, required, schema})."""

    name: str | None = Field(None, pattern=_FUNCTION_NAME)
    description: str | None = None
    name_for_model: str | None = Field(None, pattern=_FUNCTION_NAME)
    name_for_human: str | None = None
    description_for_model: str | None = None
    parameters: dict[str, Any] | list[dict[str, Any]] | None = None

    @field_validator("parameters")
    @classmethod
    def _schema_or_list(
        cls, schema: dict[str, Any] | list[dict[str, Any]] | None
    ) -> dict[str, Any] | list[dict[str, Any]] | None:
        if isinstance(schema, list):
            _check_parameter_list(schema)
            checked_json_schema(parameter_list_schema(schema))
            return schema  # the prompt shows it as sent
        return None if schema is None else _object_schema(schema)

    @model_validator(mode="after")
    def _named(self) -> LegacyFunctionDefinition:
        if not (self.name_for_model or self.name):
            raise ValueError(
                "a function needs a 'name' (or, in Qwen's form, 'name_for_model')"
            )
        return self


def _check_parameter_list(parameters: list[dict[str, Any]]) -> None:
    names = []
    for index, item in enumerate(parameters):
        name = item.get("name")
        if not isinstance(name, str) or not name:
            raise ValueError(f"parameters[{index}] needs a 'name' (a string)")
        if not isinstance(item.get("required", False), bool):
            raise ValueError(f"parameters[{index}].required must be true or false")
        if not isinstance(item.get("schema", {}), dict):
            raise ValueError(f"parameters[{index}].schema must be a JSON Schema")
        if not isinstance(item.get("type", ""), str):
            raise ValueError(f"parameters[{index}].type must be a type name")
        names.append(name)
    if len(set(names)) != len(names):
        raise ValueError("parameter names must be unique")


class ToolDefinition(_Body):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Body):
    name: str


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessageIn] = Field(min_length=1)
    tools: list[ToolDefinition] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    functions: list[LegacyFunctionDefinition] | None = None
    function_call: Literal["none", "auto"] | NamedFunction | None = None
    # ReAct calls one tool per turn: a response has at most one tool call,
    # which is what both values allow.
    parallel_tool_calls: bool | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionRequest(SamplingRequest):
    prompt: str | list[str]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value: str | None) -> str | None:
        if value:
            raise ValueError("not supported: Qwen v1 does not fill in the middle")
        return value

    @field_validator("best_of")
    @classmethod
    def _best_of_is_n(cls, value: int | None, info: ValidationInfo) -> int | None:
        n = info.data.get("n", 1)
        if value is not None and value != n:
            raise ValueError(
                f"best_of must equal n (every candidate is returned): ask for "
                f"n={value} and pick"
            )
        return value

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and not value:
            raise ValueError("at least one prompt is required")
        return value

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class FunctionCallOut(BaseModel):
    name: str
    arguments: str


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: list[ToolCallOut] | None = None
    function_call: FunctionCallOut | None = None


FinishReason = Literal["stop", "length", "tool_calls", "function_call"]


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: dict[str, Any] | None = None
    finish_reason: FinishReason


def _created() -> int:
    return int(time.time())


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_created)
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: dict[str, Any] | None = None
    finish_reason: FinishReason


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_created)
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_created)
    owned_by: str = "qwen_vllm"
    parent: str | None = None  # a LoRA adapter's base model, as vLLM lists it


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class LoadLoraAdapterRequest(_Body):
    """vLLM's POST /v1/load_lora_adapter body, plus the base to load it on."""

    lora_name: str = Field(min_length=1, max_length=256)
    lora_path: str = Field(min_length=1)
    model: str | None = None  # needed only where several models are served


class UnloadLoraAdapterRequest(_Body):
    lora_name: str = Field(min_length=1)


class DeletedModel(BaseModel):
    id: str
    object: Literal["model"] = "model"
    deleted: bool = True


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
