#!/usr/bin/env bash
# Serve across several nodes on one Ray cluster.
#
#   launch/ray-cluster.sh head [--node-ip-address IP]       # on the first node
#   launch/ray-cluster.sh worker --address HEAD_IP:6379     # on every other node
#   launch/ray-cluster.sh serve --model DIR --tensor-parallel-size 8 \
#       --host 0.0.0.0 --api-key KEY                        # on the head node
#   launch/ray-cluster.sh stop                              # on every node
#
# `serve` runs `qwen-vllm serve --ray-address auto`: each worker's
# tensor-parallel group is one placement group, kept on one node. The model
# directory must exist at the same path on every node. Every command takes
# --dry-run (check and show the plan only) and --help; each one runs
# `qwen-vllm launch ray-COMMAND` with the same flags.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

usage() { sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; }

case "${1:-}" in
    head | worker | serve | stop) command=$1 && shift ;;
    -h | --help)
        usage
        exit 0
        ;;
    *)
        echo "ray-cluster.sh: expected head, worker, serve or stop, not '${1:-}'" >&2
        usage >&2
        exit 2
        ;;
esac

# A checkout's .venv when there is one; in the container image it is on PATH.
python=python3
[ -x "$root/.venv/bin/python" ] && python=$root/.venv/bin/python

# `qwen-vllm launch ray-head|ray-worker|ray-serve|ray-stop` checks the plan,
# then execs `ray start`, `qwen-vllm serve` or `ray stop`.
exec "$python" -m qwen_vllm.cli launch "ray-$command" "$@"
