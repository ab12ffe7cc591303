"""Settings of every service, in one place.

Each field is a CLI flag (`--field-name`), an environment variable
(`QWEN_VLLM_FIELD_NAME`) and a key of an optional YAML file (`--config`), with
that precedence. The launch scripts and Kubernetes manifests set the same
names. Pure Python: no vLLM, no torch.
"""

from __future__ import annotations

import argparse
import json
import os
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, Self, TypeVar

import yaml
from pydantic import (
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from qwen_vllm import DEMO_MODEL_NAME
from qwen_vllm.serving.protocol import validation_problems
from qwen_vllm.serving.security import reachable_host

ENV_PREFIX = "QWEN_VLLM_"


def split_commas(value: Any) -> Any:
    """A comma-separated string (a flag or an environment variable) as a list."""
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class _Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="forbid", validate_default=True
    )

    host: str = Field(
        "127.0.0.1",
        description="Address the service binds to (0.0.0.0 to accept remote "
        "clients, e.g. in a container).",
    )
    internal_token: SecretStr | None = Field(
        None,
        description="Shared secret guarding controller and worker endpoints; "
        "every component of one deployment must use the same value "
        "(`qwen-vllm serve` makes one when none is given).",
    )
    insecure_no_internal_token: bool = Field(
        False,
        description="Run without an internal token even on a non-loopback "
        "address, so anyone who reaches the controller or a worker can register "
        "workers and read prompts (for FastChat's own servers, which send none).",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="Log verbosity."
    )


class ControllerFields(_Settings):
    controller_port: int = Field(21001, description="Controller port.")
    controller_address: str | None = Field(
        None,
        description="URL at which the controller is reached "
        "(default: http://<host>:<controller-port>).",
    )
    dispatch_method: Literal["shortest_queue", "lottery"] = Field(
        "shortest_queue",
        description="How the controller picks a worker: fewest queued requests, "
        "or random weighted by speed.",
    )
    health_check_interval: float = Field(
        1.0,
        gt=0,
        description="Seconds between the controller's health probes of each worker.",
    )
    unhealthy_after_failures: int = Field(
        2,
        ge=1,
        description="Failed probes in a row after which a worker gets no traffic.",
    )

    def controller_url(self) -> str:
        if self.controller_address:
            return self.controller_address.rstrip("/")
        return f"http://{reachable_host(self.host)}:{self.controller_port}"


