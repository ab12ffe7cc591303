"""The worker's HTTP protocol and the vLLM adapter, over fakes (no engine)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import uvicorn
from pydantic import ValidationError

from qwen_vllm.serving import controller as controller_module
from qwen_vllm.serving.protocol import (
    ChatDefaults,
    GenerateChunk,
    GenerateParams,
    Usage,
    iter_stream_chunks,
)
from qwen_vllm.serving.security import INTERNAL_TOKEN_HEADER
from qwen_vllm.serving.settings import ControllerSettings, WorkerSettings
from qwen_vllm.serving.worker.app import create_app
from qwen_vllm.serving.worker.engine import VllmEngine, engine_args, read_adapters
from tests.conftest import free_port


class FakeEngine:
    context_length = 64
    chat_defaults = ChatDefaults(top_p=0.8, max_new_tokens=32)
    generation_defaults = "max_new_tokens=32, top_p=0.8"

    def __init__(self, words=("Hello", " world", "!")) -> None:
        self.words = words
        self.in_flight = 0
        self.closed = asyncio.Event()
        self.seen: list[GenerateParams] = []

    def queue_length(self) -> int:
        return self.in_flight

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    async def check_health(self) -> None:
        return None

    async def generate(self, params: GenerateParams):
        self.seen.append(params)
        self.in_flight += 1
        text = ""
        try:
            for i, word in enumerate(self.words):
                text += word
                last = i == len(self.words) - 1
                yield GenerateChunk(
                    text=text,
                    usage=Usage(prompt_tokens=3, completion_tokens=i + 1),
                    finish_reason="stop" if last else None,
                )
                await asyncio.sleep(0.01)
        finally:
            self.in_flight -= 1
            self.closed.set()


def settings(**overrides) -> WorkerSettings:
    return WorkerSettings.model_validate({"model_name": "qwen-test", **overrides})


@pytest.fixture
async def client():
    engine = FakeEngine()
    app = create_app(settings(), engine, register=False)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://worker"
        ) as http,
    ):
        yield http, engine


async def test_stream_is_nul_delimited_cumulative_text(client):
    http, engine = client
    reply = await http.post(
        "/worker_generate_stream",
        json={"messages": [{"role": "user", "content": "hi"}], "max_new_tokens": 3},
    )
    assert reply.status_code == 200
    raw = reply.content
    assert raw.endswith(b"\0") and raw.count(b"\0") == 3

    async def body():
        yield raw

    chunks = [c async for c in iter_stream_chunks(body())]
    assert [c["text"] for c in chunks] == ["Hello", "Hello world", "Hello world!"]
    assert chunks[-1]["finish_reason"] == "stop"
    assert engine.seen[0].messages[0].content == "hi"


async def test_non_streaming_returns_the_final_state(client):
    http, _ = client
    reply = await http.post("/worker_generate", json={"prompt": "x"})
    assert reply.json()["text"] == "Hello world!"
    assert reply.json()["error_code"] == 0


async def test_bad_params_get_an_error_chunk_not_a_crash(client):
    http, engine = client
    reply = await http.post("/worker_generate", json={"temperature": "hot"})
    body = reply.json()
    assert body["error_code"] == 40001 and "temperature" in body["text"]
    assert engine.seen == []


@pytest.mark.parametrize("seed", [2**64, -(2**63) - 1])
async def test_seeds_the_engine_cannot_carry_get_an_error_chunk(client, seed):
    http, engine = client
    reply = await http.post("/worker_generate", json={"prompt": "x", "seed": seed})
    body = reply.json()
    assert body["error_code"] == 40001 and "seed" in body["text"]
    assert engine.seen == []
    # The extremes that fit reach the engine.
    for edge in (2**64 - 1, -(2**63)):
        reply = await http.post("/worker_generate", json={"prompt": "x", "seed": edge})
        assert reply.json()["error_code"] == 0
    assert [params.seed for params in engine.seen] == [2**64 - 1, -(2**63)]


async def test_fastchat_endpoints(client):
    from fastchat.conversation import Conversation, SeparatorStyle

    http, _ = client
    conv = (await http.post("/worker_get_conv_template", json={})).json()["conv"]
    # FastChat's API server rebuilds a Conversation from exactly these fields.
    rebuilt = Conversation(
        name=conv["name"],
        system_template=conv["system_template"],
        system_message=conv["system_message"],
        roles=conv["roles"],
        messages=list(conv["messages"]),
        offset=conv["offset"],
        sep_style=SeparatorStyle(conv["sep_style"]),
        sep=conv["sep"],
        sep2=conv["sep2"],
        stop_str=conv["stop_str"],
        stop_token_ids=conv["stop_token_ids"],
    )
    assert rebuilt.name == "qwen-7b-chat"
    assert set(rebuilt.stop_token_ids) == {151643, 151644, 151645}
    details = (await http.post("/model_details", json={"model": "qwen-test"})).json()
    assert details["context_length"] == FakeEngine.context_length
    assert details["chat_defaults"] == {
        "temperature": 1.0,
        "top_p": 0.8,
        "max_new_tokens": 32,
    }
    assert details["generation_defaults"] == "max_new_tokens=32, top_p=0.8"
    count = (await http.post("/count_token", json={"prompt": "a b c"})).json()
    assert count == {"count": 3, "error_code": 0}
    status = (await http.post("/worker_get_status", json={})).json()
    assert status == {"model_names": ["qwen-test"], "speed": 1, "queue_length": 0}


async def test_internal_token_guards_everything_but_health():
    app = create_app(settings(internal_token="s3cret"), FakeEngine(), register=False)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://w"
        ) as http,
    ):
        assert (await http.post("/worker_get_status", json={})).status_code == 401
        for route in ("/load_lora_adapter", "/unload_lora_adapter"):
            body = {"lora_name": "x", "lora_path": "/etc"}
            assert (await http.post(route, json=body)).status_code == 401
        wrong = {INTERNAL_TOKEN_HEADER: "nope"}
        assert (
            await http.post("/worker_generate", json={}, headers=wrong)
        ).status_code == 401
        right = {INTERNAL_TOKEN_HEADER: "s3cret"}
        assert (
            await http.post("/worker_get_status", json={}, headers=right)
        ).status_code == 200
        assert (await http.get("/health")).status_code == 200


def _serve(app, port):
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    return server, thread


def test_model_names_are_the_first_and_its_aliases():
    named = settings(model_name="Qwen-7B-Chat,Qwen,gpt-3.5-turbo")
    assert named.served_model_names() == ["Qwen-7B-Chat", "Qwen", "gpt-3.5-turbo"]
    assert named.served_model_name() == "Qwen-7B-Chat"
    args = engine_args(named, Path("/models/Qwen-7B-Chat"))
    assert args["served_model_name"] == ["Qwen-7B-Chat", "Qwen", "gpt-3.5-turbo"]
    unnamed = WorkerSettings.model_validate({"model": "/m/Qwen-1_8B"})
    assert unnamed.served_model_names() == ["Qwen-1_8B"]
    with pytest.raises(ValidationError, match="names must differ"):
        settings(model_name="Qwen,Qwen")


def test_registers_heartbeats_and_unregisters_with_the_real_controller():
    controller_port, worker_port = free_port(), free_port()
    controller = controller_module.create_app(
        ControllerSettings(controller_port=controller_port)
    )
    c_server, c_thread = _serve(controller, controller_port)
    # Aliases as Qwen's own clients need them: they ask for "Qwen".
    worker_settings = settings(
        model_name="qwen-test, Qwen,gpt-3.5-turbo",
        controller_port=controller_port,
        worker_port=worker_port,
        heartbeat_interval=0.2,
    )
    w_server, w_thread = _serve(create_app(worker_settings, FakeEngine()), worker_port)
    base = f"http://127.0.0.1:{controller_port}"
    try:
        deadline = time.monotonic() + 10
        while "qwen-test" not in httpx.post(f"{base}/list_models").json()["models"]:
            assert time.monotonic() < deadline, "worker never registered"
            time.sleep(0.1)
        models = httpx.post(f"{base}/list_models").json()["models"]
        assert sorted(models) == ["Qwen", "gpt-3.5-turbo", "qwen-test"]
        for name in models:
            address = httpx.post(f"{base}/get_worker_address", json={"model": name})
            assert address.json()["address"] == f"http://127.0.0.1:{worker_port}"
        # A stream through the controller reaches this worker.
        with httpx.stream(
            "POST", f"{base}/worker_generate_stream", json={"model": "qwen-test"}
        ) as reply:
            data = b"".join(reply.iter_raw())
        assert json.loads(data.split(b"\0")[-2])["text"] == "Hello world!"
    finally:
        w_server.should_exit = True
        w_thread.join(10)
    # Shutting down unregisters at once (no waiting for the health probes).
    assert httpx.post(f"{base}/list_models").json()["models"] == []
    c_server.should_exit = True
    c_thread.join(10)


# --- the vLLM adapter, over a fake AsyncLLM ---------------------------------


class FakeTokenizer:
    """One token per character, its id the code point; `raw` ids are bytes."""

    def __init__(self, raw: dict[int, bytes] | None = None) -> None:
        self.raw = raw or {}

    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text]

    def encode_plain(self, text):
        return [ord(c) for c in text]

    def decode_tokens_bytes(self, ids):
        return [self.raw.get(i) or chr(i).encode() for i in ids]

    def decode(self, ids):
        return b"".join(self.decode_tokens_bytes(ids)).decode(errors="replace")


class FakeModelConfig:
    """vLLM's ModelConfig as GenerationDefaults reads it."""

    def __init__(self, context, generation):
        self.max_model_len = context
        self.generation = generation

    def try_get_generation_config(self):
        return dict(self.generation)

    def get_diff_sampling_param(self):
        names = ("temperature", "top_p", "top_k", "repetition_penalty")
        sampling = {n: self.generation[n] for n in names if n in self.generation}
        if "max_new_tokens" in self.generation:
            sampling["max_tokens"] = self.generation["max_new_tokens"]
        return sampling


