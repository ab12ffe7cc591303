"""Fixtures of the model tests."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import free_port


@pytest.fixture(scope="session")
def load():
    """Build the model in this process and fill it with vLLM's real loader."""
    from vllm.config import set_current_vllm_config
    from vllm.distributed import (
        init_distributed_environment,
        initialize_model_parallel,
        model_parallel_is_initialized,
    )
    from vllm.engine.arg_utils import EngineArgs
    from vllm.model_executor.model_loader import get_model_loader
    from vllm.model_executor.model_loader.utils import (
        initialize_model,
        process_weights_after_loading,
    )
    from vllm.utils.torch_utils import set_default_torch_dtype

    def _load(path, dtype="float32", *, post_process=False):
        """post_process: also run vLLM's step after loading, as its load_model
        does (CPU repacking, re-tying a redundant lm_head); off, the parameters
        hold the tensors as loaded."""
        args = EngineArgs(
            model=str(path),
            dtype=dtype,
            enforce_eager=True,
            max_model_len=256,
            skip_tokenizer_init=True,
        )
        config = args.create_engine_config()
        with set_current_vllm_config(config):
            if not model_parallel_is_initialized():
                init_distributed_environment(
                    world_size=1,
                    rank=0,
                    local_rank=0,
                    distributed_init_method=f"tcp://127.0.0.1:{free_port()}",
                    backend="gloo",
                )
                initialize_model_parallel(1, 1)
            with set_default_torch_dtype(config.model_config.dtype):
                model = initialize_model(vllm_config=config)
            get_model_loader(config.load_config).load_weights(
                model, config.model_config
            )
            if post_process:
                process_weights_after_loading(
                    model, config.model_config, torch.device("cpu")
                )
        return model

    return _load
