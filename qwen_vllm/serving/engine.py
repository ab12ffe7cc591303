"""The worker's engine: vLLM's V1 AsyncLLM running the Qwen v1 plugin."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from qwen_vllm.chat.chatml import DEFAULT_MAX_WINDOW_SIZE, build_prompt_ids
from qwen_vllm.serving.protocol import (
    ErrorCode,
    GenerateChunk,
    GenerateParams,
    Usage,
    error_chunk,
)
from qwen_vllm.serving.settings import WorkerSettings
from qwen_vllm.vocab import STOP_TOKEN_IDS

logger = logging.getLogger(__name__)


class RequestError(ValueError):
    """A request the engine cannot serve, with its FastChat error code."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def resolve_model_dir(settings: WorkerSettings) -> Path:
    """The checkpoint to serve: the given directory or the demo model."""
    from qwen_vllm.model.demo import default_demo_dir, ensure_demo_model

    if settings.model is None:
        return ensure_demo_model(default_demo_dir())
    path = Path(settings.model).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"--model {settings.model}: no config.json there; pass the directory "
            "of a Qwen v1 checkpoint (HF layout)"
        )
    return path


def engine_args(settings: WorkerSettings, model_dir: Path) -> dict[str, Any]:
    args: dict[str, Any] = {
        "model": str(model_dir),
        "served_model_name": [settings.served_model_name()],
        "tensor_parallel_size": settings.tensor_parallel_size,
        "dtype": settings.dtype,
        "kv_cache_dtype": settings.kv_cache_dtype,
        "enforce_eager": settings.enforce_eager,
        "disable_log_stats": True,
    }
    if settings.tensor_parallel_size > 1:
        # Tensor-parallel ranks run as subprocesses of the worker, inside the
        # worker's placement group; vLLM would otherwise pick its Ray executor
        # whenever Ray is initialised. (One rank runs in the engine process.)
        args["distributed_executor_backend"] = "mp"
    if settings.max_model_len is not None:
        args["max_model_len"] = settings.max_model_len
    if settings.max_num_seqs is not None:
        args["max_num_seqs"] = settings.max_num_seqs
    args.update(settings.engine_args)
    return args


