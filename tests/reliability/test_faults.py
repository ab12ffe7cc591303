"""Fault injection on the whole stack under load.

Six streaming clients (the project's load generator, bounded in requests and
time) keep the shared `stack` deployment busy while one component at a time
is killed: a vLLM worker, the controller actor, the gateway actor. Each test
checks that nothing hangs, that failures are clean (an HTTP error, an error
event, a refused or dropped connection), that Ray restarts the component and
it rejoins, and that afterwards every request succeeds; it leaves the stack
fully healthy for the tests that follow. Counts and timings are printed and
written to artifacts/faults.json.

Processes are found without Ray's API: an actor is the process listening on
its service's port, and a worker reports its pid on GET /health.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest

from qwen_vllm.loadgen.procs import listening_pids, worker_pid
from qwen_vllm.loadgen.results import CLEAN_FAILURES, HUNG, RequestResult, RunResult
from qwen_vllm.loadgen.runner import LoadGenerator
from qwen_vllm.loadgen.workload import LengthRange, LoadConfig
from qwen_vllm.serving import controller as controller_module
from qwen_vllm.serving.gateway import create_app as create_gateway
from qwen_vllm.serving.settings import ControllerSettings, GatewaySettings
from tests.serving.test_controller import serving

ARTIFACT = Path(__file__).resolve().parents[2] / "artifacts" / "faults.json"
CLIENTS = 6
# Longest silence a stream may show before the client calls it hung; far
# below the gateway's own 600 s worker timeout, so a hang cannot hide.
STALL_S = 20.0
ROUTING_DEADLINE_S = 5.0
RESTART_DEADLINE_S = 300.0
REPORT: dict[str, Any] = {}


@pytest.fixture(scope="module", autouse=True)
def write_report():
    yield
    if not REPORT:  # no fault test ran (e.g. -m "not slow"): keep the last file
        return
    ARTIFACT.parent.mkdir(parents=True, exist_ok=True)
    totals = {
        key: sum(phase["counts"][key] for phase in REPORT.values())
        for key in ("sent", "succeeded", "retried", "failed_clean", "hung", "other")
    }
    for key in ("sent", "succeeded"):
        totals[f"after_recovery_{key}"] = sum(
            phase["after_recovery"][key] for phase in REPORT.values()
        )
    ARTIFACT.write_text(
        json.dumps({"phases": REPORT, "totals": totals}, indent=2) + "\n"
    )
    print(f"\nfault injection: {json.dumps(totals)} -> {ARTIFACT}")


def load(stack, seed: int, num_requests: int = 3000) -> LoadGenerator:
    return LoadGenerator(
        LoadConfig(
            base_url=f"{stack.gateway}/v1",
            model=stack.model,
            api_key=stack.api_key,
            concurrency=CLIENTS,
            num_requests=num_requests,
            max_duration=150.0,
            prompt_tokens=LengthRange(8, 64),
            output_tokens=LengthRange(16, 96),
            seed=seed,
            request_timeout=90.0,
            stall_timeout=STALL_S,
            error_backoff=0.25,
        )
    )


class Running:
    """A load generator running in the background of the test's event loop."""

    def __init__(self, generator: LoadGenerator) -> None:
        self.generator = generator
        self.task: asyncio.Task[RunResult] | None = None

    async def start(self, steady_after: int = 12) -> None:
        self.task = asyncio.create_task(self.generator.run())
        deadline = time.monotonic() + 60
        while sum(r.ok for r in self.generator.results) < steady_after:
            assert not self.task.done(), "the load ended before it was steady"
            assert time.monotonic() < deadline, self._failures()
            await asyncio.sleep(0.1)

    def _failures(self) -> str:
        bad = [r for r in self.generator.results if not r.ok]
        return f"no steady load: {[(r.kind, r.message) for r in bad[:5]]}"

    def now(self) -> float:
        return self.generator.now()

    def succeeded_since(self, t: float) -> int:
        return sum(r.ok and r.start >= t for r in self.generator.results)

    async def stop(self) -> RunResult:
        assert self.task is not None
        self.generator.stop()
        # In-flight requests end on their own: the request timeout bounds them.
        return await asyncio.wait_for(self.task, 90 + STALL_S)


