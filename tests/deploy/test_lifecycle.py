"""Root causes out of engine logs, and leftover processes ended."""

from __future__ import annotations

import subprocess
import sys

import psutil

from qwen_vllm.deploy.lifecycle import root_cause

# The shape of a failed engine start on vLLM 0.32: the engine core's own
# traceback (the cause), then the front end's wrapper.
ENGINE_START_FAILURE = """\
(EngineCore pid=7425) ERROR 12-02 04:49:56 [core.py:1510] EngineCore failed to start.
(EngineCore pid=7425) ERROR 12-02 04:49:56 [core.py:1510] Traceback (most recent call last):
(EngineCore pid=7425) ERROR 12-02 04:49:56 [core.py:1510]   File "core.py", line 1480, in run
(EngineCore pid=7425) Process EngineCore:
Traceback (most recent call last):
  File "cpu_worker.py", line 83, in init_device
ValueError: Available memory on node 0 (6.54/9.09 GiB) on startup is less than desired CPU memory utilization (0.92, 8.36 GiB).
Traceback (most recent call last):
  File "engine.py", line 95, in start
RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {'EngineCore': 1}
"""  # noqa: E501


def test_the_root_cause_is_the_first_exception_that_is_not_a_wrapper():
    assert root_cause(ENGINE_START_FAILURE) == (
        "ValueError: Available memory on node 0 (6.54/9.09 GiB) on startup is less "
        "than desired CPU memory utilization (0.92, 8.36 GiB)."
    )


def test_prefixed_exception_lines_and_dotted_names_count():
    log = "(EngineCore pid=12) vllm.exceptions.VLLMValidationError: bad block size\n"
    assert root_cause(log) == "vllm.exceptions.VLLMValidationError: bad block size"


def test_a_log_without_an_exception_has_no_cause():
    assert root_cause("INFO starting\nWARNING Error: not an exception line\n") is None
    assert root_cause(ENGINE_START_FAILURE.splitlines()[-1]) is None


# Run in a process of its own: end_descendants ends every descendant of the
# process calling it, which in pytest's would include the servers of other
# tests.
ENDS_ITS_TREE = """
import json, signal, subprocess, sys, time
import psutil
from qwen_vllm.deploy.lifecycle import adopt_orphans, end_descendants

adopt_orphans()
# A child that ignores SIGTERM, and an orphan (its parent exits at once).
stubborn = subprocess.Popen([sys.executable, "-c",
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    "print('ready', flush=True); time.sleep(600)"], stdout=subprocess.PIPE)
assert stubborn.stdout.readline().strip() == b"ready"
launcher = subprocess.Popen([sys.executable, "-c",
    "import subprocess, sys; p = subprocess.Popen([sys.executable, '-c', "
    "'import time; time.sleep(600)']); print(p.pid, flush=True)"],
    stdout=subprocess.PIPE)
orphan = int(launcher.stdout.readline())
launcher.wait()
adopted = orphan in [c.pid for c in psutil.Process().children()]
started = time.monotonic()
ended = end_descendants(grace=1.0)
print(json.dumps({"stubborn": stubborn.pid, "orphan": orphan, "adopted": adopted,
                  "ended": ended, "took": time.monotonic() - started}))
"""


def test_orphans_and_stubborn_children_are_ended():
    import json

    done = subprocess.run(
        [sys.executable, "-c", ENDS_ITS_TREE],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["adopted"], "the orphan was not re-parented to the subreaper"
    assert {result["stubborn"], result["orphan"]} <= set(result["ended"])
    assert result["took"] < 5
    for pid in (result["stubborn"], result["orphan"]):
        assert not psutil.pid_exists(pid) or (
            psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        ), pid


def test_services_keep_an_idle_connection_longer_than_clients_do():
    # Else a client's next request on a pooled connection can meet the
    # server closing it as idle, and fails without an answer.
    import httpx

    from qwen_vllm.deploy.runner import ServiceRunner
    from qwen_vllm.serving.settings import (
        ControllerSettings,
        GatewaySettings,
        build_settings,
    )

    client_idle = httpx.Limits().keepalive_expiry  # the openai client's too
    for kind, settings in (
        ("gateway", GatewaySettings),
        ("controller", ControllerSettings),
    ):
        runner = ServiceRunner(kind, build_settings(settings, {}))
        assert runner.server_config(app=None).timeout_keep_alive > client_idle
