"""Who may call a service, and where others reach it.

One place for the deployment's internal token (the header that carries it,
the headers a client sends, the middleware a service checks it with) and for
turning a bind address into the host a URL should name. Pure Python.
"""

from __future__ import annotations

import hmac

from pydantic import SecretStr
from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

# Header carrying the shared secret that guards controller and worker endpoints.
INTERNAL_TOKEN_HEADER = "X-Qwen-Vllm-Token"
# Bind addresses that mean "every interface": no URL can name them.
WILDCARD_HOSTS = ("0.0.0.0", "::")


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
            given = Headers(scope=scope).get(INTERNAL_TOKEN_HEADER, "")
            if not hmac.compare_digest(given.encode(), self._token):
                response = error_response(
                    401,
                    "authentication_error",
                    f"missing or wrong {INTERNAL_TOKEN_HEADER} header",
                )
                await response(scope, receive, send)
                return
        await self._app(scope, receive, send)


def guard(app: ASGIApp, token: SecretStr | str | None) -> None:
    """Add the internal-token check to a FastAPI/Starlette app when a token is set."""
    value = secret_value(token)
    if value:
        app.add_middleware(InternalTokenMiddleware, token=value)
