"""The GPU check's parts that run anywhere: its benchmark on the CPU with a tiny shape (same code as on CUDA), its
wheelhouse list against the CUDA lock, and the one-shot script's steps (docs/gpu.md)."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GPU_DIR = REPO / "benchmarks" / "gpu"


def _gpu_bench():
    spec = importlib.util.spec_from_file_location("gpu_bench", GPU_DIR / "gpu_bench.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_on_cpu(out: Path, *args: str) -> dict:
    """The GPU benchmark's own entry point on the CPU in float32; its JSON report."""
    assert _gpu_bench().main(["--device", "cpu", "--dtype", "float32", "--out", str(out), *args]) == 0
    return json.loads((out / "gpu-bench.json").read_text())


def test_gpu_bench_runs_every_system_and_profiles_a_slow_step(tmp_path: Path) -> None:
    report = _run_on_cpu(tmp_path, "--shapes", "tiny", "--clients", "4,32", "--tasks", "2,5", "--new-tokens", "3",
                         "--prompt-tokens", "4-6")
    assert (tmp_path / "gpu-bench.png").stat().st_size > 10_000
    runs = report["runs"]
    assert {(r["system"], r["tasks"], r["concurrency"]) for r in runs} == {
        (s, t, c) for s in ("static", "mixed") for t in (2, 5) for c in (4, 32)
    }
    for run in runs:
        assert run["generated_tokens"] == 3 * run["concurrency"], run  # every client's tokens, none lost
        assert run["step_vs_weight_read"] > 0 and run["itl_p95_s"] >= run["itl_p50_s"]
    tiny = report["shapes"]["tiny"]
    assert tiny["layout"] == "slots" and tiny["weight_bytes"] > 0
    # On a CPU a tiny model's step is far above one weight read: the profile must be there and name real operators.
    assert tiny["within_target"] is False
    ops = [entry["op"] for entry in tiny["profile"]["top"]]
    assert any(op.startswith("aten::") for op in ops), ops
    assert report["environment"]["memory_bandwidth_gb_s"] > 0 and not report["skipped"]


def test_gpu_bench_stops_starting_runs_when_its_budget_is_spent(tmp_path: Path) -> None:
    report = _run_on_cpu(tmp_path, "--shapes", "tiny,tiny", "--clients", "2", "--tasks", "2", "--new-tokens", "2",
                         "--budget-s", "0")
    assert report["runs"] == [] and len(report["skipped"]) == 2


def test_gpu_wheelhouse_takes_its_versions_from_the_cuda_lock() -> None:
    script = (GPU_DIR / "build-wheelhouse.sh").read_text()
    wanted = re.search(r"wanted=\((.*?)\)", script, re.S)
    assert wanted is not None
    names = [n for n in wanted.group(1).split() if not n.startswith("#")]
    lock = (REPO / "locks" / "cuda.txt").read_text().lower()
    missing = [n for n in names if not re.search(rf"^{re.escape(n)}==", lock, re.M)]
    assert not missing, f"not in locks/cuda.txt: {missing}"
    # What the service imports at start must travel (the GPU image lacks fastapi, pydantic, ... and gguf).
    for needed in ("fastapi", "pydantic", "pydantic-settings", "uvicorn", "transformers", "peft", "gguf", "pytest"):
        assert needed in names


@pytest.mark.parametrize("script", ["check.sh", "build-wheelhouse.sh"])
def test_gpu_scripts_are_valid_bash(script: str) -> None:
    subprocess.run(["bash", "-n", str(GPU_DIR / script)], check=True)
    text = (GPU_DIR / "check.sh").read_text()
    assert "PREFIX_SERVE_TEST_DEVICE=cuda" in text and "tests/test_device_parity.py" in text
    assert "benchmarks/gpu/gpu_bench.py" in text
