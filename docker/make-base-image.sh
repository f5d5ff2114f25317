#!/usr/bin/env bash
# Make a Debian bookworm base image with Python 3.11 from the Debian mirror alone, for hosts that cannot pull from a
# container registry (air-gapped, or package-mirror-only networks like our CI). Pass the result to the Dockerfile as
# --build-arg BASE_IMAGE=NAME. Hosts that can reach Docker Hub can use python:3.11-slim-bookworm instead.
#
# Usage: docker/make-base-image.sh [NAME]      (default NAME: prefix-serve-base:bookworm; needs root and debootstrap)
#   DEBIAN_MIRROR=URL  mirror to bootstrap from (default: the one apt uses here, else http://deb.debian.org/debian)
#   FORCE=1            rebuild even if NAME was made by this very script
set -euo pipefail

name=${1:-prefix-serve-base:bookworm}

# Cache: an image of that name made by this same script (its hash is in a label) is reused, not rebuilt.
key=$(sha256sum "$0" | cut -c1-32)
have=$(docker image inspect -f '{{ index .Config.Labels "io.prefix-serve.base-key" }}' "$name" 2>/dev/null || true)
if [ -z "${FORCE:-}" ] && [ "$have" = "$key" ]; then
    echo "base image $name is up to date (key $key)"
    exit 0
fi

mirror=${DEBIAN_MIRROR:-}
if [ -z "$mirror" ]; then
    # First plain ".../debian" URI in apt's sources (deb822 "URIs:" or one-line "deb URL suite ...").
    mirror=$(grep -hoE '^(URIs:|deb)[[:space:]]+[^][:space:]]+/debian/?([[:space:]]|$)' \
        /etc/apt/sources.list /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2; exit}' || true)
fi
mirror=${mirror:-http://deb.debian.org/debian}

rootfs=$(mktemp -d /tmp/prefix-serve-rootfs.XXXXXX)
trap 'rm -rf "$rootfs"' EXIT

# minbase + python3-venv: the smallest Debian that can create the image's virtualenv (python3-venv brings ensurepip).
echo "debootstrapping bookworm from $mirror into $rootfs"
debootstrap --variant=minbase --include=python3,python3-venv bookworm "$rootfs" "$mirror"
# Downloaded .debs and package lists are not needed in the image.
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*

tar -C "$rootfs" -c . | docker import \
    --change 'ENV LANG=C.UTF-8' \
    --change "LABEL io.prefix-serve.base-key=$key" \
    --change 'CMD ["/bin/bash"]' \
    - "$name"
echo "made base image $name"
