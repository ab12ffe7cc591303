"""`qwen-vllm chat`: the loop over a fake, then the real CLI in a pty."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pexpect
import pytest

from qwen_vllm.offline.terminal_chat import TerminalChat


class FakeChat:
    def __init__(self) -> None:
        self.calls: list[tuple[str, list, str]] = []

    def chat_stream(self, query, history, system, **sampling):
        self.calls.append((query, list(history), system))
        yield from ("Hel", "lo", "!")


def run(lines: str) -> tuple[str, FakeChat, TerminalChat]:
    fake = FakeChat()
    out = io.StringIO()
    loop = TerminalChat(fake, stdin=io.StringIO(lines), stdout=out)
    loop.run()
    return out.getvalue(), fake, loop


def test_streams_keeps_history_and_obeys_commands():
    text, fake, loop = run(
        "hi\nagain\n:system Be brief.\nthird\n:clear\nfourth\n:exit\n"
    )
    assert text.count("Qwen> Hello!") == 4
    assert fake.calls[1] == (
        "again",
        [("hi", "Hello!")],
        "You are a helpful assistant.",
    )
    # :system sets the prompt and starts over.
    assert fake.calls[2] == ("third", [], "Be brief.")
    assert "system prompt set to 'Be brief.'" in text
    assert fake.calls[3][1] == []  # after :clear
    assert "[conversation cleared]" in text


def test_unknown_command_and_end_of_input():
    text, fake, _ = run(":nope\n")
    assert "unknown command ':nope'" in text
    assert fake.calls == []


def test_engine_errors_are_shown_and_the_loop_goes_on():
    class Failing(FakeChat):
        def chat_stream(self, query, history, system, **sampling):
            raise ValueError("prompt is too long")
            yield  # pragma: no cover

    out = io.StringIO()
    loop = TerminalChat(Failing(), stdin=io.StringIO("a\nb\n"), stdout=out)
    loop.run()
    assert out.getvalue().count("[error: prompt is too long]") == 2


def test_a_missing_model_is_a_one_line_error(tmp_path, capsys):
    from qwen_vllm.cli import main

    assert main(["chat", "--model", str(tmp_path / "nope")]) == 2
    assert "no such directory" in capsys.readouterr().err
    assert main(["chat", "--model", str(tmp_path)]) == 2
    assert "no config.json there" in capsys.readouterr().err


@pytest.mark.slow
def test_real_cli_in_a_pty(demo_dir):
    cli = str(Path(sys.executable).with_name("qwen-vllm"))
    args = ["chat", "--model", str(demo_dir), "--enforce-eager"]
    args += ["--max-tokens", "8", "--max-model-len", "1024"]
    child = pexpect.spawn(
        cli,
        args,
        encoding="utf-8",
        timeout=240,
        env={
            "PATH": "/usr/bin:/bin",
            "HOME": str(Path.home()),
        },
    )
    try:
        child.expect_exact("User> ")
        child.sendline("你好")
        child.expect_exact("Qwen> ")
        child.expect_exact("User> ", timeout=60)
        answer = child.before.strip()
        assert answer
        child.sendline(":system Be brief.")
        child.expect_exact("system prompt set to 'Be brief.'")
        child.sendline(":clear")
        child.expect_exact("[conversation cleared]")
        child.sendline(":exit")
        child.expect(pexpect.EOF, timeout=60)
    finally:
        child.close()
    assert child.exitstatus == 0
