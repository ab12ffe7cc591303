"""Serve plans: the `qwen-vllm serve` command to exec, its environment, and why.

One node (`serve-node`: its GPUs or CPU cores split into tensor-parallel
workers) or the whole stack on a running Ray cluster (`ray-serve`). Each plan
is checked before anything starts; `qwen-vllm launch` prints it, then execs
exactly its command. Pure Python with no vLLM and no torch, so a bad layout
fails in a second instead of after a model load.
"""

from __future__ import annotations

import json
import shlex
import shutil
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from qwen_vllm.deploy.cluster import ServeError, check_ports_free, planned_ports
from qwen_vllm.deploy.layout import (
    ModelInfo,
    WorkerSlot,
    check_tensor_parallel,
    cpu_groups,
    gpu_groups,
    read_model,
)
from qwen_vllm.deploy.machine import LaunchError, Machine, check_gpus_flag
from qwen_vllm.serving.security import exposure, is_loopback
from qwen_vllm.serving.settings import (
    ENV_PREFIX,
    ServeSettings,
    SettingsError,
    build_settings,
    to_strings,
)

# Settings that reach `qwen-vllm serve` through its environment, never its
# command line: a command line is visible to every user of the machine (ps).
SECRET_FIELDS = ("api_keys", "internal_token", "webui_password")
# Always spelled out in the command, defaults included, so the printed
# command says where everything listens.
ALWAYS_SHOWN = (
    "model",
    "tensor_parallel_size",
    "num_workers",
    "host",
    "port",
    "controller_port",
    "worker_port",
)


@dataclass(frozen=True)
class Plan:
    """A command to exec, its added environment, and what it will do."""

    kind: str
    command: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)
    secret_env: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    # Serve plans only.
    device: str | None = None  # "gpu" | "cpu"
    model: ModelInfo | None = None
    tensor_parallel_size: int | None = None
    workers: tuple[WorkerSlot, ...] = ()
    ports: dict[str, int] = field(default_factory=dict)

    def shown_env(self) -> dict[str, str]:
        return {
            k: ("<hidden>" if k in self.secret_env else v) for k, v in self.env.items()
        }

    def to_json(self) -> str:
        data = asdict(self)
        data["env"] = self.shown_env()
        del data["secret_env"]
        return json.dumps(data, indent=2)

    def describe(self) -> str:
        rows: list[tuple[str, str]] = []
        if self.model is not None:
            rows.append(("model", self.model.describe()))
        if self.device is not None:
            n, tp = len(self.workers), self.tensor_parallel_size
            unit = "GPUs" if self.device == "gpu" else "CPU cores"
            rows.append(
                ("layout", f"{n} worker(s) x tensor parallel {tp} = {n * tp} {unit}")
            )
        for w in self.workers:
            if w.cuda_devices:
                where = "CUDA devices " + ",".join(w.cuda_devices)
            elif w.cpu_cores:
                where = "CPU cores " + "|".join(map(str, w.cpu_cores))
                where += " (VLLM_CPU_OMP_THREADS_BIND: one core per rank)"
            else:
                where = "placed by Ray"
            rows.append((f"worker {w.index}", f"port {w.port}, {where}"))
        if self.ports:
            rows.append(("ports", ", ".join(f"{k} {v}" for k, v in self.ports.items())))
        for key, value in self.shown_env().items():
            rows.append(("environment", f"{key}={value}"))
        rows.append(("command", shlex.join(self.command)))
        rows.extend(("note", note) for note in self.notes)
        width = max(len(label) for label, _ in rows)
        lines = [f"{self.kind} plan:"]
        lines += [f"  {label:<{width}}  {value}" for label, value in rows]
        return "\n".join(lines)


def _executable(name: str) -> str | None:
    """`name` in this interpreter's environment (the .venv), or on PATH."""
    beside = Path(sys.executable).with_name(name)
    return str(beside) if beside.is_file() else shutil.which(name)


def qwen_vllm_executable() -> str:
    found = _executable("qwen-vllm")
    if found is None:
        raise LaunchError(
            "qwen-vllm is not installed next to this Python or on PATH; run "
            "install.sh first"
        )
    return found


def ray_executable() -> str:
    found = _executable("ray")
    if found is None:
        raise LaunchError("ray is not installed; run install.sh first")
    return found


