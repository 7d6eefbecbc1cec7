#!/usr/bin/env bash
# Build the Dockerfile with podman and smoke-run the service in it (not part of CI).
# Prints each step, the image size, and the /health and /ready answers of the container.
#   tests/benchmarks/container_smoke.sh [<fmri bundle dir>]
# Without podman on PATH it says so and exits 0 (there is no Docker engine on these machines).
set -euo pipefail
cd "$(dirname "$0")/../.."
if ! command -v podman >/dev/null; then
  echo "podman not found: nothing built (install it with: apt-get install podman)"
  exit 0
fi
TAG=neurorecon:smoke
BASE=()
if ! podman image exists docker.io/library/python:3.11-slim \
    && ! podman pull -q docker.io/library/python:3.11-slim 2>/dev/null; then
  # no container registry reachable: a stand-in base (Debian bookworm's Python 3.11) made with
  # debootstrap from the Debian mirror, imported into podman
  echo "+ python:3.11-slim cannot be pulled: building a stand-in base with debootstrap"
  if ! podman image exists localhost/neurorecon-base:bookworm; then
    command -v debootstrap >/dev/null || apt-get install -y -qq debootstrap
    ROOTFS=$(mktemp -d)
    debootstrap --variant=minbase --include=python3,python3-pip,python3-venv,python-is-python3,ca-certificates,passwd \
      bookworm "$ROOTFS" http://deb.debian.org/debian >/dev/null
    tar -C "$ROOTFS" -c . | podman import --change 'ENV PIP_BREAK_SYSTEM_PACKAGES=1' \
      --change 'CMD ["/bin/bash"]' - localhost/neurorecon-base:bookworm
    rm -rf "$ROOTFS"
  fi
  BASE=(--from localhost/neurorecon-base:bookworm)
fi
# a local CPU torch wheel (as on these machines, where download.pytorch.org is unreachable)
WHEELS=()
if ls /opt/wheels/torch-*+cpu-*.whl >/dev/null 2>&1; then
  WHEELS=(--volume /opt/wheels:/wheels:ro --build-arg TORCH_WHEELS=/wheels)
fi
echo "+ podman build ${BASE[*]} ${WHEELS[*]} -t $TAG ."
time podman build --isolation=chroot --network=host "${BASE[@]}" "${WHEELS[@]}" -t "$TAG" .
echo "+ image size"
podman image inspect "$TAG" --format '{{.Size}}' | awk '{printf "%.0f MB\n", $1/1e6}'
echo "+ podman run $TAG --help"
podman run --rm --network=none "$TAG" --help | head -5
BUNDLE=${1:-}
if [ -z "$BUNDLE" ]; then
  echo "no bundle given: skipping the service smoke run"
  exit 0
fi
WORK=$(mktemp -d)
cp -r "$BUNDLE" "$WORK/bundle"
chmod -R a+rwX "$WORK"
podman run --rm --network=none -v "$WORK:/work" "$TAG" key key.name=smoke \
  key.file=/work/keys.txt | tail -1 > "$WORK/key"
echo "+ podman run -d … serve (bundle $BUNDLE)"
CID=$(podman run -d --network=host -v "$WORK:/work" "$TAG" serve "serve.bundles=[/work/bundle]" \
  serve.api_keys_file=/work/keys.txt serve.port=18765 serve.data_dir=/work/serve)
trap 'podman rm -f "$CID" >/dev/null; rm -rf "$WORK"' EXIT
for _ in $(seq 1 60); do
  if curl -sf http://127.0.0.1:18765/ready >/dev/null; then break; fi
  sleep 2
done
echo "+ GET /health: $(curl -s http://127.0.0.1:18765/health)"
echo "+ GET /ready:  $(curl -s http://127.0.0.1:18765/ready)"
echo "+ GET /v1/models: $(curl -s -H "X-API-Key: $(cat "$WORK/key")" http://127.0.0.1:18765/v1/models | head -c 200)"
echo "+ healthcheck: $(podman healthcheck run "$CID" && echo healthy)"
