"""Ten thousand tasks through `prefix-serve serve --replicas N` (issue 19's Ray goals), against the single server.

    python benchmarks/ray_scale.py --tasks 10000 --replicas 2 --rounds 3

On one store of `--tasks` random SmolLM2-shaped V=20 prefixes (written straight to disk, as `store_scale.py` does):

  1. start-up: `serve` (one process) and `serve --replicas N` (Ray Serve) on the store, and `serve --replicas N` on
     an empty store, started in turns, `--starts` times each: seconds from the command to /health 200 with every
     replica live, and each replica's own start (model load and start-up checks, as /health reports it);
  2. traffic, on the Ray deployment left running: `--rounds` rounds of two loads in turns, `--clients` closed-loop
     HTTP clients, `--requests` POST /generate each (greedy, up to `--new-tokens`):
       hot-8     round-robin over 8 tasks
       zipf-N    each request's task drawn from Zipf(`--zipf`) over all N tasks (a new draw each round)
     tokens/s from the tokens the server reports it generated; then, from /metrics'
     `prefix_serve_routed_requests_total{replica,task}` before and after each Zipf load:
       affinity  of the requests of tasks asked twice or more, the share that went to their task's busiest replica
       spread    the hottest tasks' requests per replica (Serve's router sends a task elsewhere when its replica is
                 `RAY_AFFINITY_IMBALANCE` requests busier than the least loaded one)
       balance   requests per replica
     and, per load, the CPU seconds of the server's processes by role (model replicas, ingress, Serve's proxy and
     controller, Ray's raylet and GCS...) and what the replicas counted (steps, rows, prefix loads and their time).

Writes ray-scale.json and ray-scale.md (the tables) to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import httpx

from service.bench.report import write_json
from service.bench.scale import HOT_TASKS
from service.settings import Settings

sys.path.insert(0, str(Path(__file__).resolve().parent))
from store_scale import build_store, free_port, smollm2_geometry  # noqa: E402 - the sibling script's store

logger = logging.getLogger("ray_scale")
REPO = Path(__file__).resolve().parent.parent
WORDS = "the river city garden music paper light morning question answer story weather market school friend".split()
HOTTEST = 5
# Tasks by how often one load asked for them: the router keeps a task on its replica unless that replica is
# RAY_AFFINITY_IMBALANCE requests busier than the least loaded one, which the hot ones reach and the rest rarely do.
AFFINITY_BUCKETS = {"2-3": (2, 3), "4-9": (4, 9), "10+": (10, 1 << 30)}


class Server:
    """`python -m service serve` on a loopback port, in its own process group (Ray's processes go with it)."""

    def __init__(self, store: Path, tasks: int, replicas: int, dtype: str, scratch: Path) -> None:
        self.port = free_port()
        self.replicas = replicas
        env = {
            **os.environ, "PREFIX_SERVE_MAX_PREFIXES": str(tasks + 100), "PREFIX_SERVE_LOG_LEVEL": "warning",
            "PREFIX_SERVE_MAX_WAITING": "4096",
        }
        command = [sys.executable, "-m", "service", "serve", "--prefix-dir", str(store), "--port", str(self.port),
                   "--dtype", dtype]
        if replicas:
            ray_dir = Path(tempfile.mkdtemp(prefix="rs-", dir="/tmp"))  # short: Ray's socket paths are limited
            env["PREFIX_SERVE_RAY_TEMP_DIR"] = str(ray_dir)
            command += ["--replicas", str(replicas)]
            self.ray_dir: Path | None = ray_dir
        else:
            self.ray_dir = None
        self.log = open(scratch / f"server-{self.port}.log", "wb")  # noqa: SIM115 - closed in stop()
        self.started = time.perf_counter()
        self.process = subprocess.Popen(command, env=env, cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_healthy(self, timeout_s: float = 600) -> dict[str, Any]:
        """Seconds to /health 200 with every replica live, and the /health body."""
        deadline = self.started + timeout_s
        while time.perf_counter() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}; see {self.log.name}")
            try:
                response = httpx.get(f"{self.url}/health", timeout=2)
                body = response.json()
                if response.status_code == 200 and body.get("replicas", 1) >= max(1, self.replicas):
                    return {"healthy_s": round(time.perf_counter() - self.started, 2), "health": body}
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.1)
        raise TimeoutError(f"not healthy within {timeout_s} s")

    def stop(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        except ProcessLookupError:
            pass
        finally:
            self.log.close()
            if self.ray_dir is not None:
                shutil.rmtree(self.ray_dir, ignore_errors=True)


def time_starts(store: Path, tasks: int, replicas: int, dtype: str, starts: int, scratch: Path) -> dict[str, Any]:
    """The single server on the store, the Ray deployment on it and on an empty store, started in turns (a busy
    moment of the machine hits all alike)."""
    empty = scratch / "empty"
    empty.mkdir(exist_ok=True)
    ray = f"ray-{replicas}"
    plan = (("single", store, 0), (ray, store, replicas), (f"{ray}-empty-store", empty, replicas))
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name, _, _ in plan}
    for _ in range(starts):
        for name, root, count in plan:
            server = Server(root, tasks, count, dtype, scratch)
            try:
                healthy = server.wait_healthy()
            finally:
                server.stop()
            details = healthy["health"].get("replica_details") or []
            runs[name].append({
                "healthy_s": healthy["healthy_s"],
                "replica_start_s": [d.get("start_seconds") for d in details],
            })
            logger.info("%s: healthy in %.1f s %s", name, healthy["healthy_s"], runs[name][-1]["replica_start_s"])
    return {
        name: {
            "healthy_s": [r["healthy_s"] for r in values],
            "healthy_s_median": statistics.median(r["healthy_s"] for r in values),
            "replica_start_s": [s for r in values for s in r["replica_start_s"]],
        }
        for name, values in runs.items()
    }


