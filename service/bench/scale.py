"""`prefix-serve bench --scale N`: ten thousand tasks (issue 19). On a server in this process (a real uvicorn on a
loopback port, the store in a temp folder):

  1. import: N random V-token PEFT prefixes through POST /prefixes/bulk (tars of --scale-batch tasks, two requests at
     a time), against --scale-single-uploads single uploads (POST /prefixes, 4 clients, deleted again), per task;
  2. listing: every page of GET /prefixes at the default limit (100) and at 1,000, and GET /v1/models pages: ms per
     page and bytes per page; then a new task: POST /prefixes and at once a one-token POST /generate on it, against
     the same request on a warm task;
  3. traffic over the stored tasks through the registry the server used (so a request may wait for its prefix to be
     read back from host memory or disk, as on the server), on the engine, --clients closed-loop clients, every
     request generating all its tokens (EOS ignored):
       hot-8       round-robin over 8 tasks (the usual bench's load)
       zipf-N      each request's task drawn from Zipf(--zipf) over all N tasks
       cold-N      every request a different task, none requested before
     with --rounds R, the three loads R times in turns (a new Zipf draw and new cold tasks each round): the table
     shows each load's median round and the range, each ratio the median of the rounds' ratios.
Writes scale.json and scale.md (the table) to --out."""

from __future__ import annotations

import argparse
import json
import logging
import random
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import torch
from safetensors.torch import save as safetensors_bytes

from service.api.app import create_app
from service.bench.report import markdown_table, median_rows, ratios_table, write_json
from service.bench.run import run_engine_system
from service.bench.workload import WorkItem, make_workload, task_ids, token_range
from service.bulk_archive import tar_stream
from service.compute_thread import run_in_fresh_thread
from service.model_loader import LoadedModel
from service.runner import ModelRunner
from service.settings import Settings
from service.startup import check_model

logger = logging.getLogger(__name__)

HOT_TASKS = 8
IMPORT_REQUESTS_AT_ONCE = 2
SINGLE_UPLOAD_CLIENTS = 4
ADAPTER_POOL = 64
NEW_TASK_SAMPLES = 20


def adapter_files(loaded: LoadedModel, num_virtual_tokens: int, generator: torch.Generator) -> dict[str, bytes]:
    """One random prefix in PEFT's saved format (what `service.bench.workload.write_random_prefixes` writes)."""
    geometry = loaded.geometry
    config = {
        "peft_type": "PREFIX_TUNING", "task_type": "SEQ_2_SEQ_LM" if geometry.is_encoder_decoder else "CAUSAL_LM",
        "num_virtual_tokens": num_virtual_tokens, "num_layers": geometry.num_layers, "token_dim": geometry.token_dim,
        "num_attention_heads": geometry.num_kv_heads, "num_transformer_submodules": 2 if geometry.is_encoder_decoder
        else 1, "base_model_name_or_path": loaded.name, "inference_mode": True, "prefix_projection": False,
    }  # fmt: skip
    embeddings = torch.randn((num_virtual_tokens, geometry.numbers_per_virtual_token), generator=generator)
    return {
        "adapter_config.json": json.dumps(config).encode("utf-8"),
        "adapter_model.safetensors": safetensors_bytes({"prompt_embeddings": embeddings}, {"format": "pt"}),
    }


class _Server:
    """The app under uvicorn on a loopback port, in a thread."""

    def __init__(self, app: Any) -> None:
        import socket

        import uvicorn

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> _Server:
        self.thread.start()
        deadline = time.monotonic() + 300
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the bench's server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)


