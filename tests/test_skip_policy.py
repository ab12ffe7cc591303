"""The skip policy of tests/conftest.py: a skip not on the allow-list fails the run.

Each test runs pytest on a small suite of its own (pytester), with the hooks of
tests/conftest.py and an allow-list written for it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import ALLOWED_SKIPS, Skip, is_allowed, load_allowed_skips
from tests.gpu.test_gpu import NEEDS_GPU

pytest_plugins = ["pytester"]

HOOKS = """
from tests.conftest import (
    pytest_configure,
    pytest_make_collect_report,
    pytest_runtest_makereport,
    pytest_sessionfinish,
    pytest_terminal_summary,
)
"""
GPU_ONLY = """
[[allow]]
marker = "gpu"
reason = "needs a CUDA GPU"
why = "no CUDA device on a CPU machine"
"""


@pytest.fixture
def suite(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makeconftest(HOOKS)
    pytester.makeini(
        "[pytest]\nasyncio_default_fixture_loop_scope = function\n"
        "markers =\n    gpu: needs a CUDA GPU\n"
    )
    (pytester.path / ALLOWED_SKIPS).parent.mkdir()
    (pytester.path / ALLOWED_SKIPS).write_text(GPU_ONLY)
    return pytester


def test_allowed_skips_and_xfails_pass_the_run(suite: pytest.Pytester) -> None:
    suite.makepyfile(
        test_cases="""
        import pytest

        @pytest.mark.gpu
        @pytest.mark.skipif(True, reason="needs a CUDA GPU")
        def test_on_a_gpu():
            pass

        def test_expected_to_fail():
            pytest.xfail("a known bug")

        def test_plain():
            pass
        """
    )
    result = suite.runpytest()
    result.assert_outcomes(passed=1, skipped=1, xfailed=1)
    assert result.ret == pytest.ExitCode.OK
    result.stdout.no_fnmatch_line("*not allowed by*")


def test_an_unlisted_skip_fails_the_run_and_is_named(suite: pytest.Pytester) -> None:
    suite.makepyfile(
        test_cases="""
        import pytest

        @pytest.fixture
        def tool():
            pytest.skip("kubectl is not installed")

        def test_in_setup(tool):
            pass

        def test_in_call():
            pytest.skip("chromium is missing")

        def test_import():
            pytest.importorskip("no_such_module_for_the_skip_policy")

        @pytest.mark.gpu
        def test_gpu_marked_but_another_reason():
            pytest.skip("needs two GPUs")

        @pytest.mark.skipif(True, reason="needs a CUDA GPU")
        def test_the_reason_without_the_marker():
            pass

        def test_plain():
            pass
        """
    )
    result = suite.runpytest()
    result.assert_outcomes(passed=1, skipped=5)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(
        [
            f"*skipped, and not allowed by {ALLOWED_SKIPS}*",
            "SKIPPED test_cases.py::test_in_setup: kubectl is not installed",
            "SKIPPED test_cases.py::test_in_call: chromium is missing",
            "SKIPPED test_cases.py::test_import: could not import"
            " 'no_such_module_for_the_skip_policy'*",
            "SKIPPED test_cases.py::test_gpu_marked_but_another_reason: needs two*",
            "SKIPPED test_cases.py::test_the_reason_without_the_marker: needs a CUDA*",
            "5 skip(s) not on the allow-list fail this run*",
        ]
    )


def test_a_module_skipped_while_collected_fails_the_run(
    suite: pytest.Pytester,
) -> None:
    suite.makepyfile(
        test_module="""
        import pytest

        pytest.importorskip("no_such_module_for_the_skip_policy")

        def test_never_collected():
            pass
        """
    )
    result = suite.runpytest()
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["SKIPPED test_module.py: could not import*"])


def test_an_entry_without_a_reason_why_is_refused(suite: pytest.Pytester) -> None:
    (suite.path / ALLOWED_SKIPS).write_text('[[allow]]\nmarker = "gpu"\n')
    suite.makepyfile(test_cases="def test_plain():\n    pass\n")
    result = suite.runpytest()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*allow entry 1 needs a `why`*"])


def test_the_suite_allows_exactly_its_cpu_skips() -> None:
    entries = load_allowed_skips(Path(__file__).parent / "allowed_skips.toml")
    gpu = frozenset({"gpu", "slow"})
    assert is_allowed(Skip("tests/gpu/test_gpu.py::test_x", NEEDS_GPU, gpu), entries)
    quantization = "tests/model/test_quantization.py::"
    for test, reason in [
        (
            "test_int4_generation_matches_the_dequantized_reference",
            "needs a GPTQ kernel",
        ),
        (
            "test_a_qlora_adapter_on_int4_matches_the_dequantized_reference_merged",
            "needs a GPTQ kernel",
        ),
        ("test_without_a_gptq_kernel_the_error_says_so", "this vLLM build runs GPTQ"),
    ]:
        assert is_allowed(Skip(quantization + test, reason), entries)
    # Missing tools are not allowed: CI must install them.
    for skip in [
        Skip("tests/launch/test_manifests.py::test_x[base]", "kubectl is missing"),
        Skip("tests/serving/test_webui_browser.py::test_x", "needs chromium", gpu),
        Skip("tests/gpu/test_gpu.py::test_x", "needs two cores", gpu),
        Skip("tests/model/test_x.py::test_y", NEEDS_GPU),
    ]:
        assert not is_allowed(skip, entries), skip
