#!/usr/bin/env bash
# Local stand-ins for the public base images, for machines that cannot pull from public registries:
#   IMAGE_PREFIX/python:3.11   Debian bookworm's python3 (3.11) with pip and venv: for the Dockerfile's PYTHON_IMAGE
#   IMAGE_PREFIX/haproxy:2.6   Debian bookworm's HAProxy 2.6: for the compose file's HAPROXY_IMAGE
# built from the Debian mirror apt already uses (debootstrap), with this machine's CA certificates (so pip and
# apt inside builds trust what the host trusts). Each is built once and kept; pass --rebuild to make them again.
# Users who can pull build from the public images instead; nothing in the Dockerfile depends on these.
#
#   bash scripts/local-base-image.sh [--rebuild]     (root; Debian or Ubuntu host with a running Docker engine)
set -euo pipefail
PREFIX=${IMAGE_PREFIX:-attnserve-local}
PYTHON_IMAGE="$PREFIX/python:3.11"
HAPROXY_IMAGE="$PREFIX/haproxy:2.6"
if [ "${1:-}" = "--rebuild" ]; then
  docker image rm -f "$PYTHON_IMAGE" "$HAPROXY_IMAGE" >/dev/null 2>&1 || true
fi

if ! docker image inspect "$PYTHON_IMAGE" >/dev/null 2>&1; then
  command -v debootstrap >/dev/null || { apt-get update -qq && apt-get install -y -qq debootstrap; }
  MIRROR=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
  MIRROR=${MIRROR:-http://deb.debian.org/debian}
  ROOTFS=$(mktemp -d)
  trap 'rm -rf "$ROOTFS"' EXIT
  echo "building $PYTHON_IMAGE from $MIRROR (a few minutes, once) ..."
  debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
    bookworm "$ROOTFS" "$MIRROR" >/dev/null
  ln -sf /usr/bin/python3 "$ROOTFS/usr/local/bin/python"
  ln -sf /usr/bin/pip3 "$ROOTFS/usr/local/bin/pip"
  rm -f "$ROOTFS"/usr/lib/python3*/EXTERNALLY-MANAGED
  cp /usr/local/share/ca-certificates/*.crt "$ROOTFS/usr/local/share/ca-certificates/" 2>/dev/null || true
  chroot "$ROOTFS" update-ca-certificates >/dev/null
  rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/*
  tar -C "$ROOTFS" -c . | docker import -c 'ENV PATH=/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    -c 'ENV LANG=C.UTF-8' - "$PYTHON_IMAGE" >/dev/null
  echo "built $PYTHON_IMAGE"
fi

if ! docker image inspect "$HAPROXY_IMAGE" >/dev/null 2>&1; then
  echo "building $HAPROXY_IMAGE ..."
  printf 'FROM %s\nRUN apt-get update -qq && apt-get install -y -qq --no-install-recommends haproxy && rm -rf /var/lib/apt/lists/*\nUSER haproxy\n' \
    "$PYTHON_IMAGE" | docker build --network host -q -t "$HAPROXY_IMAGE" - >/dev/null
  echo "built $HAPROXY_IMAGE"
fi
echo "PYTHON_IMAGE=$PYTHON_IMAGE HAPROXY_IMAGE=$HAPROXY_IMAGE"
