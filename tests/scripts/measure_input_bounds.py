"""/health latency while huge prompts are refused: a real `prefix-serve serve` with the embedded SmolLM2, loopback
only, `/health` probed every 10 ms from another thread during each request (~1 min).

Usage: .venv/bin/python tests/scripts/measure_input_bounds.py [PORT]   (one JSON line per case; docs/reliability.md)
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[2]
TWENTY_MB = 20 * 1024 * 1024


def rss_mib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) // 1024
    return -1


def measure(url: str, pid: int, path: str, body: dict[str, Any]) -> dict[str, Any]:
    raw = json.dumps(body).encode()
    latencies: list[float] = []
    stop = threading.Event()

    def probe() -> None:
        with httpx.Client(base_url=url, timeout=60) as client:
            while not stop.is_set():
                started = time.perf_counter()
                client.get("/health")
                latencies.append(time.perf_counter() - started)
                time.sleep(0.01)

    prober = threading.Thread(target=probe)
    prober.start()
    time.sleep(0.2)
    rss_before = rss_mib(pid)
    started = time.perf_counter()
    response = httpx.post(url + path, content=raw, headers={"content-type": "application/json"}, timeout=120)
    answered_s = time.perf_counter() - started
    time.sleep(0.2)
    stop.set()
    prober.join()
    error = response.json().get("error")
    message = error["message"] if isinstance(error, dict) else str(error)
    return {
        "body_MB": round(len(raw) / 1e6, 1), "status": response.status_code, "answered_s": round(answered_s, 3),
        "health_ms_p50": round(1000 * statistics.median(latencies), 1),
        "health_ms_max": round(1000 * max(latencies), 1), "probes": len(latencies),
        "rss_mib_before": rss_before, "rss_mib_after": rss_mib(pid), "message": message[:140],
    }  # fmt: skip


def main() -> None:
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 18711
    work = Path(tempfile.mkdtemp(prefix="measure-inputs-"))
    url = f"http://127.0.0.1:{port}"
    with open(work / "server.log", "wb") as log:
        server = subprocess.Popen(
            [str(ROOT / ".venv/bin/prefix-serve"), "serve", "--port", str(port), "--prefix-dir", str(work / "store"),
             "--device", "cpu", "--log-level", "warning"],
            stdout=log, stderr=subprocess.STDOUT, cwd=work,
        )  # fmt: skip
    try:
        deadline = time.time() + 180
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert server.poll() is None and time.time() < deadline, "the server did not start"
            time.sleep(0.3)
        model = httpx.get(url + "/health").json()["model"]
        huge = "hello " * (TWENTY_MB // 6)
        cases = {
            "generate_20MB": ("/generate", {"task_id": "none", "inputs": huge}),
            "completions_20MB": ("/v1/completions", {"model": model, "prompt": huge}),
            "chat_20MB": ("/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": huge}]}),
            "completions_3.9MB_over_char_bound": ("/v1/completions", {"model": model, "prompt": "hello " * 650_000}),
            "completions_at_char_bound_331k_chars": ("/v1/completions", {"model": model, "prompt": "hello " * 55_296}),
        }
        for name, (path, body) in cases.items():
            print(name, json.dumps(measure(url, server.pid, path, body)), flush=True)
    finally:
        server.terminate()
        server.wait(30)


if __name__ == "__main__":
    main()