def serve_command(settings: ServeSettings, fields: Sequence[str]) -> list[str]:
    """`qwen-vllm serve` flags for these fields; secrets excluded."""
    command = [qwen_vllm_executable(), "serve"]
    for name, value in to_strings(settings, fields).items():
        if name in SECRET_FIELDS:
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(getattr(settings, name), bool):
            command.append(flag if value == "true" else "--no-" + flag[2:])
        else:
            command += [flag, value]
    return command


def secret_env(settings: ServeSettings) -> dict[str, str]:
    present = [name for name in SECRET_FIELDS if getattr(settings, name)]
    if not present:
        return {}  # to_strings reads an empty field list as "all fields"
    return {
        ENV_PREFIX + name.upper(): value
        for name, value in to_strings(settings, present).items()
    }


def _rebuild(settings: ServeSettings, **values: Any) -> ServeSettings:
    given = {name: getattr(settings, name) for name in settings.model_fields_set}
    try:
        return build_settings(ServeSettings, {**given, **values})
    except SettingsError as exc:
        raise LaunchError(str(exc)) from exc


def _shown_fields(settings: ServeSettings, extra: Sequence[str] = ()) -> list[str]:
    first = [*ALWAYS_SHOWN, *extra]
    if settings.webui:
        first.append("webui_port")
    rest = [
        name
        for name in ServeSettings.model_fields
        if name in settings.model_fields_set and name not in first
    ]
    return first + rest


def _check_ports(settings: ServeSettings) -> dict[str, int]:
    try:
        ports = planned_ports(settings)
        check_ports_free(settings.host, ports)
    except ServeError as exc:
        raise LaunchError(str(exc)) from exc
    return ports


def plan_serve_node(settings: ServeSettings, machine: Machine) -> Plan:
    """One node: its GPUs (or CPU cores) split into tensor-parallel workers."""
    if settings.ray_address is not None:
        raise LaunchError(
            "--ray-address joins an existing Ray cluster, but serve-node starts "
            "its own; use launch/ray-cluster.sh serve for a cluster"
        )
    model = read_model(settings)
    settings = _rebuild(settings, model=model.path)
    explicit = settings.model_fields_set
    notes: list[str] = []
    env: dict[str, str] = {}
    if machine.gpu_ids:
        tp = settings.tensor_parallel_size
        check_tensor_parallel(tp, model)
        workers = settings.num_workers if "num_workers" in explicit else None
        groups = gpu_groups(machine.gpu_ids, tp, workers, machine.gpu_source)
        settings = _rebuild(settings, num_workers=len(groups))
        used = [d for group in groups for d in group]
        # Ray sees only these, so GPUs left out stay free for other work.
        env["CUDA_VISIBLE_DEVICES"] = ",".join(used)
        notes.append(
            f"each worker reserves {tp} GPU(s) in a Ray placement group; Ray "
            "hands out the visible GPUs lowest first, so each worker sees the "
            "devices above as its CUDA_VISIBLE_DEVICES"
        )
        unused = [d for d in machine.gpu_ids if d not in used]
        if unused:
            notes.append(f"GPUs {','.join(unused)} stay unused")
        slots = tuple(
            WorkerSlot(i, settings.worker_port + i, cuda_devices=group)
            for i, group in enumerate(groups)
        )
        device = "gpu"
    else:
        if machine.hidden_gpus:
            env["CUDA_VISIBLE_DEVICES"] = ""
        if "tensor_parallel_size" not in explicit:
            # The CPU path doubles as the tensor-parallel demo: TP 2 whenever
            # the machine has two cores and the model two heads to split (and,
            # if GPTQ, quantization groups that split in two).
            two = (
                len(machine.usable_cores) >= 2
                and model.attention_heads % 2 == 0
                and model.tensor_parallel_refusal(2) is None
            )
            settings = _rebuild(settings, tensor_parallel_size=2 if two else 1)
        tp = settings.tensor_parallel_size
        check_tensor_parallel(tp, model)
        groups = cpu_groups(machine, tp, settings.num_workers)
        slots = tuple(
            WorkerSlot(i, settings.worker_port + i, cpu_cores=group)
            for i, group in enumerate(groups)
        )
        device = "cpu"
        notes.append(f"no GPU used ({machine.gpu_source}); vLLM runs on the CPU")
    ports = _check_ports(settings)
    secrets = secret_env(settings)
    env.update(secrets)
    notes.extend(exposure("serve", settings, settings.controller_port).warnings)
    return Plan(
        kind="serve-node",
        command=tuple(serve_command(settings, _shown_fields(settings))),
        env=env,
        secret_env=tuple(secrets),
        notes=tuple(notes),
        device=device,
        model=model,
        tensor_parallel_size=tp,
        workers=slots,
        ports=ports,
    )


