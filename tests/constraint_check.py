"""Does an output constraint accept a text? Asked of xgrammar itself."""

from __future__ import annotations

from typing import Any

import xgrammar
from xgrammar.testing import _is_grammar_accept_string


def accepts(
    structured_outputs: dict[str, Any], text: str, *, whole: bool = True
) -> bool:
    """`whole=False`: `text` may be cut short, as long as it can still go on
    to an accepted text."""
    grammar = xgrammar.Grammar.from_structural_tag(structured_outputs["structural_tag"])
    return _is_grammar_accept_string(grammar, text, require_termination=whole)
