"""`qwen-vllm chat`: an interactive terminal chat that streams tokens.

The commands are those of `cli_demo.py` in Qwen's repository, with the same
names and short forms, plus `:system`, so its users need not learn new keys.
Two differences: `:conf` takes vLLM's sampling names (Qwen's `max_new_tokens`
is understood too) and checks the values before using them, and an unknown
`:word` is reported instead of being sent to the model.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from typing import Any, TextIO

from qwen_vllm.chat.chatml import DEFAULT_SYSTEM

WELCOME = "Chat with Qwen: type a message and press Enter; :h lists the commands."
HELP = """\
commands:
  :help, :h                  this list
  :exit, :quit, :q           leave (Ctrl-D too; Ctrl-C stops an answer)
  :clear, :cl                clear the screen (the conversation is kept)
  :clear-his, :clh           forget the conversation
  :history, :his             show the conversation
  :system [text]             show or set the system prompt (forgets the conversation)
  :seed [N | none]           show or set the seed every answer is sampled with
  :conf [key=value ...]      show or change the generation config
  :reset-conf                back to the generation config the chat started with"""

# What `:conf key=value` may change: SamplingParams fields and their types.
SETTINGS: dict[str, type] = {
    "max_tokens": int,
    "temperature": float,
    "top_p": float,
    "top_k": int,
    "min_p": float,
    "repetition_penalty": float,
    "presence_penalty": float,
    "frequency_penalty": float,
}
# Qwen's (HF generation_config) names for the same settings.
HF_NAMES = {"max_new_tokens": "max_tokens"}
# Keys cli_demo's users may try that are set another way here.
HINTS = {"seed": ":seed N sets it", "do_sample": "temperature=0 samples greedily"}
# cli_demo's seeds (HF's set_seed takes no others); torch's generator, which
# vLLM seeds per request, would fail in the engine on some.
MAX_SEED = 2**32 - 1
# Cursor home, clear the screen and its scrollback, as `clear` does.
CLEAR_SCREEN = "\x1b[H\x1b[2J\x1b[3J"


class TerminalChat:
    """The read-eval-print loop, over anything with QwenChat's chat_stream and
    sampling_params.

    `sampling` (the command-line flags over the checkpoint's defaults) is the
    generation config the chat starts with and `:reset-conf` returns to. With a
    seed, every answer is sampled with it, as cli_demo reseeds before each
    answer: the same conversation and question give the same answer. Without
    one (our default; cli_demo's is 1234) answers vary, as from the server.
    """

    def __init__(
        self,
        chat: Any,
        *,
        system: str = DEFAULT_SYSTEM,
        sampling: dict[str, Any] | None = None,
        seed: int | None = None,
        stdin: TextIO = sys.stdin,
        stdout: TextIO = sys.stdout,
    ) -> None:
        self.chat = chat
        self.system = system
        self.initial_sampling = dict(sampling or {})
        self.sampling = dict(self.initial_sampling)
        self.seed = seed
        self.history: list[tuple[str, str]] = []
        self.stdin = stdin
        self.out = stdout
        self.commands: dict[str, Callable[[str], bool | None]] = {
            **dict.fromkeys(("help", "h"), self.show_help),
            **dict.fromkeys(("exit", "quit", "q"), self.leave),
            **dict.fromkeys(("clear", "cl"), self.clear_screen),
            # "clear-history" is not cli_demo's, but the name people guess.
            **dict.fromkeys(("clear-his", "clh", "clear-history"), self.forget),
            **dict.fromkeys(("history", "his"), self.show_history),
            "system": self.set_system,
            "seed": self.set_seed,
            "conf": self.configure,
            "reset-conf": self.reset_conf,
        }

    def say(self, text: str = "", end: str = "\n") -> None:
        self.out.write(text + end)
        self.out.flush()

    def run(self) -> None:
        self.say(WELCOME)
        while True:
            self.say("User> ", end="")
            line = self.stdin.readline()
            if not line:  # end of input (Ctrl-D)
                self.say()
                return
            query = line.rstrip("\n")
            if not query.strip():
                continue
            if query.startswith(":"):
                if not self.command(query):
                    return
                continue
            self.answer(query)

    def command(self, line: str) -> bool:
        """Run a :command; False means leave the chat."""
        words = line[1:].split(maxsplit=1)
        name = words[0] if words else ""
        arg = words[1].strip() if len(words) > 1 else ""
        action = self.commands.get(name)
        if action is None:
            self.say(f"[unknown command ':{name}'; :h lists the commands]")
            return True
        return action(arg) is not False

    def leave(self, _arg: str) -> bool:
        return False

    def show_help(self, _arg: str) -> None:
        self.say(HELP)

    def clear_screen(self, _arg: str) -> None:
        # Escape codes would only garble a file or a pipe.
        if not self.out.isatty():
            self.say("[not a terminal: nothing to clear]")
            return
        self.out.write(CLEAR_SCREEN)
        self.say(WELCOME)
        if self.history:
            self.say(f"[{turns(len(self.history))} kept; :clh forgets them]")

    def forget(self, _arg: str) -> None:
        self.say(f"[conversation cleared: {turns(len(self.history))} forgotten]")
        self.history.clear()

    def show_history(self, _arg: str) -> None:
        if not self.history:
            self.say("[no conversation yet]")
            return
        self.say(f"[conversation: {turns(len(self.history))}]")
        for index, (query, response) in enumerate(self.history):
            self.say(f"User[{index}]> {query}")
            self.say(f"Qwen[{index}]> {response}")

    def set_system(self, text: str) -> None:
        if not text:
            self.say(f"[system prompt: {self.system!r}; give text to change it]")
            return
        self.system = text
        self.history.clear()
        self.say(f"[system prompt set to {self.system!r}; conversation cleared]")

    def set_seed(self, arg: str) -> None:
        if not arg:
            if self.seed is None:
                self.say("[no seed: answers vary; :seed N makes them repeatable]")
            else:
                self.say(f"[seed: {self.seed}]")
            return
        if arg.lower() == "none":
            self.seed = None
            self.say("[seed removed: answers vary]")
            return
        try:
            seed = int(arg)
        except ValueError:
            problem: str | None = f"{arg!r} is not a whole number"
        else:
            problem = seed_problem(seed)
        if problem:
            self.say(
                f"[seed not changed: {problem}; "
                "give :seed N, or :seed none for unseeded answers]"
            )
            return
        self.seed = seed
        self.say(f"[seed set to {seed}: every answer is sampled with it]")

    def configure(self, arg: str) -> None:
        if not arg:
            self.show_conf()
            return
        changes: dict[str, Any] = {}
        for pair in arg.split():
            key, equals, text = pair.partition("=")
            name = HF_NAMES.get(key, key)
            if not equals or not key or not text:
                return self.conf_error(f"{pair!r} is not key=value (no spaces)")
            if name not in SETTINGS:
                hint = f" ({HINTS[key]})" if key in HINTS else ""
                return self.conf_error(f"unknown key {key!r}{hint}")
            value = parse_setting(name, text)
            if value is None:
                kind = "a whole number" if SETTINGS[name] is int else "a number"
                return self.conf_error(f"{key} takes {kind}, not {text!r}")
            changes[name] = value
        try:  # the engine's own checks; their error types vary by version
            self.chat.sampling_params(**{**self.sampling, **changes})
        except Exception as exc:
            # vLLM's message alone, without the parameter and value it appends
            message = str(exc.args[0] if exc.args else exc)
            return self.conf_error(message.rstrip("."))
        self.sampling.update(changes)
        shown = ", ".join(f"{name}={value}" for name, value in changes.items())
        self.say(f"[generation config changed: {shown}]")

    def conf_error(self, problem: str) -> None:
        keys = ", ".join(SETTINGS).replace(
            "max_tokens", "max_tokens (or max_new_tokens)"
        )
        self.say(
            f"[generation config not changed: {problem}; "
            f"keys: {keys}; e.g. :conf temperature=0.7 top_p=0.9]"
        )

    def show_conf(self) -> None:
        params = self.chat.sampling_params(**self.sampling)
        self.say(
            "[generation config: the checkpoint's generation_config.json, "
            "then the command line, then :conf]"
        )
        for name in SETTINGS:
            value = getattr(params, name)
            if name == "max_tokens" and value is None:
                value = "None (the rest of the context)"
            self.say(f"  {name} = {value}")

    def reset_conf(self, _arg: str) -> None:
        self.sampling = dict(self.initial_sampling)
        self.say("[generation config reset]")
        self.show_conf()

    def answer(self, query: str) -> None:
        sampling = dict(self.sampling)
        if self.seed is not None:
            sampling["seed"] = self.seed
        self.say("Qwen> ", end="")
        response = ""
        try:
            for delta in self.chat.chat_stream(
                query, self.history, self.system, **sampling
            ):
                response += delta
                self.say(delta, end="")
        except KeyboardInterrupt:
            self.say(" [stopped]", end="")
        except Exception as exc:  # e.g. a prompt longer than the context
            self.say(f"[error: {exc}]")
            return
        self.say()
        self.history.append((query, response))


def seed_problem(seed: int) -> str | None:
    """Why `seed` cannot be used, or None."""
    if 0 <= seed <= MAX_SEED:
        return None
    return f"a seed is from 0 to {MAX_SEED}, not {seed}"


def turns(count: int) -> str:
    return f"{count} turn" if count == 1 else f"{count} turns"


def parse_setting(name: str, text: str) -> int | float | None:
    """`text` as the type of setting `name`; None if it is not one."""
    try:
        value = SETTINGS[name](text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None
