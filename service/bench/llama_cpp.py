"""llama.cpp's `llama-server` as a peer in `prefix-serve bench`: the same requests, the same weights, the same precision.

The peer runs the bench's work the way a llama.cpp user would: every task is a text, and each request's prompt is
its task's text followed by the request's own tokens, sent as token ids to `/completion` with `cache_prompt: true`
(a slot that last served the same task reuses the text's cached K/V and evaluates only the rest). Here the same text
is a task made from text (`service.text_prefix`): its K/V computed once and stored as a prefix. Both sides are
greedy (`temperature: 0`), ignore EOS and generate exactly the request's `max_new_tokens`; the tokens each side
generated are counted from its own answers.

The server is started with `--parallel C --cont-batching -c <C*256> -t T -tb T` (C clients, T = the torch threads of
the bench) on a free local port and stopped when the run ends. Its GGUF is either given (`--llama-gguf`) or made from
the served model's directory by llama.cpp's own `convert_hf_to_gguf.py` (`--llama-convert`, `--llama-outtype`).

Timings: a request's latency is submit -> answer (non-streaming: the load generator spends as little CPU as it can,
it shares the cores with the server); its time to first token is the latency minus the generation time llama-server
reports (`timings.predicted_ms`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from service.bench.run import RequestTiming, RunResult, closed_loop
from service.bench.workload import WorkItem

logger = logging.getLogger(__name__)

SYSTEM = "llama.cpp"
OUTTYPES = ("bf16", "f32", "f16", "q8_0")
CELLS_PER_SLOT = 256  # llama-server gives each slot at least this many KV cells; a smaller -c is raised silently
HEALTH_TIMEOUT_S = 120.0


def system_name(outtype: str | None) -> str:
    """"llama.cpp-bf16" for a GGUF the bench converted, "llama.cpp" for one given as it is."""
    return f"{SYSTEM}-{outtype}" if outtype else SYSTEM


def is_llama_system(name: str) -> bool:
    return name == SYSTEM or name.startswith(SYSTEM + "-")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def convert_to_gguf(script: Path, model_dir: Path, outtype: str, out_file: Path) -> Path:
    """Run llama.cpp's `convert_hf_to_gguf.py` on a Hugging Face model directory (once: an existing `out_file` is
    reused). The script runs in this interpreter; it needs `gguf` and `sentencepiece` importable (PYTHONPATH)."""
    if outtype not in OUTTYPES:
        raise ValueError(f"--llama-outtype {outtype!r}: choose from {', '.join(OUTTYPES)}")
    if out_file.exists():
        logger.info("llama.cpp: reusing %s", out_file)
        return out_file
    out_file.parent.mkdir(parents=True, exist_ok=True)
    partial = out_file.with_name(out_file.name + ".partial")
    command = [sys.executable, str(script), str(model_dir), "--outtype", outtype, "--outfile", str(partial)]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0 or not partial.exists():
        partial.unlink(missing_ok=True)
        raise RuntimeError(f"{shlex.join(command)} failed ({done.returncode}): {done.stderr[-2000:]}")
    os.replace(partial, out_file)
    logger.info("llama.cpp: converted %s to %s (%s) in %.1f s", model_dir, out_file, outtype,
                time.perf_counter() - started)  # fmt: skip
    return out_file


def server_command(binary: Path, gguf: Path, port: int, *, parallel: int, threads: int, extra: str = "") -> list[str]:
    return [
        str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
        "--parallel", str(parallel), "--cont-batching", "-c", str(max(8192, parallel * CELLS_PER_SLOT)),
        "-t", str(threads), "-tb", str(threads), *shlex.split(extra),
    ]  # fmt: skip


class LlamaServer:
    """A running llama-server: started on entry, answering /health before the body runs, stopped on exit."""

    def __init__(self, command: list[str], port: int, log_file: Path) -> None:
        self.command = command
        self.url = f"http://127.0.0.1:{port}"
        self.log_file = log_file
        self._process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> LlamaServer:
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_file, "wb") as log:
            self._process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL)  # fmt: skip
        logger.info("llama.cpp: started %s", shlex.join(self.command))
        try:
            self._wait_healthy()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def _wait_healthy(self) -> None:
        assert self._process is not None
        deadline = time.monotonic() + HEALTH_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"llama-server exited with {self._process.returncode} before it was healthy: "
                                   f"{self._log_tail()}")  # fmt: skip
            try:
                if httpx.get(self.url + "/health", timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass  # not listening yet
            time.sleep(0.25)
        raise RuntimeError(f"llama-server did not answer /health within {HEALTH_TIMEOUT_S:.0f} s: {self._log_tail()}")

    def _log_tail(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")[-1500:]
        except OSError:
            return "(no log)"

    def __exit__(self, *exc: object) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def completion_body(task_ids: list[int], item: WorkItem) -> dict[str, Any]:
    """The /completion request for one work item: the task's text tokens, then the prompt's."""
    return {
        "prompt": [*task_ids, *item.prompt_ids],
        "n_predict": item.max_new_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "cache_prompt": True,
        "return_tokens": True,
        "response_fields": ["tokens", "tokens_predicted", "tokens_cached", "timings"],
    }


def run_llama_cpp_system(
    name: str,
    url: str,
    task_token_ids: dict[str, list[int]],
    workload: list[WorkItem],
    *,
    concurrency: int,
    warmup: list[WorkItem] | None = None,
) -> RunResult:
    """C closed-loop clients against a running llama-server, one pooled HTTP client (see NOTES: a client per
    request costs the server's cores)."""

    async def main() -> tuple[float, list[RequestTiming]]:
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=httpx.Timeout(600.0)) as client:

            async def submit(item: WorkItem) -> RequestTiming:
                task = task_token_ids[item.task_id] if item.task_id is not None else []
                started = time.perf_counter()
                response = await client.post("/completion", json=completion_body(task, item))
                latency = time.perf_counter() - started
                if response.status_code != 200:
                    raise RuntimeError(f"llama-server answered {response.status_code}: {response.text[:500]}")
                answer = response.json()
                generated = int(answer.get("tokens_predicted", len(answer.get("tokens", []))))
                generation_s = float(answer.get("timings", {}).get("predicted_ms", 0.0)) / 1000
                return RequestTiming(latency, max(latency - generation_s, 0.0), generated)

            if warmup:
                await closed_loop(submit, warmup, concurrency)
            return await closed_loop(submit, workload, concurrency)

    wall, timings = asyncio.run(main())
    return RunResult(name, concurrency, wall, timings)
