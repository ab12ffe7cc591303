"""The whole stack (`qwen-vllm serve`: Ray, controller, two vLLM workers,
gateway) on the demo model, driven by the official openai client and by
FastChat's own API server. Destructive tests (killing a worker) come last."""

from __future__ import annotations

import json
import os
import signal
import time

import httpx
import openai
import pytest

from tests.servers import fastchat_openai_api_server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def client(stack) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{stack.gateway}/v1", api_key=stack.api_key, max_retries=0
    )


def test_models_chat_and_completions(stack, client):
    assert [m.id for m in client.models.list()] == [stack.model]
    chat = client.chat.completions.create(
        model=stack.model,
        messages=[{"role": "user", "content": "你好"}],
        max_tokens=8,
        temperature=0,
    )
    assert chat.choices[0].message.content
    assert chat.usage.completion_tokens == 8
    completion = client.completions.create(
        model=stack.model, prompt="Once upon a time", max_tokens=6, temperature=0
    )
    assert completion.choices[0].text and completion.usage.completion_tokens == 6


def test_max_length_bounds_prompt_and_answer_together(stack, client):
    """Qwen's server's max_length, as HF generate counts it."""
    messages = [{"role": "user", "content": "你好"}]
    first = client.chat.completions.create(
        model=stack.model, messages=messages, max_tokens=1, temperature=0
    )
    prompt = first.usage.prompt_tokens
    chat = client.chat.completions.create(
        model=stack.model,
        messages=messages,
        temperature=0,
        extra_body={"max_length": prompt + 3},
    )
    assert chat.usage.total_tokens == prompt + 3
    assert chat.choices[0].finish_reason == "length"
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model=stack.model, messages=messages, extra_body={"max_length": prompt}
        )
    assert refused.value.body["param"] == "max_length"


def test_streaming_chat_matches_the_non_streaming_answer(stack, client):
    messages = [{"role": "user", "content": "Tell me a story."}]
    whole = client.chat.completions.create(
        model=stack.model, messages=messages, max_tokens=12, temperature=0
    )
    deltas = [
        chunk.choices[0].delta.content or ""
        for chunk in client.chat.completions.create(
            model=stack.model,
            messages=messages,
            max_tokens=12,
            temperature=0,
            stream=True,
        )
        if chunk.choices
    ]
    assert len([d for d in deltas if d]) > 1
    assert "".join(deltas) == whole.choices[0].message.content


def test_n_choices_and_stop_strings(stack, client):
    reply = client.chat.completions.create(
        model=stack.model,
        messages=[{"role": "user", "content": "Count."}],
        max_tokens=10,
        n=3,
        temperature=1.0,
        seed=1,
    )
    assert sorted(c.index for c in reply.choices) == [0, 1, 2]
    first = reply.choices[0].message.content
    # Stop at the first character of a known greedy answer: it must not appear.
    greedy = (
        client.completions.create(
            model=stack.model, prompt="abc", max_tokens=10, temperature=0
        )
        .choices[0]
        .text
    )
    stop = greedy[len(greedy) // 2 :][:2]
    assert stop and first is not None
    cut = client.completions.create(
        model=stack.model, prompt="abc", max_tokens=10, temperature=0, stop=[stop]
    ).choices[0]
    assert cut.finish_reason == "stop"
    assert greedy.startswith(cut.text) and stop not in cut.text


def test_tools_are_accepted_end_to_end(stack, client):
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather of a city",
                "parameters": {
                    "type": "object",
                    "properties": {"city": {"type": "string"}},
                    "required": ["city"],
                },
            },
        }
    ]
    plain = client.chat.completions.create(
        model=stack.model,
        messages=[{"role": "user", "content": "Weather in Paris?"}],
        max_tokens=4,
    )
    with_tools = client.chat.completions.create(
        model=stack.model,
        messages=[{"role": "user", "content": "Weather in Paris?"}],
        tools=tools,
        max_tokens=4,
    )
    # The ReAct tool description reached the worker's prompt.
    assert with_tools.usage.prompt_tokens > plain.usage.prompt_tokens + 50
    assert with_tools.choices[0].finish_reason in ("stop", "length", "tool_calls")
    streamed = list(
        client.chat.completions.create(
            model=stack.model,
            messages=[{"role": "user", "content": "Weather in Paris?"}],
            tools=tools,
            max_tokens=4,
            stream=True,
        )
    )
    assert streamed[-1].choices[0].finish_reason in ("stop", "length", "tool_calls")


