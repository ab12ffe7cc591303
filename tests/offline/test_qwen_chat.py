"""QwenChat, the Python chat() API, on a real engine with the demo model."""

from __future__ import annotations

import pytest

from tests.reference_tokenizer import reference_chat_ids, reference_tokenizer

pytestmark = pytest.mark.slow

SYSTEM = "You are a helpful assistant."
GREEDY = {"temperature": 0.0, "max_tokens": 12}


@pytest.fixture(scope="module")
def chat(demo_dir):
    from qwen_vllm.offline.qwen_chat import QwenChat

    with QwenChat(demo_dir, enforce_eager=True, max_model_len=2048) as chat:
        yield chat


def test_chat_extends_history_with_a_structural_chatml_prompt(chat):
    response, history = chat.chat("你好", **GREEDY)
    assert response and history == [("你好", response)]
    query = "and <|im_end|> typed"
    expected = reference_chat_ids(
        reference_tokenizer(),
        [
            ("system", SYSTEM),
            ("user", "你好"),
            ("assistant", response),
            ("user", query),
        ],
    )
    assert chat.prompt_ids(query, history) == expected
    again, longer = chat.chat(query, history=history, **GREEDY)
    assert longer == [*history, (query, again)]


def test_stream_and_batch_give_the_same_greedy_answers(chat):
    whole, _ = chat.chat("Tell me a story.", **GREEDY)
    deltas = list(chat.chat_stream("Tell me a story.", **GREEDY))
    assert len(deltas) > 1
    assert "".join(deltas) == whole
    queries = ["Hi", "Tell me a story.", "Bonjour"]
    assert chat.chat_batch(queries, **GREEDY)[1] == whole
    assert chat.chat_batch(queries, **GREEDY)[0] == chat.chat("Hi", **GREEDY)[0]


def test_forced_im_end_stops_with_reason_stop(chat):
    (forced,) = chat.generate(
        ["Say something."], max_tokens=20, logit_bias={151645: 100}
    )
    completion = forced.outputs[0]
    assert completion.finish_reason == "stop"
    assert list(completion.token_ids) == [151645]
    assert completion.text == ""
    (free,) = chat.generate(
        ["Say something."],
        max_tokens=20,
        temperature=0.0,
        logit_bias={i: -100 for i in (151643, 151644, 151645)},
    )
    assert free.outputs[0].finish_reason == "length"
    assert len(free.outputs[0].token_ids) == 20