class FakeLLM:
    def __init__(self, context=200, generation=None):
        self.model_config = FakeModelConfig(context, generation or {})
        self.aborted: list[str] = []
        self.requests = []
        self.lora_requests = []

    def get_tokenizer(self):
        return FakeTokenizer()

    async def check_health(self):
        return None

    async def abort(self, request_id):
        self.aborted.append(request_id)

    async def generate(self, prompt, sampling, request_id, lora_request=None):
        self.requests.append((prompt, sampling))
        self.lora_requests.append(lora_request)
        for n in range(1, 50):
            completion = SimpleNamespace(
                text="x" * n,
                token_ids=list(range(n)),
                finish_reason=None,
                logprobs=None,
            )
            yield SimpleNamespace(outputs=[completion], finished=False)
            await asyncio.sleep(0)


async def test_adapter_stops_on_chatml_ids_and_aborts_on_close():
    llm = FakeLLM()
    engine = VllmEngine(llm)
    params = GenerateParams(
        messages=[{"role": "user", "content": "hi"}],
        max_new_tokens=40,
        stop_token_ids=[7],
        request_id="r1",
    )
    stream = engine.generate(params)
    first = await anext(stream)
    assert first.text == "x" and engine.queue_length() == 1
    await stream.aclose()
    assert engine.queue_length() == 0
    assert llm.aborted == ["r1"]
    prompt, sampling = llm.requests[0]
    assert {151643, 151644, 151645, 7} <= set(sampling.stop_token_ids)
    # ChatML ids: <|im_start|> opens the system turn.
    assert prompt["prompt_token_ids"][0] == 151644