def _ms(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "mean_ms": round(1000 * statistics.fmean(ordered), 2),
        "p50_ms": round(1000 * ordered[len(ordered) // 2], 2),
        "p95_ms": round(1000 * ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], 2),
    }


def bulk_import(url: str, loaded: LoadedModel, ids: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """POST /prefixes/bulk, --scale-batch tasks a tar, IMPORT_REQUESTS_AT_ONCE requests at a time. Each task's
    adapter is one of ADAPTER_POOL random prefixes made before the clock starts: making 10,000 random tensors in
    this process would take the server's cores (the server does all its work per task, equal bytes or not)."""
    batches = [ids[i:i + args.scale_batch] for i in range(0, len(ids), args.scale_batch)]
    generator = torch.Generator().manual_seed(args.seed)
    pool = [adapter_files(loaded, args.virtual_tokens, generator) for _ in range(ADAPTER_POOL)]

    def send(batch: list[str]) -> dict[str, Any]:
        members = ((task_id, pool[index % ADAPTER_POOL]) for index, task_id in enumerate(batch))
        response = client.post(f"{url}/prefixes/bulk", content=tar_stream(members),
                               headers={"Content-Type": "application/x-tar"})
        response.raise_for_status()
        return response.json()

    started = time.perf_counter()
    with httpx.Client(timeout=None) as client, ThreadPoolExecutor(IMPORT_REQUESTS_AT_ONCE) as workers:
        answers = list(workers.map(send, batches))
    wall = time.perf_counter() - started
    errors = [r for a in answers for r in a["results"] if r["status"] == "error"]
    if errors:
        raise RuntimeError(f"bulk import refused {len(errors)} tasks, e.g. {errors[0]}")
    return {"tasks": len(ids), "requests": len(batches), "wall_s": round(wall, 2),
            "tasks_per_s": round(len(ids) / wall, 1)}  # fmt: skip


def single_uploads(url: str, loaded: LoadedModel, count: int, args: argparse.Namespace) -> dict[str, Any]:
    """The way before bulk import: POST /prefixes per task, SINGLE_UPLOAD_CLIENTS clients."""
    generator = torch.Generator().manual_seed(args.seed + 7)
    forms = [adapter_files(loaded, args.virtual_tokens, generator) for _ in range(count)]

    def send(index: int) -> None:
        files = forms[index]
        response = client.post(f"{url}/prefixes", data={"task_id": f"single-{index}"}, files={
            "adapter_config": ("adapter_config.json", files["adapter_config.json"]),
            "adapter_model": ("adapter_model.safetensors", files["adapter_model.safetensors"]),
        })  # fmt: skip
        response.raise_for_status()

    started = time.perf_counter()
    with httpx.Client(timeout=None) as client, ThreadPoolExecutor(SINGLE_UPLOAD_CLIENTS) as pool:
        list(pool.map(send, range(count)))
    wall = time.perf_counter() - started
    for index in range(count):  # leave the store holding the N bench tasks alone
        httpx.delete(f"{url}/prefixes/single-{index}").raise_for_status()
    return {"tasks": count, "clients": SINGLE_UPLOAD_CLIENTS, "wall_s": round(wall, 2),
            "tasks_per_s": round(count / wall, 1)}  # fmt: skip


def new_task_latency(url: str, loaded: LoadedModel, hot_task: str, samples: int, args: argparse.Namespace) -> dict[str, Any]:
    """A task uploaded now is servable at once: `samples` times, a one-token POST /generate on a warm task, then
    POST /prefixes of a new task and, the moment it returns, the same one-token generate on the new task (its first
    request: the prefix comes from the store the upload just wrote). Medians; the new task is deleted again."""
    generator = torch.Generator().manual_seed(args.seed + 11)
    body = {"inputs": "The quick brown fox", "parameters": {"max_new_tokens": 1}}
    warm, new, upload = [], [], []
    with httpx.Client(timeout=None) as client:

        def first_token(task_id: str) -> float:
            started = time.perf_counter()
            client.post(f"{url}/generate", json={**body, "task_id": task_id}).raise_for_status()
            return time.perf_counter() - started

        first_token(hot_task)
        for index in range(samples):
            warm.append(first_token(hot_task))
            files = adapter_files(loaded, args.virtual_tokens, generator)
            started = time.perf_counter()
            client.post(f"{url}/prefixes", data={"task_id": f"new-{index}"}, files={
                "adapter_config": ("adapter_config.json", files["adapter_config.json"]),
                "adapter_model": ("adapter_model.safetensors", files["adapter_model.safetensors"]),
            }).raise_for_status()  # fmt: skip
            upload.append(time.perf_counter() - started)
            new.append(first_token(f"new-{index}"))
            client.delete(f"{url}/prefixes/new-{index}").raise_for_status()
    median_ms = lambda values: round(1000 * statistics.median(values), 2)  # noqa: E731
    return {"samples": samples, "upload_ms": median_ms(upload), "warm_first_token_ms": median_ms(warm),
            "new_first_token_ms": median_ms(new),
            "extra_ms": round(median_ms(new) - median_ms(warm), 2)}  # fmt: skip


def list_pages(url: str, path: str, limit: int, expected: int) -> dict[str, Any]:
    """Walk every page of a listing; time each."""
    times: list[float] = []
    sizes: list[int] = []
    seen = 0
    params: dict[str, Any] = {"limit": limit}
    with httpx.Client(timeout=None) as client:
        while True:
            started = time.perf_counter()
            response = client.get(f"{url}{path}", params=params)
            times.append(time.perf_counter() - started)
            response.raise_for_status()
            sizes.append(len(response.content))
            body = response.json()
            if path == "/prefixes":
                seen += len(body["prefixes"])
                if not body["next_cursor"]:
                    break
                params = {"limit": limit, "cursor": body["next_cursor"]}
            else:
                seen += sum(1 for card in body["data"] if card["parent"] is not None)
                if not body["has_more"]:
                    break
                params = {"limit": limit, "after": body["last_id"]}
    if seen != expected:
        raise RuntimeError(f"{path} listed {seen} tasks, expected {expected}")
    return {"path": path, "limit": limit, "pages": len(times), **_ms(times),
            "bytes_per_page_max": max(sizes)}  # fmt: skip


def zipf_workload(items: list[WorkItem], ids: list[str], exponent: float, seed: int) -> list[WorkItem]:
    """The same prompts, each request's task drawn from Zipf(exponent) over `ids` (ranks in a seeded shuffle)."""
    rng = random.Random(seed)
    ranked = ids[:]
    rng.shuffle(ranked)
    weights = [1.0 / (rank ** exponent) for rank in range(1, len(ranked) + 1)]
    chosen = rng.choices(ranked, weights=weights, k=len(items))
    return [WorkItem(task, item.prompt_ids, item.max_new_tokens) for task, item in zip(chosen, items)]


def cold_workload(
    items: list[WorkItem], ids: list[str], seed: int, exclude: set[str] | frozenset[str] = frozenset()
) -> list[WorkItem]:
    """Every request a different task, none of the hot eight nor of `exclude`."""
    cold = [task for task in ids[HOT_TASKS:] if task not in exclude]
    if len(cold) < len(items):
        raise ValueError(f"--scale {len(ids)} holds too few tasks for {len(items)} requests on distinct tasks")
    chosen = random.Random(seed).sample(cold, len(items))
    return [WorkItem(task, item.prompt_ids, item.max_new_tokens) for task, item in zip(chosen, items)]


def run_scale(args: argparse.Namespace, loaded: LoadedModel) -> int:
    scale = args.scale
    if scale < HOT_TASKS + 1:
        print(f"error: --scale must be over {HOT_TASKS}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    noisy = [logging.getLogger(name) for name in ("service.registry", "service.access", "httpx")]  # N lines each
    levels = [quiet.level for quiet in noisy]
    for quiet in noisy:
        quiet.setLevel(logging.WARNING)
    try:
        return _run_scale(args, loaded, scale)
    finally:  # the process goes on (tests): its access log must not stay silenced
        for quiet, level in zip(noisy, levels):
            quiet.setLevel(level)


def _run_scale(args: argparse.Namespace, loaded: LoadedModel, scale: int) -> int:
    ids = task_ids(scale)
    prefix_bytes = loaded.geometry.numbers_per_virtual_token * args.virtual_tokens * loaded.dtype.itemsize
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="prefix-serve-scale-") as tmp:
        settings = Settings(
            prefix_dir=Path(tmp) / "store", max_prefixes=scale + args.scale_single_uploads, max_bulk_tasks=args.scale_batch,
            max_running_rows=args.clients, max_virtual_tokens=max(args.virtual_tokens, 1),
            prefix_device_budget_bytes=args.scale_device_prefixes * prefix_bytes,
            prefix_host_budget_bytes=args.scale_host_prefixes * prefix_bytes,
        )  # fmt: skip
        app = create_app(settings, loaded)
        with _Server(app) as server:
            results["single_upload"] = single_uploads(server.url, loaded, args.scale_single_uploads, args)
            logger.info("single uploads: %s", results["single_upload"])
            results["bulk_import"] = bulk_import(server.url, loaded, ids, args)
            logger.info("bulk import: %s", results["bulk_import"])
            results["listing"] = [
                list_pages(server.url, "/prefixes", 100, scale),
                list_pages(server.url, "/prefixes", 1000, scale),
                list_pages(server.url, "/v1/models", 100, scale),
            ]
            logger.info("listing: %s", results["listing"])
            results["new_task"] = new_task_latency(server.url, loaded, ids[0], NEW_TASK_SAMPLES, args)
            logger.info("new task: %s", results["new_task"])
        registry = app.state.service.registry
        runner = ModelRunner(loaded.model, loaded.tokenizer)
        run_in_fresh_thread(check_model, runner, loaded.geometry)
        prompts = make_workload(
            loaded.tokenizer, num_requests=max(args.min_requests, args.requests_per_client * args.clients),
            num_tasks=HOT_TASKS, prompt_tokens=token_range(args.prompt_tokens), new_tokens=token_range(args.new_tokens),
            seed=args.seed,
        )  # fmt: skip
        warmup = make_workload(loaded.tokenizer, num_requests=min(args.clients, 8), num_tasks=HOT_TASKS,
                               prompt_tokens=(8, 8), new_tokens=(2, 2), seed=args.seed + 1)  # fmt: skip
        rows: list[dict[str, Any]] = []
        requested: set[str] = set()  # cold means never requested before: by no load of any round
        for round_index in range(args.rounds):
            zipf = zipf_workload(prompts, ids, args.zipf, args.seed + round_index)
            requested.update(item.task_id for item in zipf if item.task_id)
            cold = cold_workload(prompts, ids, args.seed + round_index, exclude=requested)
            requested.update(item.task_id for item in cold if item.task_id)
            workloads = [("hot-8", prompts), (f"zipf-{scale}", zipf), (f"cold-{scale}", cold)]
            shift = round_index % len(workloads)  # alternate the order: no load always runs first or last
            for name, workload in workloads[shift:] + workloads[:shift]:
                result = run_engine_system(
                    name, runner, {}, workload, concurrency=args.clients, policy="mixed", warmup=warmup,
                    step_token_budget=args.step_token_budget, fetch=registry.get,
                )  # fmt: skip
                rows.append({**result.summary(), "round": round_index})
                logger.info("%s", rows[-1])
    results["rows"] = median_rows(rows)
    results["runs"] = rows
    results["ratios"], results["ratio_ranges"] = _ratios_to_hot(rows, args.rounds)
    title = (
        f"{loaded.name} on {loaded.device} ({str(loaded.dtype).removeprefix('torch.')}), {scale} tasks, "
        f"V={args.virtual_tokens}, {args.clients} clients, prefixes kept: {args.scale_device_prefixes} device, "
        f"{args.scale_host_prefixes} host, the rest on disk, {torch.get_num_threads()} torch threads"
        + (f", median of {args.rounds} alternating rounds" if args.rounds > 1 else "")
    )
    payload = {
        "title": title,
        "command": " ".join(["prefix-serve", *sys.argv[1:]]) if sys.argv[1:2] == ["bench"] else None,
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "func"},
        **results,
    }
    write_json(args.out / "scale.json", payload)
    table = _tables(results)
    (args.out / "scale.md").write_text(f"{title}\n\n{table}\n")
    print(f"{title}\n\n{table}\n\nwrote {args.out / 'scale.json'}, {args.out / 'scale.md'}")
    return 0


def _ratios_to_hot(rows: list[dict[str, Any]], rounds: int) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Each load's tokens/s over hot-8's in the same round; the median over rounds and the range."""
    per_round: dict[str, list[float]] = {}
    for round_index in range(rounds):
        runs = {r["system"]: r["tokens_per_s"] for r in rows if r["round"] == round_index}
        hot = runs.pop("hot-8") or 1.0
        for name, speed in runs.items():
            per_round.setdefault(f"{name} / hot-8", []).append(round(speed / hot, 3))
    medians = {name: round(statistics.median(values), 3) for name, values in per_round.items()}
    ranges = {name: [min(values), max(values)] for name, values in per_round.items() if len(values) > 1}
    return medians, ranges


def _tables(results: dict[str, Any]) -> str:
    single, bulk = results["single_upload"], results["bulk_import"]
    lines = [
        "| import | tasks | wall s | tasks/s |", "|---|---|---|---|",
        f"| POST /prefixes, {single['clients']} clients | {single['tasks']} | {single['wall_s']} | "
        f"{single['tasks_per_s']} |",
        f"| POST /prefixes/bulk, {bulk['requests']} tars | {bulk['tasks']} | {bulk['wall_s']} | {bulk['tasks_per_s']} |",
        "", "| listing | limit | pages | mean ms | p50 ms | p95 ms | largest page bytes |", "|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for page in results["listing"]:
        lines.append(f"| GET {page['path']} | {page['limit']} | {page['pages']} | {page['mean_ms']} | {page['p50_ms']} "
                     f"| {page['p95_ms']} | {page['bytes_per_page_max']} |")  # fmt: skip
    new = results["new_task"]
    lines += ["", "| a task uploaded now (median of its samples) | upload ms | first-token request ms | "
              "warm task's ms | extra ms |", "|---|---|---|---|---|",
              f"| {new['samples']} samples | {new['upload_ms']} | {new['new_first_token_ms']} | "
              f"{new['warm_first_token_ms']} | {new['extra_ms']} |"]  # fmt: skip
    lines += ["", markdown_table(results["rows"]), "", ratios_table(results["ratios"], results["ratio_ranges"])]
    return "\n".join(lines)

