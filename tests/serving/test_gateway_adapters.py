"""POST /v1/load_lora_adapter and /v1/unload_lora_adapter on the gateway, over
fake workers: every worker of the base or none, and the errors a caller gets.
The real stack runs them in tests/serving/test_lora_stack.py."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from qwen_vllm.serving.client import WorkerInfo
from qwen_vllm.serving.gateway import create_app
from tests.serving.test_gateway import KEY, FakeBackend, http_client, make_settings


class AdminBackend(FakeBackend):
    """Workers that keep their names, as ours do, and a list of the calls."""

    def __init__(self, workers: dict[str, list[str]], refuse: str = "") -> None:
        super().__init__(
            models=sorted({n for names in workers.values() for n in names})
        )
        self.names = workers
        self.refuse = refuse  # the worker that refuses a load
        self.calls: list[tuple[str, str, str]] = []
        self.forgotten: list[str] = []

    async def workers(self, *, fresh: bool = False) -> list[WorkerInfo]:
        return [WorkerInfo(address=a, model_names=n) for a, n in self.names.items()]

    async def post_worker(self, address: str, path: str, body: dict[str, Any]):
        name = body["lora_name"]
        self.calls.append((address, path, name))
        names = self.names[address]
        if path == "/load_lora_adapter":
            if address == self.refuse:
                return httpx.Response(400, json={"error": f"{name}: bad rank"})
            names.append(name)
        elif name in names[1:]:
            names.remove(name)
        else:
            return httpx.Response(404, json={"error": "not loaded here"})
        return httpx.Response(200, json={"model_names": names})

    def forget(self, model: str) -> None:
        self.forgotten.append(model)


async def call(backend: AdminBackend, path: str, body: dict, key: str | None = KEY):
    app = create_app(make_settings(api_keys=[KEY]), backend)
    async with http_client(app, key) as http:
        return await http.post(path, json=body)


LOAD = {"lora_name": "sql", "lora_path": "/adapters/sql"}


async def test_an_adapter_loads_on_every_worker_of_its_base_and_unloads():
    backend = AdminBackend(
        {"http://w1": ["qwen", "Qwen"], "http://w2": ["qwen"], "http://w3": ["other"]}
    )
    reply = await call(backend, "/v1/load_lora_adapter", {**LOAD, "model": "Qwen"})
    assert reply.status_code == 200, reply.text
    assert reply.json()["id"] == "sql" and reply.json()["parent"] == "qwen"
    assert backend.names == {
        "http://w1": ["qwen", "Qwen", "sql"],
        "http://w2": ["qwen", "sql"],
        "http://w3": ["other"],
    }
    assert backend.forgotten == ["sql"]

    again = await call(backend, "/v1/load_lora_adapter", {**LOAD, "model": "qwen"})
    assert again.status_code == 400
    assert again.json()["error"]["code"] == "model_exists"

    reply = await call(backend, "/v1/unload_lora_adapter", {"lora_name": "sql"})
    assert reply.json() == {"id": "sql", "object": "model", "deleted": True}
    assert backend.names["http://w2"] == ["qwen"]
    for name in ("sql", "qwen"):  # gone, and a base is not an adapter
        gone = await call(backend, "/v1/unload_lora_adapter", {"lora_name": name})
        assert gone.status_code == 404
        assert gone.json()["error"]["code"] == "model_not_found"


async def test_a_refusal_on_one_worker_leaves_the_adapter_on_none():
    backend = AdminBackend({"http://w1": ["qwen"], "http://w2": ["qwen"]}, "http://w2")
    reply = await call(backend, "/v1/load_lora_adapter", LOAD)
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert error["message"] == "sql: bad rank" and error["param"] == "lora_path"
    assert backend.names == {"http://w1": ["qwen"], "http://w2": ["qwen"]}
    assert ("http://w1", "/unload_lora_adapter", "sql") in backend.calls


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        (LOAD, 400, "model"),  # two bases: which one?
        ({**LOAD, "model": "nope"}, 404, "model"),
        ({"lora_name": "sql"}, 400, "lora_path"),
        ({"lora_name": "", "lora_path": "/a"}, 400, "lora_name"),
    ],
)
async def test_bad_loads_are_refused_by_name(body, status, param):
    backend = AdminBackend({"http://w1": ["qwen"], "http://w2": ["other"]})
    reply = await call(backend, "/v1/load_lora_adapter", body)
    assert reply.status_code == status, reply.text
    assert reply.json()["error"]["param"] == param
    assert backend.calls == []


async def test_loading_needs_a_key():
    backend = AdminBackend({"http://w1": ["qwen"]})
    for key in (None, "sk-wrong"):
        reply = await call(backend, "/v1/load_lora_adapter", LOAD, key=key)
        assert reply.status_code == 401
        reply = await call(
            backend, "/v1/unload_lora_adapter", {"lora_name": "qwen"}, key=key
        )
        assert reply.status_code == 401
    assert backend.calls == []
