"""`qwen-vllm serve`: the whole stack as supervised Ray actors.

One actor per service (controller, N workers, gateway, web UI), each running
the same ServiceRunner as the standalone commands. Ray restarts an actor that
dies; a restarted worker registers with the controller again by itself. Each
worker reserves its tensor-parallel group (GPUs, or CPU cores) through a
placement group so a group never straddles nodes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from pydantic import SecretStr

from qwen_vllm.checkpoints.directory import NotACheckpoint, read_config
from qwen_vllm.deploy.lifecycle import StopSignals, read_tail, root_cause
from qwen_vllm.deploy.machine import bind_error
from qwen_vllm.deploy.runner import ServiceRunner, configure_logging
from qwen_vllm.model.refusal import ConfigRefused
from qwen_vllm.serving.security import (
    exposure,
    new_secret,
    reachable_host,
    secret_value,
    token_headers,
)
from qwen_vllm.serving.settings import (
    ControllerSettings,
    GatewaySettings,
    ServeSettings,
    WebUISettings,
    WorkerSettings,
    subset,
)

logger = logging.getLogger(__name__)

NAMESPACE = "qwen_vllm"
STARTUP_TIMEOUT_S = 1800.0


class ServeError(RuntimeError):
    """A deployment that cannot start, explained for the user."""


class ServiceActor:
    """Runs one service in a thread of a Ray actor process.

    The actor never restarts itself: it reports how its service ended
    (`outcome`) and the driver's Supervisor decides, so every failure reaches
    the user's terminal with its cause.
    """

    def __init__(self, kind: str, settings: Any, env: dict[str, str]) -> None:
        os.environ.update(env)
        if kind == "worker" and not settings.worker_address:
            host = reachable_host(settings.host, _node_ip())
            settings = settings.model_copy(
                update={"worker_address": f"http://{host}:{settings.worker_port}"}
            )
        configure_logging(settings.log_level)
        self.kind = kind
        self.runner = ServiceRunner(kind, settings)
        self.stopping = False
        self.failure: str | None = None
        self.fatal = False
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, name=kind, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.runner.run()
            if not self.stopping:
                self.failure = f"{self.kind} stopped unexpectedly"
        except BaseException as exc:
            logger.exception("%s failed", self.kind)
            self.failure = f"{type(exc).__name__}: {exc}"
            # A refusal explained by our own checks will fail the same way again.
            self.fatal = isinstance(exc, (ConfigRefused, FileNotFoundError))
        finally:
            self.done.set()

    def info(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "node_ip": _node_ip()}

    def wait_ready(self) -> bool:
        """True once the service listens; False if it ended first."""
        while not self.done.wait(0.2):
            if self.runner.started:
                return True
        return False

    def outcome(self) -> dict[str, Any]:
        """Blocks until the service ends: why it ended."""
        self.done.wait()
        return {"failure": self.failure, "fatal": self.fatal}

    def shutdown(self, timeout: float = 8.0) -> None:
        self.stopping = True
        self.runner.stop()
        self.thread.join(timeout)


def _node_ip() -> str:
    """The address this node joined the Ray cluster with (127.0.0.1 locally)."""
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    for node in ray.nodes():
        if node["NodeID"] == node_id:
            return node["NodeManagerAddress"]
    raise RuntimeError("this Ray node is missing from ray.nodes()")


def cpu_binding(worker: int, tp: int, cores: int) -> str:
    """OpenMP core ids per tensor-parallel rank of one CPU worker: "0|1"."""
    first = worker * tp
    return "|".join(str((first + rank) % cores) for rank in range(tp))


def check_ports_free(host: str, ports: dict[str, int]) -> None:
    for what, port in ports.items():
        if (problem := bind_error(host, port)) is not None:
            raise ServeError(
                f"port {port} ({what}) on {host} is in use ({problem}); "
                f"stop what holds it or choose another with --{what}"
            )


def planned_ports(settings: ServeSettings) -> dict[str, int]:
    ports = {
        "controller-port": settings.controller_port,
        "port": settings.port,
    }
    if settings.webui:
        ports["webui-port"] = settings.webui_port
    for i in range(settings.num_workers):
        ports[f"worker-port (+{i})"] = settings.worker_port + i
    if len(set(ports.values())) != len(ports):
        raise ServeError(f"ports must differ: {ports}")
    return ports


MAX_FAILED_STARTS = 3
MAX_BACKOFF_S = 30.0
# A crash this long after the last restart starts the backoff over.
STABLE_AFTER_S = 300.0
SHUTDOWN_S = 8.0


@dataclass
class Service:
    """One supervised actor: what to start and what happened to it."""

    name: str
    kind: str
    settings: Any
    env: dict[str, str] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    actor: Any = None
    pid: int | None = None
    node_ip: str = ""
    ready_ref: Any = None
    outcome_ref: Any = None
    ready: bool = False
    failed_starts: int = 0
    crashes: int = 0
    last_start: float = 0.0
    restart_at: float | None = None

    def log_path(self) -> Path | None:
        """Ray's stderr file of the actor process (the engine core's too)."""
        if self.pid is None:
            return None
        found = sorted(Path(ray_log_dir()).glob(f"worker-*-{self.pid}.err"))
        return found[-1] if found else None


class Supervisor:
    """Starts the actors, restarts the ones that fail, explains every failure.

    A service that fails before it ever served is started again up to
    MAX_FAILED_STARTS times (once, if our own checks refused it); then the
    deployment stops with the cause. One that fails after serving is
    restarted with exponential backoff, each time with its cause on the
    terminal.
    """

    def __init__(self, settings: ServeSettings) -> None:
        self.settings = settings
        self.services: dict[str, Service] = {}
        self.placement_groups: list[Any] = []
        self.started_ray = False
        self.controller_url = ""

    def launch(self, service: Service) -> None:
        import ray

        actor_cls = ray.remote(ServiceActor)
        service.actor = actor_cls.options(
            max_restarts=0, max_concurrency=4, **service.options
        ).remote(service.kind, service.settings, service.env)
        service.ready_ref = service.actor.wait_ready.remote()
        service.outcome_ref = service.actor.outcome.remote()
        service.ready = False
        service.pid = None
        service.last_start = time.monotonic()
        service.restart_at = None
        self.services[service.name] = service

    def _identify(self, service: Service, timeout: float = 10.0) -> None:
        import ray

        with contextlib.suppress(Exception):
            info = ray.get(service.actor.info.remote(), timeout=timeout)
            service.pid, service.node_ip = info["pid"], info["node_ip"]

    def poll(self) -> None:
        """Take note of services that became ready or ended; restart due ones."""
        import ray

        now = time.monotonic()
        for service in self.services.values():
            if service.restart_at is not None and now >= service.restart_at:
                self.launch(service)
        live = [s for s in self.services.values() if s.outcome_ref is not None]
        for service in live:
            if service.pid is None:
                self._identify(service)
            if service.ready_ref is not None:
                done, _ = ray.wait([service.ready_ref], timeout=0)
                if done:
                    service.ready_ref = None
                    with contextlib.suppress(Exception):
                        service.ready = bool(ray.get(done[0]))
                    if service.ready:
                        service.failed_starts = 0
            done, _ = ray.wait([service.outcome_ref], timeout=0)
            if done:
                self._ended(service, done[0])

    def _ended(self, service: Service, ref: Any) -> None:
        import ray

        service.outcome_ref = service.ready_ref = None
        log = service.log_path()
        try:
            outcome = ray.get(ref)
        except Exception:  # the actor process died (engine crash, OOM kill)
            outcome = {"failure": None, "fatal": False}
        text = read_tail(log) if log is not None else ""
        cause = root_cause(text) or outcome["failure"] or "the process died"
        with contextlib.suppress(Exception):
            ray.kill(service.actor, no_restart=True)
        where = f"full log: {log}" if log else f"logs: {ray_log_dir()}"
        if not service.ready:
            service.failed_starts += 1
            attempts = 1 if outcome["fatal"] else MAX_FAILED_STARTS
            if service.failed_starts >= attempts:
                raise ServeError(f"{service.name} could not start: {cause}\n{where}")
            delay = 2.0 ** (service.failed_starts - 1)
            logger.error(
                "%s failed to start (attempt %d of %d): %s; trying again in %.0f s",
                service.name,
                service.failed_starts,
                attempts,
                cause,
                delay,
            )
        else:
            if time.monotonic() - service.last_start > STABLE_AFTER_S:
                service.crashes = 0
            service.crashes += 1
            delay = min(MAX_BACKOFF_S, 2.0 ** (service.crashes - 1))
            logger.error(
                "%s crashed: %s (%s); restarting in %.0f s (restart %d)",
                service.name,
                cause,
                where,
                delay,
                service.crashes,
            )
        service.restart_at = time.monotonic() + delay

    def all_ready(self) -> bool:
        return all(s.ready for s in self.services.values())

    def stop(self) -> None:
        """Ask every actor to stop, kill what does not, then stop Ray."""
        import ray

        asked = []
        for service in self.services.values():
            if service.actor is not None and service.outcome_ref is not None:
                with contextlib.suppress(Exception):
                    asked.append(service.actor.shutdown.remote(SHUTDOWN_S - 5))
        if asked:
            with contextlib.suppress(Exception):
                ray.wait(asked, num_returns=len(asked), timeout=SHUTDOWN_S)
        for service in self.services.values():
            with contextlib.suppress(Exception):
                ray.kill(service.actor, no_restart=True)
        for group in self.placement_groups:
            with contextlib.suppress(Exception):
                ray.util.remove_placement_group(group)
        if self.started_ray:
            with contextlib.suppress(Exception):
                ray.shutdown()


def _quiet_ray_errors() -> None:
    """Ray prints a paragraph on the driver's terminal for every actor that
    dies; the Supervisor explains each death in one line instead, so the
    paragraph goes to the log only."""
    import ray._private.worker as ray_worker

    original = getattr(ray_worker, "print_to_stdstream", None)
    if original is None or getattr(original, "_qwen_vllm", False):
        return

    def print_to_stdstream(data, ignore_prefix: bool = False) -> None:
        if data.get("pid") == "raylet":
            for line in data.get("lines", []):
                logger.debug("ray: %s", line)
            return
        original(data, ignore_prefix=ignore_prefix)

    print_to_stdstream._qwen_vllm = True  # type: ignore[attr-defined]
    ray_worker.print_to_stdstream = print_to_stdstream


def start(
    settings: ServeSettings, supervisor: Supervisor, signals: StopSignals
) -> None:
    import ray
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    if settings.model is not None:
        try:
            read_config(settings.model)
        except NotACheckpoint as exc:
            raise ServeError(str(exc)) from exc
    tp = settings.tensor_parallel_size
    _quiet_ray_errors()
    if settings.ray_address is None:
        check_ports_free(settings.host, planned_ports(settings))
        status("starting Ray on 127.0.0.1 ...", end="\n")
        ray.init(
            _node_ip_address="127.0.0.1",
            include_dashboard=False,
            namespace=NAMESPACE,
            num_cpus=max(os.cpu_count() or 1, settings.num_workers * tp),
            log_to_driver=settings.log_level == "debug",
            configure_logging=False,
        )
        supervisor.started_ray = True
        signals.install()  # Ray's driver set its own SIGTERM handler
        workers_per_node = settings.num_workers
    else:
        ray.init(address=settings.ray_address, namespace=NAMESPACE, log_to_driver=False)
        signals.install()
        workers_per_node = settings.workers_per_node

    gpus = int(ray.cluster_resources().get("GPU", 0))
    if gpus and gpus < settings.num_workers * tp:
        raise ServeError(
            f"{settings.num_workers} worker(s) x tensor parallel {tp} need "
            f"{settings.num_workers * tp} GPUs; the Ray cluster has {gpus}"
        )

    controller = Service(
        "controller",
        "controller",
        subset(settings, ControllerSettings),
        options={"num_cpus": 0},
    )
    supervisor.launch(controller)
    supervisor._identify(controller, timeout=120.0)
    if controller.pid is None:
        raise ServeError(f"the controller actor did not start; logs: {ray_log_dir()}")
    supervisor.controller_url = settings.controller_address or (
        f"http://{reachable_host(settings.host, controller.node_ip)}:"
        f"{settings.controller_port}"
    )
    shared = {"controller_address": supervisor.controller_url}

    cores = os.cpu_count() or 1
    for i in range(settings.num_workers):
        bundle = {"GPU": tp, "CPU": 1} if gpus else {"CPU": tp}
        group = placement_group([bundle], strategy="STRICT_PACK")
        supervisor.placement_groups.append(group)
        env = {} if gpus else {"VLLM_CPU_OMP_THREADS_BIND": cpu_binding(i, tp, cores)}
        worker_settings = subset(
            settings,
            WorkerSettings,
            **shared,
            worker_port=settings.worker_port + i,
            workers_per_node=workers_per_node,
        )
        supervisor.launch(
            Service(
                f"worker-{i}",
                "worker",
                worker_settings,
                env,
                options={
                    "num_cpus": bundle["CPU"],
                    "num_gpus": bundle.get("GPU", 0),
                    "scheduling_strategy": PlacementGroupSchedulingStrategy(group),
                },
            )
        )
    front_ends: list[tuple[str, type]] = [("gateway", GatewaySettings)]
    if settings.webui:
        front_ends.append(("webui", WebUISettings))
    for kind, settings_cls in front_ends:
        supervisor.launch(
            Service(
                kind,
                kind,
                subset(settings, settings_cls, **shared),
                options={"num_cpus": 0},
            )
        )


def healthy_workers(supervisor: Supervisor, client: httpx.Client) -> int:
    settings = supervisor.settings
    headers = token_headers(settings.internal_token)
    try:
        reply = client.get(f"{supervisor.controller_url}/workers", headers=headers)
        reply.raise_for_status()
    except httpx.HTTPError:
        return 0
    model = settings.served_model_name()
    workers = reply.json().get("workers", [])
    return sum(1 for w in workers if w.get("healthy") and model in w.get("models", []))


def generation_defaults(supervisor: Supervisor) -> str | None:
    """The served model's generation defaults as a worker reports them
    (None if no worker says)."""
    settings = supervisor.settings
    headers = token_headers(settings.internal_token)
    model = settings.served_model_name()
    with httpx.Client(timeout=5.0, headers=headers) as client:
        try:
            reply = client.get(f"{supervisor.controller_url}/workers")
            workers = reply.raise_for_status().json().get("workers", [])
            address = next(w["name"] for w in workers if model in w.get("models", []))
            reply = client.post(f"{address}/model_details", json={"model": model})
            return reply.raise_for_status().json().get("generation_defaults")
        except (httpx.HTTPError, StopIteration, KeyError, ValueError):
            return None


def wait_until_ready(
    supervisor: Supervisor,
    stop_requested: threading.Event,
    timeout: float = STARTUP_TIMEOUT_S,
) -> bool:
    """Wait for every worker, with a live status line; False if asked to stop."""
    settings = supervisor.settings
    started = time.monotonic()
    with httpx.Client(timeout=2.0) as client:
        while not stop_requested.is_set():
            supervisor.poll()
            ready = healthy_workers(supervisor, client)
            elapsed = time.monotonic() - started
            status(
                f"starting: {ready}/{settings.num_workers} worker(s) ready "
                f"({elapsed:.0f} s; loading the model takes a while the first time)"
            )
            if ready >= settings.num_workers and supervisor.all_ready():
                status("", end="\n")
                return True
            if elapsed > timeout:
                raise ServeError(
                    f"workers not ready after {timeout:.0f} s; see the worker logs "
                    f"under {ray_log_dir()}"
                )
            stop_requested.wait(1.0)
    status("", end="\n")
    return False


def ray_log_dir() -> str:
    with contextlib.suppress(Exception):
        import ray

        return os.path.join(
            ray._private.worker._global_node.get_session_dir_path(), "logs"
        )
    return "/tmp/ray/session_latest/logs"


def status(text: str, end: str = "") -> None:
    if sys.stderr.isatty():
        sys.stderr.write("\r\033[K" + text + end)
    elif text:
        sys.stderr.write(text + "\n")
    sys.stderr.flush()


def endpoints(settings: ServeSettings, host: str = "127.0.0.1") -> list[str]:
    shown = (
        host if settings.host == "127.0.0.1" else reachable_host(settings.host, host)
    )
    names = settings.served_model_names()
    called = f"model {names[0]!r}" + (
        f", also {', '.join(map(repr, names[1:]))}" if names[1:] else ""
    )
    lines = [f"OpenAI API   http://{shown}:{settings.port}/v1  ({called})"]
    if settings.webui:
        lines.append(
            f"web UI       http://{shown}:{settings.webui_port}{settings.webui_root_path}"
        )
    lines.append(f"controller   http://{shown}:{settings.controller_port}")
    return lines


def ray_auth_env(token: SecretStr | str) -> dict[str, str]:
    """Ray's own token authentication (Ray 2.52+), with the deployment's
    internal token as Ray's token: no node joins and no job runs on the
    cluster without it."""
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secret_value(token) or ""}


def with_internal_token(settings: ServeSettings) -> ServeSettings:
    """The settings with a fresh internal token when none was given (and the
    user did not opt out): every component this run starts gets it, so the
    deployment is closed without any setting."""
    if settings.internal_token is not None or settings.insecure_no_internal_token:
        return settings
    return settings.model_copy(update={"internal_token": SecretStr(new_secret())})


def run_serve(settings: ServeSettings) -> None:
    """Start everything, serve until Ctrl-C or SIGTERM, then stop everything.

    A second Ctrl-C kills at once; `qwen-vllm` then ends whatever is left.
    """
    given = settings.internal_token is not None
    settings = with_internal_token(settings)
    # The local Ray takes the deployment's token as its own; a cluster joined
    # was started with the user's (`qwen-vllm launch ray-head`).
    ray_auth_chosen = {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"} & set(os.environ)
    ray_token = given or settings.ray_address is None
    if settings.internal_token is not None and ray_token and not ray_auth_chosen:
        os.environ.update(ray_auth_env(settings.internal_token))
    exposure("serve", settings, settings.controller_port).print_warnings()
    signals = StopSignals()
    supervisor = Supervisor(settings)
    with signals.installed():
        try:
            start(settings, supervisor, signals)
            if wait_until_ready(supervisor, signals.requested):
                for line in endpoints(settings):
                    print(line, flush=True)
                if (defaults := generation_defaults(supervisor)) is not None:
                    print(f"defaults     {defaults}", flush=True)
                print("serving; press Ctrl-C to stop", flush=True)
                while not signals.requested.wait(0.5):
                    supervisor.poll()
        finally:
            status("stopping...", end="\n")
            supervisor.stop()
            status("stopped", end="\n")
