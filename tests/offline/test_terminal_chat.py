"""`qwen-vllm chat`: the loop over a fake, then the real CLI in a pty."""

from __future__ import annotations

import io
import sys
from pathlib import Path
from types import SimpleNamespace

import pexpect
import pytest

from qwen_vllm.offline.terminal_chat import (
    CLEAR_SCREEN,
    HELP,
    SETTINGS,
    WELCOME,
    TerminalChat,
)

# Qwen-7B-Chat's generation_config.json, in SamplingParams' names.
CHECKPOINT = {"top_p": 0.8, "top_k": 0, "repetition_penalty": 1.1, "max_tokens": 512}
VLLM_DEFAULTS = {
    "temperature": 1.0,
    "min_p": 0.0,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
}


class FakeChat:
    def __init__(self) -> None:
        self.calls: list[tuple[str, list, str]] = []
        self.sampling: list[dict] = []

    def chat_stream(self, query, history, system, **sampling):
        self.calls.append((query, list(history), system))
        self.sampling.append(sampling)
        yield from ("Hel", "lo", "!")

    def sampling_params(self, **overrides):
        values = {**VLLM_DEFAULTS, **CHECKPOINT, **overrides}
        if values["temperature"] < 0:
            raise ValueError(
                f"temperature must be non-negative, got {values['temperature']}."
            )
        return SimpleNamespace(**values)


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def run(lines: str, out: io.StringIO | None = None, **options):
    fake = FakeChat()
    out = out or io.StringIO()
    loop = TerminalChat(fake, stdin=io.StringIO(lines), stdout=out, **options)
    loop.run()
    return out.getvalue(), fake, loop


def test_streams_keeps_history_and_obeys_commands():
    text, fake, loop = run("hi\nagain\n:system Be brief.\nthird\n:clh\nfourth\n:exit\n")
    assert text.count("Qwen> Hello!") == 4
    assert fake.calls[1] == (
        "again",
        [("hi", "Hello!")],
        "You are a helpful assistant.",
    )
    # :system sets the prompt and starts over.
    assert fake.calls[2] == ("third", [], "Be brief.")
    assert "system prompt set to 'Be brief.'" in text
    assert fake.calls[3][1] == []  # after :clh
    assert "[conversation cleared: 1 turn forgotten]" in text


def test_help_lists_every_command_of_cli_demo():
    text, fake, _ = run(":h\n:help\n")
    assert text.count(HELP) == 2
    for name in (":help", ":h", ":exit", ":quit", ":q", ":clear", ":cl"):
        assert name in HELP
    for name in (":clear-his", ":clh", ":history", ":his", ":seed", ":conf"):
        assert name in HELP
    assert ":reset-conf" in HELP and ":system" in HELP
    assert fake.calls == []


@pytest.mark.parametrize("command", [":exit", ":quit", ":q", ":  q  "])
def test_every_exit_alias_leaves_at_once(command):
    _, fake, _ = run(f"hi\n{command}\nnever read\n")
    assert [call[0] for call in fake.calls] == ["hi"]


@pytest.mark.parametrize("command", [":clear-his", ":clh", ":clear-history"])
def test_clearing_the_history(command):
    text, fake, loop = run(f"hi\nagain\n{command}\nthird\n")
    assert "[conversation cleared: 2 turns forgotten]" in text
    assert fake.calls[2] == ("third", [], "You are a helpful assistant.")
    assert loop.history == [("third", "Hello!")]


@pytest.mark.parametrize("command", [":clear", ":cl"])
def test_clear_wipes_a_terminal_screen_and_keeps_the_history(command):
    text, fake, _ = run(f"hi\n{command}\nagain\n", out=Terminal())
    before, cleared, after = text.partition(CLEAR_SCREEN)
    assert cleared and "Qwen> Hello!" in before
    assert after.startswith(WELCOME + "\n[1 turn kept; :clh forgets them]")
    assert fake.calls[1][1] == [("hi", "Hello!")]


