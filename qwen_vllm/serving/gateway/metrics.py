"""Prometheus metrics of one gateway app, in its own registry.

The middleware counts every request by endpoint (the route's path template,
so label values stay bounded), model and status, and times it to the end of
the response. Routes name the model in `request.state.model` once the
control plane has accepted it; the services add token counts and
time-to-first-token.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from qwen_vllm.serving.client import WorkerInfo

NAMESPACE = "qwen_vllm_gateway"
EXPOSITION_CONTENT_TYPE = CONTENT_TYPE_LATEST
_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, 600)
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 60)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "requests",
            "HTTP requests by endpoint, model and status.",
            ["endpoint", "model", "status"],
            namespace=NAMESPACE,
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            "prompt_tokens",
            "Prompt tokens processed.",
            ["model"],
            namespace=NAMESPACE,
            registry=self.registry,
        )
        self.completion_tokens = Counter(
            "completion_tokens",
            "Completion tokens generated.",
            ["model"],
            namespace=NAMESPACE,
            registry=self.registry,
        )
        self.latency = Histogram(
            "request_duration_seconds",
            "Time from request to the end of the response.",
            ["endpoint", "model"],
            namespace=NAMESPACE,
            registry=self.registry,
            buckets=_LATENCY_BUCKETS,
        )
        self.time_to_first_token = Histogram(
            "time_to_first_token_seconds",
            "Time from request to the first output of a streamed generation.",
            ["model"],
            namespace=NAMESPACE,
            registry=self.registry,
            buckets=_TTFT_BUCKETS,
        )
        self.in_flight = Gauge(
            "requests_in_flight",
            "Requests being served.",
            ["endpoint"],
            namespace=NAMESPACE,
            registry=self.registry,
        )
        self.worker_queue = Gauge(
            "worker_queue_length",
            "Requests queued at each worker, as the controller reports.",
            ["worker"],
            namespace=NAMESPACE,
            registry=self.registry,
        )
        self.worker_healthy = Gauge(
            "worker_healthy",
            "1 if the controller considers the worker healthy.",
            ["worker"],
            namespace=NAMESPACE,
            registry=self.registry,
        )

    def count_tokens(self, model: str, prompt: int, completion: int) -> None:
        self.prompt_tokens.labels(model).inc(prompt)
        self.completion_tokens.labels(model).inc(completion)

    def set_workers(self, workers: Iterable[WorkerInfo]) -> None:
        self.worker_queue.clear()
        self.worker_healthy.clear()
        for worker in workers:
            self.worker_queue.labels(worker.address).set(worker.queue_length)
            self.worker_healthy.labels(worker.address).set(int(worker.healthy))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    def __init__(self, app: ASGIApp, metrics: GatewayMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        # The route is known only after routing; count in-flight per path
        # prefix meanwhile, which is just as bounded.
        in_flight = self.metrics.in_flight.labels(_coarse(scope["path"]))
        in_flight.inc()

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            in_flight.dec()
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"
            model = scope.get("state", {}).get("model", "")
            self.metrics.requests.labels(endpoint, model, str(status)).inc()
            self.metrics.latency.labels(endpoint, model).observe(
                time.perf_counter() - started
            )


def _coarse(path: str) -> str:
    known = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/metrics")
    return next((k for k in known if path.startswith(k)), "other")