class VllmEngine:
    """Adapts AsyncLLM to the worker protocol: ChatML, stop ids, chunks."""

    def __init__(self, llm: Any) -> None:
        self.llm = llm
        self.tokenizer = llm.get_tokenizer()
        self.context_length: int = llm.model_config.max_model_len
        self._in_flight = 0

    @classmethod
    def start(cls, settings: WorkerSettings) -> VllmEngine:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        model_dir = resolve_model_dir(settings)
        args = AsyncEngineArgs(**engine_args(settings, model_dir))
        logger.info("starting vLLM on %s", model_dir)
        return cls(AsyncLLM.from_engine_args(args))

    def shutdown(self) -> None:
        self.llm.shutdown()

    def queue_length(self) -> int:
        return self._in_flight

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    async def check_health(self) -> None:
        await self.llm.check_health()

    def prompt_ids(self, params: GenerateParams) -> list[int]:
        if params.messages is not None:
            messages = [m.model_dump() for m in params.messages]
            window = params.max_window_size or DEFAULT_MAX_WINDOW_SIZE
            try:
                ids = build_prompt_ids(
                    messages,
                    self.tokenizer.encode_plain,
                    window,
                    add_generation_prompt=not params.continue_final_message,
                    continue_final_message=params.continue_final_message,
                )
            except ValueError as exc:
                raise RequestError(ErrorCode.VALIDATION_TYPE_ERROR, str(exc)) from exc
        elif params.prompt is not None:
            # A rendered prompt (FastChat's API server) spells ChatML control
            # tokens as text; they must become the control ids.
            ids = self.tokenizer.encode(params.prompt, add_special_tokens=False)
        else:
            raise RequestError(
                ErrorCode.VALIDATION_TYPE_ERROR, "either prompt or messages is required"
            )
        if not ids:
            raise RequestError(ErrorCode.VALIDATION_TYPE_ERROR, "the prompt is empty")
        if len(ids) >= self.context_length:
            raise RequestError(
                ErrorCode.CONTEXT_OVERFLOW,
                f"This model's maximum context length is {self.context_length} "
                f"tokens, but the prompt has {len(ids)} tokens.",
            )
        return ids

    def sampling_params(self, params: GenerateParams, prompt_len: int):
        from vllm import SamplingParams
        from vllm.exceptions import VLLMValidationError

        room = self.context_length - prompt_len
        max_tokens = room if params.max_new_tokens is None else params.max_new_tokens
        if max_tokens > room:
            raise RequestError(
                ErrorCode.PARAM_OUT_OF_RANGE,
                f"This model's maximum context length is {self.context_length} "
                f"tokens; the prompt has {prompt_len} tokens, so max_tokens can be "
                f"at most {room}, not {max_tokens}.",
            )
        stop_ids = sorted(set(STOP_TOKEN_IDS) | set(params.stop_token_ids or ()))
        try:
            return SamplingParams(
                n=1,
                temperature=params.temperature,
                top_p=params.top_p,
                top_k=0 if params.top_k is None or params.top_k < 0 else params.top_k,
                presence_penalty=params.presence_penalty,
                frequency_penalty=params.frequency_penalty,
                repetition_penalty=params.repetition_penalty,
                max_tokens=max(1, max_tokens),
                stop=params.stop_strings() or None,
                stop_token_ids=stop_ids,
                seed=params.seed,
                logprobs=params.logprobs,
                skip_special_tokens=True,
            )
        except (ValueError, VLLMValidationError) as exc:
            raise RequestError(ErrorCode.PARAM_OUT_OF_RANGE, str(exc)) from exc

    async def generate(self, params: GenerateParams) -> AsyncIterator[GenerateChunk]:
        try:
            prompt_ids = self.prompt_ids(params)
            sampling = self.sampling_params(params, len(prompt_ids))
        except RequestError as exc:
            yield error_chunk(exc.code, str(exc))
            return
        request_id = params.request_id or uuid.uuid4().hex
        prefix = params.prompt if params.echo and params.prompt else ""
        finished = False
        self._in_flight += 1
        stream = self.llm.generate(
            {"prompt_token_ids": prompt_ids}, sampling, request_id
        )
        try:
            async for output in stream:
                completion = output.outputs[0]
                finished = output.finished
                yield GenerateChunk(
                    text=prefix + completion.text,
                    usage=Usage(
                        prompt_tokens=len(prompt_ids),
                        completion_tokens=len(completion.token_ids),
                        total_tokens=len(prompt_ids) + len(completion.token_ids),
                    ),
                    finish_reason=completion.finish_reason if finished else None,
                    logprobs=_logprobs(completion)
                    if params.logprobs is not None
                    else None,
                )
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except Exception as exc:  # the engine died or rejected the request
            logger.exception("generation failed for request %s", request_id)
            yield error_chunk(ErrorCode.INTERNAL_ERROR, f"generation failed: {exc}")
        finally:
            self._in_flight -= 1
            await stream.aclose()
            if not finished:
                await self.llm.abort(request_id)


def _logprobs(completion: Any) -> dict[str, Any]:
    """Completion-style logprobs (FastChat's shape) of the tokens so far."""
    tokens: list[str] = []
    token_logprobs: list[float] = []
    top_logprobs: list[dict[str, float]] = []
    text_offset: list[int] = []
    offset = 0
    for token_id, candidates in zip(
        completion.token_ids, completion.logprobs or [], strict=False
    ):
        chosen = candidates[token_id]
        text = chosen.decoded_token or ""
        tokens.append(text)
        token_logprobs.append(chosen.logprob)
        top_logprobs.append(
            {(c.decoded_token or ""): c.logprob for c in candidates.values()}
        )
        text_offset.append(offset)
        offset += len(text)
    return {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top_logprobs,
        "text_offset": text_offset,
    }
