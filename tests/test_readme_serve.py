"""The README's first command, run exactly as a new user runs it.

No flags, default ports, an environment with nothing set for qwen_vllm, vLLM,
Ray or Hugging Face, and a fresh home (the demo checkpoint is generated):
the official `openai` client gets an answer, plain and streamed; then Ctrl-C
stops everything and leaves no process behind. (`.ci/run` has run the install
part, `bash install.sh --dev`, which installs what `bash install.sh` does and
the test tools.)
"""

from __future__ import annotations

import re
import socket
import time
from pathlib import Path

import pytest

from tests.processes import (
    ProcessTracker,
    clean_env,
    cleanup,
    start_in_session,
    stop_and_check,
    wait_for_output,
)

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PORTS = {"gateway": 8000, "web UI": 7860, "controller": 21001, "worker": 21002}
READY_TIMEOUT_S = 900.0


def readme_first_command() -> tuple[str, str]:
    """(install part, serve part) of the README's first command."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text, re.S)
    assert block, "README.md has no bash block"
    first = block.group(1).splitlines()[0].split("#", 1)[0].strip()
    install, serve = (part.strip() for part in first.split("&&"))
    return install, serve


def test_readme_names_the_install_script():
    install, serve = readme_first_command()
    assert install == "bash install.sh"
    assert serve == ".venv/bin/qwen-vllm serve"


@pytest.mark.timeout(READY_TIMEOUT_S + 120)
def test_readme_serve_command_answers_and_stops_clean(tmp_path):
    import openai

    for what, port in DEFAULT_PORTS.items():
        with socket.socket() as sock:
            busy = sock.connect_ex(("127.0.0.1", port)) == 0
        assert not busy, f"default {what} port {port} is taken: stop what holds it"
    _, serve = readme_first_command()
    home = tmp_path / "home"
    home.mkdir()
    log = tmp_path / "serve.log"
    started = time.monotonic()
    proc = start_in_session(["bash", "-c", serve], log, clean_env(home), cwd=ROOT)
    tracker = ProcessTracker(proc.pid)
    try:
        wait_for_output(proc, log, "serving; press Ctrl-C to stop", READY_TIMEOUT_S)
        tracker.scan()
        client = openai.OpenAI(
            base_url="http://127.0.0.1:8000/v1", api_key="none", max_retries=0
        )
        models = [m.id for m in client.models.list().data]
        assert models == ["qwen-v1-demo"]
        reply = client.chat.completions.create(
            model="qwen-v1-demo",
            messages=[{"role": "user", "content": "你好"}],
            max_tokens=16,
        )
        first_answer_s = time.monotonic() - started
        assert reply.choices[0].message.role == "assistant"
        assert reply.choices[0].message.content
        assert reply.choices[0].finish_reason in ("stop", "length")
        assert 1 <= reply.usage.completion_tokens <= 16
        deltas = [
            chunk.choices[0].delta.content or ""
            for chunk in client.chat.completions.create(
                model="qwen-v1-demo",
                messages=[{"role": "user", "content": "Tell me a story."}],
                max_tokens=16,
                stream=True,
            )
            if chunk.choices
        ]
        assert len(deltas) >= 2 and "".join(deltas)
        assert (
            home / ".cache" / "qwen_vllm" / "qwen-v1-demo" / "config.json"
        ).is_file()
        code, stop_s = stop_and_check(proc, tracker, log)
        print(
            f"\nfirst answer {first_answer_s:.0f} s after the command; "
            f"{len(tracker.seen)} processes started; stopped in {stop_s:.1f} s"
        )
        assert code == 0, log.read_text(errors="replace")[-3000:]
    finally:
        cleanup(proc, tracker)
