"""The worker's engine: vLLM's V1 AsyncLLM running the Qwen v1 plugin."""

from __future__ import annotations

import asyncio
import collections
import functools
import itertools
import logging
import re
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from qwen_vllm.chat.chatml import build_prompt_ids
from qwen_vllm.chat.vocab import with_chatml_stops
from qwen_vllm.checkpoints.adapters import AdapterRefused, LoraAdapter, max_lora_rank
from qwen_vllm.model.generation_defaults import GenerationDefaults
from qwen_vllm.serving.protocol import (
    ChatDefaults,
    ErrorCode,
    GenerateChunk,
    GenerateParams,
    Logprobs,
    TokenCandidate,
    Usage,
    error_chunk,
)
from qwen_vllm.serving.settings import WorkerSettings

logger = logging.getLogger(__name__)


class RequestError(ValueError):
    """A request the engine cannot serve, with its FastChat error code."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def resolve_model_dir(settings: WorkerSettings) -> Path:
    """The checkpoint to serve: the given directory or the demo model."""
    from qwen_vllm.checkpoints.demo import default_demo_dir, ensure_demo_model
    from qwen_vllm.checkpoints.directory import NotACheckpoint, read_config

    if settings.model is None:
        return ensure_demo_model(default_demo_dir())
    try:
        read_config(settings.model)
    except NotACheckpoint as exc:
        # The supervisor does not restart a worker for a missing file.
        raise FileNotFoundError(str(exc)) from exc
    return Path(settings.model).expanduser()


def read_adapters(settings: WorkerSettings) -> list[LoraAdapter]:
    """The --lora adapters, each checked before the engine starts."""
    paths = settings.lora_paths()
    return [LoraAdapter.read(name, path) for name, path in paths.items()]


def engine_args(
    settings: WorkerSettings, model_dir: Path, adapters: list[LoraAdapter] = ()
) -> dict[str, Any]:
    args: dict[str, Any] = {
        "model": str(model_dir),
        "served_model_name": settings.served_model_names(),
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
    slots = settings.max_loras or len(adapters)
    if slots:
        # By default every --lora adapter keeps a slot, so one batch can mix
        # them all; --max-loras makes room for adapters loaded at run time.
        args["enable_lora"] = True
        args["max_loras"] = slots
        args["max_lora_rank"] = max_lora_rank(adapters, settings.max_lora_rank)
    elif settings.max_lora_rank is not None:
        raise AdapterRefused(
            "--max-lora-rank is for LoRA adapters: add --lora NAME=PATH or "
            "--max-loras N (adapters loaded at run time)"
        )
    args.update(settings.engine_args)
    args["additional_config"] = {
        **args.get("additional_config", {}),
        **kv_cache_request(settings, args.pop("kv_cache_memory_bytes", None)),
    }
    return args


def kv_cache_request(settings: WorkerSettings, per_rank_bytes: int | None) -> dict:
    """What this worker asks of the plugin's KV cache sizing (model.hooks).

    The plugin sizes the cache on the engine's resolved config: on CPU from
    this worker's share of the machine, or the asked size checked against it;
    on GPU vLLM's profiling measures free device memory unless a size is asked.
    """
    from qwen_vllm.model import kv_cache as memory

    # The worker's whole cache: vLLM's engine argument is per rank.
    if per_rank_bytes is not None:
        total = per_rank_bytes * settings.tensor_parallel_size
    elif settings.kv_cache_memory is not None:
        total = int(settings.kv_cache_memory * memory.GiB)
    else:
        total = None
    return memory.worker_request(settings.workers_per_node, total)


_SAMPLING_FIELDS = (
    "temperature",
    "top_p",
    "top_k",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
)


def _sampling_fields(params: GenerateParams) -> dict[str, Any]:
    """The sampling fields the request set, in SamplingParams' terms."""
    fields = {
        name: getattr(params, name)
        for name in _SAMPLING_FIELDS
        if getattr(params, name) is not None
    }
    if fields.get("top_k", 0) < 0:  # FastChat's "off"
        fields["top_k"] = 0
    return fields