def ray_capacity(node_gpus: Sequence[int], tp: int) -> int:
    """Workers that fit when a tensor-parallel group must stay on one node."""
    return sum(count // tp for count in node_gpus)


def cluster_gpus(address: str) -> list[int]:
    """GPUs per alive node of a running Ray cluster."""
    import ray

    try:
        ray.init(address=address, log_to_driver=False, logging_level="ERROR")
    except (ConnectionError, RuntimeError) as exc:
        raise LaunchError(
            f"no Ray cluster at {address!r} ({exc}); start one with "
            "launch/ray-cluster.sh head, or pass --gpus N (the cluster's GPU "
            "count) to plan without it"
        ) from exc
    try:
        return [
            int(node["Resources"].get("GPU", 0))
            for node in ray.nodes()
            if node.get("Alive")
        ]
    finally:
        ray.shutdown()


def plan_ray_serve(
    settings: ServeSettings, gpus: int | None, node_gpus: Sequence[int] | None = None
) -> Plan:
    """The whole stack on a running Ray cluster; Ray places each TP group."""
    model = read_model(settings)
    settings = _rebuild(
        settings, ray_address=settings.ray_address or "auto", model=model.path
    )
    tp = settings.tensor_parallel_size
    check_tensor_parallel(tp, model)
    notes = [
        "each worker's tensor-parallel group is a STRICT_PACK placement group: "
        "Ray puts it on one node and sets its CUDA_VISIBLE_DEVICES",
    ]
    if model.path is not None:
        notes.append(f"{model.path} must exist at the same path on every node")
    if gpus is not None:
        check_gpus_flag(gpus)
        source = f"--gpus {gpus}"
        if gpus:
            gpu_groups([str(i) for i in range(gpus)], tp, None, source)
        node_gpus = [gpus]
    else:
        if node_gpus is None:
            node_gpus = cluster_gpus(settings.ray_address)
        source = "GPUs per node in the Ray cluster: " + ", ".join(map(str, node_gpus))
    if sum(node_gpus):
        capacity = ray_capacity(node_gpus, tp)
        if capacity == 0:
            raise LaunchError(
                f"no node has {tp} GPUs for one tensor-parallel group (a group "
                f"cannot span nodes; {source}); lower --tensor-parallel-size"
            )
        explicit = "num_workers" in settings.model_fields_set
        workers = settings.num_workers if explicit else capacity
        if workers > capacity:
            raise LaunchError(
                f"--num-workers {workers} x --tensor-parallel-size {tp}: only "
                f"{capacity} group(s) of {tp} GPUs fit ({source}); use "
                f"--num-workers {capacity} or fewer"
            )
        idle = sum(node_gpus) - workers * tp
        if idle:
            notes.append(f"{idle} GPU(s) stay idle ({source})")
        settings = _rebuild(settings, num_workers=workers)
        device = "gpu"
    else:
        device = "cpu"
        notes.append("no GPU in the cluster: workers run vLLM on CPU cores")
    slots = tuple(
        WorkerSlot(i, settings.worker_port + i) for i in range(settings.num_workers)
    )
    ports = _check_ports(settings)
    notes.append(f"ports checked free on this node ({settings.host})")
    if is_loopback(settings.host):
        notes.append(
            f"--host {settings.host}: services on other nodes are unreachable; "
            "use --host 0.0.0.0 when the cluster has more than this node"
        )
    notes.extend(exposure("serve", settings, settings.controller_port).warnings)
    secrets = secret_env(settings)
    shown = _shown_fields(settings, ["ray_address"])
    return Plan(
        kind="ray-serve",
        command=tuple(serve_command(settings, shown)),
        env=secrets,
        secret_env=tuple(secrets),
        notes=tuple(notes),
        device=device,
        model=model,
        tensor_parallel_size=tp,
        workers=slots,
        ports=ports,
    )
