"""Plans that start or stop Ray on this node: the head, a worker joining it.

`ray-serve` (in plans.py) then runs the stack on the cluster they form.
"""

from __future__ import annotations

import argparse
import re
import socket
from collections.abc import Mapping

from qwen_vllm.deploy.cluster import ray_auth_env
from qwen_vllm.deploy.machine import LaunchError, Machine, bind_error
from qwen_vllm.deploy.plans import Plan, ray_executable
from qwen_vllm.serving.settings import ENV_PREFIX

DEFAULT_RAY_PORT = 6379


def _check_port_free(host: str, port: int, flag: str) -> None:
    if (problem := bind_error(host, port)) is not None:
        raise LaunchError(
            f"port {port} on {host} is in use ({problem}); is a Ray head "
            f"already running here (`ray status`)? Stop it with "
            f"launch/ray-cluster.sh stop, or choose another {flag}"
        )


TOKEN_ENV = ENV_PREFIX + "INTERNAL_TOKEN"


def _ray_auth(
    node: str, environ: Mapping[str, str]
) -> tuple[dict[str, str], tuple[str, ...]]:
    """The environment that turns Ray's token authentication on for a node,
    and its secret names. The deployment's internal token is Ray's token, so
    one secret closes Ray and our services; RAY_AUTH_MODE=disabled (Ray's own
    opt-out) leaves Ray open."""
    if environ.get("RAY_AUTH_MODE") == "disabled":
        return {}, ()
    token = environ.get(TOKEN_ENV)
    if not token:
        raise LaunchError(
            f"a Ray {node} without a token takes any node and runs any code "
            f"sent to it: set {TOKEN_ENV} to a secret, the same on every node "
            "(for example: export "
            f"{TOKEN_ENV}=$(python3 -c 'import secrets; print(secrets.token_hex(32))')"
            "); Ray and qwen-vllm both use it. RAY_AUTH_MODE=disabled runs Ray "
            "open instead"
        )
    return ray_auth_env(token), ("RAY_AUTH_TOKEN",)


def _ray_resources(args: argparse.Namespace, machine: Machine) -> list[str]:
    flags = []
    if args.gpus is not None:
        flags += ["--num-gpus", str(len(machine.gpu_ids))]
    if args.node_ip_address:
        flags += ["--node-ip-address", args.node_ip_address]
    if args.block:
        flags.append("--block")
    return flags


def plan_ray_head(
    args: argparse.Namespace, machine: Machine, environ: Mapping[str, str]
) -> Plan:
    bind = args.node_ip_address or "0.0.0.0"
    _check_port_free(bind, args.ray_port, "--ray-port")
    env, secrets = _ray_auth("head", environ)
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
        env=env,
        secret_env=secrets,
        notes=(
            f"this node offers {len(machine.gpu_ids)} GPU(s) ({machine.gpu_source})",
            f"then, on every other node: launch/ray-cluster.sh worker --address {head}",
            "then, here: launch/ray-cluster.sh serve --model DIR "
            "--tensor-parallel-size N --host 0.0.0.0 --api-key KEY",
        ),
    )


def plan_ray_worker(
    args: argparse.Namespace, machine: Machine, environ: Mapping[str, str]
) -> Plan:
    address = args.address or environ.get("RAY_ADDRESS")
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
    env, secrets = _ray_auth("worker", environ)
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
        env=env,
        secret_env=secrets,
        notes=(
            f"this node offers {len(machine.gpu_ids)} GPU(s) ({machine.gpu_source})",
        ),
    )


def plan_ray_stop() -> Plan:
    return Plan(kind="ray-stop", command=(ray_executable(), "stop"))
