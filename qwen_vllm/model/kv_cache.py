"""How much KV cache an engine can have on this machine.

vLLM sizes its CPU cache as a fixed fraction (0.92) of the NUMA node's total
memory and refuses to start when less than that is free: on a laptop, a busy
node or a container it never starts. Here the cache is sized from what the
engine can really get (the available memory of the NUMA nodes its cores sit
on, the container's cgroup limit, the machine's available memory, shared by
the workers on this machine), capped at what `max_model_len x max_num_seqs`
tokens can use, and a machine that cannot hold the model plus one full-length
sequence is refused before the engine starts, with the numbers.

Pure Python (psutil and /sys): the serving processes use it without torch.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import psutil

from qwen_vllm.model.refusal import ConfigRefused

GiB = 1 << 30
# The key of vLLM's `additional_config` under which a worker tells the config
# hook its share of the machine and the KV cache it asks for (all ranks).
WORKER_REQUEST_KEY = "qwen_vllm_kv_cache"
# Memory an engine needs beyond weights and KV cache: torch, vLLM, compiled
# graphs, one batch's activations. Measured (proportional set size) on the
# CPU build serving the demo model: 0.86 GiB for the process holding the
# front end, 0.6 GiB for the engine core, 0.9 GiB per model rank.
FRONT_END_BYTES = int(1.5 * GiB)
RANK_BYTES = int(1.0 * GiB)
# Left to the rest of the machine: the OS, the control plane, page cache.
HEADROOM_FRACTION = 0.1

_SYS_NODE = Path("/sys/devices/system/node")
_CGROUP = Path("/sys/fs/cgroup")


class InsufficientMemory(ConfigRefused):
    """The machine cannot hold the model and a minimal KV cache."""


@dataclass(frozen=True)
class MemorySource:
    """Memory an engine on this machine can use, and where the bound comes from."""

    available_bytes: int
    reason: str


@dataclass(frozen=True)
class ModelFootprint:
    weight_bytes: int
    kv_bytes_per_token: int
    max_model_len: int
    max_num_seqs: int
    # Tensor-parallel ranks: each is an engine process of its own.
    ranks: int = 1

    @property
    def runtime_bytes(self) -> int:
        return FRONT_END_BYTES + RANK_BYTES * self.ranks

    @property
    def minimal_cache_bytes(self) -> int:
        """One sequence of max_model_len tokens: what vLLM needs to start."""
        return self.kv_bytes_per_token * self.max_model_len

    @property
    def useful_cache_bytes(self) -> int:
        """Every batched sequence at full length: more would sit unused."""
        return self.kv_bytes_per_token * self.max_model_len * self.max_num_seqs


def gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "fp8": 1}


def dtype_bytes(dtype: str) -> int:
    """Bytes per element of a torch/vLLM dtype name ("bfloat16", "fp8_e4m3")."""
    name = str(dtype).removeprefix("torch.")
    return _DTYPE_BYTES.get(name, _DTYPE_BYTES.get(name.split("_")[0], 2))


def footprint(
    config,
    model_dir: str | Path,
    *,
    dtype: str,
    kv_cache_dtype: str,
    max_model_len: int,
    max_num_seqs: int,
    ranks: int = 1,
) -> ModelFootprint:
    """A Qwen v1 checkpoint's memory needs when served with these settings.

    Weights are what the checkpoint's files hold on disk, rescaled when an
    unquantized checkpoint is served in another dtype.
    """
    directory = Path(model_dir)
    files = [
        f
        for pattern in ("*.safetensors", "*.bin")
        for f in (directory.glob(pattern) if directory.is_dir() else ())
        if f.name != "training_args.bin"
    ]
    weight_bytes = sum(f.stat().st_size for f in files)
    stored = getattr(config, "torch_dtype", None) or "bfloat16"
    if not getattr(config, "quantization_config", None):
        weight_bytes = weight_bytes * dtype_bytes(dtype) // dtype_bytes(stored)
    kv_dtype = dtype if kv_cache_dtype in ("auto", None) else kv_cache_dtype
    per_token = (
        2
        * config.num_hidden_layers
        * config.num_attention_heads
        * config.kv_channels
        * dtype_bytes(kv_dtype)
    )
    return ModelFootprint(weight_bytes, per_token, max_model_len, max_num_seqs, ranks)


def _parse_cpu_list(text: str) -> set[int]:
    cores: set[int] = set()
    for part in text.replace("|", ",").split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            low, high = part.split("-")
            cores.update(range(int(low), int(high) + 1))
        else:
            cores.add(int(part))
    return cores


def _node_meminfo(node: Path) -> dict[str, int]:
    values = {}
    for line in (node / "meminfo").read_text().splitlines():
        match = re.match(r"Node \d+ (\S+):\s+(\d+)", line)
        if match:
            values[match.group(1)] = int(match.group(2)) * 1024
    return values


def numa_available(cores: Iterable[int]) -> tuple[int, list[int]] | None:
    """Available bytes on the NUMA nodes holding these cores, as vLLM counts
    them (free + file pages + reclaimable slab); None without NUMA info."""
    wanted = set(cores)
    total, nodes = 0, []
    for node in sorted(_SYS_NODE.glob("node[0-9]*")):
        try:
            node_cores = _parse_cpu_list((node / "cpulist").read_text())
            info = _node_meminfo(node)
        except (OSError, ValueError):
            continue
        if node_cores & wanted:
            nodes.append(int(node.name[4:]))
            total += sum(
                info.get(key, 0)
                for key in ("MemFree", "Active(file)", "Inactive(file)", "SReclaimable")
            )
    return (total, nodes) if nodes else None


def _cgroup_dirs() -> list[tuple[Path, str, str]]:
    """(directory, limit file, usage file) of this process's memory cgroups."""
    found = []
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        rel = path.lstrip("/")
        if controllers == "":
            found.append((_CGROUP / rel, "memory.max", "memory.current"))
        elif "memory" in controllers.split(","):
            found.append(
                (
                    _CGROUP / "memory" / rel,
                    "memory.limit_in_bytes",
                    "memory.usage_in_bytes",
                )
            )
    # In a container the process's own cgroup is often the mounted root.
    found += [
        (_CGROUP, "memory.max", "memory.current"),
        (_CGROUP / "memory", "memory.limit_in_bytes", "memory.usage_in_bytes"),
    ]
    return found


