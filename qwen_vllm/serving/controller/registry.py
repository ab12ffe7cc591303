"""The controller's registry: the workers it knows, their health, routing.

Pure asyncio state, no network I/O: the service feeds it probe results, heartbeats
and registrations; routing policies pick among the healthy workers.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from qwen_vllm.serving.protocol import WorkerStatus

logger = logging.getLogger(__name__)

# A worker whose probes have failed for this long is forgotten; it must
# register again (FastChat workers do so when a heartbeat reports exist=false).
WORKER_EXPIRY_S = 30.0


@dataclass
class WorkerInfo:
    name: str  # the worker's base URL
    model_names: list[str]
    speed: int
    queue_length: int
    multimodal: bool
    check_heart_beat: bool
    last_heartbeat: float
    healthy: bool = True
    consecutive_failures: int = 0
    failing_since: float | None = None

    def load(self) -> float:
        return self.queue_length / self.speed if self.speed > 0 else float("inf")


class RoutingPolicy(Protocol):
    def choose(self, workers: Sequence[WorkerInfo]) -> WorkerInfo | None:
        """Pick one of the healthy workers serving a model (called under the lock)."""
        ...


class ShortestQueuePolicy:
    """Fewest queued requests per unit of speed; the pick counts as queued at once,
    so a burst spreads over the workers before their next status report."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def choose(self, workers: Sequence[WorkerInfo]) -> WorkerInfo | None:
        if not workers:
            return None
        best = min(worker.load() for worker in workers)
        chosen = self._rng.choice([w for w in workers if w.load() == best])
        chosen.queue_length += 1
        return chosen


class LotteryPolicy:
    """Random, weighted by speed."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def choose(self, workers: Sequence[WorkerInfo]) -> WorkerInfo | None:
        weights = [max(worker.speed, 0) for worker in workers]
        if sum(weights) <= 0:
            return None
        return self._rng.choices(workers, weights=weights)[0]


ROUTING_POLICIES: dict[str, type[ShortestQueuePolicy] | type[LotteryPolicy]] = {
    "shortest_queue": ShortestQueuePolicy,
    "lottery": LotteryPolicy,
}


class WorkerRegistry:
    """The workers known to the controller and their health; asyncio-safe."""

    def __init__(
        self,
        policy: RoutingPolicy,
        *,
        unhealthy_after_failures: int,
        expiry_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._policy = policy
        self._unhealthy_after = unhealthy_after_failures
        self._expiry_s = WORKER_EXPIRY_S if expiry_s is None else expiry_s
        self._clock = clock
        self._workers: dict[str, WorkerInfo] = {}
        self._lock = asyncio.Lock()

    async def register(
        self,
        name: str,
        status: WorkerStatus,
        *,
        check_heart_beat: bool,
        multimodal: bool,
        proven: bool = True,
    ) -> None:
        """Add or refresh a worker. One not yet proven (the controller has not
        seen it answer a probe with the internal token) gets no traffic until
        a probe succeeds; refreshing a healthy worker keeps it healthy."""
        async with self._lock:
            previous = self._workers.get(name)
            known = previous is not None
            self._workers[name] = WorkerInfo(
                name=name,
                model_names=list(status.model_names),
                speed=status.speed,
                queue_length=status.queue_length,
                multimodal=multimodal,
                check_heart_beat=check_heart_beat,
                last_heartbeat=self._clock(),
                healthy=proven or (previous is not None and previous.healthy),
            )
        logger.info(
            "%s worker %s serving %s",
            "re-registered" if known else "registered",
            name,
            status.model_names,
        )

    async def unregister(self, name: str) -> bool:
        async with self._lock:
            removed = self._workers.pop(name, None) is not None
        if removed:
            logger.info("worker %s unregistered", name)
        return removed

    async def heartbeat(self, name: str, queue_length: int) -> bool:
        async with self._lock:
            worker = self._workers.get(name)
            if worker is None:
                return False
            worker.queue_length = queue_length
            worker.last_heartbeat = self._clock()
            return True

    async def record_success(self, name: str, status: WorkerStatus) -> None:
        async with self._lock:
            worker = self._workers.get(name)
            if worker is None:
                return
            recovered = not worker.healthy
            worker.model_names = list(status.model_names)
            worker.speed = status.speed
            worker.queue_length = status.queue_length
            worker.healthy = True
            worker.consecutive_failures = 0
            worker.failing_since = None
        if recovered:
            logger.info("worker %s is healthy", name)

    async def record_failure(self, name: str, reason: str) -> None:
        now = self._clock()
        async with self._lock:
            worker = self._workers.get(name)
            if worker is None:
                return
            worker.consecutive_failures += 1
            if worker.failing_since is None:
                worker.failing_since = now
            became_unhealthy = (
                worker.healthy and worker.consecutive_failures >= self._unhealthy_after
            )
            if became_unhealthy:
                worker.healthy = False
            # A worker that sends no heartbeats would never learn it was dropped.
            expired = (
                worker.check_heart_beat and now - worker.failing_since >= self._expiry_s
            )
            if expired:
                del self._workers[name]
            failures = worker.consecutive_failures
        logger.debug(
            "probe of worker %s failed (%d in a row): %s", name, failures, reason
        )
        if became_unhealthy:
            logger.warning(
                "worker %s gets no traffic after %d failed probes: %s",
                name,
                failures,
                reason,
            )
        if expired:
            logger.warning(
                "worker %s removed after failing for %.0f s", name, self._expiry_s
            )

    async def choose(self, model: str, exclude: Sequence[str] = ()) -> str | None:
        async with self._lock:
            candidates = [
                worker
                for worker in self._workers.values()
                if worker.healthy
                and model in worker.model_names
                and worker.name not in exclude
            ]
            chosen = self._policy.choose(candidates)
            return chosen.name if chosen else None

    async def names(self) -> list[str]:
        async with self._lock:
            return list(self._workers)

    async def models(self, *, multimodal: bool | None = None) -> list[str]:
        """Models of every registered worker, healthy or not.

        A model whose workers are all failing stays listed until they expire:
        clients then get "no healthy worker right now" (retry later), not
        "unknown model".
        """
        async with self._lock:
            return sorted(
                {
                    model
                    for worker in self._workers.values()
                    if multimodal is None or worker.multimodal == multimodal
                    for model in worker.model_names
                }
            )

    async def aggregate_status(self) -> WorkerStatus:
        async with self._lock:
            healthy = [w for w in self._workers.values() if w.healthy]
            return WorkerStatus(
                model_names=sorted({m for w in healthy for m in w.model_names}),
                speed=sum(w.speed for w in healthy),
                queue_length=sum(w.queue_length for w in healthy),
            )

    async def counts(self) -> tuple[int, int]:
        async with self._lock:
            workers = self._workers.values()
            return len(workers), sum(1 for w in workers if w.healthy)

    async def describe(self) -> list[dict[str, Any]]:
        now = self._clock()
        async with self._lock:
            return [
                {
                    "name": w.name,
                    "models": list(w.model_names),
                    "speed": w.speed,
                    "queue_length": w.queue_length,
                    "multimodal": w.multimodal,
                    "check_heart_beat": w.check_heart_beat,
                    "healthy": w.healthy,
                    "consecutive_failures": w.consecutive_failures,
                    "last_heartbeat_age_s": round(now - w.last_heartbeat, 3),
                }
                for w in self._workers.values()
            ]