@pytest.mark.parametrize(
    ("body", "status", "kind"),
    [
        ({"model": "no-such-model"}, 404, "model"),
        ({"temperature": -1}, 400, "temperature"),
        ({"n": 1000}, 400, "n"),
        ({"max_tokens": 10**7}, 400, "max_tokens"),
    ],
)
def test_errors_are_openai_shaped(stack, body, status, kind):
    request = {
        "model": stack.model,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 2,
        **body,
    }
    reply = httpx.post(
        f"{stack.gateway}/v1/chat/completions",
        json=request,
        headers={"Authorization": f"Bearer {stack.api_key}"},
        timeout=60,
    )
    assert reply.status_code == status
    error = reply.json()["error"]
    assert kind in (error.get("param") or "") + error["message"]


def test_a_key_is_required(stack):
    reply = httpx.get(f"{stack.gateway}/v1/models", timeout=10)
    assert reply.status_code == 401
    assert reply.json()["error"]["type"] == "authentication_error"
    bad = openai.OpenAI(base_url=f"{stack.gateway}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_fastchat_openai_api_server_serves_from_our_worker(stack, tmp_path):
    with fastchat_openai_api_server(stack.controller, tmp_path) as url:
        fastchat = openai.OpenAI(base_url=url, api_key="x", max_retries=0)
        assert [m.id for m in fastchat.models.list()] == [stack.model]
        reply = fastchat.chat.completions.create(
            model=stack.model,
            messages=[{"role": "user", "content": "你好"}],
            max_tokens=6,
            temperature=0,
        )
        assert reply.choices[0].message.content
        assert reply.usage.completion_tokens >= 1


def _worker_health(url: str) -> dict:
    return httpx.get(f"{url}/health", timeout=5).json()


def test_requests_spread_over_both_workers(stack, client):
    before = [_worker_health(url)["requests_total"] for url in stack.worker_urls()]
    for _ in range(8):
        client.completions.create(model=stack.model, prompt="hi", max_tokens=2)
    after = [_worker_health(url)["requests_total"] for url in stack.worker_urls()]
    gained = [a - b for a, b in zip(after, before, strict=True)]
    assert sum(gained) == 8
    assert min(gained) >= 2, gained


def test_client_disconnect_frees_the_engine_slot(stack):
    headers = {"Authorization": f"Bearer {stack.api_key}"}
    body = {
        "model": stack.model,
        "prompt": "Write forever",
        "max_tokens": 1500,
        "stream": True,
        "temperature": 0,
        "logit_bias": {},
    }
    with httpx.stream(
        "POST",
        f"{stack.gateway}/v1/completions",
        json=body,
        headers=headers,
        timeout=60,
    ) as reply:
        lines = (line for line in reply.iter_lines() if line.startswith("data: "))
        events = [json.loads(next(lines).removeprefix("data: ")) for _ in range(6)]
    # The worker's stream of this request (its id starts with the response's)
    # was cut before its end, which aborts the engine request: the worker
    # lists it. 1500 tokens take far longer than the disconnect takes to reach
    # the worker, so a request that ran to its end fails this test.
    request_id = events[0]["id"]
    assert all(e["choices"][0]["finish_reason"] is None for e in events)
    deadline = time.monotonic() + 60  # only against a hang: the id decides
    while True:
        healths = [_worker_health(u) for u in stack.worker_urls()]
        cancelled = [i for h in healths for i in h["recently_cancelled"]]
        if any(i.startswith(request_id) for i in cancelled):
            break
        assert time.monotonic() < deadline, (request_id, healths)
        time.sleep(0.1)
    # Aborted, not left running: the engine's queue holds nothing of ours.
    assert sum(h["queue_length"] for h in healths) == 0, healths


def test_killed_worker_leaves_routing_and_ray_brings_it_back(stack, client):
    victim_url, survivor_url = stack.worker_urls()
    victim_pid = _worker_health(victim_url)["pid"]
    os.kill(victim_pid, signal.SIGKILL)
    killed_at = time.monotonic()
    # Requests keep succeeding on the other worker meanwhile.
    for _ in range(3):
        reply = client.completions.create(model=stack.model, prompt="hi", max_tokens=2)
        assert reply.choices[0].text is not None
    while True:
        states = {w["name"]: w["healthy"] for w in stack.workers()}
        if not states.get(victim_url, False):
            break
        assert time.monotonic() - killed_at < 5, "dead worker still routable after 5 s"
        time.sleep(0.1)
    addresses = {
        httpx.post(
            f"{stack.controller}/get_worker_address", json={"model": stack.model}
        ).json()["address"]
        for _ in range(10)
    }
    assert addresses == {survivor_url}
    # Ray restarts the actor; the new worker registers again by itself.
    deadline = time.monotonic() + 240
    while not {w["name"]: w["healthy"] for w in stack.workers()}.get(victim_url):
        assert time.monotonic() < deadline, "the killed worker never came back"
        time.sleep(1)
    assert _worker_health(victim_url)["pid"] != victim_pid
    reply = client.completions.create(model=stack.model, prompt="hi", max_tokens=2)
    assert json.loads(reply.model_dump_json())["choices"]
