"""A store of many tasks: how long the registry and the server take to start on it, what they hold idle, and where
one cold load of a prefix spends its time.

    python benchmarks/store_scale.py --tasks 10000                       # registry + profile + server, JSON out
    python benchmarks/store_scale.py --tasks 2000 --no-server            # registry + profile only

The store is written straight to disk in the registry's format (random SmolLM2-shaped V=20 prefixes, metadata with
their sha256), without fsync: building 10,000 tasks through `put` (validation, four fsyncs each) would take minutes
and measures nothing this script is about. Results go to benchmarks/results/store-scale-cpu.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as save_safetensors
from transformers import AutoConfig

from service.geometry import PrefixGeometry, geometry_from_config
from service.kv_store import KVGeometry, PrefixBank
from service.model_loader import embedded_model_dir
from service.prefix import TaskPrefix, prompt_embeddings_to_kv
from service.prefix_format import validate_adapter
from service.registry import CONFIG_FILE, METADATA_FILE, METADATA_VERSION, WEIGHTS_FILE, PrefixRegistry
from service.settings import Settings

logger = logging.getLogger("store_scale")
REPO = Path(__file__).resolve().parent.parent
SERVED = "SmolLM2-135M-Instruct"


def smollm2_geometry(settings: Settings) -> PrefixGeometry:
    return geometry_from_config(AutoConfig.from_pretrained(embedded_model_dir(settings.cache_dir)))


def config_bytes(geometry: PrefixGeometry, num_virtual_tokens: int) -> bytes:
    """An adapter_config.json as PEFT writes it for this geometry."""
    config = {
        "peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": num_virtual_tokens,
        "num_layers": geometry.num_layers, "num_attention_heads": geometry.num_kv_heads,
        "token_dim": geometry.token_dim, "num_transformer_submodules": 1, "prefix_projection": False,
        "base_model_name_or_path": f"HuggingFaceTB/{SERVED}", "inference_mode": True,
    }
    return json.dumps(config, indent=2).encode("utf-8")


def build_store(root: Path, tasks: int, geometry: PrefixGeometry, num_virtual_tokens: int) -> float:
    """Write `tasks` task folders; returns seconds taken."""
    started = time.perf_counter()
    root.mkdir(parents=True, exist_ok=True)
    config = config_bytes(geometry, num_virtual_tokens)
    generator = torch.Generator().manual_seed(0)
    width = geometry.num_layers * 2 * geometry.token_dim
    for i in range(tasks):
        weights = save_safetensors(
            {"prompt_embeddings": torch.randn(num_virtual_tokens, width, generator=generator) * 0.1},
            metadata={"format": "pt"},
        )
        folder = root / f"task-{i:05d}"
        folder.mkdir()
        (folder / CONFIG_FILE).write_bytes(config)
        (folder / WEIGHTS_FILE).write_bytes(weights)
        metadata = {
            "format_version": METADATA_VERSION, "sha256": hashlib.sha256(weights).hexdigest(), "bytes": len(weights),
            "created_at": "2026-12-05T00:00:00.000Z", "num_virtual_tokens": num_virtual_tokens,
        }
        (folder / METADATA_FILE).write_text(json.dumps(metadata, indent=2))
    return time.perf_counter() - started


def make_registry(root: Path, geometry: PrefixGeometry, settings: Settings, **overrides: Any) -> PrefixRegistry:
    kwargs: dict[str, Any] = dict(
        device=torch.device("cpu"), dtype=torch.float32, served_model_name=SERVED,
        max_virtual_tokens=settings.max_virtual_tokens, max_prefix_bytes=settings.max_prefix_bytes,
        max_config_bytes=settings.max_config_bytes, max_prefixes=None,
        host_budget_bytes=settings.prefix_host_budget_bytes,
    )
    kwargs.update(overrides)
    return PrefixRegistry(root, geometry, **kwargs)


def rss_bytes(pid: int | None = None) -> int:
    for line in Path(f"/proc/{pid or 'self'}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def time_registry(root: Path, geometry: PrefixGeometry, settings: Settings) -> dict[str, Any]:
    before = rss_bytes()
    registry = make_registry(root, geometry, settings, device_tier=False)
    started = time.perf_counter()
    registry.load_all()
    seconds = time.perf_counter() - started
    return {"tasks": len(registry), "load_all_s": round(seconds, 3), "index_rss_bytes": rss_bytes() - before}


def profile_cold_load(root: Path, geometry: PrefixGeometry, settings: Settings, samples: int) -> dict[str, Any]:
    """Per cold load, ms (median and min): each stage by hand, then the registry's own path (first use, then a re-read of a file
    this process already hashed) and the bank's write."""
    folders = sorted(p for p in root.iterdir() if not p.name.startswith("."))[:samples]
    stages: dict[str, list[float]] = {k: [] for k in ("disk_read", "sha256", "validate_parse", "to_kv", "bank_write")}
    kv_geometry = KVGeometry(geometry.num_layers, geometry.num_kv_heads, geometry.head_dim, torch.float32,
                             torch.device("cpu"))
    bank = PrefixBank(kv_geometry)
    for folder in folders:
        t0 = time.perf_counter()
        config, weights = (folder / CONFIG_FILE).read_bytes(), (folder / WEIGHTS_FILE).read_bytes()
        t1 = time.perf_counter()
        hashlib.sha256(weights).hexdigest()
        t2 = time.perf_counter()
        validated = validate_adapter(
            config, weights, geometry, served_model_name=SERVED, max_virtual_tokens=settings.max_virtual_tokens,
            max_prefix_bytes=settings.max_prefix_bytes, max_config_bytes=settings.max_config_bytes,
        )
        t3 = time.perf_counter()
        kv = prompt_embeddings_to_kv(validated.prompt_embeddings, geometry, dtype=torch.float32, device="cpu")
        bool(torch.isfinite(kv).all())
        t4 = time.perf_counter()
        entry = bank.acquire(TaskPrefix(folder.name, kv, folder.name))
        bank.release(entry)
        t5 = time.perf_counter()
        for name, seconds in zip(stages, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
            stages[name].append(seconds * 1000)
    registry = make_registry(root, geometry, settings, device_tier=False, host_budget_bytes=1)
    registry.load_all()
    first, again = [], []
    for folder in folders:
        t0 = time.perf_counter()
        registry.get(folder.name)
        first.append((time.perf_counter() - t0) * 1000)
    for folder in folders:  # host budget of one prefix: each is back on disk, its file already hashed
        t0 = time.perf_counter()
        registry.get(folder.name)
        again.append((time.perf_counter() - t0) * 1000)
    stages["registry_first_use"], stages["registry_reload"] = first, again
    # Median and minimum: on a shared machine the minimum is the cost itself, the median what a busy machine adds.
    result: dict[str, Any] = {f"{name}_ms": _spread(values) for name, values in stages.items()}
    result["samples"] = len(folders)
    return result


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3)}


