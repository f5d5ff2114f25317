"""Deadline accuracy under prefill: a real `prefix-serve serve` (embedded SmolLM2, loopback only) with a 1.5 s
deadline gets an ~8,100-token prompt; how long until its 504, and how long does a short request sent right behind it
take? (~1 min)

Usage: .venv/bin/python tests/scripts/measure_deadline.py [DTYPE]   (one JSON line per request; docs/reliability.md)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
DEADLINE_S = 1.5


def main() -> int:
    dtype = sys.argv[1] if len(sys.argv) > 1 else "float32"
    port = 8790
    url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "PREFIX_SERVE_REQUEST_TIMEOUT_S": str(DEADLINE_S),
        "PREFIX_SERVE_MAX_PROMPT_TOKENS": "8192",
        "PREFIX_SERVE_MAX_KV_TOKENS": "65536",
    }
    with tempfile.TemporaryDirectory() as store:
        server = subprocess.Popen(
            [str(ROOT / ".venv/bin/prefix-serve"), "serve", "--port", str(port), "--prefix-dir", store,
             "--device", "cpu", "--dtype", dtype, "--log-level", "warning"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 180
            while True:
                try:
                    if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert server.poll() is None and time.monotonic() < deadline, "server did not start"
                time.sleep(0.5)
            with httpx.Client(base_url=url, timeout=120) as client:
                long_prompt = " ".join(["river mountain city garden"] * 2025)  # ~8,100 tokens
                client.post("/v1/completions", json={"model": "SmolLM2-135M-Instruct", "prompt": "warm up", "max_tokens": 2})
                results: dict[str, dict] = {}

                def send(name: str, body: dict, path: str) -> None:
                    started = time.perf_counter()
                    response = client.post(path, json=body)
                    results[name] = {
                        "request": name,
                        "status": response.status_code,
                        "seconds": round(time.perf_counter() - started, 3),
                        "deadline_s": DEADLINE_S,
                    }

                long = threading.Thread(
                    target=send,
                    args=("8,100-token prompt", {"model": "SmolLM2-135M-Instruct", "prompt": long_prompt, "max_tokens": 4},
                          "/v1/completions"),
                )
                long.start()
                time.sleep(0.2)
                send("short request behind it", {"model": "SmolLM2-135M-Instruct", "prompt": "Hello", "max_tokens": 4},
                     "/v1/completions")
                long.join()
                for name in ("8,100-token prompt", "short request behind it"):
                    print(json.dumps({**results[name], "dtype": dtype}))
        finally:
            server.terminate()
            server.wait(timeout=30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