def classify(run: RunResult, fault_at: float) -> dict[str, list[RequestResult]]:
    """Requests by their state when the fault hit (times share one clock)."""
    groups: dict[str, list[RequestResult]] = {
        "before": [],
        "streaming": [],  # had output when the fault hit
        "pending": [],  # sent, no output yet
        "after": [],
    }
    for r in run.requests:
        if r.end <= fault_at:
            groups["before"].append(r)
        elif r.start >= fault_at:
            groups["after"].append(r)
        elif r.first_token is not None and r.first_token < fault_at:
            groups["streaming"].append(r)
        else:
            groups["pending"].append(r)
    return groups


def counts(run: RunResult, retried: int) -> dict[str, int]:
    failed = [r for r in run.requests if not r.ok]
    return {
        "sent": len(run.requests),
        "succeeded": len(run.requests) - len(failed),
        "retried": retried,
        "failed_clean": sum(r.kind in CLEAN_FAILURES for r in failed),
        "hung": sum(r.kind == HUNG for r in failed),
        "other": sum(r.kind not in CLEAN_FAILURES and r.kind != HUNG for r in failed),
    }


def record(
    name: str,
    run: RunResult,
    fault_at: float,
    retried: int,
    after: RunResult,
    **timings: float,
) -> dict:
    groups = classify(run, fault_at)
    in_flight = groups["streaming"] + groups["pending"]
    phase = {
        "counts": counts(run, retried),
        "at_fault": {
            "streaming": len(groups["streaming"]),
            "pending": len(groups["pending"]),
            "outcomes": dict(Counter(r.kind or "ok" for r in in_flight)),
        },
        "errors": run.summary()["errors"],
        # The batch sent once everything had recovered: all must succeed.
        "after_recovery": {
            "sent": len(after.requests),
            "succeeded": sum(r.ok for r in after.requests),
        },
        "timings_s": {k: round(v, 2) for k, v in timings.items()},
        "error_samples": sorted({r.message or "" for r in run.requests if not r.ok})[
            :8
        ],
    }
    REPORT[name] = phase
    print(f"\n{name}: {json.dumps(phase, indent=1)}")
    return phase


def assert_no_hang_and_clean(run: RunResult) -> None:
    failed = [r for r in run.requests if not r.ok]
    hung = [r for r in failed if r.kind == HUNG]
    assert not hung, [(r.index, r.message) for r in hung]
    unclean = [r for r in failed if r.kind not in CLEAN_FAILURES]
    assert not unclean, [(r.kind, r.message) for r in unclean]
    # Clean means diagnosed: an HTTP error carries an OpenAI error body, an
    # error event its message.
    for r in failed:
        assert r.message, r
        if r.kind == "http":
            assert r.status is not None and r.status >= 400


async def get_json(url: str, **kwargs: Any) -> Any:
    async with httpx.AsyncClient(timeout=5, trust_env=False) as client:
        reply = await client.get(url, **kwargs)
        reply.raise_for_status()
        return reply.json()


async def workers(stack) -> dict[str, dict]:
    data = await get_json(f"{stack.controller}/workers")
    return {w["name"]: w for w in data["workers"]}


async def wait_until(what: str, check, timeout: float, every: float = 0.1) -> float:
    """Seconds until the async check is true; fails after timeout."""
    started = time.monotonic()
    while True:
        with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
            if await check():
                return time.monotonic() - started
        assert time.monotonic() - started < timeout, f"{what}: not within {timeout} s"
        await asyncio.sleep(every)


async def all_healthy(stack) -> bool:
    known = await workers(stack)
    if sum(w["healthy"] for w in known.values()) < 2:
        return False
    await get_json(f"{stack.gateway}/health")
    models = await get_json(
        f"{stack.gateway}/v1/models",
        headers={"Authorization": f"Bearer {stack.api_key}"},
    )
    return [m["id"] for m in models["data"]] == [stack.model]


