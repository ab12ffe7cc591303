"""Fixtures shared by the whole suite: demo checkpoints and engine settings."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

# Small KV cache on CPU; set before any vLLM engine process is spawned.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from qwen_vllm.model.demo import DemoModelSpec, write_demo_model  # noqa: E402

# A second architecture beside the default demo: partial rotary, more layers
# and heads, GPT-2 style config names, stored in three safetensors shards.
WIDE_SPEC = DemoModelSpec(
    hidden_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    kv_channels=32,
    intermediate_size=384,
    rotary_pct=0.5,
    rotary_emb_base=20000.0,
    seq_length=1024,
    max_position_embeddings=1024,
    dtype="float32",
    seed=7,
    num_shards=3,
    gpt2_style_config=True,
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    """The default embedded demo model, exactly as `qwen-vllm serve` uses it."""
    return write_demo_model(tmp_path_factory.mktemp("models") / "qwen-v1-demo")


@pytest.fixture(scope="session")
def wide_dir(tmp_path_factory) -> Path:
    return write_demo_model(tmp_path_factory.mktemp("models") / "wide", WIDE_SPEC)


class Stack:
    """A running `qwen-vllm serve` deployment on loopback ports."""

    api_key = "sk-test-key"

    def __init__(self, model_dir: Path, log: Path) -> None:
        self.model_dir = model_dir
        self.model = model_dir.name
        self.log = log
        self.port = free_port()
        self.controller_port = free_port()
        self.webui_port = free_port()
        self.worker_port = free_port()
        self.gateway = f"http://127.0.0.1:{self.port}"
        self.controller = f"http://127.0.0.1:{self.controller_port}"
        self.webui = f"http://127.0.0.1:{self.webui_port}"

    def command(self) -> list[str]:
        from tests.servers import venv_bin

        return [
            venv_bin("qwen-vllm"),
            "serve",
            "--model",
            str(self.model_dir),
            "--num-workers",
            "2",
            "--enforce-eager",
            "--max-model-len",
            "2048",
            "--port",
            str(self.port),
            "--controller-port",
            str(self.controller_port),
            "--worker-port",
            str(self.worker_port),
            "--webui-port",
            str(self.webui_port),
            "--api-key",
            self.api_key,
            "--heartbeat-interval",
            "2",
        ]

    def workers(self) -> list[dict]:
        import httpx

        return httpx.get(f"{self.controller}/workers", timeout=5).json()["workers"]

    def worker_urls(self) -> list[str]:
        return [f"http://127.0.0.1:{self.worker_port + i}" for i in range(2)]


@pytest.fixture(scope="session")
def stack(demo_dir, tmp_path_factory):
    """One `qwen-vllm serve` with two workers, shared by the stack tests."""
    import time

    import httpx

    from tests.servers import running

    deployment = Stack(demo_dir, tmp_path_factory.mktemp("logs") / "serve.log")
    with running(
        deployment.command(), f"{deployment.gateway}/health", log=deployment.log
    ):
        deadline = time.monotonic() + 300
        while sum(w["healthy"] for w in deployment.workers()) < 2:
            if time.monotonic() > deadline:
                raise TimeoutError(deployment.log.read_text()[-3000:])
            time.sleep(1)
        headers = {"Authorization": f"Bearer {deployment.api_key}"}
        models = httpx.get(f"{deployment.gateway}/v1/models", headers=headers)
        assert [m["id"] for m in models.json()["data"]] == [deployment.model]
        yield deployment
