"""Qwen's own clients, unchanged, against `qwen-vllm serve`.

The Qwen repository's OpenAI-API examples are written for the pre-1.0 `openai`
client and ask for `model="Qwen"`, with functions in Qwen's own form and in
OpenAI's. They run here as written (tests/serving/qwen_examples_client.py, in a
side virtualenv with openai 0.28.1) against a deployment that also answers to
Qwen's names (`--model-name qwen-v1-demo,Qwen,gpt-3.5-turbo`), on loopback
without an API key, as a user following Qwen's README would run it. The demo
model has random weights, so what is checked is that every answer parses.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from qwen_vllm.chat.constraints import json_format
from qwen_vllm.chat.react import ToolSpec
from qwen_vllm.serving.gateway.planning import constrained
from tests.conftest import Stack
from tests.constraint_check import accepts
from tests.servers import running, wait_for_model
from tests.side_venv import side_venv_python

pytestmark = pytest.mark.slow

LEGACY_OPENAI = ("openai==0.28.1",)
LEGACY_OPENAI_KEY = "openai-0.28.1_v1"
CLIENT = Path(__file__).with_name("qwen_examples_client.py")


@pytest.fixture(scope="module")
def examples(demo_dir: Path, tmp_path_factory) -> dict[str, list[dict[str, Any]]]:
    """What each of the examples' calls returned, by example."""
    python = side_venv_python(
        "openai-legacy-venv", LEGACY_OPENAI_KEY, LEGACY_OPENAI, check_import="openai"
    )
    deployment = Stack(
        demo_dir,
        tmp_path_factory.mktemp("logs") / "serve.log",
        num_workers=1,
        aliases=("Qwen", "gpt-3.5-turbo"),
        api_key=None,
    )
    with running(
        deployment.command(), f"{deployment.gateway}/health", log=deployment.log
    ) as proc:
        wait_for_model(deployment.gateway, "Qwen", "none", proc, deployment.log)
        run = subprocess.run(
            [str(python), str(CLIENT), f"{deployment.gateway}/v1"],
            capture_output=True,
            text=True,
            timeout=900,
            env={**os.environ, "NO_PROXY": "127.0.0.1,localhost"},
        )
    assert run.returncode == 0, run.stderr[-4000:]
    by_example: dict[str, list[dict[str, Any]]] = {}
    for record in json.loads(run.stdout):
        by_example.setdefault(record["example"], []).append(record)
    return by_example


def test_plain_chat_answers(examples) -> None:
    chats = examples["chat"]
    assert len(chats) == 3
    for reply in chats:
        assert isinstance(reply["content"], str) and reply["function_call"] is None
        assert reply["finish_reason"] in ("stop", "length")


@pytest.mark.parametrize("form", ["qwen-form", "openai-form"])
def test_every_function_answer_parses(examples, form: str) -> None:
    """A call that ended parses and fits its schema. The random-weight model
    rarely closes a string no schema bounds (Qwen's examples bound none), so
    a call may run into the token limit: then the client is told ("length")
    and what came is still the start of a valid call."""
    replies = examples[form]
    assert len(replies) == {"qwen-form": 7, "openai-form": 2}[form]
    for reply in replies:
        assert reply["finish_reason"] in ("stop", "length", "function_call"), reply
        call = reply["function_call"]
        if call is None:  # a final answer
            assert isinstance(reply["content"], str)
            assert reply["finish_reason"] != "function_call"
            continue
        tools = {
            spec.name: spec for spec in map(ToolSpec.from_function, reply["functions"])
        }
        assert call["name"] in tools, call
        schema = tools[call["name"]].arguments_schema
        if reply["finish_reason"] == "function_call":
            jsonschema.validate(json.loads(call["arguments"]), schema)
        else:
            assert reply["finish_reason"] == "length"
            arguments = constrained(json_format(schema))
            assert accepts(arguments, call["arguments"], whole=False), call


def test_readme_stream_and_stop_list(examples) -> None:
    (stream,) = examples["readme-stream"]
    # The README prints every delta that has a content: never a None.
    assert stream["pieces"] and all(isinstance(p, str) for p in stream["pieces"])
    assert "".join(stream["pieces"])
    assert stream["finishes"][-1] in ("stop", "length")
    (reply,) = examples["readme"]
    assert isinstance(reply["content"], str) and reply["content"]


def test_models_answer_to_every_name(examples) -> None:
    (models,) = examples["models"]
    assert sorted(models["ids"]) == sorted(["qwen-v1-demo", "Qwen", "gpt-3.5-turbo"])
