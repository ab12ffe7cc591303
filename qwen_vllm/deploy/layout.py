"""The model check and the device layouts a launch plan is built from.

The model's attention heads (and a GPTQ checkpoint's quantization groups)
decide which tensor-parallel sizes work; a layout is which GPUs (consecutive
device ids) or CPU cores (the binding `qwen-vllm serve` uses) each worker gets.
Every check fails with a LaunchError that names the flag to change.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from qwen_vllm.checkpoints.demo import DemoModelSpec
from qwen_vllm.checkpoints.directory import NotACheckpoint, read_config
from qwen_vllm.deploy.cluster import cpu_binding
from qwen_vllm.deploy.machine import LaunchError, Machine
from qwen_vllm.model.sizes import GptqSplit
from qwen_vllm.serving.settings import ServeSettings


@dataclass(frozen=True)
class ModelInfo:
    path: str | None  # absolute checkpoint directory; None: the demo model
    name: str  # what clients ask for
    attention_heads: int
    gptq: GptqSplit | None = None  # how GPTQ weights split over ranks

    def describe(self) -> str:
        where = self.path or "generated on first use"
        text = f"{self.name} ({where}), {self.attention_heads} attention heads"
        if self.gptq is not None:
            text += f", GPTQ {self.gptq.bits}-bit, group size {self.gptq.group_size}"
        return text

    def tensor_parallel_refusal(self, tp: int) -> str | None:
        """Why the weights do not split over tp ranks (GPTQ groups), or None."""
        return None if self.gptq is None else self.gptq.refusal(tp)


def read_model(settings: ServeSettings) -> ModelInfo:
    """The checkpoint's attention-head count and GPTQ sizes, from config.json."""
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
    try:
        gptq = GptqSplit.of(config)
    except ValueError as exc:
        raise LaunchError(f"{config_file}: {exc}") from exc
    name = settings.served_model_name()
    return ModelInfo(str(path), name, heads, gptq)


def check_tensor_parallel(tp: int, model: ModelInfo) -> None:
    # vLLM splits the attention heads (and the MLP) evenly across ranks.
    valid = [
        n
        for n in (1, 2, 4, 8, 16, 32, 64)
        if model.attention_heads % n == 0 and model.tensor_parallel_refusal(n) is None
    ]
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
    refusal = model.tensor_parallel_refusal(tp)
    if refusal is not None:
        raise LaunchError(f"--tensor-parallel-size {tp} for {model.name}: {refusal}")


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