def test_clear_writes_no_escape_codes_to_a_file_or_pipe():
    text, _, loop = run("hi\n:cl\n")
    assert "\x1b" not in text
    assert "[not a terminal: nothing to clear]" in text
    assert loop.history == [("hi", "Hello!")]


@pytest.mark.parametrize("command", [":history", ":his"])
def test_history_shows_the_turns(command):
    text, _, _ = run(f"{command}\nhi\nthere\n{command}\n")
    assert "[no conversation yet]" in text
    shown = text.split("[conversation: 2 turns]\n")[1]
    assert shown.startswith(
        "User[0]> hi\nQwen[0]> Hello!\nUser[1]> there\nQwen[1]> Hello!\n"
    )


def test_system_without_text_shows_the_prompt():
    text, _, loop = run("hi\n:system\n")
    assert "[system prompt: 'You are a helpful assistant.'; give text" in text
    assert loop.history  # only setting a prompt starts over


def test_unseeded_by_default_and_seed_commands_reach_the_sampling():
    text, fake, _ = run(
        "a\n:seed\n:seed 42\n:seed\nb\nc\n:seed x1\n:seed 4 2\n:seed -1\n"
        ":seed 4294967296\nd\n:seed none\ne\n:seed 4294967295\nf\n"
    )
    seeds = [sampling.get("seed") for sampling in fake.sampling]
    assert seeds == [None, 42, 42, 42, None, 2**32 - 1]
    assert "[no seed: answers vary" in text
    assert "[seed set to 42: every answer is sampled with it]" in text
    assert "[seed: 42]" in text
    assert "[seed not changed: 'x1' is not a whole number" in text
    assert "[seed not changed: '4 2' is not a whole number" in text
    assert "[seed not changed: a seed is from 0 to 4294967295, not -1;" in text
    assert "not 4294967296;" in text
    assert "[seed removed: answers vary]" in text


def test_a_seed_given_at_start_samples_every_answer():
    text, fake, _ = run("a\nb\n:seed\n", seed=1234, sampling={"max_tokens": 8})
    assert fake.sampling == [{"max_tokens": 8, "seed": 1234}] * 2
    assert "[seed: 1234]" in text


def test_conf_shows_the_checkpoint_defaults_under_the_flags():
    text, _, _ = run(":conf\n", sampling={"temperature": 0.3})
    shown = text.split("then :conf]\n")[1]
    assert shown.startswith(
        "  max_tokens = 512\n  temperature = 0.3\n  top_p = 0.8\n  top_k = 0\n"
        "  min_p = 0.0\n  repetition_penalty = 1.1\n"
    )
    assert set(SETTINGS) == {
        line.split(" = ")[0].strip() for line in shown.splitlines() if " = " in line
    }


def test_conf_changes_reach_the_sampling_and_reset_conf_restores_the_start():
    text, fake, _ = run(
        "a\n:conf temperature=0.5 max_new_tokens=20\nb\n:conf top_k=3\nc\n"
        ":reset-conf\nd\n",
        sampling={"max_tokens": 8},
        seed=5,
    )
    assert fake.sampling == [
        {"max_tokens": 8, "seed": 5},
        {"max_tokens": 20, "temperature": 0.5, "seed": 5},
        {"max_tokens": 20, "temperature": 0.5, "top_k": 3, "seed": 5},
        {"max_tokens": 8, "seed": 5},
    ]
    assert "[generation config changed: temperature=0.5, max_tokens=20]" in text
    assert "[generation config reset]\n" in text
    assert "  max_tokens = 8\n  temperature = 1.0\n" in text.split("reset]")[1]


def test_max_tokens_none_means_the_rest_of_the_context():
    text, _, _ = run(":conf\n", sampling={"max_tokens": None})
    assert "  max_tokens = None (the rest of the context)\n" in text


