"""The launch script for real: the demo model, tensor parallel 2 on two cores.

Starts `launch/serve-node.sh` (Ray, the controller, one vLLM worker whose two
ranks each get one core, the gateway) on loopback, asks it one question with
the official OpenAI client, then presses Ctrl-C the way a terminal does
(SIGINT to the process group) and checks that everything it started is gone.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.servers import wait_for_model

ROOT = Path(__file__).resolve().parents[2]
SERVE_NODE = ROOT / "launch" / "serve-node.sh"
API_KEY = "sk-launch-test"
MODEL = "qwen-v1-demo"
READY_TIMEOUT_S = 600.0
SHUTDOWN_TIMEOUT_S = 30.0
# Ray and vLLM processes may outlive their parent by a moment while exiting.
REAP_TIMEOUT_S = 30.0
# The ranks are named before the model loads, so they are up once it serves.
RANKS_TIMEOUT_S = 30.0


def proc_stat(pid: int) -> tuple[int, int, int, str] | None:
    """(ppid, session id, start time, state) of a live process, else None."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name is parenthesised and may contain spaces.
    fields = raw[raw.rindex(")") + 2 :].split()
    state, ppid, session, start = fields[0], int(fields[1]), int(fields[3]), fields[19]
    if state in ("Z", "X"):
        return None
    return ppid, session, int(start), state


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def processes_of(root: int) -> dict[int, int]:
    """pid -> start time of root's descendants and its session's members."""
    stats = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = proc_stat(int(entry.name))
            if stat is not None:
                stats[int(entry.name)] = stat
    found = {pid: s[2] for pid, s in stats.items() if s[1] == root}
    frontier = [root]
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, _, start, _) in stats.items():
            if ppid == parent and pid not in found:
                found[pid] = start
                frontier.append(pid)
    found.pop(root, None)
    return found


def still_running(known: dict[int, int]) -> dict[int, str]:
    alive = {}
    for pid, start in known.items():
        stat = proc_stat(pid)
        if stat is not None and stat[2] == start:  # not a reused pid
            alive[pid] = cmdline(pid)
    return alive


def process_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def tp_rank_processes() -> dict[int, int]:
    """pid -> start time of live vLLM tensor-parallel ranks.

    A rank names itself "VLLM::Worker_TP<n>" when setproctitle manages to
    rewrite its title, which it does not always do; so a rank is also known by
    where it sits: a process spawned by the engine core, itself the first
    spawned process of its line. Ray may start its daemons detached from the
    serve process, so the ranks are looked for among all processes: no other
    test serves with tensor parallel.
    """
    ranks = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        stat = proc_stat(pid)
        if stat is not None and (
            "Worker_TP" in process_name(pid) + cmdline(pid)
            or is_spawned_by_engine_core(pid, stat[0])
        ):
            ranks[pid] = stat[2]
    return ranks


def is_spawned(pid: int) -> bool:
    return "multiprocessing.spawn" in cmdline(pid)


def is_spawned_by_engine_core(pid: int, parent: int) -> bool:
    if not is_spawned(pid):
        return False
    if "EngineCore" in process_name(parent) + cmdline(parent):
        return True
    parent_stat = proc_stat(parent)
    return (
        is_spawned(parent)
        and parent_stat is not None
        and not is_spawned(parent_stat[0])
    )


def wait_for_tp_ranks(count: int, log: Path) -> dict[int, int]:
    """The ranks, once `count` of them are up (they start, and name
    themselves, before the model loads)."""
    deadline = time.monotonic() + RANKS_TIMEOUT_S
    while True:
        ranks = tp_rank_processes()
        if len(ranks) >= count or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    if len(ranks) != count:
        seen = "\n".join(
            f"{pid} {process_name(pid)!r}: {cmdline(pid)[:160]}"
            for pid in sorted(
                int(e.name) for e in Path("/proc").iterdir() if e.name.isdigit()
            )
            if proc_stat(pid) is not None
            and ("python" in cmdline(pid) or "::" in cmdline(pid))
        )
        raise AssertionError(
            f"expected {count} tensor-parallel ranks, found {len(ranks)}; processes:\n"
            f"{seen}\nlog:\n" + log.read_text(errors="replace")[-4000:]
        )
    return ranks


