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
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from qwen_vllm.serving.protocol import INTERNAL_TOKEN_HEADER
from qwen_vllm.serving.runner import SERVICES, ServiceRunner, configure_logging
from qwen_vllm.serving.settings import (
    ControllerSettings,
    GatewaySettings,
    ServeSettings,
    WebUISettings,
    WorkerSettings,
    build_settings,
    subset,
    to_strings,
)

logger = logging.getLogger(__name__)

NAMESPACE = "qwen_vllm"
STARTUP_TIMEOUT_S = 1800.0


class ServeError(RuntimeError):
    """A deployment that cannot start, explained for the user."""


class ServiceActor:
    """Runs one service in a thread of a Ray actor process."""

    def __init__(self, kind: str, values: dict[str, str], env: dict[str, str]) -> None:
        os.environ.update(env)
        if kind == "worker" and not values.get("worker_address"):
            host = advertised_host(values.get("host", "127.0.0.1"), _node_ip())
            values = {
                **values,
                "worker_address": f"http://{host}:{values['worker_port']}",
            }
        settings = build_settings(SERVICES[kind].settings_cls, values)
        configure_logging(settings.log_level)
        self.kind = kind
        self.runner = ServiceRunner(kind, settings)
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name=kind, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.runner.run()
        except BaseException:
            logger.exception("%s crashed", self.kind)
        if not self.stopping:
            # A service that ended on its own is broken: let Ray restart us.
            logger.error("%s stopped unexpectedly; exiting for a restart", self.kind)
            os._exit(1)

    def info(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "node_ip": _node_ip(),
            "alive": self.thread.is_alive(),
        }

    def shutdown(self, timeout: float = 20.0) -> None:
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


def advertised_host(bind_host: str, node_ip: str) -> str:
    """Where others reach a service bound to bind_host on a node at node_ip."""
    return node_ip if bind_host in ("0.0.0.0", "::") else bind_host


@dataclass
class Deployment:
    settings: ServeSettings
    started_ray: bool = False
    actors: dict[str, Any] = field(default_factory=dict)
    placement_groups: list[Any] = field(default_factory=list)
    controller_url: str = ""


def cpu_binding(worker: int, tp: int, cores: int) -> str:
    """OpenMP core ids per tensor-parallel rank of one CPU worker: "0|1"."""
    first = worker * tp
    return "|".join(str((first + rank) % cores) for rank in range(tp))


def check_ports_free(host: str, ports: dict[str, int]) -> None:
    for what, port in ports.items():
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
            except OSError as exc:
                raise ServeError(
                    f"port {port} ({what}) on {host} is in use ({exc.strerror}); "
                    f"stop what holds it or choose another with --{what}"
                ) from exc


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


def start(settings: ServeSettings) -> Deployment:
    import ray
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    if settings.model is not None and not os.path.isfile(
        os.path.join(os.path.expanduser(settings.model), "config.json")
    ):
        raise ServeError(
            f"--model {settings.model}: no config.json there; pass the directory of "
            "a Qwen v1 checkpoint, or omit --model to serve the demo model"
        )
    tp = settings.tensor_parallel_size
    deployment = Deployment(settings)
    if settings.ray_address is None:
        check_ports_free(settings.host, planned_ports(settings))
        ray.init(
            _node_ip_address="127.0.0.1",
            include_dashboard=False,
            namespace=NAMESPACE,
            num_cpus=max(os.cpu_count() or 1, settings.num_workers * tp),
            log_to_driver=settings.log_level == "debug",
            configure_logging=False,
        )
        deployment.started_ray = True
    else:
        ray.init(address=settings.ray_address, namespace=NAMESPACE, log_to_driver=False)

    gpus = int(ray.cluster_resources().get("GPU", 0))
    if gpus and gpus < settings.num_workers * tp:
        raise ServeError(
            f"{settings.num_workers} worker(s) x tensor parallel {tp} need "
            f"{settings.num_workers * tp} GPUs; the Ray cluster has {gpus}"
        )

    actor_cls = ray.remote(ServiceActor)
    supervised = {"max_restarts": -1, "max_concurrency": 4}

    def launch(name: str, kind: str, values: dict[str, str], env=None, **options):
        actor = actor_cls.options(name=name, **supervised, **options).remote(
            kind, values, env or {}
        )
        deployment.actors[name] = actor
        return actor

    controller = launch(
        "controller",
        "controller",
        to_strings(subset(settings, ControllerSettings)),
        num_cpus=0,
    )
    controller_ip = ray.get(controller.info.remote(), timeout=120)["node_ip"]
    deployment.controller_url = settings.controller_address or (
        f"http://{advertised_host(settings.host, controller_ip)}:"
        f"{settings.controller_port}"
    )
    shared = {"controller_address": deployment.controller_url}

    cores = os.cpu_count() or 1
    for i in range(settings.num_workers):
        bundle = {"GPU": tp, "CPU": 1} if gpus else {"CPU": tp}
        group = placement_group([bundle], strategy="STRICT_PACK")
        deployment.placement_groups.append(group)
        env = {} if gpus else {"VLLM_CPU_OMP_THREADS_BIND": cpu_binding(i, tp, cores)}
        values = to_strings(subset(settings, WorkerSettings, **shared))
        values["worker_port"] = str(settings.worker_port + i)
        launch(
            f"worker-{i}",
            "worker",
            values,
            env,
            num_cpus=bundle["CPU"],
            num_gpus=bundle.get("GPU", 0),
            scheduling_strategy=PlacementGroupSchedulingStrategy(group),
        )
    launch(
        "gateway",
        "gateway",
        to_strings(subset(settings, GatewaySettings, **shared)),
        num_cpus=0,
    )
    if settings.webui:
        launch(
            "webui",
            "webui",
            to_strings(subset(settings, WebUISettings, **shared)),
            num_cpus=0,
        )
    return deployment


