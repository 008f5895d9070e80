# One image for the operator (`defender-operator`), the sidecar agent (`defender-agent`) and the
# kubectl plugin (`kubectl-defender`). Build: make image (hack/image.sh).
#
# Stage 1 builds the project wheel and the wheels of its pinned dependencies; stage 2 installs
# only those wheels into a slim Python with no compiler, as an unprivileged user.
ARG PYTHON_IMAGE=python:3.11.7-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY requirements/constraints.txt requirements/constraints.txt
COPY src src
COPY operator operator
RUN pip wheel --wheel-dir /wheels --constraint requirements/constraints.txt .

FROM ${PYTHON_IMAGE}
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="ml-defender-config" \
      org.opencontainers.image.description="ML Defender config plane: operator, sidecar agent, kubectl plugin" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
# No .pyc writes (the root filesystem is read-only in the chart), unbuffered logs.
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-index --find-links /wheels ml-defender-config \
    && groupadd --gid 10001 defender \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin defender
# Numeric so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001
WORKDIR /tmp
CMD ["defender-operator"]
