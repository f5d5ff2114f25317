#!/usr/bin/env bash
# The GPU check: one command, on a machine with one NVIDIA GPU and no network, in under 8 minutes (docs/gpu.md).
#
#   bash benchmarks/gpu/build-wheelhouse.sh      # on a networked machine: .gpu-wheels/ (~30 MB) from locks/cuda.txt
#   bash benchmarks/gpu/check.sh                 # on the GPU machine (the working tree + .gpu-wheels carried there)
#
# Uses the machine's own torch (CUDA build); installs the lock's other packages from .gpu-wheels into a private
# folder. Steps: PEFT parity on CUDA (SmolLM2-135M shape + three tiny families, float32 exact, bfloat16 within its
# tie tolerance, both batch layouts), then the engine benchmark (benchmarks/gpu/gpu_bench.py). Results in $OUT
# (default gpu-check-out/): environment.json, parity.log + parity.xml, gpu-bench.json, gpu-bench.png, bench.log.
set -uo pipefail
cd "$(dirname "$0")/../.."

out=${OUT:-gpu-check-out}
mkdir -p "$out"
python=${PYTHON:-python3}
site=$(mktemp -d)/site
status=0

echo "== install .gpu-wheels into $site"
"$python" -m pip install --quiet --no-index --no-deps --target "$site" .gpu-wheels/*.whl || exit 1
export PYTHONPATH="$PWD:$site"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

"$python" - >"$out/environment.json" <<'PY'
import importlib.metadata as md, json, platform, torch

def version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None

names = ["torch", "transformers", "peft", "tokenizers", "safetensors", "fastapi", "pydantic", "numpy"]
print(json.dumps({
    "python": platform.python_version(), "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    "bf16_supported": torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
    "versions": {name: version(name) for name in names},
}, indent=1))
PY
cat "$out/environment.json"
"$python" -c "import service.api.app, service.engine" || { echo "the service does not import here" >&2; exit 1; }

echo "== PEFT parity on CUDA"
PREFIX_SERVE_TEST_DEVICE=cuda timeout 200 "$python" -m pytest tests/test_device_parity.py tests/test_device.py -q \
    -p no:cacheprovider --junitxml "$out/parity.xml" 2>&1 | tee "$out/parity.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== engine benchmark on CUDA"
timeout 300 "$python" benchmarks/gpu/gpu_bench.py --out "$out" --budget-s 220 2>&1 | tee "$out/bench.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
exit "$status"
