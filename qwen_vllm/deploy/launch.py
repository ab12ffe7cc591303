"""Launch plans for `qwen-vllm serve`: one node, or a Ray cluster of several.

`launch/serve-node.sh` and `launch/ray-cluster.sh` are thin wrappers around
this module. It checks what it is given (GPUs, tensor-parallel size, model,
ports) before anything starts, prints the plan, then execs exactly the
command it printed; `--dry-run` stops after the plan. Pure Python with no
vLLM and no torch, so a bad layout fails in a second instead of after a
model load.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from qwen_vllm.checkpoints.demo import DemoModelSpec
from qwen_vllm.checkpoints.directory import NotACheckpoint, read_config
from qwen_vllm.deploy.cluster import (
    ServeError,
    check_ports_free,
    cpu_binding,
    planned_ports,
)
from qwen_vllm.serving.settings import (
    ENV_PREFIX,
    ServeSettings,
    SettingsError,
    add_arguments,
    build_settings,
    settings_from_args,
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
DEFAULT_RAY_PORT = 6379
LOOPBACK = ("127.0.0.1", "localhost", "::1")


class LaunchError(Exception):
    """What is wrong and what to do about it; printed without a traceback."""


# ---------------------------------------------------------------- machine facts


@dataclass(frozen=True)
class Machine:
    """What this node offers, as the plan sees it."""

    gpu_ids: tuple[str, ...]  # CUDA device ids the plan may hand out, in order
    gpu_source: str  # where gpu_ids came from, for messages
    cpu_count: int  # os.cpu_count(): what `serve` numbers CPU cores against
    usable_cores: frozenset[int]  # cores this process may run on
    hidden_gpus: bool = False  # GPUs exist but --gpus 0 asked for the CPU


def nvidia_smi_gpus(environ: Mapping[str, str]) -> tuple[list[str], str]:
    """GPU indices listed by `nvidia-smi -L`, and how they were found."""
    smi = shutil.which("nvidia-smi", path=environ.get("PATH"))
    if smi is None:
        return [], "nvidia-smi not found"
    try:
        done = subprocess.run(
            [smi, "-L"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return [], f"nvidia-smi -L failed: {exc}"
    if done.returncode != 0:
        reason = done.stderr.strip() or f"exit code {done.returncode}"
        return [], f"nvidia-smi -L failed: {reason}"
    # MIG devices are indented under their GPU; only whole GPUs count.
    return re.findall(r"^GPU (\d+):", done.stdout, re.MULTILINE), "nvidia-smi -L"


def detect_machine(
    gpus: int | None, environ: Mapping[str, str] | None = None
) -> Machine:
    """This node's GPUs (nvidia-smi, CUDA_VISIBLE_DEVICES, --gpus) and cores."""
    env = os.environ if environ is None else environ
    listed, source = nvidia_smi_gpus(env)
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if listed and visible is not None:
        # Respect a restriction already in place (a scheduler's, or the user's).
        listed = [d.strip() for d in visible.split(",") if d.strip()][: len(listed)]
        source = f"nvidia-smi -L, restricted by CUDA_VISIBLE_DEVICES={visible}"
    hidden = False
    if gpus is not None:
        if gpus < 0:
            raise LaunchError("--gpus must be 0 (CPU) or a positive GPU count")
        if listed and gpus > len(listed):
            raise LaunchError(
                f"--gpus {gpus}, but only {len(listed)} GPU(s) are visible "
                f"({source}); pass --gpus {len(listed)} or less"
            )
        if listed:
            hidden = gpus == 0
            listed = listed[:gpus]
            source = f"--gpus {gpus} of {source}"
        else:
            listed = [str(i) for i in range(gpus)]
            source = f"--gpus {gpus} (not checked: {source})"
    try:
        usable = frozenset(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        usable = frozenset(range(os.cpu_count() or 1))
    return Machine(
        gpu_ids=tuple(listed),
        gpu_source=source,
        cpu_count=os.cpu_count() or 1,
        usable_cores=usable,
        hidden_gpus=hidden,
    )


# ------------------------------------------------------------------ the model


@dataclass(frozen=True)
class ModelInfo:
    path: str | None  # absolute checkpoint directory; None: the demo model
    name: str  # what clients ask for
    attention_heads: int

    def describe(self) -> str:
        where = self.path or "generated on first use"
        return f"{self.name} ({where}), {self.attention_heads} attention heads"


def read_model(settings: ServeSettings) -> ModelInfo:
    """The checkpoint's attention-head count, from config.json."""
    if settings.model is None:
        return ModelInfo(
            None, settings.served_model_name(), DemoModelSpec().num_attention_heads
        )
    path = Path(settings.model).expanduser().resolve()
    try:
        config = read_config(settings.model)
    except NotACheckpoint as exc:
        raise LaunchError(str(exc)) from exc
    config_file = path / "config.json"
    # The first Qwen-7B-Chat release used GPT-2 names (n_head).
    heads = config.get("num_attention_heads", config.get("n_head"))
    if not isinstance(heads, int) or heads < 1:
        raise LaunchError(
            f"{config_file} has no num_attention_heads (or n_head); is this a "
            "Qwen v1 checkpoint?"
        )
    name = settings.model_name or path.name
    return ModelInfo(str(path), name, heads)


def check_tensor_parallel(tp: int, model: ModelInfo) -> None:
    # vLLM splits the attention heads (and the MLP) evenly across ranks.
    valid = [n for n in (1, 2, 4, 8, 16, 32, 64) if model.attention_heads % n == 0]
    choices = ", ".join(map(str, valid))
    if tp & (tp - 1):
        raise LaunchError(
            f"--tensor-parallel-size {tp} is not a power of two; use one of "
            f"{choices} for {model.name}"
        )
    if model.attention_heads % tp:
        raise LaunchError(
            f"--tensor-parallel-size {tp} does not divide the "
            f"{model.attention_heads} attention heads of {model.name} "
            f"(num_attention_heads in config.json); use one of {choices}"
        )


# -------------------------------------------------------------------- layouts


@dataclass(frozen=True)
class WorkerSlot:
    index: int
    port: int
    cuda_devices: tuple[str, ...] = ()  # GPU plans
    cpu_cores: tuple[int, ...] = ()  # CPU plans: one core per rank


def gpu_groups(
    gpu_ids: Sequence[str], tp: int, num_workers: int | None, source: str
) -> list[tuple[str, ...]]:
    """Consecutive device ids, tp per worker: 8 GPUs, TP 2 -> 0,1 / 2,3 / ..."""
    count = len(gpu_ids)
    if tp > count:
        raise LaunchError(
            f"--tensor-parallel-size {tp} needs {tp} GPUs for one worker, but "
            f"only {count} are available ({source}); use --tensor-parallel-size "
            f"{_largest_power_of_two(count)} or less, or a node with more GPUs"
        )
    if count % tp:
        fits = count - count % tp
        raise LaunchError(
            f"{count} GPUs do not split into tensor-parallel groups of {tp} "
            f"({count % tp} would sit idle); choose a --tensor-parallel-size "
            f"that divides {count}, or pass --gpus {fits} to use only {fits} of "
            "them"
        )
    workers = count // tp if num_workers is None else num_workers
    if workers * tp > count:
        raise LaunchError(
            f"--num-workers {workers} x --tensor-parallel-size {tp} needs "
            f"{workers * tp} GPUs, but only {count} are available ({source}); "
            f"use --num-workers {count // tp} or fewer"
        )
    return [tuple(gpu_ids[i * tp : (i + 1) * tp]) for i in range(workers)]


def cpu_groups(machine: Machine, tp: int, num_workers: int) -> list[tuple[int, ...]]:
    """The cores `qwen-vllm serve` binds each CPU worker's ranks to."""
    usable = len(machine.usable_cores)
    if num_workers * tp > usable:
        raise LaunchError(
            f"{num_workers} worker(s) x tensor parallel {tp} need "
            f"{num_workers * tp} CPU cores (one per rank), but this process may "
            f"use {usable} ({_core_list(machine.usable_cores)}); lower "
            "--tensor-parallel-size or --num-workers"
        )
    groups = []
    for i in range(num_workers):
        # The same function serve uses, so the plan shows the real binding.
        binding = cpu_binding(i, tp, machine.cpu_count)
        cores = tuple(int(c) for c in binding.split("|"))
        outside = set(cores) - machine.usable_cores
        if outside:
            raise LaunchError(
                f"worker {i} would bind its ranks to cores {binding} (serve "
                "counts cores from 0), but this process may only use cores "
                f"{_core_list(machine.usable_cores)}; run it without a CPU "
                "affinity restriction (taskset, cgroup cpuset)"
            )
        groups.append(cores)
    return groups


def _largest_power_of_two(n: int) -> int:
    return 1 << (max(n, 1).bit_length() - 1)


def _core_list(cores: frozenset[int]) -> str:
    ordered = sorted(cores)
    if ordered and ordered == list(range(ordered[0], ordered[-1] + 1)):
        return f"{ordered[0]}-{ordered[-1]}" if len(ordered) > 1 else str(ordered[0])
    return ",".join(map(str, ordered))


# ---------------------------------------------------------------------- plans


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


def qwen_vllm_executable() -> str:
    """The `qwen-vllm` of this interpreter's environment (the .venv), or PATH's."""
    beside = Path(sys.executable).with_name("qwen-vllm")
    if beside.is_file():
        return str(beside)
    found = shutil.which("qwen-vllm")
    if found is None:
        raise LaunchError(
            "qwen-vllm is not installed next to this Python or on PATH; run "
            "install.sh first"
        )
    return found


def ray_executable() -> str:
    beside = Path(sys.executable).with_name("ray")
    if beside.is_file():
        return str(beside)
    found = shutil.which("ray")
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
            # the machine has two cores and the model two heads to split.
            two = len(machine.usable_cores) >= 2 and model.attention_heads % 2 == 0
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
    if settings.host not in LOOPBACK and not settings.api_keys:
        notes.append(
            f"--host {settings.host} exposes the API without --api-key: anyone "
            "who reaches this node can use it"
        )
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
        if gpus < 0:
            raise LaunchError("--gpus must be 0 (CPU) or a positive GPU count")
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
    if settings.host in LOOPBACK:
        notes.append(
            f"--host {settings.host}: services on other nodes are unreachable; "
            "use --host 0.0.0.0 when the cluster has more than this node"
        )
    elif settings.internal_token is None:
        notes.append(
            "no internal token: controller and worker endpoints are open to the "
            "network; set QWEN_VLLM_INTERNAL_TOKEN"
        )
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


def _check_port_free(host: str, port: int, flag: str) -> None:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise LaunchError(
                f"port {port} on {host} is in use ({exc.strerror}); is a Ray head "
                f"already running here (`ray status`)? Stop it with "
                f"launch/ray-cluster.sh stop, or choose another {flag}"
            ) from exc


def _ray_resources(args: argparse.Namespace, machine: Machine) -> list[str]:
    flags = []
    if args.gpus is not None:
        flags += ["--num-gpus", str(len(machine.gpu_ids))]
    if args.node_ip_address:
        flags += ["--node-ip-address", args.node_ip_address]
    if args.block:
        flags.append("--block")
    return flags


def plan_ray_head(args: argparse.Namespace, machine: Machine) -> Plan:
    bind = args.node_ip_address or "0.0.0.0"
    _check_port_free(bind, args.ray_port, "--ray-port")
    command = [
        ray_executable(),
        "start",
        "--head",
        "--port",
        str(args.ray_port),
        # The dashboard would listen on every interface; serving needs none.
        "--include-dashboard=false",
        "--disable-usage-stats",
        *_ray_resources(args, machine),
    ]
    head = f"{args.node_ip_address or '<this node IP>'}:{args.ray_port}"
    return Plan(
        kind="ray-head",
        command=tuple(command),
        notes=(
            f"this node offers {len(machine.gpu_ids)} GPU(s) ({machine.gpu_source})",
            f"then, on every other node: launch/ray-cluster.sh worker --address {head}",
            "then, here: launch/ray-cluster.sh serve --model DIR "
            "--tensor-parallel-size N --host 0.0.0.0 --api-key KEY",
        ),
    )


def plan_ray_worker(args: argparse.Namespace, machine: Machine) -> Plan:
    address = args.address or os.environ.get("RAY_ADDRESS")
    match = re.fullmatch(r"\[?([^\s\[\]]+?)\]?:(\d+)", address or "")
    if not match:
        raise LaunchError(
            f"--address {address or '(missing)'}: give the Ray head as HOST:PORT, "
            "as printed by launch/ray-cluster.sh head (for example "
            f"10.0.0.1:{DEFAULT_RAY_PORT})"
        )
    host, port = match.group(1), int(match.group(2))
    try:
        socket.create_connection((host, port), timeout=5).close()
    except OSError as exc:
        raise LaunchError(
            f"cannot reach the Ray head at {host}:{port} ({exc}); start it with "
            "launch/ray-cluster.sh head on that node and check that this node "
            "may connect to it (firewall, security groups)"
        ) from exc
    command = [
        ray_executable(),
        "start",
        "--address",
        f"{host}:{port}",
        *_ray_resources(args, machine),
    ]
    return Plan(
        kind="ray-worker",
        command=tuple(command),
        notes=(
            f"this node offers {len(machine.gpu_ids)} GPU(s) ({machine.gpu_source})",
        ),
    )


# ------------------------------------------------------------------------ CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m qwen_vllm.deploy.launch",
        description="Check, show and start `qwen-vllm serve` layouts (used by "
        "launch/serve-node.sh and launch/ray-cluster.sh).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def common(p: argparse.ArgumentParser, gpus_help: str) -> None:
        p.add_argument("--gpus", type=int, default=None, metavar="N", help=gpus_help)
        p.add_argument(
            "--dry-run", action="store_true", help="print the plan, start nothing"
        )
        p.add_argument(
            "--json", action="store_true", help="print the plan as JSON (--dry-run)"
        )

    node = sub.add_parser(
        "serve-node",
        help="serve on this node: its GPUs split into tensor-parallel workers",
        description="Serve on this node. GPUs (from nvidia-smi -L) are split "
        "into workers of --tensor-parallel-size GPUs each (default: as many "
        "workers as fit). Without GPUs, vLLM runs on the CPU with one core per "
        "rank (default: one worker, tensor parallel 2). Every `qwen-vllm "
        "serve` flag is accepted.",
    )
    common(node, "GPUs to use (default: all nvidia-smi lists; 0: CPU)")
    add_arguments(node, ServeSettings)

    serve = sub.add_parser(
        "ray-serve",
        help="serve on a running Ray cluster (qwen-vllm serve --ray-address auto)",
        description="Run `qwen-vllm serve --ray-address auto` on a Ray cluster "
        "started with launch/ray-cluster.sh head/worker. Each worker's "
        "tensor-parallel group is placed on one node by a placement group.",
    )
    common(serve, "GPUs in the cluster (default: ask the running cluster)")
    add_arguments(serve, ServeSettings)

    for kind, text in (
        ("ray-head", "start the Ray head on this node"),
        ("ray-worker", "join this node to a Ray head"),
    ):
        p = sub.add_parser(kind, help=text, description=text + ".")
        common(p, "GPUs this node offers to Ray (default: all nvidia-smi lists)")
        p.add_argument("--node-ip-address", default=None, metavar="IP")
        p.add_argument(
            "--block", action="store_true", help="stay in the foreground (containers)"
        )
        if kind == "ray-head":
            p.add_argument("--ray-port", type=int, default=DEFAULT_RAY_PORT)
        else:
            p.add_argument(
                "--address", default=None, metavar="HOST:PORT", help="the Ray head"
            )

    sub.add_parser("ray-stop", help="stop Ray on this node (ray stop)")
    return parser


def make_plan(
    args: argparse.Namespace, environ: Mapping[str, str] | None = None
) -> Plan:
    if args.command == "ray-stop":
        return Plan(kind="ray-stop", command=(ray_executable(), "stop"))
    if args.command in ("ray-head", "ray-worker"):
        machine = detect_machine(args.gpus, environ)
        if args.command == "ray-head":
            return plan_ray_head(args, machine)
        return plan_ray_worker(args, machine)
    try:
        settings = settings_from_args(ServeSettings, args, environ)
    except SettingsError as exc:
        raise LaunchError(str(exc)) from exc
    if args.command == "ray-serve":
        return plan_ray_serve(settings, args.gpus)
    return plan_serve_node(settings, detect_machine(args.gpus, environ))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        plan = make_plan(args)
    except LaunchError as exc:
        print(f"{args.command}: error: {exc}", file=sys.stderr)
        return 2
    if getattr(args, "dry_run", False):
        print(plan.to_json() if args.json else plan.describe() + "\n(dry run)")
        return 0
    if args.command != "ray-stop":
        print(plan.describe(), file=sys.stderr, flush=True)
    # Exec, so signals (Ctrl-C, SIGTERM from a supervisor) reach serve itself.
    os.execve(plan.command[0], list(plan.command), {**os.environ, **plan.env})
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
