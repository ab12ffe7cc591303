#!/usr/bin/env bash
# Serve a model on this node with `qwen-vllm serve`: the node's GPUs are split
# into workers of --tensor-parallel-size GPUs each. Without a GPU, vLLM runs on
# the CPU with one core per rank (default: the demo model, tensor parallel 2).
#
#   launch/serve-node.sh --dry-run                 # check and show the plan only
#   launch/serve-node.sh --model /models/Qwen-14B-Chat --tensor-parallel-size 2
#   launch/serve-node.sh --gpus 4 --tensor-parallel-size 4 --host 0.0.0.0 --api-key KEY
#
# This runs `qwen-vllm launch serve-node`. Flags are those of `qwen-vllm
# serve` (same names) plus --gpus N (override nvidia-smi; 0: CPU), --dry-run
# and --json; --help lists them all.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# A checkout's .venv when there is one; in the container image it is on PATH.
python=python3
[ -x "$root/.venv/bin/python" ] && python=$root/.venv/bin/python

# `qwen-vllm launch serve-node` checks the plan, then execs `qwen-vllm serve`;
# exec here too, so Ctrl-C and a supervisor's SIGTERM reach serve itself.
exec "$python" -m qwen_vllm.cli launch serve-node "$@"
