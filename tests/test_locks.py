"""One source of versions: the locks agree with each other and with pyproject's ranges, every installer reads them,
and the environment the suite runs in is the lock (docs/dependencies.md)."""

from __future__ import annotations

import importlib.metadata
import os
import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
LOCKS = REPO / "locks"


def pins(lock: str) -> dict[str, str]:
    text = (LOCKS / lock).read_text()
    found = dict(re.findall(r"^([A-Za-z0-9_.-]+)==([^\s;\\]+)", text, re.M))
    assert found, f"no pins in {lock}"
    # Every pin carries hashes: pip installs it with --require-hashes.
    assert text.count("==") <= text.count("--hash=sha256:"), f"{lock} has pins without hashes"
    return {canonicalize_name(name): version for name, version in found.items()}


def test_the_serving_lock_holds_no_training_or_bench_extra() -> None:
    # The Docker image installs locks/serve-cpu.txt: PEFT and matplotlib are the train/bench extras' alone (tqdm stays:
    # transformers and huggingface-hub need it themselves).
    serve = pins("serve-cpu.txt")
    assert not {"peft", "matplotlib"} & set(serve), sorted(serve)
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    runtime = {canonicalize_name(Requirement(r).name) for r in project["dependencies"]}
    assert not {"peft", "tqdm", "matplotlib"} & runtime
    extras = project["optional-dependencies"]
    assert {"train", "bench"} <= set(extras) and "prefix-serve[train,bench]" in extras["test"]


def test_serving_and_cuda_locks_take_the_cpu_locks_versions() -> None:
    cpu, serve, cuda = pins("cpu.txt"), pins("serve-cpu.txt"), pins("cuda.txt")
    assert set(serve) <= set(cpu)
    assert {n: v for n, v in serve.items() if cpu[n] != v} == {}
    differ = {n: (cpu[n], v) for n, v in cuda.items() if n in cpu and cpu[n] != v}
    assert set(differ) <= {"torch"}, differ
    assert Version(cuda["torch"]).public == Version(cpu["torch"]).public  # the same torch release, CUDA vs CPU build
    assert cpu["torch"].endswith("+cpu") and "+" not in cuda["torch"]


def test_locks_satisfy_pyprojects_ranges() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = [Requirement(r) for r in project["dependencies"]]
    requirements += [Requirement(r) for extra in project["optional-dependencies"].values() for r in extra]
    cpu = pins("cpu.txt")
    for requirement in requirements:
        name = canonicalize_name(requirement.name)
        if name == canonicalize_name(project["name"]):  # `test` pulls the project's own extras (train, bench)
            assert set(requirement.extras) <= set(project["optional-dependencies"]), requirement
            continue
        assert name in cpu, f"{name} is not in locks/cpu.txt"
        assert requirement.specifier.contains(Version(cpu[name]), prereleases=True), (requirement, cpu[name])


def test_every_installer_reads_the_lock() -> None:
    setup = (REPO / ".ci" / "setup").read_text()
    assert "locks/cpu.txt" in setup and "--require-hashes" in setup and "--no-deps" in setup
    assert "bash .ci/setup" in (REPO / ".ci" / "run").read_text()
    wheelhouse = (REPO / "docker" / "build-wheelhouse.sh").read_text()
    assert "locks/serve-cpu.txt" in wheelhouse and "--require-hashes" in wheelhouse
    assert "locks/cuda.txt" in (REPO / "benchmarks" / "gpu" / "build-wheelhouse.sh").read_text()


@pytest.mark.skipif(os.environ.get("PREFIX_SERVE_UNLOCKED") == "1", reason=".ci/latest runs unlocked on purpose")
def test_the_suite_runs_on_the_lock() -> None:
    """CI's environment is exactly the lock (a missing install step or a stray upgrade shows here)."""
    wrong = {}
    for name, version in pins("cpu.txt").items():
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            wrong[name] = (version, None)
            continue
        if Version(installed) != Version(version):
            wrong[name] = (version, installed)
    assert not wrong, f"(locked, installed): {wrong}"
