# syntax=docker/dockerfile:1
# Lethe images, built from one file:
#   docker build --target api    -t lethe-api .     slim: FastAPI + SQLAlchemy + Celery client, no torch
#   docker build --target worker -t lethe-worker .  Celery GPU worker: torch 2.14.1 (CUDA wheels)
# Both run as the unprivileged user `lethe` (uid 10001) and keep state under /var/lib/lethe
# (the model store is a volume shared by the API, which streams checkpoints, and the workers).
# The PyPI torch wheel carries its CUDA runtime; the host supplies only the NVIDIA driver
# (NVIDIA Container Toolkit, `deploy.resources.reservations.devices` in docker-compose.yml).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/lethe \
    PATH=/opt/lethe/bin:$PATH
RUN groupadd --system --gid 10001 lethe \
 && useradd --system --uid 10001 --gid lethe --home-dir /var/lib/lethe --shell /usr/sbin/nologin lethe \
 && install -d -o lethe -g lethe -m 0750 /var/lib/lethe /var/lib/lethe/models

# ---------------------------------------------------------------------------------------------
# Build stages: a virtualenv per image, so the runtime stages carry no compiler or pip cache.
FROM base AS build-api
RUN python -m venv /opt/lethe
WORKDIR /src
COPY pyproject.toml README.md ./
COPY engine ./engine
COPY models_store ./models_store
COPY app ./app
COPY worker ./worker
COPY migrations ./migrations
RUN pip install --upgrade pip && pip install '.[api]'

FROM build-api AS build-worker
RUN pip install '.[worker]'

# ---------------------------------------------------------------------------------------------
FROM base AS api
COPY --from=build-api /opt/lethe /opt/lethe
ENV LETHE_ENVIRONMENT=production \
    LETHE_VAR_DIR=/var/lib/lethe \
    LETHE_STORE_ROOT=/var/lib/lethe/models
WORKDIR /var/lib/lethe
USER lethe
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
CMD ["lethe", "serve", "--api-only", "--no-migrate", "--no-bootstrap", "--host", "0.0.0.0", "--port", "8000"]

# ---------------------------------------------------------------------------------------------
FROM base AS worker
COPY --from=build-worker /opt/lethe /opt/lethe
ENV LETHE_ENVIRONMENT=production \
    LETHE_VAR_DIR=/var/lib/lethe \
    LETHE_STORE_ROOT=/var/lib/lethe/models \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
WORKDIR /var/lib/lethe
USER lethe
# One process, one GPU, Celery solo pool (CUDA is never initialised in a forking process).
HEALTHCHECK --interval=30s --timeout=15s --start-period=60s --retries=3 \
  CMD ["python", "-m", "worker.health"]
CMD ["lethe", "worker"]