async def requests_totals(stack) -> list[int]:
    return [
        (await get_json(f"{url}/health"))["requests_total"]
        for url in stack.worker_urls()
    ]


async def assert_recovered(stack, seed: int) -> RunResult:
    """Both workers healthy, and a fresh batch of requests all succeeds."""
    await wait_until("full health", lambda: all_healthy(stack), RESTART_DEADLINE_S, 1)
    before = await requests_totals(stack)
    run = await load(stack, seed, num_requests=24).run()
    bad = [(r.kind, r.message) for r in run.requests if not r.ok]
    assert not bad, bad
    assert len(run.requests) == 24
    gained = [a - b for a, b in zip(await requests_totals(stack), before, strict=True)]
    assert sum(gained) == 24 and min(gained) >= 1, gained
    return run


async def single_pid(port: int) -> int:
    pids = await asyncio.to_thread(listening_pids, port)
    assert len(pids) == 1, f"port {port}: processes {pids}"
    return pids[0]


def ray_log(pid: int) -> Path | None:
    """The stderr log Ray keeps for the actor process pid (newest session)."""
    found = sorted(
        Path("/tmp/ray").glob(f"session_*/logs/worker-*-{pid}.err"),
        key=lambda p: p.stat().st_mtime,
    )
    return found[-1] if found else None


def descendants(pid: int) -> set[int]:
    """Every live process below pid (the engine processes of a worker)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                stat = (entry / "stat").read_text()
                parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier}
        found |= frontier
    return found


def state(pid: int) -> str | None:
    """The process state letter in /proc (R, S, T, Z, ...), None once reaped."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def alive(pid: int) -> bool:
    return state(pid) not in (None, "Z")


def stopped(pid: int) -> bool:
    return state(pid) in (None, "T", "t", "Z")  # gone: it will not run either


