"""How vLLM reads a Qwen v1 config: validation, context length, engine options."""

from __future__ import annotations

import logging

from vllm.config import VllmConfig
from vllm.model_executor.models.config import VerifyAndUpdateConfig
from vllm.transformers_utils.model_arch_config_convertor import (
    ModelArchConfigConvertorBase,
)

from qwen_vllm.model.sizes import TensorParallelMismatch, tensor_parallel_refusal

logger = logging.getLogger(__name__)


class QWenArchConfigConvertor(ModelArchConfigConvertorBase):
    def convert(self, supports_multimodal: bool = True):
        # Runs in the front end while vLLM builds its ModelConfig, so an
        # unservable checkpoint fails before any engine process starts.
        self.hf_config.check_servable()
        return super().convert(supports_multimodal)

    def derive_max_model_len_and_key(self) -> tuple[float, str | None]:
        # vLLM would take the smallest of seq_length and max_position_embeddings;
        # the checkpoint's own settings decide instead (see QWenConfig).
        config = self.hf_config
        key = (
            "max_position_embeddings"
            if config.max_context_length == config.max_position_embeddings
            else "seq_length"
        )
        return config.max_context_length, key


class QWenConfigHook(VerifyAndUpdateConfig):
    """Adjusts vLLM's engine config for a Qwen v1 checkpoint."""

    @staticmethod
    def verify_and_update_config(vllm_config: VllmConfig) -> None:
        _check_quantization_kernels(vllm_config)
        _check_tensor_parallel_split(vllm_config)
        _check_kv_cache_kernels(vllm_config)
        _size_kv_cache(vllm_config)
        hf_config = vllm_config.model_config.hf_config
        long_prompts = vllm_config.model_config.max_model_len > hf_config.seq_length
        cache = vllm_config.cache_config
        if hf_config.use_dynamic_ntk and long_prompts and cache.enable_prefix_caching:
            # Keys cached for one prompt length were rotated with that length's
            # NTK alpha; another prompt sharing the prefix may need another.
            logger.warning(
                "Prefix caching is off: with dynamic NTK the rotary base depends "
                "on each prompt's length (max_model_len %d > seq_length %d). "
                "Serve with --max-model-len %d to keep prefix caching.",
                vllm_config.model_config.max_model_len,
                hf_config.seq_length,
                hf_config.seq_length,
            )
            cache.enable_prefix_caching = False


def _check_quantization_kernels(vllm_config: VllmConfig) -> None:
    """Fail early and plainly where this vLLM build cannot run GPTQ weights."""
    from vllm.platforms import current_platform

    method = vllm_config.model_config.quantization or ""
    if "gptq" not in method or not current_platform.is_cpu():
        return
    import torch
    import vllm._custom_ops  # noqa: F401  (registers torch.ops._C)

    if not hasattr(torch.ops._C, "cpu_gemm_wna16"):
        raise ValueError(
            "This is a GPTQ (-Int4/-Int8) checkpoint, but this CPU build of vLLM "
            "has no GPTQ kernel (torch.ops._C.cpu_gemm_wna16 is missing). Serve "
            "the unquantized checkpoint here, or the GPTQ one on a GPU."
        )
    bits = (vllm_config.model_config.hf_config.quantization_config or {}).get("bits")
    if bits != 4:
        raise ValueError(
            f"This is a {bits}-bit GPTQ checkpoint; vLLM's CPU GPTQ kernel runs only "
            "4-bit weights. Serve it on a GPU, or use the -Int4 release on CPU."
        )


def _check_tensor_parallel_split(vllm_config: VllmConfig) -> None:
    """Refuse GPTQ weights whose quantization groups do not split over the
    ranks, before vLLM would fail loading them in every rank (model/sizes.py)."""
    tp = vllm_config.parallel_config.tensor_parallel_size
    refusal = tensor_parallel_refusal(vllm_config.model_config.hf_config, tp)
    if refusal is not None:
        raise TensorParallelMismatch(refusal)


def _check_kv_cache_kernels(vllm_config: VllmConfig) -> None:
    """Fail before the engine starts where this CPU cannot run an fp8 KV cache
    (vLLM would only find out inside the engine process, once per worker)."""
    from vllm.platforms import current_platform

    dtype = vllm_config.cache_config.cache_dtype or "auto"
    if not dtype.startswith("fp8") or not current_platform.is_cpu():
        return
    import torch

    if not (torch.cpu._is_avx512_supported() or torch.cpu._is_amx_tile_supported()):
        raise ValueError(
            f"--kv-cache-dtype {dtype}: vLLM's CPU build runs fp8 KV caches only "
            "on CPUs with AVX-512 or AMX, and this one has neither. Leave the KV "
            "cache dtype at auto here, or serve on a GPU or an AVX-512 machine."
        )


def _size_kv_cache(vllm_config: VllmConfig) -> None:
    """Size the KV cache (per rank) from the resolved engine config.

    On CPU vLLM reserves 92% of the NUMA node and refuses to start when that
    much is not free; see qwen_vllm/model/kv_cache.py. Here the cache gets what
    this engine can really have: its worker's share of the machine, or the size
    the worker asked for, checked against the machine (both arrive in
    `additional_config`). An explicit per-rank size (kv_cache_memory_bytes, or
    VLLM_CPU_KVCACHE_SPACE without a worker's request) is left alone.
    """
    import os

    from vllm.platforms import current_platform

    from qwen_vllm.model import kv_cache as memory

    cache = vllm_config.cache_config
    if cache.kv_cache_memory_bytes is not None:
        return
    extra = vllm_config.additional_config
    request = (
        extra.get(memory.WORKER_REQUEST_KEY, {}) if isinstance(extra, dict) else {}
    )
    requested = request.get("total_bytes")
    tp = vllm_config.parallel_config.tensor_parallel_size
    if not current_platform.is_cpu():
        if requested is not None:  # on GPU vLLM measures free memory itself
            cache.kv_cache_memory_bytes = requested // tp
        return
    if requested is None and os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        return
    model_config = vllm_config.model_config
    model = memory.footprint(
        model_config.hf_config,
        model_config.model,
        dtype=str(model_config.dtype),
        kv_cache_dtype=cache.cache_dtype,
        max_model_len=model_config.max_model_len,
        max_num_seqs=vllm_config.scheduler_config.max_num_seqs,
        ranks=tp,
    )
    cache.kv_cache_memory_bytes = memory.cpu_kv_cache_bytes_per_rank(
        model, share=request.get("share", 1), requested_bytes=requested
    )
    logger.info(
        "KV cache: %s per rank, %s",
        memory.gib(cache.kv_cache_memory_bytes),
        "as asked"
        if requested is not None
        else "sized from this machine's available memory (set "
        "kv_cache_memory_bytes to choose)",
    )
