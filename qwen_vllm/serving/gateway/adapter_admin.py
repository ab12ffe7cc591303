"""LoRA adapters loaded and unloaded on a running deployment, as vLLM's
POST /v1/load_lora_adapter and /v1/unload_lora_adapter do it.

An adapter is loaded on every healthy worker of its base model or on none;
each worker registers its new names with the controller before it answers,
so the controller routes the adapter only to workers that hold it. Unloading
takes it out of routing first, then out of each engine once its requests end.
Adapters loaded here last as long as their workers: a restarted worker comes
back with its --lora adapters only.
"""

from __future__ import annotations

import logging

import httpx

from qwen_vllm.serving.client import WorkerAdmin, WorkerInfo
from qwen_vllm.serving.gateway.errors import APIError
from qwen_vllm.serving.gateway.openai_models import (
    DeletedModel,
    LoadLoraAdapterRequest,
    ModelCard,
    UnloadLoraAdapterRequest,
)

logger = logging.getLogger(__name__)


async def load_adapter(
    admin: WorkerAdmin, request: LoadLoraAdapterRequest
) -> ModelCard:
    name = request.lora_name
    workers = [
        w for w in await admin.workers(fresh=True) if w.healthy and w.model_names
    ]
    if any(name in w.model_names for w in workers):
        raise APIError(
            400,
            f"{name!r} is already served; unload it first or choose another name.",
            param="lora_name",
            code="model_exists",
        )
    targets = _workers_of_base(workers, request.model)
    loaded: list[WorkerInfo] = []
    body = {"lora_name": name, "lora_path": request.lora_path}
    for worker in targets:
        try:
            answer = await admin.post_worker(worker.address, "/load_lora_adapter", body)
        except httpx.HTTPError as exc:
            await _unload_from(admin, loaded, name)
            raise APIError(
                502, f"The worker {worker.address} failed: {exc!r}", code="worker_error"
            ) from exc
        if answer.status_code != 200:
            await _unload_from(admin, loaded, name)
            raise APIError(
                400 if answer.status_code < 500 else 502,
                _worker_message(answer),
                param="lora_path",
                code="invalid_adapter",
            )
        loaded.append(worker)
    admin.forget(name)
    logger.info("loaded LoRA adapter %s on %d worker(s)", name, len(loaded))
    return ModelCard(id=name, parent=targets[0].model_names[0])


async def unload_adapter(
    admin: WorkerAdmin, request: UnloadLoraAdapterRequest
) -> DeletedModel:
    name = request.lora_name
    holders = [w for w in await admin.workers(fresh=True) if name in w.model_names]
    answers = await _unload_from(admin, holders, name)
    if not any(status == 200 for status in answers):
        raise APIError(
            404,
            f"No LoRA adapter {name!r} is loaded.",
            param="lora_name",
            code="model_not_found",
        )
    admin.forget(name)
    failed = sum(status is None or status >= 500 for status in answers)
    if failed:
        raise APIError(
            502,
            f"{name!r} was unloaded, but {failed} of its workers did not answer; "
            "they no longer get it once they restart.",
            code="worker_error",
        )
    return DeletedModel(id=name)


def _workers_of_base(workers: list[WorkerInfo], base: str | None) -> list[WorkerInfo]:
    """The workers to load on: those serving `base` (by any of its names), or
    every worker when they all serve one model."""
    if base is None:
        bases = sorted({w.model_names[0] for w in workers})
        if len(bases) > 1:
            raise APIError(
                400,
                f"This deployment serves several models ({', '.join(bases)}): "
                'name the adapter\'s base model with "model".',
                param="model",
                code="missing_required_parameter",
            )
        if not bases:
            raise APIError(503, "No healthy worker is up.", code="no_healthy_worker")
        base = bases[0]
    # By the model's own name (its workers' first), whichever name was given.
    own = {w.model_names[0] for w in workers if base in w.model_names}
    targets = [w for w in workers if w.model_names[0] in own]
    if not targets:
        raise APIError(
            404,
            f"The model {base!r} does not exist.",
            param="model",
            code="model_not_found",
        )
    return targets


async def _unload_from(
    admin: WorkerAdmin, workers: list[WorkerInfo], name: str
) -> list[int | None]:
    """Each worker's answer status (None: no answer)."""
    statuses: list[int | None] = []
    for worker in workers:
        try:
            answer = await admin.post_worker(
                worker.address, "/unload_lora_adapter", {"lora_name": name}
            )
        except httpx.HTTPError as exc:
            logger.warning("worker %s did not unload %s: %r", worker.address, name, exc)
            statuses.append(None)
        else:
            statuses.append(answer.status_code)
    return statuses


def _worker_message(answer: httpx.Response) -> str:
    try:
        message = answer.json().get("error")
    except (ValueError, AttributeError):
        message = None
    return str(message or f"The worker answered {answer.status_code}.")