async def test_unset_fields_take_the_models_generation_defaults():
    generation = {"top_p": 0.8, "top_k": 3, "max_new_tokens": 7, "max_window_size": 9}
    llm = FakeLLM(generation=generation)
    engine = VllmEngine(llm)
    history = [
        {"role": "user", "content": "a long old question"},
        {"role": "assistant", "content": "a long old answer"},
    ]
    unset = GenerateParams(messages=[*history, {"role": "user", "content": "hi"}])
    own = unset.model_copy(update={"top_p": 0.3, "top_k": -1, "max_new_tokens": 2})
    whole = unset.model_copy(update={"max_window_size": 10_000})
    for params in (unset, own, whole):
        [c async for c in engine.generate(params)]
    (prompt, defaults), (_, chosen), (whole_prompt, _) = llm.requests
    assert (defaults.top_p, defaults.top_k, defaults.max_tokens) == (0.8, 3, 7)
    assert (defaults.temperature, defaults.repetition_penalty) == (1.0, 1.0)
    assert (chosen.top_p, chosen.top_k, chosen.max_tokens) == (0.3, 0, 2)
    assert engine.chat_defaults == ChatDefaults(top_p=0.8, max_new_tokens=7)
    # The model's max_window_size (9 tokens) drops the earlier turn.
    ids, all_ids = prompt["prompt_token_ids"], whole_prompt["prompt_token_ids"]
    assert len(ids) < len(all_ids) and ids[-10:] == all_ids[-10:]


