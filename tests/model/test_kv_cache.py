"""KV cache sizing from the memory a machine can really give."""

from __future__ import annotations

from pathlib import Path

import pytest

from qwen_vllm.model import kv_cache as memory
from qwen_vllm.model.kv_cache import (
    GiB,
    InsufficientMemory,
    MemorySource,
    ModelFootprint,
)

# Qwen-7B in bf16: 32 layers x 32 heads x 128 x (K and V) x 2 bytes.
QWEN_7B = ModelFootprint(
    weight_bytes=int(15.4 * GiB),
    kv_bytes_per_token=2 * 32 * 32 * 128 * 2,
    max_model_len=8192,
    max_num_seqs=256,
)


def machine(gib: float) -> MemorySource:
    return MemorySource(int(gib * GiB), f"{gib} GiB test machine")


def test_qwen_7b_token_costs_half_a_mebibyte():
    assert QWEN_7B.kv_bytes_per_token == 512 * 1024
    assert QWEN_7B.minimal_cache_bytes == 4 * GiB


def test_the_cache_takes_what_is_left_after_weights_engine_and_headroom():
    budget = memory.kv_cache_budget(QWEN_7B, machine(64))
    assert budget == int(64 * GiB * 0.9) - int(15.4 * GiB) - int(2.5 * GiB)


def test_the_cache_is_capped_by_what_the_batch_can_use():
    tiny = ModelFootprint(40 << 20, 512, 2048, 256)
    assert memory.kv_cache_budget(tiny, machine(64)) == 512 * 2048 * 256


def test_a_machine_too_small_for_one_sequence_is_refused_with_the_numbers():
    with pytest.raises(InsufficientMemory) as refused:
        memory.kv_cache_budget(QWEN_7B, machine(16))
    message = str(refused.value)
    assert "needs 21.90 GiB" in message  # 15.4 + 2.5 + 4.0
    assert "can use 14.40 GiB (16 GiB test machine, less 10% headroom)" in message
    assert "--max-model-len" in message and "--num-workers" in message


def test_an_explicit_size_is_kept_or_refused():
    assert memory.kv_cache_budget(QWEN_7B, machine(64), 8 * GiB) == 8 * GiB
    with pytest.raises(InsufficientMemory, match="does not fit.*at most 39.70 GiB"):
        memory.kv_cache_budget(QWEN_7B, machine(64), 100 * GiB)
    with pytest.raises(InsufficientMemory, match="fewer than max_model_len=8192"):
        memory.kv_cache_budget(QWEN_7B, machine(64), 1 * GiB)


def test_tensor_parallel_ranks_each_cost_an_engine_and_share_the_cache():
    two = ModelFootprint(0, 1024, 1024, 1 << 20, ranks=2)
    total = memory.kv_cache_budget(two, machine(10))
    assert total == int(10 * GiB * 0.9) - int(1.5 * GiB) - 2 * GiB
    assert memory.cpu_kv_cache_bytes_per_rank(two) > 0


def test_workers_sharing_a_machine_split_it(monkeypatch):
    monkeypatch.setattr(memory, "numa_available", lambda cores: None)
    monkeypatch.setattr(memory, "cgroup_available", lambda: None)
    whole = memory.cpu_memory(1).available_bytes
    half = memory.cpu_memory(2)
    assert abs(half.available_bytes - whole // 2) < 256 << 20
    assert "shared by 2 workers" in half.reason


def test_the_tightest_bound_wins(monkeypatch):
    monkeypatch.setattr(memory, "numa_available", lambda cores: (3 * GiB, [1]))
    monkeypatch.setattr(memory, "cgroup_available", lambda: 5 * GiB)
    source = memory.cpu_memory()
    assert source.available_bytes == 3 * GiB
    assert "NUMA node 1" in source.reason
    monkeypatch.setattr(memory, "cgroup_available", lambda: 2 * GiB)
    assert "container's memory limit" in memory.cpu_memory().reason


def test_cgroup_limits_are_read_from_this_process_cgroup(tmp_path, monkeypatch):
    group = tmp_path / "memory" / "pods" / "p1"
    group.mkdir(parents=True)
    (group / "memory.limit_in_bytes").write_text(str(6 * GiB))
    (group / "memory.usage_in_bytes").write_text(str(1 * GiB))
    (tmp_path / "memory" / "memory.limit_in_bytes").write_text(str(1 << 62))
    (tmp_path / "memory" / "memory.usage_in_bytes").write_text("0")
    proc_cgroup = tmp_path / "self-cgroup"
    proc_cgroup.write_text("4:memory:/pods/p1\n0::/\n")
    monkeypatch.setattr(memory, "_CGROUP", tmp_path)
    real_path = Path

    def fake_path(p, *rest):
        return proc_cgroup if str(p) == "/proc/self/cgroup" else real_path(p, *rest)

    monkeypatch.setattr(memory, "Path", fake_path)
    assert memory.cgroup_available() == 5 * GiB


def test_numa_nodes_count_free_file_and_reclaimable_pages(tmp_path, monkeypatch):
    for node, cpus, free in (("node0", "0-1", 100), ("node1", "2-3", 1000)):
        (tmp_path / node).mkdir()
        (tmp_path / node / "cpulist").write_text(cpus + "\n")
        (tmp_path / node / "meminfo").write_text(
            f"Node {node[4:]} MemTotal: 9999 kB\n"
            f"Node {node[4:]} MemFree:  {free} kB\n"
            f"Node {node[4:]} Active(file): 10 kB\n"
            f"Node {node[4:]} Inactive(file): 20 kB\n"
            f"Node {node[4:]} SReclaimable: 30 kB\n"
        )
    monkeypatch.setattr(memory, "_SYS_NODE", tmp_path)
    assert memory.numa_available({1}) == ((100 + 60) * 1024, [0])
    assert memory.numa_available({1, 2}) == ((1100 + 120) * 1024, [0, 1])
    assert memory.numa_available({7}) is None


def test_the_engine_binding_decides_the_cores(monkeypatch):
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0-1|4")
    assert memory.bound_cores() == {0, 1, 4}
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "auto")
    assert memory.bound_cores()  # this process's own cores


def test_footprint_of_the_demo_checkpoint(demo_dir):
    from qwen_vllm.model.config import QWenConfig

    config = QWenConfig.from_pretrained(demo_dir)
    model = memory.footprint(
        config,
        demo_dir,
        dtype="bfloat16",
        kv_cache_dtype="auto",
        max_model_len=2048,
        max_num_seqs=256,
    )
    # 2 layers x 2 heads x 32 channels, K and V, 2 bytes each.
    assert model.kv_bytes_per_token == 2 * 2 * 2 * 32 * 2
    size = (demo_dir / "model.safetensors").stat().st_size
    assert model.weight_bytes == size
    in_fp32 = memory.footprint(
        config,
        demo_dir,
        dtype="float32",
        kv_cache_dtype="fp8_e4m3",
        max_model_len=2048,
        max_num_seqs=256,
    )
    assert in_fp32.weight_bytes == 2 * size
    assert in_fp32.kv_bytes_per_token == 2 * 2 * 2 * 32 * 1