def omp_places(pid: int) -> str | None:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for item in environ:
        if item.startswith(b"OMP_PLACES="):
            return item.split(b"=", 1)[1].decode()
    return None


@pytest.mark.slow
@pytest.mark.timeout(READY_TIMEOUT_S + 300)
def test_serve_node_demo_with_tensor_parallel_2_on_cpu(tmp_path):
    import openai

    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("tensor parallel 2 on CPU needs two cores")
    port = free_port()
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("QWEN_VLLM_", "RAY_")) and k != "CUDA_VISIBLE_DEVICES"
    }
    # A fresh cache: the worker generates the demo checkpoint itself.
    env.update(XDG_CACHE_HOME=str(tmp_path / "cache"))
    command = [
        str(SERVE_NODE),
        "--gpus",
        "0",
        "--tensor-parallel-size",
        "2",
        "--num-workers",
        "1",
        "--enforce-eager",
        "--max-model-len",
        "2048",
        "--no-webui",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--controller-port",
        str(free_port()),
        "--worker-port",
        str(free_port()),
        "--api-key",
        API_KEY,
    ]
    log = tmp_path / "serve-node.log"
    started = time.monotonic()
    known: dict[int, int] = {}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            command,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for_model(url, MODEL, API_KEY, proc, log, READY_TIMEOUT_S)
        ready_s = time.monotonic() - started

        known = processes_of(proc.pid)
        tp_ranks = wait_for_tp_ranks(2, log)
        known.update(tp_ranks)
        ranks = {pid: omp_places(pid) for pid in tp_ranks}
        places = [p for p in ranks.values() if p is not None]
        # Best effort: vLLM may set OMP_PLACES after a rank has started, and
        # then only its own log ("local_rank=0, core ids=[0]") shows them.
        if len(places) == 2:
            assert sorted(places) == ["{0}", "{1}"], places

        client = openai.OpenAI(
            base_url=f"{url}/v1", api_key=API_KEY, timeout=120, max_retries=0
        )
        asked = time.monotonic()
        reply = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Hello! Who are you?"}],
            max_tokens=8,
            temperature=0,
        )
        answer_s = time.monotonic() - asked
        choice = reply.choices[0]
        assert choice.message.role == "assistant"
        assert isinstance(choice.message.content, str)
        assert choice.finish_reason in ("stop", "length")
        assert 1 <= reply.usage.completion_tokens <= 8
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(
                base_url=f"{url}/v1", api_key="sk-wrong", max_retries=0
            ).models.list()

        known.update(processes_of(proc.pid))
        assert "plan:" in log.read_text(errors="replace")
        stopping = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)
        try:
            code = proc.wait(SHUTDOWN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pytest.fail(
                f"still running {SHUTDOWN_TIMEOUT_S:.0f} s after SIGINT:\n"
                + log.read_text(errors="replace")[-4000:]
            )
        stop_s = time.monotonic() - stopping
        deadline = time.monotonic() + REAP_TIMEOUT_S
        while still_running(known) and time.monotonic() < deadline:
            time.sleep(0.5)
        left = still_running(known)
        print(
            f"\nready after {ready_s:.1f} s; answer {choice.message.content!r} in "
            f"{answer_s:.2f} s; stopped in {stop_s:.1f} s with exit code {code}; "
            f"{len(known)} processes started, {len(left)} left; "
            f"rank OMP_PLACES {sorted(ranks.values(), key=str)}"
        )
        assert code == 0, log.read_text(errors="replace")[-4000:]
        assert not left, f"still running after shutdown: {left}"
    finally:
        # Whatever went wrong, leave nothing behind: the group, then the
        # processes seen earlier, each by its own pid.
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
        for pid in still_running(known):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