def time_throughput(
    store: Path, settings: Settings, *, requests: int, concurrency: int, new_tokens: int, prompt_tokens: int,
    rounds: int,
) -> dict[str, Any]:
    """The engine (slot layout, the embedded model) fed through the registry as the server does: tokens/s when the
    requests cycle over 8 tasks (warm: after the warm-up their prefixes are in the host tier and the bank) and when every
    request is a different task, read from disk on its first use (cold)."""
    import asyncio
    import random

    from service.bench.run import closed_loop
    from service.bench.workload import WorkItem
    from service.engine import ContinuousBatchingEngine, EngineLimits
    from service.model_loader import load_base_model
    from service.requests import GenerationRequest, SamplingParams
    from service.runner import ModelRunner
    from service.startup import check_model

    loaded = load_base_model(settings)
    runner = ModelRunner(loaded.model, loaded.tokenizer)
    layout = check_model(runner, loaded.geometry, "mixed")
    tasks = sorted(p.name for p in store.iterdir() if not p.name.startswith("."))
    rng = random.Random(0)
    vocab = loaded.tokenizer.vocab_size

    def workload(task_ids: list[str]) -> list[WorkItem]:
        return [WorkItem(t, [rng.randrange(100, vocab) for _ in range(prompt_tokens)], new_tokens) for t in task_ids]

    def run(name: str, items: list[WorkItem], warmup: list[WorkItem]) -> dict[str, Any]:
        registry = make_registry(store, loaded.geometry, settings, device_tier=False, dtype=loaded.dtype,
                                 device=loaded.device)
        registry.load_all()
        limits = EngineLimits.from_settings(settings.model_copy(update={"max_running_rows": concurrency}))
        engine = ContinuousBatchingEngine(runner, policy="mixed", limits=limits, layout=layout)
        engine.on_prefix_bank = lambda bank: (bank.set_idle_budget(settings.prefix_device_budget_bytes),
                                              registry.attach_device_tier(bank))
        lookups: list[float] = []

        async def submit(item: WorkItem) -> Any:
            started = time.perf_counter()
            prefix = await asyncio.to_thread(registry.get, item.task_id)
            lookups.append((time.perf_counter() - started) * 1000)
            params = SamplingParams(max_new_tokens=item.max_new_tokens, ignore_eos=True)
            return await engine.generate(GenerationRequest(item.prompt_ids, prefix, params))

        async def main() -> tuple[float, list[Any]]:
            engine.start()
            try:
                await closed_loop(submit, warmup, concurrency)
                lookups.clear()
                return await closed_loop(submit, items, concurrency)
            finally:
                engine.stop()

        wall, results = asyncio.run(main())
        tokens = sum(len(r.token_ids) for r in results)
        misses = registry.cache.stats.misses_from_disk
        return {"system": name, "tokens_per_s": round(tokens / wall, 1), "wall_s": round(wall, 2),
                "lookup_ms": _spread(lookups), "disk_reads": misses}

    warm_tasks = tasks[:8]
    systems: dict[str, list[dict[str, Any]]] = {}
    for round_ in range(rounds):  # alternated, so a busy moment of the machine hits every system alike
        warm = run("8 tasks", workload([warm_tasks[i % 8] for i in range(requests)]), workload(warm_tasks))
        cold_ids = tasks[8 + round_ * requests : 8 + (round_ + 1) * requests]  # never used before: read from disk
        cold = run("every request a different cold task", workload(cold_ids), workload(tasks[-concurrency:]))
        # The same distinct tasks once their prefixes are in host memory: the many prefixes' cost without the reads.
        distinct = run("every request a different task, in host memory", workload(cold_ids), workload(cold_ids))
        for result in (warm, cold, distinct):
            systems.setdefault(result["system"], []).append(result)
            logger.info("throughput: %s", result)
    best = {name: max(r["tokens_per_s"] for r in runs) for name, runs in systems.items()}
    warm_best = best["8 tasks"]
    return {"requests": requests, "concurrency": concurrency, "new_tokens": new_tokens, "prompt_tokens": prompt_tokens,
            "rounds": rounds, "runs": systems, "best_tokens_per_s": best,
            "best_over_8_tasks": {name: round(value / warm_best, 3) for name, value in best.items()}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def time_server(store: Path, tasks: int, idle_s: float) -> dict[str, Any]:
    """Start `prefix-serve serve` on `store`; seconds to the first /health 200 and RSS after `idle_s` idle."""
    port = free_port()
    env = {**os.environ, "PREFIX_SERVE_MAX_PREFIXES": str(max(tasks, 1)), "PREFIX_SERVE_LOG_LEVEL": "warning"}
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "service", "serve", "--prefix-dir", str(store), "--port", str(port)],
        env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"server exited: {process.stderr.read().decode()[-2000:] if process.stderr else ''}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.05)
        healthy_s = time.perf_counter() - started
        time.sleep(idle_s)
        return {"tasks": tasks, "healthy_s": round(healthy_s, 2), "idle_rss_bytes": rss_bytes(process.pid)}
    finally:
        process.terminate()
        process.wait(timeout=30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--virtual-tokens", type=int, default=20)
    parser.add_argument("--store", type=Path, help="Reuse (or create) this store instead of a temporary one.")
    parser.add_argument("--profile-samples", type=int, default=200)
    parser.add_argument("--no-server", action="store_true", help="Skip the server start-up timing.")
    parser.add_argument("--idle-s", type=float, default=3.0)
    parser.add_argument("--server-repeats", type=int, default=3)
    parser.add_argument("--throughput", action="store_true", help="Also: engine tokens/s, 8 warm tasks vs cold ones.")
    parser.add_argument("--requests", type=int, default=96)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3, help="Throughput rounds (each runs every system once).")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "store-scale-cpu.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("service").setLevel(logging.WARNING)
    settings = Settings()
    geometry = smollm2_geometry(settings)
    scratch = Path(tempfile.mkdtemp(prefix="store-scale-"))
    store = args.store or scratch / "store"
    try:
        result: dict[str, Any] = {"tasks": args.tasks, "virtual_tokens": args.virtual_tokens,
                                  "torch_threads": torch.get_num_threads()}
        existing = sum(1 for p in store.iterdir() if not p.name.startswith(".")) if store.is_dir() else 0
        if existing != args.tasks:
            shutil.rmtree(store, ignore_errors=True)
            result["build_s"] = round(build_store(store, args.tasks, geometry, args.virtual_tokens), 1)
            logger.info("built %d tasks in %.1f s", args.tasks, result["build_s"])
        result["registry"] = time_registry(store, geometry, settings)
        logger.info("registry: %s", result["registry"])
        result["cold_load"] = profile_cold_load(store, geometry, settings, args.profile_samples)
        logger.info("cold load: %s", result["cold_load"])
        if args.throughput:
            result["throughput"] = time_throughput(
                store, settings, requests=args.requests, concurrency=args.concurrency, new_tokens=args.new_tokens,
                prompt_tokens=24, rounds=args.rounds,
            )
            logger.info("throughput, best over 8 tasks: %s", result["throughput"]["best_over_8_tasks"])
        if not args.no_server:
            empty = scratch / "empty"
            empty.mkdir()
            runs: dict[str, list[dict[str, Any]]] = {"server_empty": [], "server_full": []}
            for _ in range(args.server_repeats):  # alternated, so a busy moment of the machine hits both alike
                runs["server_empty"].append(time_server(empty, 0, args.idle_s))
                runs["server_full"].append(time_server(store, args.tasks, args.idle_s))
                logger.info("server, empty store: %s; %d tasks: %s", runs["server_empty"][-1], args.tasks,
                            runs["server_full"][-1])
            for name, values in runs.items():
                result[name] = {
                    "tasks": values[0]["tasks"],
                    "healthy_s": [v["healthy_s"] for v in values],
                    "idle_rss_bytes": [v["idle_rss_bytes"] for v in values],
                    "healthy_s_min": min(v["healthy_s"] for v in values),
                    "idle_rss_bytes_median": int(statistics.median(v["idle_rss_bytes"] for v in values)),
                }
        result["peak_rss_bytes_this_process"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