def signal_each(pids: set[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):  # exited meanwhile
            os.kill(pid, sig)


class LogTail:
    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.offset = path.stat().st_size if path else 0

    def new_text(self) -> str:
        if self.path is None:
            return ""
        with self.path.open("rb") as f:
            f.seek(self.offset)
            return f.read().decode(errors="replace")


@pytest.mark.slow
@pytest.mark.timeout(900)
async def test_a_worker_killed_under_load(stack) -> None:
    urls = stack.worker_urls()
    await wait_until("full health", lambda: all_healthy(stack), RESTART_DEADLINE_S, 1)
    pids = {url: worker_pid(url) for url in urls}
    assert None not in pids.values(), pids
    engines = {url: await asyncio.to_thread(descendants, pids[url]) for url in urls}
    assert all(engines.values()), f"a worker runs no engine process: {engines}"
    gateway_log = LogTail(ray_log(await single_pid(stack.port)))
    assert gateway_log.path is not None, "no Ray log of the gateway actor"
    running = Running(load(stack, seed=1))
    await running.start()

    # Freeze both workers' engines: their HTTP servers still answer the
    # controller's probes, so both stay routable, but no request that reaches
    # them from now on can get any output. One more request, sent now, must
    # reach one of them; the first worker that counts a request after the
    # freeze is the victim, and that request is provably waiting on it when it
    # dies. No race with the probes, no time window.
    frozen = set().union(*engines.values())
    signal_each(frozen, signal.SIGSTOP)
    try:
        await wait_until(
            "the engines stopped", lambda: _true(all(map(stopped, frozen))), 10, 0.01
        )
        before = await requests_totals(stack)
        extra = asyncio.create_task(load(stack, seed=4, num_requests=1).run())

        async def reached_a_worker() -> bool:
            return await requests_totals(stack) != before

        await wait_until("a request reaching a frozen worker", reached_a_worker, 60)
        counted = await requests_totals(stack)
        victim = next(
            url for url, n, m in zip(urls, counted, before, strict=True) if n > m
        )
        (survivor,) = set(urls) - {victim}
        signal_each(engines[survivor], signal.SIGCONT)
        os.kill(pids[victim], signal.SIGKILL)
        killed_at, killed_clock = running.now(), time.monotonic()
        # Its engines go on only once it is gone, so no output of theirs can
        # leave it; they must then notice its death and exit (checked below).
        await wait_until(
            "the killed worker gone", lambda: _true(not alive(pids[victim])), 10, 0.01
        )
    finally:
        signal_each(frozen, signal.SIGCONT)

    async def unroutable() -> bool:
        info = (await workers(stack)).get(victim)
        return info is None or not info["healthy"]

    await wait_until("dead worker out of routing", unroutable, ROUTING_DEADLINE_S, 0.05)
    left_routing = time.monotonic() - killed_clock
    # The extra request was served: on the survivor, or retried there if it
    # was the one that reached the victim.
    (extra_result,) = (await extra).requests
    assert extra_result.ok, (extra_result.kind, extra_result.message)
    # Keep the load on the survivor for a while, then stop it.
    await wait_until(
        "load continuing on the survivor",
        lambda: _true(running.succeeded_since(killed_at) >= 12),
        60,
    )
    run = await running.stop()

    # A request fails only if the victim had sent part of its answer: its
    # stream ends with an error event, never a hang. Every request without
    # output at the kill (waiting on the victim, or not yet routed) was served.
    assert_no_hang_and_clean(run)
    failed = [r for r in run.requests if not r.ok]
    for r in failed:
        cut = r.kind == "error_event" and r.first_token is not None
        assert cut, (r.kind, r.message)
    # Started after the kill: all served, by retry or by the survivor.
    late = [(r.kind, r.message) for r in failed if r.start >= killed_at]
    assert not late, late
    # The gateway logs each failed worker stream: a retry, or a cut stream. At
    # least the request that reached the frozen victim was retried.
    failures_logged = gateway_log.new_text().count(f"Worker {victim} failed: ")
    retried = failures_logged - len(failed)
    assert retried >= 1, f"{failures_logged} failures logged, {len(failed)} cut"

    # The dead worker's engine processes go with it: no orphan keeps its
    # memory and cores.
    await wait_until(
        "the killed worker's engine processes exit",
        lambda: _true(not any(alive(pid) for pid in engines[victim])),
        30,
        0.5,
    )

    # Ray restarts the actor; the new worker registers again by itself.
    async def back() -> bool:
        info = (await workers(stack)).get(victim)
        return bool(info and info["healthy"])

    await wait_until("worker restarted", back, RESTART_DEADLINE_S, 1)
    rejoined = time.monotonic() - killed_clock
    new_pid = worker_pid(victim)
    assert new_pid not in (None, pids[victim])
    after = await assert_recovered(stack, seed=2)
    record(
        "worker_sigkill",
        run,
        killed_at,
        retried,
        after,
        kill_to_unroutable=left_routing,
        kill_to_rejoined=rejoined,
    )


async def test_a_controller_without_workers_means_an_outage_not_a_404() -> None:
    """What the gateway sees right after a controller restart, before the
    workers have registered again: 503, so clients retry, not "no such model"."""
    settings = ControllerSettings(health_check_interval=3600)
    with serving(controller_module.create_app(settings)) as controller:
        port = int(controller.url.rsplit(":", 1)[1])
        gateway = create_gateway(GatewaySettings(controller_port=port))
        body = {"model": "qwen-demo", "messages": [{"role": "user", "content": "x"}]}
        async with (
            gateway.router.lifespan_context(gateway),
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=gateway), base_url="http://gw"
            ) as client,
        ):
            for stream in (False, True):
                reply = await client.post(
                    "/v1/chat/completions", json={**body, "stream": stream}
                )
                assert reply.status_code == 503, reply.text
                assert reply.json()["error"]["code"] == "no_healthy_worker"
            # Once some model is served, an unlisted one is unknown again.
            async with httpx.AsyncClient(base_url=controller.url) as internal:
                registered = await internal.post(
                    "/register_worker",
                    json={
                        "worker_name": "http://127.0.0.1:9",
                        "worker_status": {"model_names": ["other-model"]},
                    },
                )
                assert registered.status_code == 200
            reply = await client.post("/v1/chat/completions", json=body)
            assert reply.status_code == 404, reply.text
            assert reply.json()["error"]["param"] == "model"