class VllmEngine:
    """Adapts AsyncLLM to the worker protocol: ChatML, stop ids, chunks."""

    def __init__(self, llm: Any, adapters: list[LoraAdapter] = ()) -> None:
        from vllm.lora.request import LoRARequest

        self.llm = llm
        # A request for an adapter's name runs with that adapter (ids from 1;
        # an unloaded adapter's id is never given again).
        self._lora_ids = itertools.count(1)
        self.lora_requests = {
            adapter.name: LoRARequest(
                adapter.name, next(self._lora_ids), str(adapter.path)
            )
            for adapter in adapters
        }
        lora_config = getattr(getattr(llm, "vllm_config", None), "lora_config", None)
        self.max_lora_rank: int | None = getattr(lora_config, "max_lora_rank", None)
        self._adapter_lock = asyncio.Lock()
        self._adapter_streams: collections.Counter[str | None] = collections.Counter()
        self._adapter_stream_ended = asyncio.Condition()
        self.tokenizer = llm.get_tokenizer()
        self.context_length: int = llm.model_config.max_model_len
        self.defaults = GenerationDefaults.of(llm.model_config)
        self.generation_defaults = self.defaults.describe()
        logger.info("generation defaults: %s", self.generation_defaults)
        self.chat_defaults = ChatDefaults(
            temperature=self.defaults.sampling.get("temperature", 1.0),
            top_p=self.defaults.sampling.get("top_p", 1.0),
            max_new_tokens=self.defaults.max_new_tokens,
        )
        self._in_flight = 0

    @classmethod
    def start(cls, settings: WorkerSettings) -> VllmEngine:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        from qwen_vllm.model.refusal import refusal_in

        model_dir = resolve_model_dir(settings)
        adapters = read_adapters(settings)
        args = AsyncEngineArgs(**engine_args(settings, model_dir, adapters))
        logger.info("starting vLLM on %s", model_dir)
        try:
            config = args.create_engine_config()
        except Exception as exc:
            # The plugin's config hook refuses, before any engine process
            # starts, a machine that cannot hold the model (with the numbers)
            # and GPTQ weights that do not split over the ranks; vLLM wraps
            # those refusals, the supervisor needs them as they are.
            if (refusal := refusal_in(exc)) is not None:
                raise refusal from None
            raise
        return cls(AsyncLLM.from_vllm_config(config, disable_log_stats=True), adapters)

    def shutdown(self) -> None:
        self.llm.shutdown()

    def queue_length(self) -> int:
        return self._in_flight

    async def load_adapter(self, name: str, path: str) -> None:
        """Serve a LoRA adapter from now on; AdapterRefused says why not."""
        from vllm.lora.request import LoRARequest

        if self.max_lora_rank is None:
            raise AdapterRefused(
                "this worker runs without LoRA: start it with --max-loras N "
                "(adapters in one batch) to load adapters at run time"
            )
        adapter = LoraAdapter.read(name, path)
        if adapter.rank > self.max_lora_rank:
            raise AdapterRefused(
                f"LoRA adapter {name!r} ({path}) has rank {adapter.rank}, more than "
                f"this worker's --max-lora-rank {self.max_lora_rank}"
            )
        async with self._adapter_lock:
            if name in self.lora_requests:
                raise AdapterRefused(f"LoRA adapter {name!r} is already loaded")
            request = LoRARequest(name, next(self._lora_ids), str(adapter.path))
            try:
                # Loaded now, so weights vLLM cannot use fail this call and
                # not a client's request.
                await self.llm.add_lora(request)
            except Exception as exc:
                raise AdapterRefused(
                    f"LoRA adapter {name!r} ({path}): vLLM cannot load it: {exc}"
                ) from exc
            self.lora_requests[name] = request
        logger.info("loaded LoRA adapter %s from %s", name, adapter.path)

    async def unload_adapter(self, name: str) -> None:
        """Stop serving an adapter; returns once its last request has ended."""
        async with self._adapter_lock:
            request = self.lora_requests.pop(name, None)
        if request is None:
            raise KeyError(name)
        async with self._adapter_stream_ended:
            await self._adapter_stream_ended.wait_for(
                lambda: not self._adapter_streams[name]
            )
        await self.llm.remove_lora(request.lora_int_id)
        logger.info("unloaded LoRA adapter %s", name)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    async def check_health(self) -> None:
        await self.llm.check_health()

    def prompt_ids(self, params: GenerateParams) -> list[int]:
        if params.messages is not None:
            messages = [m.model_dump() for m in params.messages]
            window = params.max_window_size or self.defaults.window(
                self.context_length, params.max_new_tokens
            )
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
        asked = params.max_new_tokens
        if asked is None and params.max_length is not None:
            if not prompt_len < params.max_length <= self.context_length:
                raise RequestError(
                    ErrorCode.PARAM_OUT_OF_RANGE,
                    f"max_length ({params.max_length}) counts the prompt and the "
                    f"answer: with a prompt of {prompt_len} tokens it must be more "
                    f"than {prompt_len} and at most the context length of "
                    f"{self.context_length} tokens.",
                )
            asked = params.max_length - prompt_len
        max_tokens = self.defaults.max_tokens(asked, room)
        if max_tokens > room:
            raise RequestError(
                ErrorCode.PARAM_OUT_OF_RANGE,
                f"This model's maximum context length is {self.context_length} "
                f"tokens; the prompt has {prompt_len} tokens, so max_tokens can be "
                f"at most {room}, not {max_tokens}.",
            )
        # The request's fields over the model's defaults (GenerationDefaults).
        sampling = {**self.defaults.sampling, **_sampling_fields(params)}
        stop_ids = with_chatml_stops(params.stop_token_ids or ())
        try:
            structured = _structured_outputs(params.structured_outputs)
            return SamplingParams(
                n=1,
                **sampling,
                max_tokens=max(1, max_tokens),
                stop=params.stop_strings() or None,
                stop_token_ids=stop_ids,
                seed=params.seed,
                logprobs=params.logprobs,
                prompt_logprobs=params.logprobs if _echoes(params) else None,
                skip_special_tokens=True,
                structured_outputs=structured,
            )
        except (ValueError, TypeError, VLLMValidationError) as exc:
            raise RequestError(ErrorCode.PARAM_OUT_OF_RANGE, str(exc)) from exc

    async def generate(self, params: GenerateParams) -> AsyncIterator[GenerateChunk]:
        from vllm.exceptions import VLLMClientError

        try:
            prompt_ids = self.prompt_ids(params)
            sampling = self.sampling_params(params, len(prompt_ids))
        except RequestError as exc:
            yield error_chunk(exc.code, str(exc))
            return
        request_id = params.request_id or uuid.uuid4().hex
        echo = _echoes(params)
        prefix = (params.prompt or "") if echo else ""
        logprobs = None
        if params.logprobs is not None:
            logprobs = _LogprobsBuilder(self.tokenizer, echo)
        finished = False
        self._in_flight += 1
        lora_request = self.lora_requests.get(params.model or "")
        adapter = lora_request.lora_name if lora_request else None
        self._adapter_streams[adapter] += 1
        stream = self.llm.generate(
            {"prompt_token_ids": prompt_ids},
            sampling,
            request_id,
            lora_request=lora_request,
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
                    logprobs=None if logprobs is None else logprobs.update(output),
                )
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except (ValueError, VLLMClientError) as exc:  # vLLM's checks of the request
            logger.warning("vLLM refused request %s: %s", request_id, exc)
            yield error_chunk(ErrorCode.PARAM_OUT_OF_RANGE, str(exc))
        except Exception as exc:  # the engine died or rejected the request
            logger.exception("generation failed for request %s", request_id)
            yield error_chunk(ErrorCode.INTERNAL_ERROR, f"generation failed: {exc}")
        finally:
            self._in_flight -= 1
            await stream.aclose()
            if not finished:
                await self.llm.abort(request_id)
            async with self._adapter_stream_ended:
                self._adapter_streams[adapter] -= 1
                self._adapter_stream_ended.notify_all()


