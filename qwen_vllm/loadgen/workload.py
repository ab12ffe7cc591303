"""What the load generator sends: a seeded sequence of requests and the run's
configuration.

Prompt and output lengths are drawn from a seeded distribution, so two
servers measured with the same seed see the same sequence of requests.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Endpoint = Literal["chat", "completions"]

# Common English words: in Qwen's BPE each, with its leading space, is one
# token, so a prompt of n words is about n tokens on every server.
_WORD_TEXT = (
    "the of and to in is was for on that with as by at from his her they be "
    "this which have or one had not but what all were when we there can an "
    "your more if has will so no time would other into its then two like "
    "about these many some could see first been people water day long made "
    "over did down only way find use may new work part take get place live "
    "back give most very after thing our just name good great through where "
    "much before line right too mean old any same tell boy follow came want "
    "show also around form three small set put end does another well large "
    "must big even such because turn here why ask went men read need land "
    "different home us move try kind hand picture again change off play "
    "spell air away animal house point page letter mother answer found study "
    "still learn should world high every near add food between own below "
    "country plant last school father keep tree never start city earth eye "
    "light thought head under story saw left few while along might close "
    "something seem next hard open example begin life always those both paper "
    "together got group often run important until children side feet car mile "
    "night walk white sea began grow took river four carry state once book hear"
)
_WORDS = _WORD_TEXT.split()


@dataclass(frozen=True)
class LengthRange:
    """Token counts drawn log-uniformly from [low, high]: short ones dominate,
    as in real traffic, while long ones still occur."""

    low: int
    high: int

    @classmethod
    def parse(cls, text: str) -> LengthRange:
        low, _, high = text.partition("-")
        try:
            result = cls(int(low), int(high or low))
        except ValueError:
            raise ValueError(f"expected N or LOW-HIGH, got {text!r}") from None
        if not 1 <= result.low <= result.high:
            raise ValueError(f"need 1 <= LOW <= HIGH, got {text!r}")
        return result

    def draw(self, rng: random.Random) -> int:
        if self.low == self.high:
            return self.low
        value = math.exp(rng.uniform(math.log(self.low), math.log(self.high + 1)))
        return min(self.high, max(self.low, int(value)))

    def __str__(self) -> str:
        return f"{self.low}-{self.high}"


@dataclass(frozen=True)
class RequestSpec:
    index: int
    prompt: str
    prompt_words: int
    max_tokens: int


def request_specs(
    count: int, prompt: LengthRange, output: LengthRange, seed: int
) -> list[RequestSpec]:
    """The request sequence of one seed (the same for every server measured)."""
    rng = random.Random(seed)
    specs = []
    for index in range(count):
        words = prompt.draw(rng)
        text = " ".join(rng.choice(_WORDS) for _ in range(words))
        specs.append(RequestSpec(index, text, words, output.draw(rng)))
    return specs


@dataclass
class LoadConfig:
    base_url: str  # the API root, e.g. http://127.0.0.1:8000/v1
    model: str
    api_key: str | None = None
    endpoint: Endpoint = "chat"
    concurrency: int = 8
    num_requests: int = 100
    max_duration: float = 600.0  # no request starts after this many seconds
    prompt_tokens: LengthRange = field(default_factory=lambda: LengthRange(16, 256))
    output_tokens: LengthRange = field(default_factory=lambda: LengthRange(16, 128))
    seed: int = 0
    temperature: float = 0.0
    request_timeout: float = 300.0  # whole request, first byte to [DONE]
    stall_timeout: float = 60.0  # longest silence inside a stream
    connect_timeout: float = 5.0
    error_backoff: float = 0.1  # a client's pause after a failed request
    extra_body: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["prompt_tokens"] = str(self.prompt_tokens)
        data["output_tokens"] = str(self.output_tokens)
        data.pop("api_key")
        return data
