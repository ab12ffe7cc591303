"""QwenChat, the Python chat() API: on a real engine with the demo model, and
its streams over a scripted one."""

from __future__ import annotations

import itertools

import pytest

from tests.reference_tokenizer import reference_chat_ids, reference_tokenizer

SYSTEM = "You are a helpful assistant."
GREEDY = {"temperature": 0.0, "max_tokens": 12}


@pytest.fixture(scope="module")
def chat(demo_dir):
    from qwen_vllm.offline.qwen_chat import QwenChat

    with QwenChat(demo_dir, enforce_eager=True, max_model_len=2048) as chat:
        yield chat


@pytest.mark.slow
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


@pytest.mark.slow
def test_stream_and_batch_give_the_same_greedy_answers(chat):
    whole, _ = chat.chat("Tell me a story.", **GREEDY)
    deltas = list(chat.chat_stream("Tell me a story.", **GREEDY))
    assert len(deltas) > 1
    assert "".join(deltas) == whole
    queries = ["Hi", "Tell me a story.", "Bonjour"]
    assert chat.chat_batch(queries, **GREEDY)[1] == whole
    assert chat.chat_batch(queries, **GREEDY)[0] == chat.chat("Hi", **GREEDY)[0]


@pytest.mark.slow
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


@pytest.mark.slow
def test_cumulative_stream_is_the_delta_stream_summed(chat):
    deltas = list(chat.chat_stream("Tell me a story.", **GREEDY))
    texts = list(chat.chat_stream_cumulative("Tell me a story.", **GREEDY))
    assert len(texts) > 1
    assert texts == list(itertools.accumulate(deltas))
    # Leaving early stops the generation.
    stream = chat.chat_stream_cumulative("Tell me a story.", max_tokens=200)
    assert next(stream)
    stream.close()
    assert not chat.engine.has_unfinished_requests()


def test_cumulative_stream_yields_the_reply_so_far_hf_style():
    from qwen_vllm.offline.qwen_chat import QwenChat

    asked, closed = [], []

    def deltas(*args, **sampling):
        asked.append((args, sampling))
        try:
            yield from ("Hel", "lo", " you")
        finally:
            closed.append(True)

    chat = QwenChat.__new__(QwenChat)  # no engine: only the stream's shape
    chat.chat_stream = deltas
    history = [("hi", "Hello")]
    texts = list(chat.chat_stream_cumulative("q", history, "sys", seed=3))
    assert texts == ["Hel", "Hello", "Hello you"]
    assert asked == [(("q", history, "sys"), {"seed": 3})]
    stream = chat.chat_stream_cumulative("q")
    assert next(stream) == "Hel"
    stream.close()
    assert closed == [True, True]
