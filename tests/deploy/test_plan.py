"""Launch plans: device grouping, the checks and their messages, the commands.

Everything here is a dry run (or an exec replaced by a recorder): nothing
starts Ray or vLLM. Ports are free loopback ports so a busy machine does not
make the plans fail.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from qwen_vllm.cli import build_parser, main
from qwen_vllm.deploy import plans
from qwen_vllm.deploy.machine import LaunchError, Machine
from qwen_vllm.serving.settings import ServeSettings, settings_from_args
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
SERVE_NODE = ROOT / "launch" / "serve-node.sh"
RAY_CLUSTER = ROOT / "launch" / "ray-cluster.sh"
POWERS = [1, 2, 4, 8]


def free_port_block(count: int) -> int:
    """A first port with `count` free loopback ports from it (workers)."""
    for _ in range(50):
        first = free_port()
        if first + count > 65535:
            continue
        try:
            for port in range(first, first + count):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return first
    raise RuntimeError("no block of free ports")


@pytest.fixture
def ports() -> list[str]:
    return [
        "--port",
        str(free_port()),
        "--controller-port",
        str(free_port()),
        "--webui-port",
        str(free_port()),
        "--worker-port",
        str(free_port_block(16)),
    ]


@pytest.fixture
def no_nvidia_smi(monkeypatch, tmp_path):
    """A PATH without nvidia-smi and no QWEN_VLLM_* settings from outside."""
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    for key in list(os.environ):
        if key.startswith("QWEN_VLLM_"):
            monkeypatch.delenv(key)


@pytest.fixture
def model_dir(tmp_path) -> Path:
    """A checkpoint directory as far as the launcher looks: config.json."""
    path = tmp_path / "Qwen-14B-Chat"
    path.mkdir()
    (path / "config.json").write_text(
        json.dumps({"model_type": "qwen", "num_attention_heads": 40})
    )
    return path


def launch(*argv: str) -> int:
    """`qwen-vllm launch ARGV...` in-process: its exit code."""
    return main(["launch", *argv])


def dry_run(capsys, *argv: str) -> dict:
    """`serve-node --dry-run --json` in-process: the plan, as printed."""
    code = launch(*argv, "--dry-run", "--json")
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


def failure(capsys, *argv: str) -> str:
    code = launch(*argv, "--dry-run")
    out, err = capsys.readouterr()
    assert code == 2, out
    assert err.count("\n") == 1, "one line, no traceback"
    return err


def flag(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


# ------------------------------------------------------------- GPU grouping


@pytest.mark.parametrize("gpus", POWERS)
@pytest.mark.parametrize("tp", POWERS)
def test_gpu_plans(capsys, no_nvidia_smi, model_dir, ports, gpus, tp):
    argv = ["serve-node", "--gpus", str(gpus), "--tensor-parallel-size", str(tp)]
    argv += ["--model", str(model_dir), *ports]
    if tp > gpus:
        err = failure(capsys, *argv)
        assert f"--tensor-parallel-size {tp} needs {tp} GPUs for one worker" in err
        assert f"only {gpus} are available" in err
        assert f"use --tensor-parallel-size {gpus} or less" in err
        return
    plan = dry_run(capsys, *argv)
    groups = [w["cuda_devices"] for w in plan["workers"]]
    expected = [[str(d) for d in range(i, i + tp)] for i in range(0, gpus, tp)]
    assert groups == expected
    assert plan["device"] == "gpu"
    command = plan["command"]
    assert command[1] == "serve"
    assert flag(command, "--tensor-parallel-size") == str(tp)
    assert flag(command, "--num-workers") == str(gpus // tp)
    assert flag(command, "--model") == str(model_dir)
    assert plan["env"]["CUDA_VISIBLE_DEVICES"] == ",".join(map(str, range(gpus)))
    first = int(flag(command, "--worker-port"))
    assert [w["port"] for w in plan["workers"]] == [
        first + i for i in range(gpus // tp)
    ]


def test_eight_gpus_tp2_is_four_pairs(capsys, no_nvidia_smi, model_dir, ports):
    plan = dry_run(
        capsys,
        "serve-node",
        "--gpus",
        "8",
        "--tensor-parallel-size",
        "2",
        "--model",
        str(model_dir),
        *ports,
    )
    assert [",".join(w["cuda_devices"]) for w in plan["workers"]] == [
        "0,1",
        "2,3",
        "4,5",
        "6,7",
    ]


def test_gpus_that_do_not_divide_fail(capsys, no_nvidia_smi, model_dir, ports):
    err = failure(
        capsys,
        "serve-node",
        "--gpus",
        "6",
        "--tensor-parallel-size",
        "4",
        "--model",
        str(model_dir),
        *ports,
    )
    assert "6 GPUs do not split into tensor-parallel groups of 4" in err
    assert "2 would sit idle" in err
    assert "--gpus 4" in err


def test_tp_that_is_not_a_power_of_two_fails(capsys, no_nvidia_smi, model_dir, ports):
    err = failure(
        capsys,
        "serve-node",
        "--gpus",
        "6",
        "--tensor-parallel-size",
        "3",
        "--model",
        str(model_dir),
        *ports,
    )
    assert "--tensor-parallel-size 3 is not a power of two" in err
    assert "1, 2, 4, 8" in err  # the sizes that divide 40 heads


def test_tp_must_divide_the_attention_heads(capsys, no_nvidia_smi, tmp_path, ports):
    model = tmp_path / "twelve-heads"
    model.mkdir()
    # GPT-2 style names, as in the first Qwen-7B-Chat release.
    (model / "config.json").write_text(json.dumps({"n_head": 12}))
    argv = ["serve-node", "--gpus", "8", "--model", str(model), *ports]
    err = failure(capsys, *argv, "--tensor-parallel-size", "8")
    assert "does not divide the 12 attention heads of twelve-heads" in err
    assert "use one of 1, 2, 4" in err
    assert dry_run(capsys, *argv, "--tensor-parallel-size", "4")["workers"]


def test_too_many_workers_fail(capsys, no_nvidia_smi, model_dir, ports):
    err = failure(
        capsys,
        "serve-node",
        "--gpus",
        "4",
        "--tensor-parallel-size",
        "2",
        "--num-workers",
        "3",
        "--model",
        str(model_dir),
        *ports,
    )
    assert "--num-workers 3 x --tensor-parallel-size 2 needs 6 GPUs" in err
    assert "use --num-workers 2 or fewer" in err


def test_fewer_workers_leave_gpus_unused(capsys, no_nvidia_smi, model_dir, ports):
    plan = dry_run(
        capsys,
        "serve-node",
        "--gpus",
        "8",
        "--tensor-parallel-size",
        "2",
        "--num-workers",
        "3",
        "--model",
        str(model_dir),
        *ports,
    )
    assert plan["env"]["CUDA_VISIBLE_DEVICES"] == "0,1,2,3,4,5"
    assert "GPUs 6,7 stay unused" in plan["notes"]


# ------------------------------------------------------------ GPTQ groups


def gptq_checkpoint(tmp_path: Path, name: str, **sizes) -> Path:
    """config.json of a Qwen v1 -Int4 release, as far as the launcher looks."""
    path = tmp_path / name
    path.mkdir()
    quantization = {"quant_method": "gptq", "bits": 4, "desc_act": False}
    quantization["group_size"] = sizes.pop("group_size", 128)
    config = {"model_type": "qwen", **sizes, "quantization_config": quantization}
    (path / "config.json").write_text(json.dumps(config))
    return path


QWEN_14B = {"hidden_size": 5120, "num_attention_heads": 40, "intermediate_size": 27392}
QWEN_7B = {"hidden_size": 4096, "num_attention_heads": 32, "intermediate_size": 22016}


def test_gptq_groups_straddling_ranks_are_refused(
    capsys, no_nvidia_smi, tmp_path, ports
):
    # The upstream report: Qwen-14B-Chat-Int4 at TP 2 failed deep in vLLM's
    # GPTQ loader. The plan names the layer, the sizes and what works.
    model = gptq_checkpoint(tmp_path, "Qwen-14B-Chat-Int4", **QWEN_14B)
    argv = ["serve-node", "--gpus", "2", "--model", str(model), *ports]
    err = failure(capsys, *argv, "--tensor-parallel-size", "2")
    assert err == (
        "qwen-vllm launch serve-node: error: --tensor-parallel-size 2 for "
        "Qwen-14B-Chat-Int4: tensor_parallel_size 2 splits the 13696 inputs of "
        "the MLP's output projection (mlp.c_proj) into 6848 per rank, not a "
        "multiple of the GPTQ group size 128; sizes that work for this "
        "checkpoint: 1\n"
    )
    plan = dry_run(capsys, *argv, "--tensor-parallel-size", "1")
    assert [w["cuda_devices"] for w in plan["workers"]] == [["0"], ["1"]]
    assert plan["model"]["gptq"]["group_size"] == 128


def test_gptq_sizes_that_work_are_the_advice(capsys, no_nvidia_smi, tmp_path, ports):
    model = gptq_checkpoint(tmp_path, "Qwen-7B-Chat-Int4", **QWEN_7B)
    argv = ["serve-node", "--gpus", "8", "--model", str(model), *ports]
    err = failure(capsys, *argv, "--tensor-parallel-size", "4")
    assert "splits the 11008 inputs of the MLP's output projection" in err
    assert "into 2752 per rank" in err
    assert err.endswith("sizes that work for this checkpoint: 1, 2\n")
    # The other refusals offer only sizes this one accepts too.
    err = failure(capsys, *argv, "--tensor-parallel-size", "3")
    assert "is not a power of two; use one of 1, 2 for Qwen-7B-Chat-Int4" in err
    plan = dry_run(capsys, *argv, "--tensor-parallel-size", "2")
    assert len(plan["workers"]) == 4


def test_gptq_with_one_group_per_channel_splits_anywhere(
    capsys, no_nvidia_smi, tmp_path, ports
):
    model = gptq_checkpoint(tmp_path, "per-channel", group_size=-1, **QWEN_14B)
    argv = ["serve-node", "--gpus", "8", "--model", str(model), *ports]
    assert dry_run(capsys, *argv, "--tensor-parallel-size", "8")["workers"]


def test_gptq_refusal_in_a_ray_plan(tmp_path, ports):
    model = gptq_checkpoint(tmp_path, "Qwen-14B-Chat-Int4", **QWEN_14B)
    settings = serve_settings("--model", str(model), "--tensor-parallel-size", "2")
    with pytest.raises(LaunchError, match="6848 per rank"):
        plans.plan_ray_serve(settings, 8)


def test_cpu_plan_keeps_a_gptq_checkpoint_that_does_not_split_at_tp1(tmp_path):
    # The CPU demo's TP 2 is chosen only where the weights split in two.
    model = gptq_checkpoint(tmp_path, "Qwen-14B-Chat-Int4", **QWEN_14B)
    settings = serve_settings("--model", str(model), *cpu_ports())
    plan = plans.plan_serve_node(settings, cpu_machine(2))
    assert plan.tensor_parallel_size == 1
    assert "GPTQ 4-bit, group size 128" in plan.describe()
    seven = gptq_checkpoint(tmp_path, "Qwen-7B-Chat-Int4", **QWEN_7B)
    settings = serve_settings("--model", str(seven), *cpu_ports())
    assert plans.plan_serve_node(settings, cpu_machine(2)).tensor_parallel_size == 2


# ------------------------------------------------------------ GPU detection


@pytest.fixture
def fake_nvidia_smi(tmp_path, monkeypatch, no_nvidia_smi):
    """An nvidia-smi on PATH listing four GPUs, one of them split by MIG."""
    bin_dir = Path(os.environ["PATH"])
    script = bin_dir / "nvidia-smi"
    script.write_text(
        "#!/bin/sh\n"
        'echo "GPU 0: NVIDIA A100-SXM4-80GB (UUID: GPU-0)"\n'
        'echo "GPU 1: NVIDIA A100-SXM4-80GB (UUID: GPU-1)"\n'
        'echo "  MIG 1g.10gb     Device  0: (UUID: MIG-1)"\n'
        'echo "GPU 2: NVIDIA A100-SXM4-80GB (UUID: GPU-2)"\n'
        'echo "GPU 3: NVIDIA A100-SXM4-80GB (UUID: GPU-3)"\n'
    )
    script.chmod(0o755)
    return script


def test_gpus_come_from_nvidia_smi(capsys, fake_nvidia_smi, model_dir, ports):
    plan = dry_run(
        capsys,
        "serve-node",
        "--tensor-parallel-size",
        "2",
        "--model",
        str(model_dir),
        *ports,
    )
    assert [w["cuda_devices"] for w in plan["workers"]] == [["0", "1"], ["2", "3"]]


def test_cuda_visible_devices_restricts_the_plan(
    capsys, fake_nvidia_smi, model_dir, ports, monkeypatch
):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    plan = dry_run(
        capsys,
        "serve-node",
        "--tensor-parallel-size",
        "2",
        "--model",
        str(model_dir),
        *ports,
    )
    assert [w["cuda_devices"] for w in plan["workers"]] == [["2", "3"]]
    assert plan["env"]["CUDA_VISIBLE_DEVICES"] == "2,3"


def test_gpus_override_cannot_exceed_what_is_visible(
    capsys, fake_nvidia_smi, model_dir, ports
):
    err = failure(capsys, "serve-node", "--gpus", "8", "--model", str(model_dir))
    assert "--gpus 8, but only 4 GPU(s) are visible (nvidia-smi -L)" in err


def test_gpus_zero_hides_the_gpus(capsys, fake_nvidia_smi, ports):
    plan = dry_run(capsys, "serve-node", "--gpus", "0", *ports)
    assert plan["device"] == "cpu"
    assert plan["env"]["CUDA_VISIBLE_DEVICES"] == ""


def test_broken_nvidia_smi_means_cpu(capsys, fake_nvidia_smi, ports):
    fake_nvidia_smi.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed' >&2\nexit 9\n")
    plan = dry_run(capsys, "serve-node", *ports)
    assert plan["device"] == "cpu"
    notes = " ".join(plan["notes"])
    assert "nvidia-smi -L failed: NVIDIA-SMI has failed" in notes


# ---------------------------------------------------------------- CPU plans


def cpu_machine(cores: int, usable: set[int] | None = None) -> Machine:
    return Machine(
        gpu_ids=(),
        gpu_source="nvidia-smi not found",
        cpu_count=cores,
        usable_cores=frozenset(range(cores) if usable is None else usable),
    )


def serve_settings(*argv: str):
    args = build_parser().parse_args(["launch", "serve-node", *argv])
    return settings_from_args(ServeSettings, args, environ={})


def cpu_ports() -> list[str]:
    return [
        "--port",
        str(free_port()),
        "--controller-port",
        str(free_port()),
        "--worker-port",
        str(free_port_block(4)),
        "--no-webui",
    ]


def test_cpu_plan_is_the_demo_with_tp2_one_core_per_rank():
    plan = plans.plan_serve_node(serve_settings(*cpu_ports()), cpu_machine(2))
    assert plan.device == "cpu"
    assert plan.model.path is None and plan.model.name == "qwen-v1-demo"
    assert plan.tensor_parallel_size == 2
    assert [w.cpu_cores for w in plan.workers] == [(0, 1)]
    command = list(plan.command)
    assert "--model" not in command
    assert flag(command, "--tensor-parallel-size") == "2"
    assert flag(command, "--num-workers") == "1"
    assert "CUDA_VISIBLE_DEVICES" not in plan.env


def test_cpu_plan_matches_serves_core_binding():
    from qwen_vllm.deploy.cluster import cpu_binding

    settings = serve_settings("--num-workers", "2", *cpu_ports())
    plan = plans.plan_serve_node(settings, cpu_machine(4))
    assert [w.cpu_cores for w in plan.workers] == [(0, 1), (2, 3)]
    for w in plan.workers:
        assert "|".join(map(str, w.cpu_cores)) == cpu_binding(w.index, 2, 4)


def test_one_core_means_tp1():
    plan = plans.plan_serve_node(serve_settings(*cpu_ports()), cpu_machine(1))
    assert plan.tensor_parallel_size == 1
    assert [w.cpu_cores for w in plan.workers] == [(0,)]


def test_cpu_plan_needs_a_core_per_rank():
    settings = serve_settings("--tensor-parallel-size", "2", "--num-workers", "2")
    with pytest.raises(LaunchError) as err:
        plans.plan_serve_node(settings, cpu_machine(2))
    assert "2 worker(s) x tensor parallel 2 need 4 CPU cores (one per rank)" in str(
        err.value
    )
    assert "this process may use 2 (0-1)" in str(err.value)


def test_cpu_plan_refuses_cores_outside_the_affinity_mask():
    with pytest.raises(LaunchError) as err:
        plans.plan_serve_node(serve_settings(*cpu_ports()), cpu_machine(4, {2, 3}))
    assert "worker 0 would bind its ranks to cores 0|1" in str(err.value)
    assert "may only use cores 2-3" in str(err.value)


def test_cpu_plan_on_this_machine(capsys, no_nvidia_smi):
    plan = dry_run(capsys, "serve-node", *cpu_ports())
    assert plan["device"] == "cpu"
    ranks = sum(len(w["cpu_cores"]) for w in plan["workers"])
    assert ranks == plan["tensor_parallel_size"] <= len(os.sched_getaffinity(0))


# ------------------------------------------------------------ model and ports


def test_missing_model_directory(capsys, no_nvidia_smi, tmp_path):
    err = failure(capsys, "serve-node", "--model", str(tmp_path / "nope"))
    assert f"--model {tmp_path / 'nope'}: no such directory" in err
    assert "omit --model to serve the demo model" in err


def test_model_directory_without_config(capsys, no_nvidia_smi, tmp_path):
    err = failure(capsys, "serve-node", "--model", str(tmp_path))
    assert f"--model {tmp_path}: no config.json there" in err


def test_unreadable_config(capsys, no_nvidia_smi, tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    err = failure(capsys, "serve-node", "--model", str(tmp_path))
    assert f"cannot read {tmp_path / 'config.json'}" in err


def test_config_without_heads(capsys, no_nvidia_smi, tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "qwen"}')
    err = failure(capsys, "serve-node", "--model", str(tmp_path))
    assert "has no num_attention_heads (or n_head)" in err


def test_relative_model_path_becomes_absolute(
    capsys, no_nvidia_smi, model_dir, ports, monkeypatch
):
    monkeypatch.chdir(model_dir.parent)
    plan = dry_run(
        capsys, "serve-node", "--gpus", "2", "--model", model_dir.name, *ports
    )
    assert flag(plan["command"], "--model") == str(model_dir)


def test_busy_port_fails(capsys, no_nvidia_smi):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        err = failure(
            capsys,
            "serve-node",
            "--port",
            str(port),
            "--controller-port",
            str(free_port()),
            "--worker-port",
            str(free_port()),
            "--no-webui",
        )
    assert f"port {port} (port) on 127.0.0.1 is in use" in err
    assert "choose another with --port" in err


def test_colliding_ports_fail(capsys, no_nvidia_smi):
    port = str(free_port())
    err = failure(capsys, "serve-node", "--port", port, "--controller-port", port)
    assert "ports must differ" in err


def test_invalid_setting_fails_readably(capsys, no_nvidia_smi):
    err = failure(capsys, "serve-node", "--tensor-parallel-size", "0")
    assert "--tensor-parallel-size: Input should be greater than or equal to 1" in err


def test_serve_node_does_not_join_a_cluster(capsys, no_nvidia_smi):
    err = failure(capsys, "serve-node", "--ray-address", "auto")
    assert "use launch/ray-cluster.sh serve" in err


# -------------------------------------------------------- command and secrets


def test_secrets_go_to_the_environment_not_the_command(
    capsys, no_nvidia_smi, model_dir, ports
):
    plan = dry_run(
        capsys,
        "serve-node",
        "--gpus",
        "2",
        "--model",
        str(model_dir),
        "--api-key",
        "sk-one",
        "--api-key",
        "sk-two",
        "--internal-token",
        "t0ken",
        "--enforce-eager",
        "--no-webui",
        *ports,
    )
    text = json.dumps(plan)
    assert "sk-one" not in text and "t0ken" not in text
    assert plan["env"]["QWEN_VLLM_API_KEYS"] == "<hidden>"
    assert plan["env"]["QWEN_VLLM_INTERNAL_TOKEN"] == "<hidden>"
    assert "--enforce-eager" in plan["command"]
    assert "--no-webui" in plan["command"]


def test_an_open_network_plan_says_who_can_use_it(
    capsys, no_nvidia_smi, model_dir, ports
):
    # No token given (serve makes one per run), no API key, no web UI password.
    argv = ["serve-node", "--gpus", "1", "--model", str(model_dir)]
    plan = dry_run(capsys, *argv, "--host", "0.0.0.0", *ports)
    port = flag(plan["command"], "--port")
    assert (
        f"no --api-key: anyone who reaches 0.0.0.0:{port} can use the OpenAI API"
        in plan["notes"]
    )
    assert any(
        n.startswith("no --webui-password: anyone who reaches") for n in plan["notes"]
    )
    assert not any("--api-key" in n for n in dry_run(capsys, *argv, *ports)["notes"])


def test_exec_gets_the_printed_command_and_environment(
    capsys, no_nvidia_smi, model_dir, ports, monkeypatch
):
    calls = []
    monkeypatch.setattr(os, "execve", lambda *a: calls.append(a))
    argv = ["serve-node", "--gpus", "4", "--tensor-parallel-size", "2"]
    argv += ["--model", str(model_dir), "--api-key", "sk-x", *ports]
    assert launch(*argv) == 0
    shown = capsys.readouterr().err
    ((path, command, env),) = calls
    assert path == command[0] == plans.qwen_vllm_executable()
    assert " ".join(command) in shown
    assert env["QWEN_VLLM_API_KEYS"] == "sk-x"
    assert env["CUDA_VISIBLE_DEVICES"] == "0,1,2,3"
    assert "sk-x" not in shown


def test_the_command_is_accepted_by_qwen_vllm_serve(
    capsys, no_nvidia_smi, model_dir, ports
):
    plan = dry_run(
        capsys,
        "serve-node",
        "--gpus",
        "8",
        "--tensor-parallel-size",
        "4",
        "--model",
        str(model_dir),
        "--engine-args",
        '{"gpu_memory_utilization": 0.85}',
        "--no-enforce-eager",
        *ports,
    )
    args = build_parser().parse_args(plan["command"][1:])
    assert args.command == "serve"
    assert args.tensor_parallel_size == "4" and args.num_workers == "2"
    assert args.engine_args == {"gpu_memory_utilization": 0.85}
    assert args.enforce_eager is False


def test_text_plan_shows_devices_ports_and_command(
    capsys, no_nvidia_smi, model_dir, ports
):
    argv = ["serve-node", "--gpus", "8", "--tensor-parallel-size", "2"]
    assert launch(*argv, "--model", str(model_dir), *ports, "--dry-run") == 0
    out = capsys.readouterr().out
    assert "layout       4 worker(s) x tensor parallel 2 = 8 GPUs" in out
    assert "CUDA devices 6,7" in out
    assert "environment  CUDA_VISIBLE_DEVICES=0,1,2,3,4,5,6,7" in out
    assert "command      " in out and " serve --model " in out
    assert out.rstrip().endswith("(dry run)")


# ------------------------------------------------------------------------ Ray


def test_ray_serve_places_groups_per_node(capsys, model_dir, ports):
    settings = serve_settings(
        "--model", str(model_dir), "--tensor-parallel-size", "4", *ports
    )
    plan = plans.plan_ray_serve(settings, None, node_gpus=[8, 6])
    assert len(plan.workers) == 3  # 2 groups on the 8-GPU node, 1 on the other
    assert "2 GPU(s) stay idle" in " ".join(plan.notes)
    command = list(plan.command)
    assert flag(command, "--ray-address") == "auto"
    assert flag(command, "--num-workers") == "3"


def test_ray_serve_group_cannot_span_nodes(model_dir, ports):
    settings = serve_settings(
        "--model", str(model_dir), "--tensor-parallel-size", "4", *ports
    )
    with pytest.raises(LaunchError, match="no node has 4 GPUs for one tensor"):
        plans.plan_ray_serve(settings, None, node_gpus=[2, 2])


def test_ray_capacity():
    assert plans.ray_capacity([8, 8], 8) == 2
    assert plans.ray_capacity([8, 4, 2], 4) == 3
    assert plans.ray_capacity([2, 2], 4) == 0


def test_ray_serve_dry_run_with_gpu_count(capsys, model_dir, ports, monkeypatch):
    monkeypatch.setattr(plans, "cluster_gpus", pytest.fail)  # never asks Ray
    plan = dry_run(
        capsys,
        "ray-serve",
        "--gpus",
        "16",
        "--tensor-parallel-size",
        "8",
        "--model",
        str(model_dir),
        "--host",
        "127.0.0.1",
        *ports,
    )
    assert len(plan["workers"]) == 2
    assert any("--host 0.0.0.0" in n for n in plan["notes"])
    assert any("same path on every node" in n for n in plan["notes"])


def test_ray_head_plan(capsys, monkeypatch):
    monkeypatch.setenv("QWEN_VLLM_INTERNAL_TOKEN", "itok-ray-plan")
    port = free_port()
    plan = dry_run(capsys, "ray-head", "--ray-port", str(port), "--gpus", "0")
    # Ray's token authentication, with the deployment's token (not printed).
    assert plan["env"] == {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "<hidden>"}
    command = plan["command"]
    assert command[1:5] == ["start", "--head", "--port", str(port)]
    assert "--include-dashboard=false" in command
    assert flag(command, "--num-gpus") == "0"
    assert any("ray-cluster.sh worker --address" in n for n in plan["notes"])


@pytest.mark.parametrize("node", ["ray-head", "ray-worker"])
def test_a_ray_node_needs_the_token(capsys, monkeypatch, node):
    monkeypatch.delenv("QWEN_VLLM_INTERNAL_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    with socket.socket() as head:
        head.bind(("127.0.0.1", 0))
        head.listen()
        address = f"127.0.0.1:{head.getsockname()[1]}"
        args = ["--ray-port", str(free_port())] if node == "ray-head" else []
        args += ["--address", address] if node == "ray-worker" else []
        err = failure(capsys, node, *args)
        assert "without a token takes any node" in err
        assert "set QWEN_VLLM_INTERNAL_TOKEN" in err
        # Ray's own opt-out, by name.
        monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
        assert dry_run(capsys, node, *args)["env"] == {}


def test_ray_head_port_in_use(capsys):
    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        port = busy.getsockname()[1]
        err = failure(capsys, "ray-head", "--ray-port", str(port))
    assert f"port {port} on 0.0.0.0 is in use" in err
    assert "launch/ray-cluster.sh stop" in err


def test_ray_worker_plan(capsys, monkeypatch):
    monkeypatch.setenv("QWEN_VLLM_INTERNAL_TOKEN", "itok-ray-plan")
    with socket.socket() as head:
        head.bind(("127.0.0.1", 0))
        head.listen()
        address = f"127.0.0.1:{head.getsockname()[1]}"
        plan = dry_run(capsys, "ray-worker", "--address", address, "--block")
    assert plan["command"][1:] == ["start", "--address", address, "--block"]
    assert plan["env"] == {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "<hidden>"}


def test_ray_worker_needs_a_reachable_head(capsys, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    err = failure(capsys, "ray-worker")
    assert "--address (missing): give the Ray head as HOST:PORT" in err
    err = failure(capsys, "ray-worker", "--address", f"127.0.0.1:{free_port()}")
    assert "cannot reach the Ray head at 127.0.0.1:" in err


# ------------------------------------------------------------- shell scripts


@pytest.mark.parametrize("script", [SERVE_NODE, RAY_CLUSTER])
def test_scripts_are_strict_bash(script):
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert "set -euo pipefail" in text
    assert os.access(script, os.X_OK)


def script_env(tmp_path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QWEN_VLLM_")}
    # No nvidia-smi: the plans depend on --gpus only.
    env["PATH"] = f"{Path(sys.executable).parent}:/usr/bin:/bin"
    return env


def test_serve_node_script_dry_run(tmp_path, model_dir, ports):
    done = subprocess.run(
        [str(SERVE_NODE), "--dry-run", "--json", "--gpus", "8"]
        + ["--tensor-parallel-size", "2", "--model", str(model_dir), *ports],
        capture_output=True,
        text=True,
        env=script_env(tmp_path),
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)
    assert [",".join(w["cuda_devices"]) for w in plan["workers"]] == [
        "0,1",
        "2,3",
        "4,5",
        "6,7",
    ]


def test_serve_node_script_reports_errors(tmp_path, model_dir):
    done = subprocess.run(
        [str(SERVE_NODE), "--dry-run", "--gpus", "4", "--tensor-parallel-size", "8"]
        + ["--model", str(model_dir)],
        capture_output=True,
        text=True,
        env=script_env(tmp_path),
        timeout=120,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr.startswith(
        "qwen-vllm launch serve-node: error: --tensor-parallel-size 8 needs"
    )
    assert "Traceback" not in done.stderr


def test_ray_cluster_script_routes_commands(tmp_path, model_dir, ports):
    env = script_env(tmp_path)
    done = subprocess.run(
        [str(RAY_CLUSTER), "serve", "--dry-run", "--json", "--gpus", "4"]
        + ["--tensor-parallel-size", "4", "--model", str(model_dir), *ports],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["kind"] == "ray-serve"
    bad = subprocess.run(
        [str(RAY_CLUSTER), "launch"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert bad.returncode == 2
    assert "expected head, worker, serve or stop, not 'launch'" in bad.stderr


# --------------------------------------------------------------- dependencies


def test_launcher_imports_neither_vllm_nor_torch(ports):
    code = (
        "import sys\n"
        "from qwen_vllm.cli import build_parser\n"
        "from qwen_vllm.cli.launch import make_plan\n"
        f"argv = ['launch', 'serve-node', '--gpus', '2', *{ports!r}]\n"
        "args = build_parser().parse_args(argv)\n"
        "make_plan(args, environ={'PATH': ''})\n"
        "heavy = {'vllm', 'torch', 'transformers'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_serve_shows_every_name_the_model_answers_to():
    from qwen_vllm.deploy.cluster import endpoints

    named = ServeSettings.model_validate({"model_name": "Qwen-7B-Chat,Qwen"})
    assert endpoints(named)[0] == (
        "OpenAI API   http://127.0.0.1:8000/v1  (model 'Qwen-7B-Chat', also 'Qwen')"
    )
    assert endpoints(ServeSettings.model_validate({}))[0].endswith(
        "/v1  (model 'qwen-v1-demo')"
    )