class WorkerFields(_Settings):
    model: str | None = Field(
        None,
        description="Qwen v1 checkpoint directory; default: the embedded demo "
        "model, generated on first use.",
    )
    model_name: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Name(s) clients use for the model, comma-separated: the "
        "first is its own, the others aliases (e.g. Qwen-7B-Chat,Qwen,"
        "gpt-3.5-turbo for Qwen's own clients); default: the checkpoint "
        "directory's name.",
    )
    lora: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="LoRA adapters served beside the model, NAME=PATH, "
        "comma-separated (YAML: a mapping of names to paths): directories PEFT "
        "wrote (Qwen's finetune.py); a client asks for one with model=NAME.",
    )
    max_loras: int | None = Field(
        None,
        ge=1,
        description="LoRA adapters one batch can mix (vLLM's --max-loras); "
        "default: the number of --lora adapters. Set it to load adapters at run "
        "time (POST /v1/load_lora_adapter) on a model served without --lora.",
    )
    max_lora_rank: int | None = Field(
        None,
        ge=1,
        description="Highest adapter rank served (vLLM's --max-lora-rank: 1, 8, "
        "16, 32, 64, 128, 256, 320 or 512); default: the smallest that holds "
        "the --lora adapters, 16 without any.",
    )
    tensor_parallel_size: int = Field(
        1,
        ge=1,
        description="GPUs (CPU: cores) per worker, split by tensor parallelism.",
    )
    worker_port: int = Field(21002, description="Port of the (first) worker.")
    worker_address: str | None = Field(
        None,
        description="URL at which the controller and gateway reach this worker "
        "(default: http://<host>:<worker-port>).",
    )
    heartbeat_interval: float = Field(
        5.0, gt=0, description="Seconds between the worker's heartbeats."
    )
    dtype: str = Field("auto", description="Weight dtype passed to vLLM.")
    max_model_len: int | None = Field(
        None, description="Longest context (default: the checkpoint's)."
    )
    kv_cache_dtype: str = Field(
        "auto", description="vLLM KV cache dtype (auto, fp8_e4m3, fp8_e5m2)."
    )
    kv_cache_memory: float | None = Field(
        None,
        gt=0,
        description="GiB of KV cache per worker (split over its tensor-parallel "
        "ranks); default on CPU: what the worker's share of the machine's "
        "available memory holds after the weights, capped at max-model-len x "
        "max-num-seqs tokens; on GPU: vLLM's own sizing.",
    )
    workers_per_node: int = Field(
        1,
        ge=1,
        description="Workers sharing this machine's memory (qwen-vllm serve sets "
        "it); each sizes its default KV cache from its share.",
    )
    max_num_seqs: int | None = Field(
        None, description="Most sequences the engine batches at once."
    )
    enforce_eager: bool = Field(
        False, description="Disable CUDA graphs / torch.compile (faster start)."
    )
    engine_args: dict[str, Any] = Field(
        default_factory=dict,
        description="Further vLLM engine arguments (YAML mapping, or JSON in the "
        "environment).",
    )

    @field_validator("model_name", mode="before")
    @classmethod
    def _split_names(cls, value: Any) -> Any:
        return split_commas(value)

    @field_validator("model_name")
    @classmethod
    def _distinct_names(cls, names: list[str]) -> list[str]:
        if len(set(names)) != len(names):
            raise ValueError(f"names must differ, got {','.join(names)}")
        return names

    @field_validator("lora", mode="before")
    @classmethod
    def _lora_items(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return [f"{name}={path}" for name, path in value.items()]
        return split_commas(value)

    @field_validator("lora")
    @classmethod
    def _lora_pairs(cls, items: list[str]) -> list[str]:
        for item in items:
            name, _, path = item.partition("=")
            if not name.strip() or not path.strip():
                raise ValueError(
                    f"{item!r} is not NAME=PATH (e.g. sql=/models/qwen-7b-sql-lora)"
                )
        names = [item.partition("=")[0].strip() for item in items]
        if len(set(names)) != len(names):
            raise ValueError(f"adapter names must differ, got {','.join(names)}")
        return items

    @model_validator(mode="after")
    def _adapters_named_apart_from_the_model(self) -> Self:
        clash = set(self.lora_paths()) & set(self.served_model_names())
        if clash:
            raise ValueError(
                f"LoRA adapter name {sorted(clash)[0]!r} is also a name of the "
                "model; give the adapter another name"
            )
        return self

    def lora_paths(self) -> dict[str, str]:
        """Adapter name -> its directory, as given."""
        pairs = (item.partition("=") for item in self.lora)
        return {name.strip(): path.strip() for name, _, path in pairs}

    def served_model_names(self) -> list[str]:
        """Every name the model answers to; the first is its own."""
        if self.model_name:
            return list(self.model_name)
        if self.model is None:
            return [DEMO_MODEL_NAME]
        return [Path(self.model).resolve().name]

    def served_model_name(self) -> str:
        return self.served_model_names()[0]


class GatewayFields(_Settings):
    port: int = Field(8000, description="Port of the OpenAI-compatible API.")
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list,
        description="API keys accepted as Bearer tokens (comma-separated in "
        "QWEN_VLLM_API_KEYS); none: the API is open.",
    )
    max_body_bytes: int = Field(
        1 << 20, gt=0, description="Largest accepted request body, in bytes."
    )
    max_tokens_limit: int = Field(
        8192, gt=0, description="Largest max_tokens a request may ask for."
    )
    max_n: int = Field(
        8, gt=0, description="Largest n (choices) a request may ask for."
    )
    max_concurrent_per_key: int = Field(
        64, gt=0, description="Requests one API key may have in flight at once."
    )
    requests_per_second_per_key: float = Field(
        50.0, gt=0, description="Sustained request rate allowed per API key."
    )
    burst_per_key: int = Field(
        100, gt=0, description="Requests per key allowed in a burst above that rate."
    )
    request_timeout: float = Field(
        600.0, gt=0, description="Seconds a worker may take for one request."
    )
    allowed_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Web origins whose pages may call the API from a browser "
        "(CORS; comma-separated, '*' for any); none: no cross-origin access.",
    )

    @field_validator("api_keys", "allowed_origins", mode="before")
    @classmethod
    def _split_commas(cls, value: Any) -> Any:
        return split_commas(value)


class WebUIFields(_Settings):
    webui_port: int = Field(7860, description="Port of the web UI.")
    webui_password: SecretStr | None = Field(
        None, description="Password of the web UI (user 'qwen'); none: open."
    )
    webui_root_path: str = Field(
        "", description="URL prefix when the UI sits behind a proxy or ingress."
    )


class ControllerSettings(ControllerFields):
    """`qwen-vllm controller`."""


class WorkerSettings(WorkerFields, ControllerFields):
    """`qwen-vllm worker`."""


class GatewaySettings(GatewayFields, ControllerFields):
    """`qwen-vllm gateway`."""


class WebUISettings(WebUIFields, ControllerFields):
    """`qwen-vllm webui`."""