ROLES = (  # a Ray process's title (setproctitle) -> what it does here
    ("ModelReplica", "model replicas"), ("Ingress", "ingress"), ("ProxyActor", "proxy"),
    ("ServeController", "serve controller"), ("StatsBoard", "stats board"), ("raylet", "raylet"),
    ("gcs_server", "gcs"), ("service serve", "driver"),
)


def cpu_seconds_by_role(root_pid: int) -> dict[str, float]:
    """User + system CPU seconds so far of the server's processes (Ray's included: they descend from it), by role."""
    import psutil

    totals: Counter[str] = Counter()
    try:
        root = psutil.Process(root_pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return {}
    for process in processes:
        try:
            title = " ".join(process.cmdline())
            times = process.cpu_times()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        role = next((name for needle, name in ROLES if needle in title), "other")
        totals[role] += times.user + times.system
    return dict(totals)


def cpu_used(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {role: round(after[role] - before.get(role, 0.0), 2) for role in sorted(after)}


def prompt(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(20))


def zipf_tasks(ids: list[str], count: int, exponent: float, seed: int) -> list[str]:
    """`count` task ids drawn from Zipf(exponent) over `ids`, ranks in a seeded shuffle of them."""
    rng = random.Random(seed)
    ranked = ids[:]
    rng.shuffle(ranked)
    weights = [1.0 / (rank ** exponent) for rank in range(1, len(ranked) + 1)]
    return rng.choices(ranked, weights=weights, k=count)


async def drive(url: str, tasks: list[str], clients: int, new_tokens: int, seed: int) -> dict[str, Any]:
    """Closed loop: `clients` workers, each sends its next request when its last one is answered."""
    rng = random.Random(seed)
    bodies = [{"task_id": task, "inputs": prompt(rng), "parameters": {"max_new_tokens": new_tokens}} for task in tasks]
    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)
    tokens = 0
    failures: Counter[int] = Counter()
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=600) as client:
        async def worker() -> None:
            nonlocal tokens
            while not queue.empty():
                body = queue.get_nowait()
                response = await client.post("/generate", json=body)
                if response.status_code != 200:
                    failures[response.status_code] += 1
                    continue
                tokens += int(response.json()["details"]["generated_tokens"])

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - started
    return {"requests": len(bodies), "tokens": tokens, "wall_s": round(wall, 2),
            "tokens_per_s": round(tokens / wall, 1), "failures": dict(failures)}


REPLICA_COUNTERS = ("prefix_loads", "prefix_load_seconds", "steps", "prefills", "rows_stepped")