@pytest.mark.parametrize(
    ("pairs", "problem"),
    [
        ("do_sample=False", "unknown key 'do_sample' (temperature=0 samples"),
        ("top_p=0.5 seed=3", "unknown key 'seed' (:seed N sets it)"),
        ("topp=0.5", "unknown key 'topp'"),
        ("temperature", "'temperature' is not key=value (no spaces)"),
        ("temperature =0.5", "'temperature' is not key=value (no spaces)"),
        ("top_p=", "'top_p=' is not key=value"),
        ("=1", "'=1' is not key=value"),
        ("top_k=1.5", "top_k takes a whole number, not '1.5'"),
        ("max_new_tokens=lots", "max_new_tokens takes a whole number, not 'lots'"),
        ("temperature=warm", "temperature takes a number, not 'warm'"),
        ("top_p=nan", "top_p takes a number, not 'nan'"),
        ("temperature=-1", "temperature must be non-negative, got -1.0"),
    ],
)
def test_bad_conf_names_the_problem_and_the_keys_and_changes_nothing(pairs, problem):
    text, fake, _ = run(f":conf {pairs}\nhi\n")
    message = text.split("User> ")[1]
    assert message.startswith(f"[generation config not changed: {problem}")
    assert "; keys: " in message
    assert "max_tokens (or max_new_tokens), temperature, top_p, top_k" in message
    assert fake.sampling == [{}]


def test_unknown_command_and_end_of_input():
    text, fake, _ = run(":nope\n:\n")
    assert "unknown command ':nope'; :h lists the commands" in text
    assert "unknown command ':'" in text
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


def test_conf_checks_values_with_vllms_sampling_params():
    from qwen_vllm.model.generation_defaults import GenerationDefaults
    from qwen_vllm.offline.qwen_chat import QwenChat

    # QwenChat's sampling, without its engine.
    chat = QwenChat.__new__(QwenChat)
    chat.defaults = GenerationDefaults(
        {"top_p": 0.8, "top_k": 0, "repetition_penalty": 1.1}, 512
    )
    out = io.StringIO()
    lines = ":conf\n:conf top_p=1.5\n:conf temperature=-2\n:conf top_p=0.5\n"
    TerminalChat(chat, stdin=io.StringIO(lines), stdout=out).run()
    text = out.getvalue()
    assert "  max_tokens = 512\n" in text and "  top_p = 0.8\n" in text
    assert "[generation config not changed: top_p must be in (0, 1]" in text
    assert (
        "[generation config not changed: temperature must be non-negative, "
        "got -2.0; keys: "
    ) in text
    assert "[generation config changed: top_p=0.5]" in text


def test_the_chat_command_hands_its_flags_and_seed_to_the_loop(monkeypatch, capsys):
    import qwen_vllm.offline.qwen_chat as qwen_chat
    import qwen_vllm.offline.terminal_chat as terminal_chat
    from qwen_vllm.cli import main

    class Engineless(FakeChat):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__()

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return None

    loops: list[TerminalChat] = []

    class Recorded(TerminalChat):
        def run(self) -> None:
            loops.append(self)

    monkeypatch.setattr(qwen_chat, "QwenChat", Engineless)
    monkeypatch.setattr(terminal_chat, "TerminalChat", Recorded)
    assert main(["chat", "--verbose", "--seed", "7", "--temperature", "0.3"]) == 0
    assert main(["chat", "--verbose", "--max-tokens", "9"]) == 0
    assert (loops[0].seed, loops[0].sampling) == (7, {"temperature": 0.3})
    assert (loops[1].seed, loops[1].sampling) == (None, {"max_tokens": 9})
    assert main(["chat", "--verbose", "--seed", "-5"]) == 2
    assert "a seed is from 0 to 4294967295, not -5" in capsys.readouterr().err
    assert len(loops) == 2


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
    args += ["--max-tokens", "8", "--max-model-len", "1024", "--seed", "3"]
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
        child.sendline(":seed")
        child.expect_exact("[seed: 3]")
        child.sendline(":conf top_p=0.5")
        child.expect_exact("[generation config changed: top_p=0.5]")
        child.sendline(":conf")
        child.expect_exact("  top_p = 0.5")
        child.sendline(":clh")
        child.expect_exact("[conversation cleared: 0 turns forgotten]")
        child.sendline(":exit")
        child.expect(pexpect.EOF, timeout=60)
    finally:
        child.close()
    assert child.exitstatus == 0