async def _true(value: bool) -> bool:
    return value


@pytest.mark.slow
@pytest.mark.timeout(900)
async def test_the_controller_killed_under_load(stack) -> None:
    await wait_until("full health", lambda: all_healthy(stack), RESTART_DEADLINE_S, 1)
    old_pid = await single_pid(stack.controller_port)
    running = Running(load(stack, seed=3))
    await running.start()
    started = time.monotonic()
    os.kill(old_pid, signal.SIGKILL)
    killed_at = running.now()

    async def answering() -> bool:
        await get_json(f"{stack.controller}/health")
        return True

    controller_up = await wait_until("controller restarted", answering, 120, 0.1)
    rejoined = await wait_until(
        "workers re-registered",
        lambda: _healthy_count_is(stack, 2),
        60,
        0.1,
    )
    rejoined += controller_up
    served_again = running.now()
    await wait_until(
        "the gateway serving again",
        lambda: _true(running.succeeded_since(served_again) >= 6),
        60,
    )
    recovered = time.monotonic() - started
    run = await running.stop()
    assert await single_pid(stack.controller_port) != old_pid

    groups = classify(run, killed_at)
    # Streams already running talk to their worker directly: untouched.
    cut = [(r.kind, r.message) for r in groups["streaming"] if not r.ok]
    assert not cut, cut
    assert_no_hang_and_clean(run)
    # While the controller is away new requests get a clean 503, or wait for
    # it; never a 5xx other than "unavailable".
    for r in run.requests:
        if r.kind == "http":
            assert r.status == 503, r.message
    after = await assert_recovered(stack, seed=4)
    record(
        "controller_sigkill",
        run,
        killed_at,
        0,
        after,
        kill_to_controller_up=controller_up,
        kill_to_workers_rejoined=rejoined,
        kill_to_serving=recovered,
    )


async def _healthy_count_is(stack, count: int) -> bool:
    known = await workers(stack)
    return sum(w["healthy"] for w in known.values()) == count


@pytest.mark.slow
@pytest.mark.timeout(900)
async def test_the_gateway_killed_under_load(stack) -> None:
    await wait_until("full health", lambda: all_healthy(stack), RESTART_DEADLINE_S, 1)
    old_pid = await single_pid(stack.port)
    running = Running(load(stack, seed=5))
    await running.start()
    started = time.monotonic()
    os.kill(old_pid, signal.SIGKILL)
    killed_at = running.now()

    async def answering() -> bool:
        await get_json(f"{stack.gateway}/health")
        return True

    gateway_up = await wait_until("gateway restarted", answering, 120, 0.1)
    served_again = running.now()
    await wait_until(
        "requests succeeding again",
        lambda: _true(running.succeeded_since(served_again) >= 6),
        60,
    )
    recovered = time.monotonic() - started
    run = await running.stop()
    assert await single_pid(stack.port) != old_pid

    # The generations of the cut streams were aborted: no engine keeps
    # working for a client that is gone.
    async def idle() -> bool:
        for url in stack.worker_urls():
            if (await get_json(f"{url}/health"))["queue_length"]:
                return False
        return True

    drained = await wait_until("engines idle", idle, 10, 0.1)

    groups = classify(run, killed_at)
    assert_no_hang_and_clean(run)
    # The streams in flight were cut with the connection: a clean failure.
    for r in groups["streaming"]:
        assert r.ok or r.kind == "disconnected", (r.kind, r.message)
    # A request sent just as the gateway died may not have connected yet:
    # then it is refused, as clean a failure as a cut.
    for r in groups["pending"]:
        assert r.ok or r.kind in ("disconnected", "connect"), (r.kind, r.message)
    assert any(r.kind in ("connect", "disconnected") for r in run.requests)
    after = await assert_recovered(stack, seed=6)
    record(
        "gateway_sigkill",
        run,
        killed_at,
        0,
        after,
        kill_to_gateway_up=gateway_up,
        kill_to_serving=recovered,
        load_stop_to_engines_idle=drained,
    )
