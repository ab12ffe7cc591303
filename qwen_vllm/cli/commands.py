"""The `qwen-vllm` command.

Each subcommand imports what it needs when it runs, so `qwen-vllm --help` and
the control-plane commands start without loading vLLM or torch.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import fields

from qwen_vllm.checkpoints.demo import DemoModelSpec
from qwen_vllm.cli.errors import CliError


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
    from qwen_vllm.checkpoints.demo import write_demo_model

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


def _add_merge_lora(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "merge-lora",
        help="write a LoRA fine-tune as a standalone checkpoint",
        description="Merge a PEFT LoRA adapter (Qwen's finetune.py output, "
        "modules_to_save included) into its base model and write the result "
        "in the base's layout, to serve with --model. Adapters without "
        "modules_to_save can also be served unmerged with --lora.",
    )
    p.add_argument("base", help="the base model's checkpoint directory")
    p.add_argument("adapter", help="the adapter directory PEFT wrote")
    p.add_argument("out", help="output directory (must not exist)")
    p.set_defaults(run=_run_merge_lora)


def _run_merge_lora(args: argparse.Namespace) -> None:
    from qwen_vllm.checkpoints.directory import NotACheckpoint
    from qwen_vllm.checkpoints.merge_lora import merge_lora
    from qwen_vllm.model.refusal import ConfigRefused

    try:
        out = merge_lora(args.base, args.adapter, args.out)
    except (NotACheckpoint, ConfigRefused, FileExistsError) as exc:
        raise CliError(str(exc)) from exc
    print(f"wrote the merged checkpoint to {out}; serve it with --model {out}")


_SERVICE_HELP = {
    "controller": "run the FastChat-protocol controller alone",
    "worker": "run one vLLM worker alone (registers with the controller)",
    "gateway": "run the OpenAI-compatible API gateway alone",
    "webui": "run the web UI alone",
}


def _add_service(kind: str) -> Callable[[argparse._SubParsersAction], None]:
    def add(sub: argparse._SubParsersAction) -> None:
        from qwen_vllm.deploy.runner import SERVICES
        from qwen_vllm.serving.settings import add_arguments

        p = sub.add_parser(kind, help=_SERVICE_HELP[kind])
        add_arguments(p, SERVICES[kind].settings_cls)
        p.set_defaults(run=lambda args: _run_service(kind, args))

    return add


def _settings(cls, args: argparse.Namespace):
    from qwen_vllm.serving.settings import SettingsError, settings_from_args

    try:
        return settings_from_args(cls, args)
    except SettingsError as exc:
        raise CliError(str(exc)) from exc


def _run_service(kind: str, args: argparse.Namespace) -> None:
    from qwen_vllm.deploy.runner import SERVICES, ServiceRunner, configure_logging
    from qwen_vllm.model.refusal import ConfigRefused
    from qwen_vllm.serving.security import exposure

    service = SERVICES[kind]
    settings = _settings(service.settings_cls, args)
    exposed = exposure(kind, settings, getattr(settings, service.port_field))
    if exposed.refusal:
        raise CliError(exposed.refusal)
    exposed.print_warnings()
    configure_logging(settings.log_level)
    try:
        ServiceRunner(kind, settings).run()
    except (FileNotFoundError, ConfigRefused) as exc:
        raise CliError(str(exc)) from exc


def _add_serve(sub: argparse._SubParsersAction) -> None:
    from qwen_vllm.serving.settings import ServeSettings, add_arguments

    p = sub.add_parser(
        "serve",
        help="serve a model with the whole stack (controller, workers, gateway, "
        "web UI) on Ray",
        description="Start (or join) a Ray cluster and run the controller, the "
        "vLLM workers, the OpenAI gateway and the web UI as supervised actors. "
        "Without --model it serves the embedded demo model.",
    )
    add_arguments(p, ServeSettings)
    p.set_defaults(run=_run_serve)


def _run_serve(args: argparse.Namespace) -> None:
    from qwen_vllm.deploy.cluster import ServeError, run_serve
    from qwen_vllm.deploy.runner import configure_logging
    from qwen_vllm.serving.settings import ServeSettings

    settings = _settings(ServeSettings, args)
    configure_logging(settings.log_level)
    try:
        run_serve(settings)
    except ServeError as exc:
        raise CliError(str(exc)) from exc


def _add_chat(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "chat",
        help="chat with a model in the terminal (streams tokens)",
        description="An interactive terminal chat: answers stream as they are "
        "generated. The commands of Qwen's cli_demo.py (:h lists them) and "
        ":system <text>.",
    )
    p.add_argument("--model", default=None, help="Qwen v1 checkpoint (default: demo)")
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--system", default=None, help="system prompt")
    source = "default: the checkpoint's generation_config.json"
    p.add_argument("--max-tokens", type=int, help=f"per answer; {source}")
    p.add_argument("--temperature", type=float, default=None, help=source)
    p.add_argument("--top-p", type=float, default=None, help=source)
    p.add_argument(
        "--seed",
        type=int,
        default=None,
        help="sample every answer with this seed, as Qwen's cli_demo.py does: "
        "the same question gives the same answer (default: unseeded)",
    )
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--enforce-eager", action="store_true", help="faster start")
    p.add_argument("--verbose", action="store_true", help="show vLLM's logs")
    p.set_defaults(run=_run_chat)


def _run_chat(args: argparse.Namespace) -> None:
    import os

    if not args.verbose:
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
        os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "1")
    if args.model is not None:
        from qwen_vllm.checkpoints.directory import NotACheckpoint, read_config

        try:
            read_config(args.model)
        except NotACheckpoint as exc:
            raise CliError(str(exc)) from exc
    from qwen_vllm.chat.chatml import DEFAULT_SYSTEM
    from qwen_vllm.offline.qwen_chat import QwenChat
    from qwen_vllm.offline.terminal_chat import TerminalChat, seed_problem

    if args.seed is not None and (problem := seed_problem(args.seed)):
        raise CliError(problem)
    print(f"loading {args.model or 'the demo model'} ...", flush=True)
    engine_kwargs = {"dtype": args.dtype, "enforce_eager": args.enforce_eager}
    if args.max_model_len:
        engine_kwargs["max_model_len"] = args.max_model_len
    asked = {
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
    }
    sampling = {name: value for name, value in asked.items() if value is not None}
    with QwenChat(args.model, args.tensor_parallel_size, **engine_kwargs) as chat:
        TerminalChat(
            chat,
            system=args.system or DEFAULT_SYSTEM,
            sampling=sampling,
            seed=args.seed,
        ).run()


def _add_bench(sub: argparse._SubParsersAction) -> None:
    from qwen_vllm.cli.bench import add_bench_parser

    add_bench_parser(sub)


def _add_launch(sub: argparse._SubParsersAction) -> None:
    from qwen_vllm.cli.launch import add_launch_parser

    add_launch_parser(sub)


_COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_serve,
    _add_chat,
    *(_add_service(kind) for kind in _SERVICE_HELP),
    _add_demo_model,
    _add_merge_lora,
    _add_bench,
    _add_launch,
]


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
        # A command group (launch) names its subcommand too.
        name = " ".join(filter(None, (args.command, getattr(args, "subcommand", None))))
        print(f"qwen-vllm {name}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


def entry() -> None:
    """The `qwen-vllm` process: main() owning the whole process tree.

    Ctrl-C and SIGTERM (a supervisor, `kill`) stop every command within
    seconds, and whatever it started (engine cores, tensor-parallel ranks,
    Ray) ends with it. In the terminal chat, Ctrl-C interrupts an answer.
    """
    from qwen_vllm.deploy.lifecycle import StopSignals, adopt_orphans, end_descendants

    adopt_orphans()
    chat = len(sys.argv) > 1 and sys.argv[1] == "chat"
    handled = (signal.SIGTERM,) if chat else (signal.SIGINT, signal.SIGTERM)
    try:
        with StopSignals(interrupt=True, signals=handled).installed():
            code = main()
    finally:
        end_descendants()
    sys.exit(code)


if __name__ == "__main__":
    entry()
