"""`qwen-vllm chat`: an interactive terminal chat that streams tokens."""

from __future__ import annotations

import sys
from typing import Any, TextIO

from qwen_vllm.chat.chatml import DEFAULT_SYSTEM

HELP = "commands: :clear (forget the conversation), :system <text>, :help, :exit"


class TerminalChat:
    """The read-eval-print loop, over anything with QwenChat's chat_stream."""

    def __init__(
        self,
        chat: Any,
        *,
        system: str = DEFAULT_SYSTEM,
        sampling: dict[str, Any] | None = None,
        stdin: TextIO = sys.stdin,
        stdout: TextIO = sys.stdout,
    ) -> None:
        self.chat = chat
        self.system = system
        self.sampling = sampling or {}
        self.history: list[tuple[str, str]] = []
        self.stdin = stdin
        self.out = stdout

    def say(self, text: str = "", end: str = "\n") -> None:
        self.out.write(text + end)
        self.out.flush()

    def run(self) -> None:
        self.say(HELP)
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
        name, _, arg = line.partition(" ")
        if name in (":exit", ":quit", ":q"):
            return False
        if name == ":clear":
            self.history.clear()
            self.say("[conversation cleared]")
        elif name == ":system":
            if not arg.strip():
                self.say(f"[system prompt: {self.system!r}; give text to change it]")
            else:
                self.system = arg.strip()
                self.history.clear()
                self.say(
                    f"[system prompt set to {self.system!r}; conversation cleared]"
                )
        elif name == ":help":
            self.say(HELP)
        else:
            self.say(f"[unknown command {name!r}; {HELP}]")
        return True

    def answer(self, query: str) -> None:
        self.say("Qwen> ", end="")
        response = ""
        try:
            for delta in self.chat.chat_stream(
                query, self.history, self.system, **self.sampling
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