def scrape(url: str) -> tuple[dict[tuple[str, str], float], dict[str, float]]:
    """/metrics: prefix_serve_routed_requests_total by (replica, task), and REPLICA_COUNTERS summed over replicas."""
    from prometheus_client.parser import text_string_to_metric_families

    counts: dict[tuple[str, str], float] = {}
    replicas: Counter[str] = Counter()
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=30).text):
        for sample in family.samples:
            if not sample.name.endswith("_total"):
                continue
            if family.name == "prefix_serve_routed_requests":
                counts[(sample.labels["replica"], sample.labels["task"])] = sample.value
            elif family.name.removeprefix("prefix_serve_replica_") in REPLICA_COUNTERS:
                replicas[family.name.removeprefix("prefix_serve_replica_")] += sample.value
    return counts, dict(replicas)


def measured_load(server: Server, tasks: list[str], args: argparse.Namespace, seed: int
                  ) -> tuple[dict[str, Any], dict[tuple[str, str], float], dict[tuple[str, str], float]]:
    """One load, with the CPU its processes used and what the replicas counted (their reports settle first)."""
    time.sleep(2.5)  # replicas report every RAY_STATS_INTERVAL_S (1 s): let the last load's counts arrive
    routed_before, replicas_before = scrape(server.url)
    cpu_before = cpu_seconds_by_role(server.process.pid)
    result = asyncio.run(drive(server.url, tasks, args.clients, args.new_tokens, seed))
    result["cpu_s"] = cpu_used(cpu_before, cpu_seconds_by_role(server.process.pid))
    time.sleep(2.5)
    routed_after, replicas_after = scrape(server.url)
    counted = {key: round(replicas_after.get(key, 0) - replicas_before.get(key, 0), 3) for key in REPLICA_COUNTERS}
    steps = counted["steps"] + counted["prefills"]
    counted["mean_batch_rows"] = round(counted["rows_stepped"] / steps, 2) if steps else None
    result["replicas"] = counted
    return result, routed_before, routed_after


def placement(before: dict[tuple[str, str], float], after: dict[tuple[str, str], float],
              asked: Counter[str]) -> dict[str, Any]:
    """Where one load's requests went: affinity of repeated tasks, the hottest tasks' spread, per-replica totals."""
    per_task: dict[str, Counter[str]] = defaultdict(Counter)
    for key, value in after.items():
        delta = value - before.get(key, 0.0)
        if delta > 0:
            per_task[key[1]][key[0]] += int(delta)
    repeated = [task for task, n in asked.items() if n >= 2]
    replicas: Counter[str] = Counter()
    for counts in per_task.values():
        replicas.update(counts)
    overall = _affinity(repeated, per_task, len(replicas))
    return {
        "repeated_tasks": overall["tasks"],
        "requests_of_repeated_tasks": overall["requests"],
        "affinity": overall["affinity"],
        "affinity_if_random": overall["affinity_if_random"],
        "affinity_by_requests": {
            label: _affinity([task for task in repeated if low <= asked[task] <= high], per_task, len(replicas))
            for label, (low, high) in AFFINITY_BUCKETS.items()
        },
        "hottest": [
            {"task": task, "requests": n, "per_replica": sorted(per_task[task].values(), reverse=True)}
            for task, n in asked.most_common(HOTTEST)
        ],
        "per_replica": sorted(replicas.values(), reverse=True),
    }


def _affinity(tasks: list[str], per_task: dict[str, Counter[str]], replicas: int) -> dict[str, Any]:
    """Tasks, their requests, the share on each one's busiest replica, and that share under random routing."""
    requests = [sum(per_task[task].values()) for task in tasks]
    on_busiest = sum(max(per_task[task].values(), default=0) for task in tasks)
    return {
        "tasks": len(tasks), "requests": sum(requests),
        "affinity": round(on_busiest / sum(requests), 3) if sum(requests) else None,
        "affinity_if_random": random_affinity(requests, replicas),
    }


def random_affinity(requests_per_task: list[int], replicas: int, trials: int = 200) -> float | None:
    """The affinity a router ignoring tasks would show on the same requests: each request to a uniformly random
    replica (simulated, seeded), the share on each task's busiest replica."""
    total = sum(requests_per_task)
    if not total or replicas < 1:
        return None
    rng = random.Random(0)
    on_busiest = 0
    for _ in range(trials):
        for n in requests_per_task:
            on_busiest += max(Counter(rng.randrange(replicas) for _ in range(n)).values())
    return round(on_busiest / (total * trials), 3)


