"""The layering in pyproject.toml's import-linter contracts holds, and a stray
import breaks it: the contracts are run on the tree and on copies of it with
one deliberately wrong import each."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(tree: Path) -> subprocess.CompletedProcess[str]:
    # lint-imports puts its working directory first on sys.path, so it grades
    # the package found there.
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"],
        cwd=tree,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_tree_keeps_every_contract() -> None:
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "BROKEN" not in result.stdout
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "wrong_import", "complaint"),
    [
        # A lazy import inside a function still counts.
        (
            "serving/gateway/__init__.py",
            "def _engine():\n    import vllm\n",
            "qwen_vllm.serving.gateway is not allowed to import vllm",
        ),
        # So does a chain: protocol -> the demo writer -> torch.
        (
            "serving/protocol.py",
            "def _demo():\n    import qwen_vllm.checkpoints.demo\n",
            "qwen_vllm.serving.protocol is not allowed to import torch",
        ),
        (
            "chat/chatml.py",
            "def _worker():\n    import qwen_vllm.serving.protocol\n",
            "qwen_vllm.chat is not allowed to import qwen_vllm.serving",
        ),
    ],
)
def test_one_wrong_import_breaks_a_contract(
    tmp_path: Path, module: str, wrong_import: str, complaint: str
) -> None:
    shutil.copytree(
        ROOT / "qwen_vllm",
        tmp_path / "qwen_vllm",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / "qwen_vllm" / module
    target.write_text(target.read_text() + "\n\n" + wrong_import)

    result = lint_imports(tmp_path)

    assert result.returncode != 0
    assert "BROKEN" in result.stdout
    assert complaint in result.stdout, result.stdout