def _structured_outputs(fields: dict[str, Any] | None):
    """vLLM's StructuredOutputsParams, a structural tag checked by xgrammar
    first: vLLM's own check says only that the tag is invalid, not why."""
    if fields is None:
        return None
    from vllm.sampling_params import StructuredOutputsParams

    tag = fields.get("structural_tag")
    if tag is not None:
        _check_structural_tag(tag)
    return StructuredOutputsParams(**fields)


@functools.lru_cache(maxsize=256)
def _check_structural_tag(tag: str) -> None:
    import xgrammar

    try:
        xgrammar.Grammar.from_structural_tag(tag)
    except Exception as exc:
        # xgrammar's messages start with a time and a source location.
        reason = _XGRAMMAR_PREFIX.sub("", str(exc).strip())
        raise ValueError(f"Invalid output constraint: {reason}") from None


_XGRAMMAR_PREFIX = re.compile(r"^\[[^\]]*\]\s+\S+:\d+:\s*")


def _echoes(params: GenerateParams) -> bool:
    """Whether the output repeats the prompt (FastChat's echo: prompts only)."""
    return params.echo and params.messages is None and bool(params.prompt)


# What OpenAI and vLLM report for a logprob of -inf (not valid JSON).
_MIN_LOGPROB = -9999.0


