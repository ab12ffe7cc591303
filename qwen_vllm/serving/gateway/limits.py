"""API keys, request-body size, per-key rate and concurrency limits.

Both are plain ASGI middleware: they answer before any route runs, and the
access middleware holds a key's concurrency slot until the response,
streamed or not, has been sent completely.
"""

from __future__ import annotations

import hmac
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pydantic import SecretStr
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from qwen_vllm.serving.gateway.errors import APIError

ANONYMOUS = "anonymous"
# Paths reachable without a key.
OPEN_PATHS = frozenset({("GET", "/health")})
# Paths that count against the per-key rate and concurrency limits.
LIMITED_PREFIX = "/v1/"
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


class ApiKeys:
    """Bearer-token check; keys are identified by position, never by value."""

    def __init__(self, keys: Sequence[SecretStr]) -> None:
        self._keys = [key.get_secret_value().encode() for key in keys]

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def identify(self, authorization: str | None) -> str | None:
        """The key's label, ANONYMOUS when no keys are set, None when refused."""
        if not self._keys:
            return ANONYMOUS
        scheme, _, token = (authorization or "").partition(" ")
        given = token.strip().encode() if scheme.lower() == "bearer" else b""
        found = None
        # Compare with every key, so the time taken tells nothing about which.
        for index, key in enumerate(self._keys):
            if hmac.compare_digest(given, key) and given:
                found = f"key-{index}"
        return found


@dataclass
class TokenBucket:
    rate: float
    capacity: float
    tokens: float
    updated: float

    def take(self, now: float) -> float:
        """0 if a token was taken, else the seconds until one is available."""
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


class KeyLimits:
    """Token-bucket rate and in-flight count per key."""

    def __init__(
        self,
        rate: float,
        burst: int,
        max_concurrent: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._rate = rate
        self._burst = burst
        self._max_concurrent = max_concurrent
        self._clock = clock
        self._buckets: dict[str, TokenBucket] = {}
        self._in_flight: dict[str, int] = {}

    def acquire(self, key: str) -> APIError | None:
        if self._in_flight.get(key, 0) >= self._max_concurrent:
            return APIError(
                429,
                f"Too many concurrent requests for this API key (limit "
                f"{self._max_concurrent}).",
                code="concurrency_limit_exceeded",
                headers={"Retry-After": "1"},
            )
        now = self._clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = TokenBucket(
                self._rate, self._burst, self._burst, now
            )
        wait = bucket.take(now)
        if wait > 0:
            return APIError(
                429,
                f"Rate limit exceeded for this API key ({self._rate:g} requests/s, "
                f"bursts of {self._burst}).",
                code="rate_limit_exceeded",
                headers={"Retry-After": str(max(1, math.ceil(wait)))},
            )
        self._in_flight[key] = self._in_flight.get(key, 0) + 1
        return None

    def release(self, key: str) -> None:
        left = self._in_flight.get(key, 0) - 1
        if left > 0:
            self._in_flight[key] = left
        else:
            self._in_flight.pop(key, None)


class AccessMiddleware:
    """401 without a valid key (except OPEN_PATHS), 429 over a key's limits."""

    def __init__(self, app: ASGIApp, keys: ApiKeys, limits: KeyLimits) -> None:
        self.app = app
        self.keys = keys
        self.limits = limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path, method = scope["path"], scope["method"]
        if (method, path) in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        key = self.keys.identify(Headers(scope=scope).get("authorization"))
        if key is None:
            refusal = APIError(
                401,
                "Invalid or missing API key: send 'Authorization: Bearer <key>'.",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
            await refusal.response()(scope, receive, send)
            return
        if not path.startswith(LIMITED_PREFIX):
            await self.app(scope, receive, send)
            return
        refusal = self.limits.acquire(key)
        if refusal is not None:
            await refusal.response()(scope, receive, send)
            return
        try:
            await self.app(scope, receive, send)
        finally:
            self.limits.release(key)


class BodySizeLimitMiddleware:
    """413 for bodies over the limit, declared or chunked, before any parsing.

    The body is read here (at most max_bytes) and replayed to the app; later
    receive() calls (disconnect notices) go to the server as usual.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in _BODY_METHODS:
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length")
        if declared and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(scope, receive, send)
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        refusal = APIError(
            413,
            f"The request body is larger than {self.max_bytes} bytes.",
            code="request_too_large",
        )
        await refusal.response()(scope, receive, send)
