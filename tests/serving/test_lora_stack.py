"""`qwen-vllm serve --lora NAME=PATH`: an adapter Qwen's fine-tuning would
write, served beside its base through the controller and the gateway, seen by
FastChat's API server and both web UIs; another loaded and unloaded while the
deployment runs (`--max-loras 2`).

In float32 (`--dtype`), so each answer can be checked against the float64
reference run on weights the test merges itself.
"""

from __future__ import annotations

import shutil

import httpx
import openai
import pytest

from tests.conftest import Stack
from tests.lora_adapters import AdapterSpec, merged, write_adapter
from tests.reference_qwen import ReferenceQwenV1, read_checkpoint
from tests.reference_tokenizer import reference_tokenizer
from tests.servers import fastchat_openai_api_server, running, wait_for_model
from tests.serving.fastchat_webui import fastchat_webui
from tests.serving.webui_page import (
    ChatPage,
    FastChatPage,
    chromium_context,
    keep_on_loopback,
)

pytestmark = pytest.mark.slow

STOP_IDS = (151643, 151644, 151645)  # <|endoftext|>, <|im_start|>, <|im_end|>
STEPS = 8


@pytest.fixture(scope="module")
def deployment(demo_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-stack")
    model = root / "Qwen-demo"
    shutil.copytree(demo_dir, model)
    adapter = write_adapter(model, root / "sql-lora", AdapterSpec(rank=8, alpha=16))
    stack = Stack(
        model,
        root / "serve.log",
        num_workers=1,
        flags=(
            *("--lora", f"sql={adapter}", "--max-loras", "2", "--max-lora-rank", "16"),
            *("--dtype", "float32"),
        ),
    )
    with running(stack.command(), f"{stack.gateway}/health", log=stack.log) as proc:
        wait_for_model(stack.gateway, "sql", stack.api_key, proc, stack.log, 300)
        yield stack, adapter


@pytest.fixture(scope="module")
def client(deployment) -> openai.OpenAI:
    stack, _ = deployment
    return openai.OpenAI(base_url=f"{stack.gateway}/v1", api_key=stack.api_key)


def reference_text(model_dir, adapter, prompt: list[int]) -> str:
    """The reference's greedy answer as the worker returns it: up to a stop
    token, special tokens left out."""
    weights = merged(model_dir, adapter) if adapter else read_checkpoint(model_dir)
    tokens, _ = ReferenceQwenV1(*weights).greedy(prompt, STEPS)
    for i, token in enumerate(tokens):
        if token in STOP_IDS:
            tokens = tokens[:i]
            break
    return reference_tokenizer().decode(tokens, skip_special_tokens=True)


def greedy(client: openai.OpenAI, model: str, text: str, **extra) -> str:
    reply = client.completions.create(
        model=model, prompt=text, max_tokens=STEPS, temperature=0, extra_body=extra
    )
    return reply.choices[0].text


def test_adapter_is_listed_with_its_base_and_answers_as_merged(deployment, client):
    stack, adapter = deployment
    listed = {m.id: m for m in client.models.list()}
    assert set(listed) == {stack.model, "sql"}
    assert listed["sql"].parent == stack.model
    assert listed[stack.model].parent is None

    text = "SELECT name FROM users WHERE"
    prompt = reference_tokenizer().encode(text)
    base = reference_text(stack.model_dir, None, prompt)
    tuned = reference_text(stack.model_dir, adapter, prompt)
    assert base != tuned  # else the adapter could not be told from the base

    assert greedy(client, "sql", text, repetition_penalty=1.0) == tuned
    assert greedy(client, stack.model, text, repetition_penalty=1.0) == base


def test_fastchat_api_server_lists_the_adapter_and_routes_to_it(
    deployment, client, tmp_path
):
    stack, _ = deployment
    text = "SELECT name FROM users WHERE"
    with fastchat_openai_api_server(stack.controller, tmp_path) as url:
        fastchat = openai.OpenAI(base_url=url, api_key="x", max_retries=0)
        assert {m.id for m in fastchat.models.list()} == {stack.model, "sql"}
        # FastChat sends no repetition_penalty: both take the model's default.
        answers = {
            model: greedy(fastchat, model, text) for model in ("sql", stack.model)
        }
    assert answers == {model: greedy(client, model, text) for model in answers}
    assert answers["sql"] != answers[stack.model]


def test_an_adapter_loads_and_unloads_while_serving(
    deployment, client, wide_dir, tmp_path
):
    stack, _ = deployment
    chat = write_adapter(
        stack.model_dir, tmp_path / "chat-lora", AdapterSpec(rank=16, alpha=8, seed=1)
    )
    load = {"lora_name": "chat", "lora_path": str(chat)}

    def post(path: str, body: dict, key: str | None = stack.api_key) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.post(
            f"{stack.gateway}/v1/{path}", json=body, headers=headers, timeout=120
        )

    def listed() -> dict[str, str | None]:
        return {m.id: m.parent for m in client.models.list()}

    for key in (None, "sk-not-a-key"):
        assert post("load_lora_adapter", load, key).status_code == 401
        assert post("unload_lora_adapter", {"lora_name": "sql"}, key).status_code == 401
    assert listed() == {stack.model: None, "sql": stack.model}

    nowhere = post("load_lora_adapter", {**load, "lora_path": str(tmp_path / "gone")})
    assert nowhere.status_code == 400
    assert "no adapter_config.json" in nowhere.json()["error"]["message"]
    # Fine-tuned from a wider model: vLLM cannot put its matrices in.
    wider = write_adapter(wide_dir, tmp_path / "wide-lora", AdapterSpec(8, 16))
    misfit = post("load_lora_adapter", {"lora_name": "wide", "lora_path": str(wider)})
    assert misfit.status_code == 400, misfit.text
    assert "vLLM cannot load it" in misfit.json()["error"]["message"]
    assert listed() == {stack.model: None, "sql": stack.model}

    loaded = post("load_lora_adapter", load)
    assert loaded.status_code == 200, loaded.text
    assert loaded.json()["parent"] == stack.model
    assert listed() == {stack.model: None, "sql": stack.model, "chat": stack.model}
    text = "Write a haiku about"
    expected = reference_text(stack.model_dir, chat, reference_tokenizer().encode(text))
    assert greedy(client, "chat", text, repetition_penalty=1.0) == expected

    unloaded = post("unload_lora_adapter", {"lora_name": "chat"})
    assert unloaded.status_code == 200, unloaded.text
    assert listed() == {stack.model: None, "sql": stack.model}
    with pytest.raises(openai.NotFoundError):
        greedy(client, "chat", text)
    assert post("unload_lora_adapter", {"lora_name": "chat"}).status_code == 404


@pytest.mark.browser
def test_both_web_uis_offer_the_adapter(deployment, tmp_path):
    stack, _ = deployment
    with chromium_context() as context:
        keep_on_loopback(context)
        chat = ChatPage.open(context, stack.webui, timeout=60)
        assert set(chat.model_choices()) == {stack.model, "sql"}
        chat.select_model("sql")
        chat.set_max_tokens(8)
        chat.send("SELECT")
        chat.wait_idle()
        assert chat.answers() and "Error" not in chat.answers()[-1]
        with fastchat_webui(stack.controller, workdir=tmp_path) as url:
            fastchat = FastChatPage.open(context, url, timeout=60)
            assert set(fastchat.model_choices()) == {stack.model, "sql"}