async def test_max_length_counts_the_prompt():
    llm = FakeLLM(context=200)
    engine = VllmEngine(llm)
    prompt = "y" * 25  # 25 tokens for the fake tokenizer
    [c async for c in engine.generate(GenerateParams(prompt=prompt, max_length=40))]
    (_, sampling) = llm.requests[0]
    assert sampling.max_tokens == 40 - 25
    for too_short_or_long in (25, 201):
        params = GenerateParams(prompt=prompt, max_length=too_short_or_long)
        (chunk,) = [c async for c in engine.generate(params)]
        assert chunk.error_code == 40302
        assert f"max_length ({too_short_or_long}) counts the prompt" in chunk.text
        assert "more than 25 and at most the context length of 200" in chunk.text


async def test_adapter_reports_context_errors_as_fastchat_error_codes():
    engine = VllmEngine(FakeLLM(context=20))
    too_long = GenerateParams(prompt="y" * 25)
    (chunk,) = [c async for c in engine.generate(too_long)]
    assert chunk.error_code == 40303 and "maximum context length is 20" in chunk.text
    too_many = GenerateParams(prompt="y" * 5, max_new_tokens=30)
    (chunk,) = [c async for c in engine.generate(too_many)]
    assert chunk.error_code == 40302 and "max_tokens can be at most 15" in chunk.text
    bad = GenerateParams(prompt="y", temperature=-1.0)
    (chunk,) = [c async for c in engine.generate(bad)]
    assert chunk.error_code == 40302 and "temperature" in chunk.text


class ScriptedLLM(FakeLLM):
    """Yields the given request outputs, then stops."""

    def __init__(self, outputs, tokenizer):
        super().__init__()
        self.outputs = outputs
        self.tokenizer = tokenizer

    def get_tokenizer(self):
        return self.tokenizer

    async def generate(self, prompt, sampling, request_id, lora_request=None):
        self.requests.append((prompt, sampling))
        self.lora_requests.append(lora_request)
        for output in self.outputs:
            yield output


def position(*candidates):
    """vLLM's logprobs of one position: {id: Logprob}, ranked as listed."""
    from vllm.logprobs import Logprob

    return {
        token_id: Logprob(logprob, rank, text)
        for rank, (token_id, text, logprob) in enumerate(candidates, start=1)
    }