def run_traffic(store: Path, tasks: int, replicas: int, dtype: str, args: argparse.Namespace,
                scratch: Path) -> dict[str, Any]:
    ids = sorted(p.name for p in store.iterdir() if not p.name.startswith("."))
    hot = ids[:HOT_TASKS]
    server = Server(store, tasks, replicas, dtype, scratch)
    rounds: list[dict[str, Any]] = []
    try:
        server.wait_healthy()
        warm = [hot[i % len(hot)] for i in range(args.clients * 2)]
        asyncio.run(drive(server.url, warm, args.clients, args.new_tokens, seed=1))  # compile paths, fill the bank
        for index in range(args.rounds):
            round_result: dict[str, Any] = {}
            hot_load = [hot[i % len(hot)] for i in range(args.requests)]
            round_result["hot-8"], _, _ = measured_load(server, hot_load, args, index)
            zipf_load = zipf_tasks(ids, args.requests, args.zipf, seed=100 + index)
            round_result[f"zipf-{tasks}"], before, after = measured_load(server, zipf_load, args, index)
            round_result["placement"] = placement(before, after, Counter(zipf_load))
            round_result["ratio"] = round(
                round_result[f"zipf-{tasks}"]["tokens_per_s"] / round_result["hot-8"]["tokens_per_s"], 3
            )
            rounds.append(round_result)
            logger.info("round %d: %s", index, json.dumps(round_result))
        health = httpx.get(f"{server.url}/health", timeout=10).json()
    finally:
        server.stop()
    ratios = [r["ratio"] for r in rounds]
    affinities = [r["placement"]["affinity"] for r in rounds if r["placement"]["affinity"] is not None]
    random_affinities = [r["placement"]["affinity_if_random"] for r in rounds
                         if r["placement"]["affinity_if_random"] is not None]
    return {
        "rounds": rounds,
        "hot_tokens_per_s_median": statistics.median(r["hot-8"]["tokens_per_s"] for r in rounds),
        "zipf_tokens_per_s_median": statistics.median(r[f"zipf-{tasks}"]["tokens_per_s"] for r in rounds),
        "ratio_median": statistics.median(ratios), "ratio_range": [min(ratios), max(ratios)],
        "affinity_median": statistics.median(affinities) if affinities else None,
        "affinity_range": [min(affinities), max(affinities)] if affinities else None,
        "affinity_if_random_median": statistics.median(random_affinities) if random_affinities else None,
        "health_after": health,
    }


