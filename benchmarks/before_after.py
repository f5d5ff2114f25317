"""The engine of two source trees (before / after a change), one `prefix-serve bench` run each per round, in turns.

    git worktree add /tmp/before <commit>
    PYTHONPATH=. .venv/bin/python benchmarks/before_after.py --before /tmp/before --after . --rounds 4 \\
        --out benchmarks/results/engine-before-after-slot-prefix.json -- \\
        --systems mixed --clients 32 --requests-per-client 2 --new-tokens 32 --dtype bfloat16

Both trees run with this interpreter (the same installed packages), each from its own directory with its own tree
first on `PYTHONPATH`, so the code differs and nothing else. The order alternates every round (before first in odd
rounds), so a machine that slows down over the run hits both alike; the result holds each round's tokens/s per
system and concurrency, and the median and range of the after/before ratio per concurrency.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

logger = logging.getLogger("before_after")


def tree_commit(tree: Path) -> str:
    """The tree's commit, with "+changes" when its tracked files differ from it."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tree, capture_output=True, text=True)
    if head.returncode:
        return "(not a git tree)"
    dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=tree).returncode != 0
    return head.stdout.strip() + ("+changes" if dirty else "")


def run_bench(tree: Path, bench_args: list[str]) -> dict[str, dict[str, float]]:
    """tokens/s of one bench run of `tree`: {system: {concurrency: tok/s}}."""
    with tempfile.TemporaryDirectory() as out:
        env = {**os.environ, "PYTHONPATH": str(tree.resolve())}
        command = [sys.executable, "-m", "service", "bench", *bench_args, "--out", out]
        subprocess.run(command, cwd=tree, env=env, check=True, stdout=subprocess.DEVNULL)
        rows = json.loads((Path(out) / "bench.json").read_text())["rows"]
    result: dict[str, dict[str, float]] = {}
    for row in rows:
        result.setdefault(row["system"], {})[str(row["concurrency"])] = row["tokens_per_s"]
    return result


def summarize(rounds: list[dict[str, dict[str, dict[str, float]]]]) -> dict[str, dict[str, object]]:
    """Per system and concurrency: the median after/before ratio over the rounds and its range."""
    summary: dict[str, dict[str, object]] = {}
    first = rounds[0]["before"]
    for system, levels in first.items():
        for level in levels:
            ratios = [r["after"][system][level] / r["before"][system][level] for r in rounds]
            summary.setdefault(system, {})[level] = {
                "ratio_median": round(statistics.median(ratios), 3),
                "ratio_range": [round(min(ratios), 3), round(max(ratios), 3)],
                "before_tok_s": [r["before"][system][level] for r in rounds],
                "after_tok_s": [r["after"][system][level] for r in rounds],
            }
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, required=True, help="Source tree of the engine before the change.")
    parser.add_argument("--after", type=Path, required=True, help="Source tree of the engine after it.")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--out", type=Path)
    parser.add_argument("bench_args", nargs=argparse.REMAINDER, help="After --: the arguments of prefix-serve bench.")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    bench_args = args.bench_args[1:] if args.bench_args[:1] == ["--"] else args.bench_args
    trees = {"before": args.before, "after": args.after}
    rounds = []
    for number in range(1, args.rounds + 1):
        order = ["before", "after"] if number % 2 else ["after", "before"]
        measured = {name: run_bench(trees[name], bench_args) for name in order}
        logger.info("round %d: %s", number, json.dumps(measured))
        rounds.append({"round": number, "order": order, **measured})
    result = {
        "bench_args": bench_args,
        "before_commit": tree_commit(args.before),
        "after_commit": tree_commit(args.after),
        "rounds": rounds,
        "summary": summarize(rounds),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
