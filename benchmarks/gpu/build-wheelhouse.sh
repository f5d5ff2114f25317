#!/usr/bin/env bash
# Build .gpu-wheels/: what the GPU check (benchmarks/gpu/check.sh) installs on a GPU machine that has no network.
#
# The versions are locks/cuda.txt's (the lock's, for Python 3.12 on manylinux x86_64). The GPU image already holds
# torch with its CUDA libraries (and numpy, matplotlib, httpx, ...), so only what the service and the check import
# and the image may lack or hold older travels: the packages listed below, hash-checked, ~35 MB. Run on a machine
# with network; the folder travels with the working tree (run: carry .gpu-wheels).
set -euo pipefail
cd "$(dirname "$0")/../.."

out=.gpu-wheels
lock=locks/cuda.txt
# The service's imports and the check's test runner (pyproject's runtime set, less what the GPU image brings).
wanted=(
    transformers tokenizers huggingface-hub hf-xet safetensors peft accelerate gguf
    fastapi starlette annotated-doc uvicorn h11 click pydantic pydantic-core pydantic-settings python-dotenv
    annotated-types typing-inspection typing-extensions python-multipart prometheus-client anyio
    pytest pluggy iniconfig packaging
)
rm -rf "$out.new"
mkdir -p "$out.new"
pattern=$(printf '%s|' "${wanted[@]}")
# The lock's entries (with their --hash lines) for the wanted names only.
awk -v want="^(${pattern%|})==" 'BEGIN { IGNORECASE = 1 } /^[A-Za-z0-9]/ { keep = ($0 ~ want) } keep' "$lock" \
    >"$out.new/requirements.txt"
found=$(grep -cE '^[A-Za-z0-9]' "$out.new/requirements.txt")
[ "$found" -eq "${#wanted[@]}" ] || {
    echo "expected ${#wanted[@]} packages in $lock, found $found:" >&2
    grep -oE '^[A-Za-z0-9_.-]+' "$out.new/requirements.txt" >&2
    exit 1
}
python3 -m pip download --quiet --no-deps --require-hashes --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux_2_17_x86_64 -d "$out.new" -r "$out.new/requirements.txt"
size_mb=$(du -sm "$out.new" | cut -f1)
[ "$size_mb" -le 60 ] || { echo "$out is ${size_mb} MB, over the 60 MB the GPU check may carry" >&2; exit 1; }
rm -rf "$out"
mv "$out.new" "$out"
echo "$out ready: $(ls "$out"/*.whl | wc -l) wheels, ${size_mb} MB"
