"""`qwen-vllm launch`: check, show and start `qwen-vllm serve` layouts.

`launch/serve-node.sh` and `launch/ray-cluster.sh` are thin wrappers around
this command. It checks what it is given (GPUs, tensor-parallel size, model,
ports) before anything starts, prints the plan, then execs exactly the
command it printed; `--dry-run` stops after the plan. The plans themselves
live in qwen_vllm.deploy (machine, layout, plans, ray_nodes).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING

from qwen_vllm.cli.errors import CliError

if TYPE_CHECKING:
    from qwen_vllm.deploy.plans import Plan


def add_launch_parser(sub: argparse._SubParsersAction) -> None:
    from qwen_vllm.deploy.ray_nodes import DEFAULT_RAY_PORT
    from qwen_vllm.serving.settings import ServeSettings, add_arguments

    launch = sub.add_parser(
        "launch",
        help="check, show and start serve layouts: GPU nodes, Ray clusters",
        description="Check, show and start `qwen-vllm serve` layouts (used by "
        "launch/serve-node.sh and launch/ray-cluster.sh).",
    )
    launch.set_defaults(run=run_launch)
    # dest "subcommand": errors read `qwen-vllm launch serve-node: error: ...`.
    commands = launch.add_subparsers(
        dest="subcommand", metavar="COMMAND", required=True
    )

    def common(p: argparse.ArgumentParser, gpus_help: str) -> None:
        p.add_argument("--gpus", type=int, default=None, metavar="N", help=gpus_help)
        p.add_argument(
            "--dry-run", action="store_true", help="print the plan, start nothing"
        )
        p.add_argument(
            "--json", action="store_true", help="print the plan as JSON (--dry-run)"
        )

    node = commands.add_parser(
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

    serve = commands.add_parser(
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
        p = commands.add_parser(kind, help=text, description=text + ".")
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

    commands.add_parser("ray-stop", help="stop Ray on this node (ray stop)")


def make_plan(
    args: argparse.Namespace, environ: Mapping[str, str] | None = None
) -> Plan:
    """The plan for the parsed `qwen-vllm launch` command line."""
    from qwen_vllm.deploy import plans, ray_nodes
    from qwen_vllm.deploy.machine import detect_machine
    from qwen_vllm.serving.settings import (
        ServeSettings,
        SettingsError,
        settings_from_args,
    )

    if args.subcommand == "ray-stop":
        return ray_nodes.plan_ray_stop()
    if args.subcommand in ("ray-head", "ray-worker"):
        machine = detect_machine(args.gpus, environ)
        env = os.environ if environ is None else environ
        if args.subcommand == "ray-head":
            return ray_nodes.plan_ray_head(args, machine, env)
        return ray_nodes.plan_ray_worker(args, machine, env)
    try:
        settings = settings_from_args(ServeSettings, args, environ)
    except SettingsError as exc:
        raise CliError(str(exc)) from exc
    if args.subcommand == "ray-serve":
        return plans.plan_ray_serve(settings, args.gpus)
    return plans.plan_serve_node(settings, detect_machine(args.gpus, environ))


def run_launch(args: argparse.Namespace) -> None:
    from qwen_vllm.deploy.machine import LaunchError

    try:
        plan = make_plan(args)
    except LaunchError as exc:
        raise CliError(str(exc)) from exc
    if getattr(args, "dry_run", False):
        print(plan.to_json() if args.json else plan.describe() + "\n(dry run)")
        return
    if args.subcommand != "ray-stop":
        print(plan.describe(), file=sys.stderr, flush=True)
    # Exec, so signals (Ctrl-C, SIGTERM from a supervisor) reach serve itself.
    os.execve(plan.command[0], list(plan.command), {**os.environ, **plan.env})
