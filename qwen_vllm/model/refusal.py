"""Configurations the plugin's config hook turns down before any engine starts.

Each refusal says what to change (a machine too small for the model, GPTQ
weights that do not split over the ranks); trying the same configuration again
fails the same way, so the supervisor does not retry it and the command line
prints it as a message, not a traceback. Pure Python: both catch it without
loading vLLM.
"""

from __future__ import annotations


class ConfigRefused(ValueError):
    """A configuration our checks refuse; the message says why and what to do."""


def refusal_in(exc: BaseException) -> ConfigRefused | None:
    """Our refusal, also when vLLM's config has wrapped it in pydantic's
    ValidationError (the hook runs while vLLM validates its config)."""
    if isinstance(exc, ConfigRefused):
        return exc
    errors = getattr(exc, "errors", None)
    for error in errors() if callable(errors) else ():
        cause = (error.get("ctx") or {}).get("error")
        if isinstance(cause, ConfigRefused):
            return cause
    return None