async def test_adapter_echoes_prompt_logprobs_and_keeps_every_candidate():
    # The prompt "hi", then "é" as its two UTF-8 bytes: the first (id 1000)
    # decodes to "" like the runner-up (id 1001, the first byte of "€").
    tokenizer = FakeTokenizer({1000: b"\xc3", 1001: b"\xe2", 1002: b"\xa9"})
    first_byte = position((1000, "", -0.1), (1001, "", -2.5))
    prompt = [None, position((ord("i"), "i", -1.0), (ord("!"), "!", -2.0))]
    outputs = [
        SimpleNamespace(
            prompt_token_ids=[ord("h"), ord("i")],
            prompt_logprobs=prompt,
            outputs=[
                SimpleNamespace(
                    text=text,
                    token_ids=ids,
                    logprobs=logprobs,
                    finish_reason="stop" if last else None,
                )
            ],
            finished=last,
        )
        for text, ids, logprobs, last in [
            ("", [1000], [first_byte], False),
            ("é", [1000, 1002], [first_byte, position((1002, "é", -0.05))], True),
        ]
    ]
    llm = ScriptedLLM(outputs, tokenizer)
    params = GenerateParams(prompt="hi", echo=True, logprobs=1)
    first, last = [chunk async for chunk in VllmEngine(llm).generate(params)]
    _, sampling = llm.requests[0]
    assert (sampling.logprobs, sampling.prompt_logprobs) == (1, 1)
    assert last.text == "hié"
    logprobs = last.logprobs
    assert logprobs.tokens == ["h", "i", "", "é"]
    assert logprobs.token_logprobs == [None, -1.0, -0.1, -0.05]
    assert logprobs.text_offset == [0, 1, 2, 2]
    # FastChat's shape, for its clients: one key per text.
    assert logprobs.top_logprobs == [
        None,
        {"i": -1.0, "!": -2.0},
        {"": -0.1},
        {"é": -0.05},
    ]
    assert logprobs.token_bytes == [[ord("h")], [ord("i")], [0xC3], [0xA9]]
    assert [
        [(c.token, c.logprob, bytes(c.bytes)) for c in top or []]
        for top in logprobs.candidates
    ] == [
        [],
        [("i", -1.0, b"i"), ("!", -2.0, b"!")],
        [("", -0.1, b"\xc3"), ("", -2.5, b"\xe2")],
        [("é", -0.05, b"\xa9")],
    ]
    assert logprobs.candidates[0] is None
    assert first.logprobs.tokens == ["h", "i", ""]  # not changed by later ones
    # FastChat's API server reads the chunk's logprobs as its LogProbs model.
    from fastchat.protocol.openai_api_protocol import LogProbs

    sent = json.loads(last.encode().rstrip(b"\0"))["logprobs"]
    fastchat = LogProbs(**sent)
    assert fastchat.tokens == logprobs.tokens
    assert fastchat.top_logprobs == logprobs.top_logprobs


async def test_adapter_without_echo_asks_for_no_prompt_logprobs():
    llm = FakeLLM()
    engine = VllmEngine(llm)
    for params in (
        GenerateParams(prompt="hi", logprobs=2),
        GenerateParams(prompt="hi", echo=True),
        GenerateParams(messages=[{"role": "user", "content": "hi"}], echo=True),
    ):
        stream = engine.generate(params)
        chunk = await anext(stream)
        await stream.aclose()
        _, sampling = llm.requests[-1]
        assert sampling.prompt_logprobs is None
        assert chunk.text == ("hix" if params.echo and params.prompt else "x")


