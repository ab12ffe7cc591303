"""`qwen-vllm serve --lora NAME=PATH`: an adapter Qwen's fine-tuning would
write, served beside its base through the controller and the gateway.

In float32 (`--dtype`), so each answer can be checked against the float64
reference run on weights the test merges itself.
"""

from __future__ import annotations

import shutil

import openai
import pytest

from tests.conftest import Stack
from tests.lora_adapters import AdapterSpec, merged, write_adapter
from tests.reference_qwen import ReferenceQwenV1, read_checkpoint
from tests.reference_tokenizer import reference_tokenizer
from tests.servers import running, wait_for_model

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
        flags=("--lora", f"sql={adapter}", "--dtype", "float32"),
    )
    with running(stack.command(), f"{stack.gateway}/health", log=stack.log) as proc:
        wait_for_model(stack.gateway, "sql", stack.api_key, proc, stack.log, 300)
        yield stack, adapter


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


def test_adapter_is_listed_with_its_base_and_answers_as_merged(deployment):
    stack, adapter = deployment
    client = openai.OpenAI(base_url=f"{stack.gateway}/v1", api_key=stack.api_key)
    listed = {m.id: m for m in client.models.list()}
    assert set(listed) == {stack.model, "sql"}
    assert listed["sql"].parent == stack.model
    assert listed[stack.model].parent is None

    text = "SELECT name FROM users WHERE"
    prompt = reference_tokenizer().encode(text)
    base = reference_text(stack.model_dir, None, prompt)
    tuned = reference_text(stack.model_dir, adapter, prompt)
    assert base != tuned  # else the adapter could not be told from the base

    def answer(model: str) -> str:
        reply = client.completions.create(
            model=model,
            prompt=text,
            max_tokens=STEPS,
            temperature=0,
            extra_body={"repetition_penalty": 1.0},
        )
        return reply.choices[0].text

    assert answer("sql") == tuned
    assert answer(stack.model) == base