def cgroup_available() -> int | None:
    """Room left under this process's cgroup (v2 or v1) memory limit."""
    for directory, limit_file, usage_file in _cgroup_dirs():
        try:
            limit = (directory / limit_file).read_text().strip()
            usage = int((directory / usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit == "max" or int(limit) >= 1 << 60:
            continue
        return max(0, int(limit) - usage)
    return None


def bound_cores() -> set[int]:
    """The cores this process's engine will run on (vLLM's CPU binding)."""
    binding = os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "")
    if binding and binding not in ("auto", "nobind"):
        try:
            return _parse_cpu_list(binding)
        except ValueError:
            pass
    return set(os.sched_getaffinity(0))


def cpu_memory(share: int = 1) -> MemorySource:
    """What one of `share` engines on this machine can use."""
    bounds = [(psutil.virtual_memory().available, "available on this machine")]
    numa = numa_available(bound_cores())
    if numa is not None:
        nodes = ",".join(map(str, numa[1]))
        bounds.append((numa[0], f"available on NUMA node {nodes}"))
    room = cgroup_available()
    if room is not None:
        bounds.append((room, "left under the container's memory limit"))
    available, reason = min(bounds)
    if share > 1:
        return MemorySource(
            available // share, f"{gib(available)} {reason}, shared by {share} workers"
        )
    return MemorySource(available, f"{gib(available)} {reason}")


def kv_cache_budget(
    model: ModelFootprint, memory: MemorySource, requested_bytes: int | None = None
) -> int:
    """The KV cache of one worker (all its ranks together), or
    InsufficientMemory with the numbers."""
    usable = int(memory.available_bytes * (1 - HEADROOM_FRACTION))
    room = usable - model.weight_bytes - model.runtime_bytes
    if requested_bytes is not None:
        if requested_bytes < model.minimal_cache_bytes:
            raise InsufficientMemory(
                f"--kv-cache-memory {gib(requested_bytes)} holds fewer than "
                f"max_model_len={model.max_model_len} tokens "
                f"({gib(model.minimal_cache_bytes)} needed); give at least that, "
                "or lower --max-model-len"
            )
        if requested_bytes > room:
            raise InsufficientMemory(
                f"--kv-cache-memory {gib(requested_bytes)} does not fit: the "
                f"weights need {gib(model.weight_bytes)} and the engine about "
                f"{gib(model.runtime_bytes)}, and this worker can use "
                f"{gib(usable)} ({memory.reason}, less "
                f"{HEADROOM_FRACTION:.0%} headroom); lower --kv-cache-memory to "
                f"at most {gib(max(room, 0))}, or free memory"
            )
        return requested_bytes
    if room < model.minimal_cache_bytes:
        needed = model.weight_bytes + model.runtime_bytes + model.minimal_cache_bytes
        raise InsufficientMemory(
            f"not enough memory for this model: it needs {gib(needed)} (weights "
            f"{gib(model.weight_bytes)}, engine about "
            f"{gib(model.runtime_bytes)}, KV cache for one "
            f"{model.max_model_len}-token sequence "
            f"{gib(model.minimal_cache_bytes)}), and this worker can use "
            f"{gib(usable)} ({memory.reason}, less {HEADROOM_FRACTION:.0%} "
            "headroom). Free memory, serve fewer --num-workers, lower "
            "--max-model-len, or use a smaller or quantized checkpoint"
        )
    return min(room, model.useful_cache_bytes)


def cpu_kv_cache_bytes_per_rank(
    model: ModelFootprint, *, share: int = 1, requested_bytes: int | None = None
) -> int:
    """vLLM's `kv_cache_memory_bytes` (per rank) for an engine on this CPU."""
    return kv_cache_budget(model, cpu_memory(share), requested_bytes) // model.ranks


def worker_request(share: int, total_bytes: int | None) -> dict:
    """The `additional_config` entry a worker starts its engine with."""
    return {WORKER_REQUEST_KEY: {"share": share, "total_bytes": total_bytes}}
