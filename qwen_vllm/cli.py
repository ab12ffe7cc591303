"""The `qwen-vllm` command.

Each subcommand imports what it needs when it runs, so `qwen-vllm --help` and
the control-plane commands start without loading vLLM or torch.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import fields

from qwen_vllm.model.demo import DemoModelSpec


class CliError(Exception):
    """A user-facing error: printed as one line, no traceback."""


def _add_demo_model(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo-model",
        help="write the tiny random-weight Qwen v1 demo checkpoint",
        description="Write a small random-weight Qwen v1 checkpoint in the exact "
        "HF layout of a real release, with the real Qwen vocabulary.",
    )
    p.add_argument("dir", help="output directory (replaced if it exists)")
    for field in fields(DemoModelSpec):
        flag = "--" + field.name.replace("_", "-")
        if field.type == "bool":
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        else:
            kind = {"int": int, "float": float}.get(field.type, str)
            p.add_argument(flag, type=kind, default=None, metavar=field.name.upper())
    p.set_defaults(run=_run_demo_model)


def _run_demo_model(args: argparse.Namespace) -> None:
    from qwen_vllm.model.demo import write_demo_model

    overrides = {
        f.name: getattr(args, f.name)
        for f in fields(DemoModelSpec)
        if getattr(args, f.name) is not None
    }
    try:
        spec = DemoModelSpec(**overrides)
        spec.validate()
    except ValueError as exc:
        raise CliError(f"invalid demo model settings: {exc}") from exc
    path = write_demo_model(args.dir, spec)
    print(f"wrote Qwen v1 demo checkpoint to {path}")


_COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_demo_model]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qwen-vllm", description="Serve the Qwen v1 model family on vLLM."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in _COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except CliError as exc:
        print(f"qwen-vllm {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
