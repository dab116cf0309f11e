# The image a GPU node runs:  docker run --gpus all -v /data:/data -v /out:/out IMAGE distill /data/job.toml --out /out/run
# torch's wheel carries the CUDA 13 runtime and nvidia-dali-cuda130 matches it; the host only needs the
# NVIDIA driver and container toolkit. Without --gpus the same image runs on the CPU.
# Build:  docker build -t rded .   (BASE: any Debian-like image with Python 3.11 and python3 -m venv; the
# default is a short name, which the engine resolves with its own registry configuration; behind a
# TLS-inspecting proxy pass the CA bundle as a build secret: --secret id=pip-cert,src=BUNDLE)
ARG BASE=python:3.11-slim-bookworm
FROM ${BASE}

# The package index: --build-arg PIP_INDEX_URL=URL (a mirror); left empty, pip's own default index.
ARG PIP_INDEX_URL=
ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

RUN useradd --create-home --uid 1000 rded && mkdir -p /data /out && chown rded:rded /out
WORKDIR /opt/rded

# The README's set-up in its two phases. First the dependencies, from pyproject.toml alone: this ~6 GB
# layer is rebuilt only when pyproject.toml or setup.sh change, not when the code does.
COPY pyproject.toml setup.sh ./
RUN --mount=type=secret,id=pip-cert \
    if [ -s /run/secrets/pip-cert ]; then export PIP_CERT=/run/secrets/pip-cert; fi; \
    if [ -z "${PIP_INDEX_URL:-}" ]; then unset PIP_INDEX_URL; fi; \
    ./setup.sh --deps-only
# Then the code, installed without dependencies and offline: a code change rebuilds in seconds.
COPY README.md ./
COPY jobs ./jobs
COPY shards ./shards
COPY pipeline ./pipeline
RUN ./setup.sh --no-deps

USER 1000:1000
ENV PATH=/opt/rded/.venv/bin:$PATH
VOLUME ["/data", "/out"]
WORKDIR /out
ENTRYPOINT ["rded"]
CMD ["--help"]