def healthy_workers(deployment: Deployment, client: httpx.Client) -> int:
    headers = {}
    if deployment.settings.internal_token is not None:
        headers[INTERNAL_TOKEN_HEADER] = (
            deployment.settings.internal_token.get_secret_value()
        )
    try:
        reply = client.get(f"{deployment.controller_url}/workers", headers=headers)
        reply.raise_for_status()
    except httpx.HTTPError:
        return 0
    model = deployment.settings.served_model_name()
    workers = reply.json().get("workers", [])
    return sum(1 for w in workers if w.get("healthy") and model in w.get("models", []))


def wait_until_ready(
    deployment: Deployment, timeout: float = STARTUP_TIMEOUT_S
) -> None:
    """Wait for every worker, with a live status line."""
    import ray

    settings = deployment.settings
    started = time.monotonic()
    with httpx.Client(timeout=2.0) as client:
        while True:
            ready = healthy_workers(deployment, client)
            elapsed = time.monotonic() - started
            status(
                f"starting: {ready}/{settings.num_workers} worker(s) ready "
                f"({elapsed:.0f} s; loading the model takes a while the first time)"
            )
            if ready >= settings.num_workers:
                break
            if elapsed > timeout:
                raise ServeError(
                    f"workers not ready after {timeout:.0f} s; see the worker logs "
                    f"under {ray_log_dir()}"
                )
            dead = [
                name
                for name, actor in deployment.actors.items()
                if not _alive(ray, actor)
            ]
            if dead:
                logger.debug("restarting: %s", ", ".join(dead))
            time.sleep(1.0)
    status("", end="\n")


def _alive(ray, actor) -> bool:
    try:
        return ray.get(actor.info.remote(), timeout=5)["alive"]
    except Exception:
        return False


def ray_log_dir() -> str:
    with contextlib.suppress(Exception):
        import ray

        return os.path.join(
            ray._private.worker._global_node.get_session_dir_path(), "logs"
        )
    return "the Ray session directory (/tmp/ray/session_latest/logs)"


def status(text: str, end: str = "") -> None:
    if sys.stderr.isatty():
        sys.stderr.write("\r\033[K" + text + end)
    elif text:
        sys.stderr.write(text + "\n")
    sys.stderr.flush()


def stop(deployment: Deployment) -> None:
    import ray

    for name, actor in reversed(list(deployment.actors.items())):
        with contextlib.suppress(Exception):
            ray.get(actor.shutdown.remote(), timeout=30)
        with contextlib.suppress(Exception):
            ray.kill(actor, no_restart=True)
        logger.debug("stopped %s", name)
    for group in deployment.placement_groups:
        with contextlib.suppress(Exception):
            ray.util.remove_placement_group(group)
    if deployment.started_ray:
        ray.shutdown()


def endpoints(settings: ServeSettings, host: str = "127.0.0.1") -> list[str]:
    shown = host if settings.host in ("127.0.0.1", "0.0.0.0", "::") else settings.host
    lines = [
        f"OpenAI API   http://{shown}:{settings.port}/v1  "
        f"(model {settings.served_model_name()!r})",
    ]
    if settings.webui:
        lines.append(
            f"web UI       http://{shown}:{settings.webui_port}{settings.webui_root_path}"
        )
    lines.append(f"controller   http://{shown}:{settings.controller_port}")
    return lines


def run_serve(settings: ServeSettings) -> None:
    """Start everything, wait until Ctrl-C or SIGTERM, then stop everything."""
    stop_event = threading.Event()

    def on_signal(signum, frame) -> None:
        stop_event.set()

    signal.signal(signal.SIGTERM, on_signal)
    deployment: Deployment | None = None
    try:
        deployment = start(settings)
        wait_until_ready(deployment)
        for line in endpoints(settings):
            print(line, flush=True)
        print("serving; press Ctrl-C to stop", flush=True)
        while not stop_event.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        status("stopping...", end="\n")
        if deployment is not None:
            stop(deployment)
        status("stopped", end="\n")