def test_lora_adapters_are_engine_args_model_names_and_per_request(tmp_path):
    from tests.checkpoints.test_adapters import write_adapter_dir

    sql = write_adapter_dir(tmp_path / "sql", r=8)
    chat = write_adapter_dir(tmp_path / "chat", r=12)
    with_lora = settings(lora=f"sql={sql},chat={chat}")
    assert with_lora.lora_paths() == {"sql": str(sql), "chat": str(chat)}
    adapters = read_adapters(with_lora)
    args = engine_args(with_lora, Path("/models/Qwen-7B-Chat"), adapters)
    assert (args["enable_lora"], args["max_loras"], args["max_lora_rank"]) == (
        True,
        2,
        16,
    )
    assert "enable_lora" not in engine_args(settings(), Path("/m"))

    llm = FakeLLM()
    engine = VllmEngine(llm, adapters)

    async def ask(model):
        params = GenerateParams(prompt="hi", model=model, max_new_tokens=1)
        async for _ in engine.generate(params):
            pass

    for model in ("chat", "qwen-test", None, "sql"):
        asyncio.run(ask(model))
    names = [None if r is None else r.lora_name for r in llm.lora_requests]
    assert names == ["chat", None, None, "sql"]
    paths = {r.lora_name: r.lora_path for r in llm.lora_requests if r is not None}
    assert paths == {"chat": str(chat), "sql": str(sql)}
    assert len({r.lora_int_id for r in llm.lora_requests if r is not None}) == 2


def test_lora_names_are_checked_at_start():
    with pytest.raises(ValidationError, match="is not NAME=PATH"):
        settings(lora="sql")
    with pytest.raises(ValidationError, match="adapter names must differ"):
        settings(lora="a=/x,a=/y")
    with pytest.raises(ValidationError, match="also a name of the model"):
        settings(lora="qwen-test=/x")
    from_yaml = WorkerSettings.model_validate({"lora": {"sql": "/a", "chat": "/b"}})
    assert from_yaml.lora_paths() == {"sql": "/a", "chat": "/b"}


class AdapterEngine(FakeEngine):
    """A FakeEngine that keeps the adapters it is asked to load."""

    def __init__(self) -> None:
        super().__init__()
        self.adapters: dict[str, str] = {}
        self.unloaded: list[str] = []

    async def load_adapter(self, name: str, path: str) -> None:
        from qwen_vllm.checkpoints.adapters import AdapterRefused

        if not Path(path).is_dir():
            raise AdapterRefused(f"LoRA adapter {name!r} ({path}): no such directory")
        self.adapters[name] = path

    async def unload_adapter(self, name: str) -> None:
        self.adapters.pop(name, None)
        self.unloaded.append(name)


async def test_adapters_load_and_unload_at_run_time_and_change_the_names(tmp_path):
    engine = AdapterEngine()
    app = create_app(settings(lora=f"sql={tmp_path}"), engine, register=False)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://worker"
        ) as http,
    ):

        async def names():
            return (await http.post("/worker_get_status", json={})).json()[
                "model_names"
            ]

        async def ask(model):
            body = {"prompt": "x", "model": model}
            return (await http.post("/worker_generate", json=body)).json()

        assert await names() == ["qwen-test", "sql"]
        missing = {"lora_name": "chat", "lora_path": str(tmp_path / "gone")}
        reply = await http.post("/load_lora_adapter", json=missing)
        assert reply.status_code == 400 and "no such directory" in reply.json()["error"]
        assert (await ask("chat"))["error_code"] == 40301  # never the base instead

        body = {"lora_name": "chat", "lora_path": str(tmp_path)}
        reply = await http.post("/load_lora_adapter", json=body)
        assert reply.status_code == 200, reply.text
        assert await names() == ["qwen-test", "sql", "chat"]
        assert (await ask("chat"))["text"] == "Hello world!"
        details = (await http.post("/model_details", json={"model": "chat"})).json()
        assert details["parent"] == "qwen-test"
        for taken in ("chat", "qwen-test"):
            again = await http.post(
                "/load_lora_adapter", json={"lora_name": taken, "lora_path": "/x"}
            )
            assert again.status_code == 400 and "already served" in again.text
        assert (
            await http.post("/load_lora_adapter", json={"lora_name": "x"})
        ).status_code == 400

        assert (
            await http.post("/unload_lora_adapter", json={"lora_name": "sql"})
        ).status_code == 200
        assert await names() == ["qwen-test", "chat"] and engine.unloaded == ["sql"]
        for unknown in ("sql", "qwen-test"):
            gone = await http.post("/unload_lora_adapter", json={"lora_name": unknown})
            assert gone.status_code == 404
        assert (await ask("sql"))["error_code"] == 40301


