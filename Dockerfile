# The image a GPU node runs:  docker run --gpus all -v /data:/data -v /out:/out IMAGE distill /data/job.toml --out /out/run
# torch's wheel carries the CUDA 13 runtime and nvidia-dali-cuda130 matches it; the host only needs the
# NVIDIA driver and container toolkit. Without --gpus the same image runs on the CPU.
FROM python:3.11-slim-bookworm

ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

WORKDIR /opt/rded
COPY pyproject.toml README.md setup.sh ./
COPY pipeline ./pipeline
COPY jobs ./jobs
COPY shards ./shards
# the README's set-up, word for word: a .venv at the repository root, installed from pyproject.toml
RUN ./setup.sh

RUN useradd --create-home --uid 1000 rded && mkdir -p /data /out && chown rded:rded /out
USER 1000:1000
ENV PATH=/opt/rded/.venv/bin:$PATH
VOLUME ["/data", "/out"]
ENTRYPOINT ["rded"]
CMD ["--help"]
