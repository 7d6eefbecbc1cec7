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
    # this machine's CA bundle too (its registries may sit behind a TLS-inspecting proxy)
    cp /etc/ssl/certs/ca-certificates.crt "$ROOTFS/etc/ssl/certs/ca-certificates.crt"
    tar -C "$ROOTFS" -c . | podman import --change 'ENV PIP_BREAK_SYSTEM_PACKAGES=1' \
      --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
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
time podman build --format docker --isolation=chroot --network=host "${BASE[@]}" "${WHEELS[@]}" -t "$TAG" .
echo "+ image size"
podman image inspect "$TAG" --format '{{.Size}}' | awk '{printf "%.0f MB\n", $1/1e6}'
# podman run, or -- where this machine's OCI runtime refuses (as in unprivileged sandboxes:
# "setrlimit ... Operation not permitted") -- the image's own file system under chroot, as its
# user (uid 1000), with /work, /proc and /dev bound in
MODE=podman
if ! podman run --rm --network=none "$TAG" --help >/dev/null 2>&1; then
  MODE=chroot
  MNT=$(podman image mount "$TAG")
  echo "+ podman run is refused here: running the image's file system with chroot ($MNT)"
fi
in_image() {  # in_image <work dir> <args of neurorecon...>
  local work=$1; shift
  if [ "$MODE" = podman ]; then
    podman run --rm --network=host -v "$work:/work" "$TAG" "$@"
  else
    unshare -m bash -c 'set -e; m=$0; w=$1; shift 1
      mount --bind "$w" "$m/work"; mount -t proc proc "$m/proc"; mount --rbind /dev "$m/dev"
      exec chroot --userspec=1000:1000 "$m" /usr/bin/env HOME=/home/neurorecon \
        NEURORECON_ROOT=/work HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
        PATH=/usr/local/bin:/usr/bin:/bin sh -c "cd /work && exec neurorecon \"\$@\"" sh "$@"' \
      "$MNT" "$work" "$@"
  fi
}
WORK=$(mktemp -d)
chmod a+rwx "$WORK"
echo "+ neurorecon --help (in the image)"
in_image "$WORK" --help | head -4
BUNDLE=${1:-}
if [ -z "$BUNDLE" ]; then
  echo "no bundle given: skipping the service smoke run"
  exit 0
fi
cp -r "$BUNDLE" "$WORK/bundle"
chmod -R a+rwX "$WORK"
in_image "$WORK" key key.name=smoke key.file=/work/keys.txt | tail -1 > "$WORK/key"
echo "+ neurorecon serve in the image (bundle $BUNDLE) on 127.0.0.1:18765"
in_image "$WORK" serve "serve.bundles=[/work/bundle]" serve.api_keys_file=/work/keys.txt \
  serve.port=18765 serve.data_dir=/work/serve-data > "$WORK/serve.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null; sleep 2; rm -rf "$WORK"' EXIT
for _ in $(seq 1 90); do
  if curl -sf http://127.0.0.1:18765/ready >/dev/null; then break; fi
  sleep 2
done
echo "+ GET /health: $(curl -s http://127.0.0.1:18765/health)"
echo "+ GET /ready:  $(curl -s http://127.0.0.1:18765/ready)"
echo "+ the HEALTHCHECK's command against it: $(python3 -c "import urllib.request as u; print(u.urlopen('http://127.0.0.1:18765/health', timeout=4).status)")"
echo "+ GET /v1/models: $(curl -s -H "X-API-Key: $(cat "$WORK/key")" http://127.0.0.1:18765/v1/models | head -c 160)"
echo "+ the image's HEALTHCHECK: $(podman image inspect "$TAG" --format '{{.HealthCheck}}')"
echo "+ the image's user: $(podman image inspect "$TAG" --format '{{.User}}')"
