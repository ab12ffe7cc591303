"""The `qwen-vllm` command line: one entry point, a module per subcommand group.

`commands` builds the parser and runs a subcommand; `bench` is the load
generator's command, `launch` the multi-GPU launch plans'. Every subcommand
imports what it needs when it runs, so `qwen-vllm --help` starts without
loading vLLM or torch.
"""

from qwen_vllm.cli.commands import build_parser, entry, main
from qwen_vllm.cli.errors import CliError

__all__ = ["CliError", "build_parser", "entry", "main"]
