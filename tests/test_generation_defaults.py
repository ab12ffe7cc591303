"""A checkpoint's generation_config.json is the default of every request field.

On a checkpoint with distinctive sampling values, a seeded chat request that
sets nothing gets the same tokens through our gateway as through plain
`vllm serve`, and the same as a request that sends those values itself; a
request that sets its own values gets them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import openai
import pytest

from tests.conftest import Stack, free_port
from tests.servers import running, venv_bin, wait_for_model

pytestmark = pytest.mark.slow

DISTINCTIVE = {
    "temperature": 0.6,
    "top_p": 0.5,
    "top_k": 7,
    "repetition_penalty": 1.3,
    "max_new_tokens": 24,
}
GENERATION_CONFIG = {
    "chat_format": "chatml",
    "eos_token_id": 151643,
    "pad_token_id": 151643,
    "max_window_size": 900,
    "do_sample": True,
    **DISTINCTIVE,
}
MESSAGES = [{"role": "user", "content": "Tell me a story about a lighthouse."}]
SEED = 1234
# The same values sent by the request itself, and vLLM's neutral ones.
AS_CONFIGURED = {
    "temperature": 0.6,
    "top_p": 0.5,
    "max_tokens": 24,
    "extra_body": {"top_k": 7, "repetition_penalty": 1.3},
}
NEUTRAL = {
    "temperature": 1.0,
    "top_p": 1.0,
    "max_tokens": 24,
    "extra_body": {"top_k": 0, "repetition_penalty": 1.0},
}
OWN = {"temperature": 0.0, "max_tokens": 5}
REQUESTS = {"unset": {}, "as_configured": AS_CONFIGURED, "neutral": NEUTRAL, "own": OWN}


def answers(client: openai.OpenAI, model: str) -> dict[str, tuple[str, int, str]]:
    out = {}
    for name, fields in REQUESTS.items():
        reply = client.chat.completions.create(
            model=model, messages=MESSAGES, seed=SEED, **fields
        )
        choice = reply.choices[0]
        out[name] = (
            choice.message.content,
            reply.usage.completion_tokens,
            choice.finish_reason,
        )
    return out


@pytest.fixture(scope="module")
def checkpoint(demo_dir: Path, tmp_path_factory) -> Path:
    model = tmp_path_factory.mktemp("defaults") / "Qwen-distinct-Chat"
    shutil.copytree(demo_dir, model)
    (model / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG))
    return model


@pytest.fixture(scope="module")
def replies(checkpoint: Path, tmp_path_factory) -> dict[str, dict]:
    """The same requests to our gateway, then to plain vllm serve."""
    logs = tmp_path_factory.mktemp("logs")
    ours = Stack(checkpoint, logs / "serve.log", num_workers=1)
    with running(ours.command(), f"{ours.gateway}/health", log=ours.log) as proc:
        wait_for_model(ours.gateway, ours.model, ours.api_key, proc, ours.log)
        client = openai.OpenAI(
            base_url=f"{ours.gateway}/v1", api_key=ours.api_key, max_retries=0
        )
        gateway = answers(client, ours.model)
    port = free_port()
    cmd = [
        *(venv_bin("vllm"), "serve", str(checkpoint)),
        *("--host", "127.0.0.1", "--port", str(port)),
        *("--max-model-len", "2048"),
    ]
    with running(cmd, f"http://127.0.0.1:{port}/health", log=logs / "vllm.log"):
        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0
        )
        vllm = answers(client, str(checkpoint))
    return {"gateway": gateway, "vllm": vllm, "log": ours.log.read_text()}


def test_unset_fields_take_the_checkpoints_values(replies) -> None:
    for server in ("gateway", "vllm"):
        got = replies[server]
        assert got["unset"] == got["as_configured"], server
        assert got["unset"] != got["neutral"], server
        text, tokens, finish = got["unset"]
        # max_new_tokens 24 bounds the answer
        assert tokens <= 24 and (finish == "stop" or tokens == 24), server


def test_the_gateway_answers_as_vllm_serve(replies) -> None:
    assert replies["gateway"] == replies["vllm"]


def test_a_request_gets_its_own_values(replies) -> None:
    for server in ("gateway", "vllm"):
        text, tokens, finish = replies[server]["own"]
        assert (tokens, finish) == (5, "length") or finish == "stop", server
        assert tokens <= 5


def test_serve_shows_the_defaults_at_start(replies) -> None:
    assert (
        "\ndefaults     max_new_tokens=24, max_window_size=900, "
        "repetition_penalty=1.3, temperature=0.6, top_k=7, top_p=0.5\n"
    ) in replies["log"]
