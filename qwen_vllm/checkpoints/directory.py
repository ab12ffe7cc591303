"""A checkpoint directory in the Hugging Face layout: is it one, and its config.

The one check every entry point makes before it spends time on a `--model`
(`qwen-vllm serve`, `launch`, `chat`, a worker). Pure Python.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

HINT = (
    "pass the directory of a Qwen v1 checkpoint (HF layout, with config.json), "
    "or omit --model to serve the demo model"
)


class NotACheckpoint(ValueError):
    """`--model` does not name a readable checkpoint directory."""


def read_config(model: str | Path) -> dict[str, Any]:
    """The checkpoint's config.json, or NotACheckpoint saying what to pass."""
    path = Path(model).expanduser()
    if not path.is_dir():
        raise NotACheckpoint(f"--model {model}: no such directory; {HINT}")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise NotACheckpoint(f"--model {model}: no config.json there; {HINT}")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise NotACheckpoint(f"cannot read {config_file}: {exc}") from exc
    if not isinstance(config, dict):
        raise NotACheckpoint(f"{config_file} is not a JSON object; {HINT}")
    return config
