"""Load (slow, real process): LOAD_CLIENTS concurrent loopback clients against a small queue
(PREFIX_SERVE_MAX_WAITING=4) for RELIABILITY_LOAD_S seconds (default 20): only 200/429 come back, every accepted
request is answered (streams end with their final event), server RSS stays bounded.

Measured figures are printed (run with -s to see them)."""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.model_loader import LoadedModel
from tests.helpers import (
    ServerProcess,
    Version,
    generate_body,
    make_version,
    save_model_dir,
    sse_events,
    upload_files,
    upload_form,
)

LOAD_S = float(os.environ.get("RELIABILITY_LOAD_S", "20"))
LOAD_CLIENTS = int(os.environ.get("RELIABILITY_LOAD_CLIENTS", "64"))

@pytest.mark.slow
def test_overload_answers_200_or_429_and_memory_stays_bounded(loaded: LoadedModel, tmp_path: Path) -> None:
    model_dir = save_model_dir(loaded.model, tmp_path / "model")
    versions = [make_version(loaded.model, tmp_path, f"v{i}", 4 + i, 30 + i, loaded.tokenizer) for i in range(2)]
    env = {
        "PREFIX_SERVE_MAX_WAITING": "4",
        "PREFIX_SERVE_MAX_RUNNING_ROWS": "8",
        "PREFIX_SERVE_MAX_PREFILL_ROWS": "8",
        "PREFIX_SERVE_REQUEST_TIMEOUT_S": "120",
    }
    server = ServerProcess(model_dir, tmp_path / "store", tmp_path / "server.log", env).start()
    try:
        with httpx.Client(base_url=server.url, timeout=60) as c:
            for i, v in enumerate(versions):
                assert c.post("/prefixes", data=upload_form(f"task{i}", False), files=upload_files(v.config, v.weights)).status_code == 201
        rss_start = server.rss_kib()
        result = asyncio.run(_load(server, versions))
        rss_end = server.rss_kib()
        with httpx.Client(base_url=server.url, timeout=60) as c:
            assert c.get("/health").status_code == 200
            after = c.post("/generate", json=generate_body("task0"))
            assert after.status_code == 200 and after.json()["generated_text"] == versions[0].expected_text
    finally:
        server.stop()

    statuses: Counter = result["statuses"]
    samples: list[tuple[float, int]] = result["rss"]
    warm = [kib for t, kib in samples if t >= LOAD_S * 0.25]
    rss_warm, rss_max = warm[0], max(kib for _, kib in samples)
    latencies = sorted(result["latencies"])
    figures = {
        "clients": LOAD_CLIENTS, "duration_s": LOAD_S, "requests": sum(statuses.values()),
        "statuses": dict(statuses), "per_s": round(sum(statuses.values()) / LOAD_S, 1),
        "answered_200_per_s": round(statuses[200] / LOAD_S, 1),
        "streams_completed": result["streams_completed"], "transport_errors": len(result["errors"]),
        "p50_ms_200": round(1000 * latencies[len(latencies) // 2]) if latencies else None,
        "p99_ms_200": round(1000 * latencies[int(len(latencies) * 0.99)]) if latencies else None,
        "rss_mib": {"start": rss_start // 1024, "after_warmup": rss_warm // 1024, "max": rss_max // 1024,
                    "end": rss_end // 1024},
    }  # fmt: skip
    print(f"\nload test: {json.dumps(figures)}")

    assert not result["errors"], result["errors"][:10]
    assert set(statuses) <= {200, 429}, statuses
    assert statuses[200] > 0 and statuses[429] > 0, f"the queue limit was never reached: {statuses}"
    assert not result["problems"], result["problems"][:10]
    # Bounded growth: after warm-up, the server's RSS grows by less than 64 MiB whatever the number of requests.
    assert rss_end - rss_warm < 64 * 1024, figures


async def _load(server: ServerProcess, versions: list[Version]) -> dict[str, Any]:
    statuses: Counter = Counter()
    errors: list[str] = []
    problems: list[str] = []
    latencies: list[float] = []
    rss: list[tuple[float, int]] = []
    streams_completed = 0
    texts = {f"task{i}": v.expected_text for i, v in enumerate(versions)}
    started = time.monotonic()
    deadline = started + LOAD_S

    async def sample_rss() -> None:
        while time.monotonic() < deadline:
            rss.append((time.monotonic() - started, server.rss_kib()))
            await asyncio.sleep(0.5)

    async def client(index: int, http: httpx.AsyncClient) -> None:
        nonlocal streams_completed
        rng = random.Random(index)
        streaming = index % 4 == 3
        while time.monotonic() < deadline:
            task = f"task{rng.randrange(len(versions))}"
            t0 = time.monotonic()
            try:
                if streaming:
                    async with http.stream("POST", "/generate_stream", json=generate_body(task)) as r:
                        body = (await r.aread()).decode()
                else:
                    r = await http.post("/generate", json=generate_body(task))
                    body = r.text
            except httpx.HTTPError as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                continue
            statuses[r.status_code] += 1
            if r.status_code == 200:
                latencies.append(time.monotonic() - t0)
                if streaming:
                    events = sse_events(body)
                    if not events or events[-1].get("generated_text") != texts[task]:
                        problems.append(f"stream did not end with its final text: {body[-300:]!r}")
                    else:
                        streams_completed += 1
                elif json.loads(body)["generated_text"] != texts[task]:
                    problems.append(f"wrong text: {body[:300]!r}")
            elif r.status_code == 429:
                if "retry-after" not in r.headers:
                    problems.append("429 without Retry-After")
                await asyncio.sleep(rng.uniform(0.02, 0.1))  # back off briefly; keep the pressure on
            else:
                problems.append(f"{r.status_code}: {body[:300]}")

    limits = httpx.Limits(max_connections=LOAD_CLIENTS, max_keepalive_connections=LOAD_CLIENTS)
    async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=limits) as http:
        await asyncio.gather(sample_rss(), *(client(i, http) for i in range(LOAD_CLIENTS)))
    return {"statuses": statuses, "errors": errors, "problems": problems, "latencies": latencies, "rss": rss,
            "streams_completed": streams_completed}  # fmt: skip