class LoraLLM(FakeLLM):
    """A FakeLLM with LoRA on, as vLLM's AsyncLLM reports and changes it."""

    def __init__(self, max_lora_rank=16):
        super().__init__()
        lora_config = SimpleNamespace(max_lora_rank=max_lora_rank)
        self.vllm_config = SimpleNamespace(lora_config=lora_config)
        self.added: list = []
        self.removed: list[int] = []

    async def add_lora(self, request):
        if request.lora_path.endswith("broken"):
            raise RuntimeError("size mismatch for lora_a")
        self.added.append(request)
        return True

    async def remove_lora(self, lora_id):
        self.removed.append(lora_id)
        return True


async def test_engine_loads_adapters_with_new_ids_and_unloads_after_their_requests(
    tmp_path,
):
    from qwen_vllm.checkpoints.adapters import AdapterRefused
    from tests.checkpoints.test_adapters import write_adapter_dir

    sql = write_adapter_dir(tmp_path / "sql", r=8)
    chat = write_adapter_dir(tmp_path / "chat", r=16)
    big = write_adapter_dir(tmp_path / "big", r=32)
    broken = write_adapter_dir(tmp_path / "broken", r=8)
    llm = LoraLLM(max_lora_rank=16)
    engine = VllmEngine(llm, read_adapters(settings(lora=f"sql={sql}")))

    with pytest.raises(AdapterRefused, match=r"rank 32, more than.*--max-lora-rank 16"):
        await engine.load_adapter("big", str(big))
    with pytest.raises(AdapterRefused, match=r"vLLM cannot load it: size mismatch"):
        await engine.load_adapter("broken", str(broken))
    await engine.load_adapter("chat", str(chat))
    with pytest.raises(AdapterRefused, match="already loaded"):
        await engine.load_adapter("chat", str(chat))
    assert [r.lora_name for r in llm.added] == ["chat"]
    ids = {name: r.lora_int_id for name, r in engine.lora_requests.items()}
    assert len(set(ids.values())) == 2

    # An unload waits for the adapter's streams, not for the base's.
    stream = engine.generate(
        GenerateParams(prompt="hi", model="chat", max_new_tokens=9)
    )
    await anext(stream)
    base = engine.generate(GenerateParams(prompt="hi", max_new_tokens=9))
    await anext(base)
    unload = asyncio.create_task(engine.unload_adapter("chat"))
    while "chat" in engine.lora_requests:  # out of routing at once
        await asyncio.sleep(0)
    for _ in range(20):
        await asyncio.sleep(0)
    assert not unload.done() and llm.removed == []
    await stream.aclose()
    await unload
    assert llm.removed == [ids["chat"]]
    await base.aclose()
    await engine.load_adapter("chat", str(chat))
    assert engine.lora_requests["chat"].lora_int_id not in ids.values()

    without = VllmEngine(FakeLLM())
    with pytest.raises(AdapterRefused, match="without LoRA: start it with --max-loras"):
        await without.load_adapter("chat", str(chat))


def test_max_loras_enables_lora_for_adapters_loaded_later():
    args = engine_args(settings(max_loras=4), Path("/m"))
    assert (args["enable_lora"], args["max_loras"], args["max_lora_rank"]) == (
        True,
        4,
        16,
    )
    args = engine_args(settings(max_loras=2, max_lora_rank=64), Path("/m"))
    assert args["max_lora_rank"] == 64
    from qwen_vllm.checkpoints.adapters import AdapterRefused

    with pytest.raises(AdapterRefused, match="add --lora NAME=PATH or --max-loras"):
        engine_args(settings(max_lora_rank=64), Path("/m"))
