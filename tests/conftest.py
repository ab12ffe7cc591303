"""Fixtures shared by the whole suite: demo checkpoints and engine settings."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from qwen_vllm.checkpoints.demo import DemoModelSpec, write_demo_model

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


_handed_out: set[int] = set()


# generation_config.json of the Qwen-7B-Chat release.
REAL_GENERATION_CONFIG = {
    "chat_format": "chatml",
    "eos_token_id": 151643,
    "pad_token_id": 151643,
    "max_window_size": 6144,
    "max_new_tokens": 512,
    "do_sample": True,
    "top_k": 0,
    "top_p": 0.8,
    "repetition_penalty": 1.1,
    "transformers_version": "4.31.0",
}


def free_port() -> int:
    """A loopback port free now and not handed out before in this session
    (the kernel may offer a just-closed port again)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _handed_out and port + 1 not in _handed_out:
            _handed_out.update((port, port + 1))
            return port


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    """The default embedded demo model, exactly as `qwen-vllm serve` uses it."""
    return write_demo_model(tmp_path_factory.mktemp("models") / "qwen-v1-demo")


@pytest.fixture(scope="session")
def wide_dir(tmp_path_factory) -> Path:
    return write_demo_model(tmp_path_factory.mktemp("models") / "wide", WIDE_SPEC)


class Stack:
    """A running `qwen-vllm serve` deployment on loopback ports."""

    def __init__(
        self,
        model_dir: Path,
        log: Path,
        num_workers: int = 2,
        *,
        aliases: tuple[str, ...] = (),
        api_key: str | None = "sk-test-key",
        flags: tuple[str, ...] = (),
    ) -> None:
        self.model_dir = model_dir
        self.flags = flags
        self.num_workers = num_workers
        self.model = model_dir.name
        self.model_names = [self.model, *aliases]
        self.api_key = api_key
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
            str(self.num_workers),
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
            "--heartbeat-interval",
            "2",
            # FastChat's own servers (tests/serving) call the controller and
            # the workers, and send no internal token.
            "--insecure-no-internal-token",
            *(["--api-key", self.api_key] if self.api_key else []),
            *(
                ["--model-name", ",".join(self.model_names)]
                if len(self.model_names) > 1
                else []
            ),
            *self.flags,
        ]

    def workers(self) -> list[dict]:
        import httpx

        return httpx.get(f"{self.controller}/workers", timeout=5).json()["workers"]

    def worker_urls(self) -> list[str]:
        return [
            f"http://127.0.0.1:{self.worker_port + i}" for i in range(self.num_workers)
        ]


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


# ---------------------------------------------------------------- skip policy
# Every skip is recorded (in setup or call, skipif, importorskip, a module
# skipped while collected); at the end of the session, skips that
# tests/allowed_skips.toml does not allow are listed and fail the run, so a CI
# run cannot pass with a silently smaller suite.

import dataclasses  # noqa: E402
import fnmatch  # noqa: E402
import tomllib  # noqa: E402

ALLOWED_SKIPS = "tests/allowed_skips.toml"  # relative to the pytest rootdir
_MATCHERS = ("marker", "node", "reason")
_allowed_key = pytest.StashKey[list[dict]]()
_skipped_key = pytest.StashKey[list["Skip"]]()


@dataclasses.dataclass(frozen=True)
class Skip:
    nodeid: str
    reason: str
    markers: frozenset[str] = frozenset()


def load_allowed_skips(path: Path) -> list[dict]:
    if not path.is_file():
        raise pytest.UsageError(f"{path}: the list of allowed skips is missing")
    entries = tomllib.loads(path.read_text()).get("allow", [])
    for number, entry in enumerate(entries, 1):
        unknown = set(entry) - {*_MATCHERS, "why"}
        if unknown or not entry.get("why") or not set(entry) & set(_MATCHERS):
            raise pytest.UsageError(
                f"{path}: allow entry {number} needs a `why` and at least one of "
                f"{', '.join(_MATCHERS)}, and nothing else: {entry}"
            )
    return entries


def is_allowed(skip: Skip, entries: list[dict]) -> bool:
    """An entry allows a skip when every matcher it gives matches."""
    return any(
        ("marker" not in entry or entry["marker"] in skip.markers)
        and ("node" not in entry or fnmatch.fnmatchcase(skip.nodeid, entry["node"]))
        and ("reason" not in entry or entry["reason"] == skip.reason)
        for entry in entries
    )


def _skip_reason(report: pytest.CollectReport | pytest.TestReport) -> str:
    longrepr = report.longrepr
    message = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    return message.removeprefix("Skipped: ")


def _unexpected_skips(config: pytest.Config) -> list[Skip]:
    allowed = config.stash[_allowed_key]
    return [s for s in config.stash[_skipped_key] if not is_allowed(s, allowed)]


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_allowed_key] = load_allowed_skips(config.rootpath / ALLOWED_SKIPS)
    config.stash[_skipped_key] = []


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = yield
    if report.skipped and not hasattr(report, "wasxfail"):
        markers = frozenset(mark.name for mark in item.iter_markers())
        skip = Skip(report.nodeid, _skip_reason(report), markers)
        item.config.stash[_skipped_key].append(skip)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector: pytest.Collector):
    report = yield
    if report.skipped:
        skip = Skip(report.nodeid, _skip_reason(report))
        collector.config.stash[_skipped_key].append(skip)
    return report


def pytest_sessionfinish(session: pytest.Session) -> None:
    passing = (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED)
    if session.exitstatus in passing and _unexpected_skips(session.config):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    unexpected = _unexpected_skips(config)
    if not unexpected:
        return
    terminalreporter.section(
        f"skipped, and not allowed by {ALLOWED_SKIPS}", red=True, bold=True
    )
    for skip in unexpected:
        terminalreporter.line(f"SKIPPED {skip.nodeid}: {skip.reason}")
    terminalreporter.line(
        f"{len(unexpected)} skip(s) not on the allow-list fail this run: install "
        f"what they need, or allow them in {ALLOWED_SKIPS}, saying why."
    )
