"""Who may call a service, and where others reach it.

One place for the deployment's internal token (the header that carries it,
the headers a client sends, the middleware a service checks it with, the
proof a worker gives that it knows it), for what a service bound beyond
loopback must have before it starts, and for turning a bind address into the
host a URL should name. Pure Python.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
import sys
from dataclasses import dataclass, field
from typing import Any

from pydantic import SecretStr
from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

# Header carrying the shared secret that guards controller and worker endpoints.
INTERNAL_TOKEN_HEADER = "X-Qwen-Vllm-Token"
# A random value the controller sends with a probe, and the worker's answer:
# HMAC-SHA256 of it under the token. Only a worker that knows the token can
# answer, so an address registered by an impostor never passes a probe.
CHALLENGE_HEADER = "X-Qwen-Vllm-Challenge"
PROOF_HEADER = "X-Qwen-Vllm-Proof"
# Bind addresses that mean "every interface": no URL can name them.
WILDCARD_HOSTS = ("0.0.0.0", "::")
# The opt-out of the internal token, as a flag and as a setting.
OPEN_FLAG = "--insecure-no-internal-token"


def new_secret() -> str:
    """A random secret for a deployment's internal token (256 bits)."""
    return secrets.token_urlsafe(32)


def is_loopback(host: str) -> bool:
    """True when only this machine can reach an address bound to host."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to any interface


def token_proof(token: str, challenge: str) -> str:
    """What a service that knows token answers to challenge."""
    return hmac.new(token.encode(), challenge.encode(), hashlib.sha256).hexdigest()


def proves_token(token: str, challenge: str, proof: str | None) -> bool:
    """True when proof is the answer to challenge under token."""
    return proof is not None and hmac.compare_digest(
        proof.encode(), token_proof(token, challenge).encode()
    )


def secret_value(secret: SecretStr | str | None) -> str | None:
    """The plain text of a secret setting (None or "" when unset)."""
    return secret.get_secret_value() if isinstance(secret, SecretStr) else secret


def token_headers(token: SecretStr | str | None) -> dict[str, str]:
    """The headers a caller sends to a service guarded by the internal token."""
    value = secret_value(token)
    return {INTERNAL_TOKEN_HEADER: value} if value else {}


def reachable_host(bind_host: str, node_ip: str = "127.0.0.1") -> str:
    """The host a URL names for a service bound to bind_host on node_ip."""
    return node_ip if bind_host in WILDCARD_HOSTS else bind_host


def error_response(status: int, kind: str, message: str) -> JSONResponse:
    """An OpenAI-style error body, as every service answers errors."""
    return JSONResponse(
        {"error": {"message": message, "type": kind, "code": status}},
        status_code=status,
    )


class InternalTokenMiddleware:
    """Requires the internal token on everything but GET /health.

    A middleware rather than a route dependency, so it also guards what no
    route covers: the schema and docs pages, and unknown paths (a 401, not a
    404 that maps the API).
    """

    def __init__(self, app: ASGIApp, token: str) -> None:
        self._app = app
        self._token = token.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not (
            scope["path"] == "/health" and scope["method"] in ("GET", "HEAD")
        ):
            headers = Headers(scope=scope)
            given = headers.get(INTERNAL_TOKEN_HEADER, "")
            if not hmac.compare_digest(given.encode(), self._token):
                response = error_response(
                    401,
                    "authentication_error",
                    f"missing or wrong {INTERNAL_TOKEN_HEADER} header",
                )
                await response(scope, receive, send)
                return
            challenge = headers.get(CHALLENGE_HEADER)
            if challenge is not None:
                send = self._answering(send, challenge)
        await self._app(scope, receive, send)

    def _answering(self, send: Send, challenge: str) -> Send:
        """send, with the proof of the token added to the response's headers."""
        proof = token_proof(self._token.decode(), challenge)

        async def send_with_proof(message: Any) -> None:
            if message["type"] == "http.response.start":
                message = {
                    **message,
                    "headers": [
                        *message.get("headers", []),
                        (PROOF_HEADER.lower().encode(), proof.encode()),
                    ],
                }
            await send(message)

        return send_with_proof


def guard(app: ASGIApp, token: SecretStr | str | None) -> None:
    """Add the internal-token check to a FastAPI/Starlette app when a token is set."""
    value = secret_value(token)
    if value:
        app.add_middleware(InternalTokenMiddleware, token=value)


@dataclass(frozen=True)
class Exposure:
    """What a service bound to its host lets others do: a refusal to start
    (what is wrong and how to fix it) or warnings to print."""

    refusal: str | None = None
    warnings: tuple[str, ...] = field(default=())

    def print_warnings(self) -> None:
        """On the terminal (stderr), where the user starting the service sees them."""
        for warning in self.warnings:
            print(f"warning: {warning}", file=sys.stderr, flush=True)


def exposure(kind: str, settings: Any, port: int) -> Exposure:
    """Whether `qwen-vllm <kind>` may start with these settings, and what to
    tell its user. On loopback only this machine can call; beyond it, the
    controller and worker endpoints (which register workers and carry every
    prompt) need the internal token unless the user opted out by name, and an
    API or web UI without a key or password is open to whoever reaches it.
    port: the service's own port (for serve, the controller's), for messages."""
    host = settings.host
    if is_loopback(host):
        return Exposure()
    where = f"{host}:{port}"
    refusal = None
    warnings = []
    if not secret_value(settings.internal_token):
        if settings.insecure_no_internal_token:
            warnings.append(
                f"{OPEN_FLAG}: controller and worker endpoints behind {where} "
                "take calls from anyone who reaches them, without a token"
            )
        else:
            refusal = (
                f"{kind} on {where} without an internal token: in a "
                "deployment without one, anyone who reaches its controller can "
                "register a worker of their own and read users' prompts. Set "
                "QWEN_VLLM_INTERNAL_TOKEN (or --internal-token) to "
                "the same secret in every component, or pass "
                f"{OPEN_FLAG} to run without one (FastChat's own servers send none)"
            )
    if kind in ("gateway", "serve") and not settings.api_keys:
        warnings.append(
            f"no --api-key: anyone who reaches {host}:{settings.port} can use the "
            "OpenAI API"
        )
    webui = kind == "webui" or (kind == "serve" and settings.webui)
    if webui and not secret_value(settings.webui_password):
        warnings.append(
            f"no --webui-password: anyone who reaches "
            f"{host}:{settings.webui_port} can use the web UI"
        )
    return Exposure(refusal=refusal, warnings=tuple(warnings))