class _LogprobsBuilder:
    """The logprobs of one generation's chunks, each position converted once.

    vLLM's outputs are cumulative; with echo the prompt's logprobs come
    whole once its prefill is done, the first position without any.
    """

    def __init__(self, tokenizer: Any, echo: bool) -> None:
        self.tokenizer = tokenizer
        self.prompt_pending = echo
        self.prompt_len = 0
        self.tokens: list[str] = []
        self.token_logprobs: list[float | None] = []
        self.top_logprobs: list[dict[str, float] | None] = []
        self.text_offset: list[int] = []
        self.token_bytes: list[list[int]] = []
        self.candidates: list[list[TokenCandidate] | None] = []

    def update(self, output: Any) -> Logprobs:
        prompt = output.prompt_logprobs if self.prompt_pending else None
        if prompt and len(prompt) == len(output.prompt_token_ids):
            self._extend(output.prompt_token_ids, prompt)
            self.prompt_pending = False
            self.prompt_len = len(self.tokens)
        completion = output.outputs[0]
        if not self.prompt_pending:
            done = len(self.tokens) - self.prompt_len
            ready = min(len(completion.token_ids), len(completion.logprobs or ()))
            if ready > done:
                self._extend(
                    completion.token_ids[done:ready], completion.logprobs[done:ready]
                )
        # Validation copies the lists: a chunk never changes once yielded.
        return Logprobs(
            tokens=self.tokens,
            token_logprobs=self.token_logprobs,
            top_logprobs=self.top_logprobs,
            text_offset=self.text_offset,
            token_bytes=self.token_bytes,
            candidates=self.candidates,
        )

    def _extend(self, token_ids: Any, positions: Any) -> None:
        token_ids = list(token_ids)
        ranked = [
            None if top is None else sorted(top.items(), key=_by_rank)
            for top in positions
        ]
        ids = token_ids + [i for top in ranked if top for i, _ in top]
        raw = iter(self.tokenizer.decode_tokens_bytes(ids))
        chosen_bytes = [list(next(raw)) for _ in token_ids]
        for token_id, token_bytes, top in zip(
            token_ids, chosen_bytes, ranked, strict=True
        ):
            last = self.text_offset[-1] + len(self.tokens[-1]) if self.tokens else 0
            self.text_offset.append(last)
            self.token_bytes.append(token_bytes)
            if top is None:  # the prompt's first token: nothing predicts it
                self.tokens.append(self.tokenizer.decode([token_id]))
                self.token_logprobs.append(None)
                self.top_logprobs.append(None)
                self.candidates.append(None)
                continue
            candidates = [
                TokenCandidate(
                    token=c.decoded_token or "",
                    logprob=max(c.logprob, _MIN_LOGPROB),
                    bytes=list(next(raw)),
                )
                for _, c in top
            ]
            by_text: dict[str, float] = {}
            for c in candidates:  # best first: a shared text keeps the best
                by_text.setdefault(c.token, c.logprob)
            chosen = dict(top)[token_id]
            self.tokens.append(chosen.decoded_token or "")
            self.token_logprobs.append(max(chosen.logprob, _MIN_LOGPROB))
            self.top_logprobs.append(by_text)
            self.candidates.append(candidates)


def _by_rank(item: tuple[int, Any]) -> tuple[bool, int]:
    rank = item[1].rank
    return rank is None, rank or 0