class ServeSettings(WebUIFields, GatewayFields, WorkerFields, ControllerFields):
    """`qwen-vllm serve`: the whole stack, supervised by Ray."""

    num_workers: int = Field(1, ge=1, description="Workers serving the model.")
    ray_address: str | None = Field(
        None,
        description="Ray cluster to join ('auto' or host:port); default: start "
        "a local one on 127.0.0.1.",
    )
    webui: bool = Field(True, description="Start the web UI.")


S = TypeVar("S", bound=_Settings)


def add_arguments(parser: argparse.ArgumentParser, cls: type[_Settings]) -> None:
    """One flag per field; values left None so env and YAML can fill them."""
    parser.add_argument(
        "--config", type=Path, default=None, help="YAML file with settings."
    )
    for name, field in cls.model_fields.items():
        flag = "--" + name.replace("_", "-")
        help_text = f"{field.description} [env {ENV_PREFIX}{name.upper()}]"
        base = _base_type(field.annotation)
        if base is bool:
            parser.add_argument(
                flag,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=help_text,
            )
        elif name == "api_keys":
            parser.add_argument(
                "--api-key",
                dest="api_keys",
                action="append",
                default=None,
                metavar="KEY",
                help=help_text + " (repeat for several keys)",
            )
        elif base is dict:
            parser.add_argument(
                flag, type=_parse_mapping, default=None, metavar="JSON", help=help_text
            )
        else:
            parser.add_argument(
                flag, default=None, metavar=name.upper(), help=help_text
            )


def _base_type(annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _base_type(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _base_type(args[0]) if len(args) == 1 else annotation
    return origin or annotation


def _parse_mapping(text: str) -> dict:
    value = yaml.safe_load(text)
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON/YAML mapping, got {text!r}")
    return value


class SettingsError(ValueError):
    """Settings that do not validate, explained per field."""


def settings_from_args(
    cls: type[S], args: argparse.Namespace, environ: dict[str, str] | None = None
) -> S:
    """CLI values over environment over YAML file over defaults."""
    values: dict[str, Any] = {}
    config_file = getattr(args, "config", None)
    if config_file is not None:
        try:
            loaded = yaml.safe_load(Path(config_file).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise SettingsError(
                f"cannot read settings file {config_file}: {exc}"
            ) from exc
        if not isinstance(loaded, dict):
            raise SettingsError(f"settings file {config_file} must hold a mapping")
        values.update({k.replace("-", "_"): v for k, v in loaded.items()})
    env = os.environ if environ is None else environ
    for name in cls.model_fields:
        env_value = env.get(ENV_PREFIX + name.upper())
        if env_value is not None:
            values[name] = env_value
        cli_value = getattr(args, name, None)
        if cli_value is not None:
            values[name] = cli_value
    return build_settings(cls, values)


def build_settings(cls: type[S], values: dict[str, Any]) -> S:
    """Validate explicit values (no environment lookup) with readable errors."""
    unknown = sorted(set(values) - set(cls.model_fields))
    if unknown:
        raise SettingsError(
            "unknown setting(s): " + ", ".join(u.replace("_", "-") for u in unknown)
        )
    try:
        return cls.model_validate(_decode_env_json(cls, values))
    except ValidationError as exc:
        problems = validation_problems(
            exc.errors(), label=lambda path: "--" + path.replace("_", "-")
        )
        raise SettingsError(problems) from exc


def _decode_env_json(cls: type[_Settings], values: dict[str, Any]) -> dict[str, Any]:
    decoded = dict(values)
    for name, value in values.items():
        if (
            isinstance(value, str)
            and _base_type(cls.model_fields[name].annotation) is dict
        ):
            decoded[name] = _parse_mapping(value)
    return decoded


def subset(settings: _Settings, cls: type[S], **overrides: Any) -> S:
    """The settings of one component, taken from a larger settings object."""
    values = {
        name: getattr(settings, name)
        for name in cls.model_fields
        if name in type(settings).model_fields
    }
    values.update(overrides)
    return cls.model_validate(values)


def to_strings(
    settings: _Settings, fields: Sequence[str] | None = None
) -> dict[str, str]:
    """Field values as the strings an environment variable would hold.

    Secrets are revealed: this is how settings reach another process.
    """
    out: dict[str, str] = {}
    for name in fields or type(settings).model_fields:
        value = getattr(settings, name)
        if value is None:
            continue
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        elif isinstance(value, list):
            value = ",".join(
                v.get_secret_value() if isinstance(v, SecretStr) else str(v)
                for v in value
            )
        elif isinstance(value, dict):
            value = json.dumps(value)
        elif isinstance(value, bool):
            value = "true" if value else "false"
        out[name] = str(value)
    return out