def markdown(result: dict[str, Any]) -> str:
    replicas, tasks = result["replicas"], result["tasks"]
    ray = f"ray-{replicas}"
    starts, traffic = result["starts"], result["traffic"]
    lines = [
        f"| start-up, {tasks:,} stored tasks | single server | `serve --replicas {replicas}` |",
        "|---|---|---|",
        f"| command → /health 200, every replica live (median of {len(starts['single']['healthy_s'])}) | "
        f"{starts['single']['healthy_s_median']:.1f} s | {starts[ray]['healthy_s_median']:.1f} s "
        f"(empty store: {starts[f'{ray}-empty-store']['healthy_s_median']:.1f} s) |",
        f"| each replica's own start (model + checks), range | | "
        f"{min(starts[ray]['replica_start_s']):.1f}–{max(starts[ray]['replica_start_s']):.1f} s |",
        "",
        f"| traffic on `serve --replicas {replicas}`, {result['clients']} clients, median of "
        f"{len(traffic['rounds'])} rounds | value |",
        "|---|---|",
        f"| hot-8 tokens/s | {traffic['hot_tokens_per_s_median']:.0f} |",
        f"| zipf-{tasks} tokens/s | {traffic['zipf_tokens_per_s_median']:.0f} |",
        f"| zipf-{tasks} / hot-8 | {traffic['ratio_median']:.2f}× "
        f"({traffic['ratio_range'][0]:.2f}–{traffic['ratio_range'][1]:.2f}) |",
    ]
    if traffic["affinity_median"] is not None:
        lines.append(
            f"| affinity: requests of repeated tasks on their task's busiest replica | "
            f"{traffic['affinity_median']:.0%} ({traffic['affinity_range'][0]:.0%}–{traffic['affinity_range'][1]:.0%}); "
            f"routing at random: {traffic['affinity_if_random_median']:.0%} |"
        )
    for label in AFFINITY_BUCKETS:
        buckets = [r["placement"]["affinity_by_requests"][label] for r in traffic["rounds"]]
        shares = [b["affinity"] for b in buckets if b["affinity"] is not None]
        randoms = [b["affinity_if_random"] for b in buckets if b["affinity_if_random"] is not None]
        if shares:
            lines.append(
                f"| — tasks asked {label} times in a load ({sum(b['tasks'] for b in buckets)} over the rounds) | "
                f"{statistics.median(shares):.0%} ({min(shares):.0%}–{max(shares):.0%}); "
                f"routing at random: {statistics.median(randoms):.0%} |"
            )
    roles = sorted({role for r in traffic["rounds"] for role in r["hot-8"]["cpu_s"]},
                   key=lambda role: -statistics.median(r["hot-8"]["cpu_s"].get(role, 0) for r in traffic["rounds"]))
    cells = []
    for role in roles:
        hot = statistics.median(r["hot-8"]["cpu_s"].get(role, 0) for r in traffic["rounds"])
        zipf = statistics.median(r[f"zipf-{tasks}"]["cpu_s"].get(role, 0) for r in traffic["rounds"])
        cells.append(f"{role} {hot:.1f} / {zipf:.1f}")
    lines.append(f"| CPU s a load by process, hot-8 / zipf-{tasks} (medians) | {', '.join(cells)} |")
    for key, label in (("mean_batch_rows", "mean batch rows a replica step"), ("prefix_loads", "prefix loads"),
                       ("prefix_load_seconds", "seconds replicas spent loading prefixes")):
        hot = statistics.median(r["hot-8"]["replicas"][key] or 0 for r in traffic["rounds"])
        zipf = statistics.median(r[f"zipf-{tasks}"]["replicas"][key] or 0 for r in traffic["rounds"])
        lines.append(f"| {label}, hot-8 / zipf-{tasks} (medians) | {hot:g} / {zipf:g} |")
    last = traffic["rounds"][-1]["placement"]
    spread = ", ".join(f"{h['requests']} → {'/'.join(map(str, h['per_replica']))}" for h in last["hottest"])
    lines.append(f"| hottest {HOTTEST} tasks of the last round, requests → per replica | {spread} |")
    lines.append(f"| requests per replica, last round | {' / '.join(map(str, last['per_replica']))} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--store", type=Path, help="Reuse (or create) this store instead of a temporary one.")
    parser.add_argument("--starts", type=int, default=3, help="Start-ups of each server, alternated.")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=192, help="Requests per load and round.")
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--zipf", type=float, default=1.1)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "ray-scale-cpu")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    scratch = Path(tempfile.mkdtemp(prefix="ray-scale-"))
    store = args.store or scratch / "store"
    try:
        existing = sum(1 for p in store.iterdir() if not p.name.startswith(".")) if store.is_dir() else 0
        if existing != args.tasks:
            shutil.rmtree(store, ignore_errors=True)
            seconds = build_store(store, args.tasks, smollm2_geometry(Settings()), 20)
            logger.info("built %d tasks in %.1f s", args.tasks, seconds)
        result: dict[str, Any] = {
            "tasks": args.tasks, "replicas": args.replicas, "dtype": args.dtype, "clients": args.clients,
            "requests": args.requests, "new_tokens": args.new_tokens, "zipf": args.zipf, "cpus": os.cpu_count(),
            "command": "python benchmarks/ray_scale.py " + " ".join(sys.argv[1:]),
        }
        result["starts"] = time_starts(store, args.tasks, args.replicas, args.dtype, args.starts, scratch)
        result["traffic"] = run_traffic(store, args.tasks, args.replicas, args.dtype, args, scratch)
        args.out.mkdir(parents=True, exist_ok=True)
        write_json(args.out / "ray-scale.json", result)
        (args.out / "ray-scale.md").write_text(markdown(result))
        print(markdown(result))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
