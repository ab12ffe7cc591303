"""Drive the qwen_vllm web UI in a real headless Chromium (Playwright, sync API).

Nothing here knows about fakes: point ChatPage at any base URL, e.g. the web
UI that `qwen-vllm serve` started::

    with chromium_context() as context:
        blocked = keep_on_loopback(context)
        chat = ChatPage.open(context, "http://127.0.0.1:7860/", password="...")
        chat.select_model(chat.model_choices()[0])
        chat.send("你好")
        print(chat.wait_for_answer(lambda text: len(text) > 0))

Every wait is bounded (`timeout` seconds).
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

from playwright.sync_api import BrowserContext, Page, Route, sync_playwright

CHROMIUM = "/usr/bin/chromium"
# The skip reason where it is missing: the exact install command, which
# `bash install.sh --dev` runs as root.
CHROMIUM_MISSING = (
    "needs Debian's chromium: apt-get install -y chromium fonts-wqy-microhei "
    "(as root; `bash install.sh --dev` runs it)"
)
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")
POLL = 0.05


@contextlib.contextmanager
def chromium_context(
    user_data_dir: Path | None = None, *, timeout: float = 30.0
) -> Iterator[BrowserContext]:
    """A headless Debian Chromium with a fresh profile (never a download)."""
    with contextlib.ExitStack() as stack:
        if user_data_dir is None:
            user_data_dir = Path(
                stack.enter_context(tempfile.TemporaryDirectory(prefix="chromium-"))
            )
        playwright = stack.enter_context(sync_playwright())
        context = playwright.chromium.launch_persistent_context(
            str(user_data_dir),
            executable_path=CHROMIUM,
            args=CHROMIUM_ARGS,
            headless=True,
            viewport={"width": 1280, "height": 900},
            timeout=timeout * 1000,
        )
        context.set_default_timeout(timeout * 1000)
        try:
            yield context
        finally:
            context.close()


def keep_on_loopback(context: BrowserContext) -> list[str]:
    """Abort every request leaving 127.0.0.1; returns the list of those URLs."""
    blocked: list[str] = []

    def route(route: Route) -> None:
        url = route.request.url
        host = urlsplit(url).hostname or ""
        if url.startswith(("data:", "blob:")) or host in LOOPBACK_HOSTS:
            route.continue_()
        else:
            blocked.append(url)
            route.abort()

    context.route("**/*", route)
    return blocked


def wait_until(
    condition: Callable[[], bool], timeout: float, what: str, poll: float = POLL
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(poll)


class ChatPage:
    """One browser tab on the web UI."""

    # The elem_ids of qwen_vllm.serving.webui.ui.ELEMENT_IDS, spelled out so
    # this module works against a UI served by another process or version.
    MODEL = "#model input"
    REFRESH = "#refresh-models"
    STATUS = "#status"
    CHATBOT = "#chatbot"
    MESSAGE = "#message textarea"
    SEND = "#send"
    STOP = "#stop"
    REGENERATE = "#regenerate"
    CLEAR = "#clear"
    SYSTEM = "#system-prompt textarea"
    MAX_TOKENS = "#max-tokens input[type=number]"
    TEMPERATURE = "#temperature input[type=number]"
    TOP_P = "#top-p input[type=number]"

    def __init__(self, page: Page, base_url: str, timeout: float = 30.0) -> None:
        self.page = page
        self.base_url = base_url if base_url.endswith("/") else base_url + "/"
        self.timeout = timeout

    @classmethod
    def open(
        cls,
        context: BrowserContext,
        base_url: str,
        *,
        password: str | None = None,
        user: str = "qwen",
        timeout: float = 30.0,
    ) -> ChatPage:
        chat = cls(context.new_page(), base_url, timeout)
        chat.page.goto(chat.base_url, timeout=timeout * 1000)
        if password is not None:
            chat.login(user, password)
        chat.wait_ready()
        return chat

    # Page state

    def login_form_visible(self) -> bool:
        return self.page.locator("input[type=password]").count() > 0

    def wait_for_login_form(self) -> None:
        self.page.locator("input[type=password]").wait_for(state="visible")

    def login(self, user: str, password: str) -> None:
        self.wait_for_login_form()
        self.page.locator("input[data-testid=textbox]").first.fill(user)
        self.page.locator("input[type=password]").fill(password)
        self.page.get_by_role("button", name="Login").click()

    def wait_ready(self) -> None:
        """The chat is shown and the model list was loaded (page-load event):
        a model is selected or the status line tells why not."""
        self.page.locator(self.MESSAGE).wait_for(state="visible")
        wait_until(
            lambda: bool(self.selected_model() or self.status()),
            self.timeout,
            "the model list to load",
        )

    def status(self) -> str:
        """The status line's text (not its progress timer)."""
        return (
            self.page.locator(f"{self.STATUS} [data-testid=markdown]")
            .inner_text()
            .strip()
        )

    # Model picker

    def selected_model(self) -> str:
        return self.page.locator(self.MODEL).input_value()

    def _open_model_list(self) -> None:
        field = self.page.locator(self.MODEL)
        field.blur()  # a click on the focused field does not reopen the list
        field.click()
        self.page.locator("ul[role=listbox]").wait_for(state="visible")

    def model_choices(self) -> list[str]:
        self._open_model_list()
        options = self.page.locator("ul[role=listbox] [role=option]")
        names = [
            (option.get_attribute("aria-label") or option.inner_text()).strip()
            for option in options.all()
        ]
        self.page.keyboard.press("Escape")
        return names

    def select_model(self, name: str) -> None:
        self._open_model_list()
        option = f"ul[role=listbox] [role=option][aria-label='{name}']"
        self.page.locator(option).click()
        wait_until(
            lambda: self.selected_model() == name, self.timeout, f"model {name!r}"
        )

    def refresh_models(self) -> None:
        self.page.locator(self.REFRESH).click()

    # Settings

    def set_system_prompt(self, text: str) -> None:
        self.page.locator(self.SYSTEM).fill(text)

    def sampling_settings(self) -> tuple[float, float, int]:
        """Temperature, top p and max tokens as the page shows them."""
        values = [
            self.page.locator(selector).input_value()
            for selector in (self.TEMPERATURE, self.TOP_P, self.MAX_TOKENS)
        ]
        return float(values[0]), float(values[1]), int(float(values[2]))

    def set_max_tokens(self, value: int) -> None:
        field = self.page.locator(self.MAX_TOKENS)
        field.fill(str(value))
        field.press("Enter")

    # Conversation

    def send(self, text: str) -> None:
        """Send a message and wait until the chat shows it."""
        before = len(self.user_messages())
        self.page.locator(self.MESSAGE).fill(text)
        self.page.locator(self.SEND).click()
        wait_until(
            lambda: len(self.user_messages()) > before,
            self.timeout,
            "the message to appear in the chat",
        )

    def stop(self) -> None:
        self.page.locator(self.STOP).click()

    def clear(self) -> None:
        self.page.locator(self.CLEAR).click()

    def regenerate(self) -> None:
        self.page.locator(self.REGENERATE).click()

    def messages(self) -> list[tuple[str, str]]:
        """(role, text) of every message shown, in order; role is user or bot."""
        return self.page.locator(
            f"{self.CHATBOT} [data-testid=user], {self.CHATBOT} [data-testid=bot]"
        ).evaluate_all("els => els.map(e => [e.dataset.testid, e.innerText])")

    def user_messages(self) -> list[str]:
        return [text for role, text in self.messages() if role == "user"]

    def answers(self) -> list[str]:
        return [text for role, text in self.messages() if role == "bot"]

    def current_answer(self) -> str:
        """The answer to the latest message ('' while none is shown)."""
        messages = self.messages()
        if messages and messages[-1][0] == "bot":
            return messages[-1][1]
        return ""

    def is_generating(self) -> bool:
        tracker = self.page.locator(
            f"{self.CHATBOT} [data-testid=status-tracker]"
        ).first
        return "hide" not in (tracker.get_attribute("class") or "").split()

    def wait_for_answer(
        self, done: Callable[[str], bool], timeout: float | None = None
    ) -> str:
        """The answer to the latest message once `done(text)` holds."""
        seen: list[str] = []

        def check() -> bool:
            seen[:] = [self.current_answer()]
            return done(seen[0])

        wait_until(check, timeout or self.timeout, "the answer")
        return seen[0]

    def record_answer_states(self) -> None:
        """From now on, record in the page every text the next answer shows.

        A MutationObserver sees each streamed update however fast it comes,
        where polling from here can miss a short stream entirely. Read the
        record with `recorded_answer_states()`.
        """
        self.page.evaluate(
            """(selector) => {
                const chatbot = document.querySelector(selector);
                const bots = () => chatbot.querySelectorAll('[data-testid=bot]');
                const shownBefore = bots().length;
                const states = (window.__answerStates = []);
                new MutationObserver(() => {
                    const all = bots();
                    if (all.length <= shownBefore) return;
                    const text = all[all.length - 1].innerText;
                    if (states[states.length - 1] !== text) states.push(text);
                }).observe(chatbot, {
                    subtree: true, childList: true, characterData: true,
                });
            }""",
            self.CHATBOT,
        )

    def recorded_answer_states(self) -> list[str]:
        return self.page.evaluate("window.__answerStates || []")

    def watch_answer(
        self, until: Callable[[str], bool], timeout: float | None = None
    ) -> list[str]:
        """Every distinct state of the current answer seen until `until(text)`."""
        states: list[str] = []

        def check() -> bool:
            text = self.current_answer()
            if not states or states[-1] != text:
                states.append(text)
            return until(text)

        wait_until(check, timeout or self.timeout, "the answer to complete")
        return states

    def wait_idle(self, timeout: float | None = None) -> None:
        wait_until(
            lambda: not self.is_generating(),
            timeout or self.timeout,
            "the generation to end",
        )

    def screenshot(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(path), full_page=True)
        return path


class FastChatPage(ChatPage):
    """FastChat's own gradio_web_server page (Gradio 5), for compatibility.

    Only what that page has: a model picker, the chat and a text box (sent
    with Enter). Its Chatbot shows a "▌" cursor while streaming.
    """

    MODEL = "#model_selector_row input"
    CHATBOT = "#chatbot"
    MESSAGE = "#input_box textarea"

    def wait_ready(self) -> None:
        self.page.locator(self.MESSAGE).wait_for(state="visible")
        wait_until(lambda: bool(self.selected_model()), self.timeout, "a model")

    def send(self, text: str) -> None:
        before = len(self.user_messages())
        self.page.locator(self.MESSAGE).fill(text)
        self.page.locator(self.MESSAGE).press("Enter")
        wait_until(
            lambda: len(self.user_messages()) > before,
            self.timeout,
            "the message to appear in the chat",
        )
