"""The benchmark: its PEFT baseline is exact, its workload is seeded, and one command writes table, JSON and PNG."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from service import cli
from service.bench.peft_baseline import load_peft_model, peft_generate
from service.bench.workload import make_workload
from service.batch import generate
from service.bench.static_baseline import _generate_batch
from service.bench.run import TokenClock
from service.bench.workload import WorkItem
from service.geometry import geometry_from_config
from service.prefix import TaskPrefix, prompt_embeddings_to_kv
from service.requests import GenerationRequest, SamplingParams
from service.runner import ModelRunner
from tests.helpers import (
    make_peft_prefix_model,
    make_peft_seq2seq_model,
    peft_greedy,
    peft_seq2seq_greedy,
    save_adapter,
    tiny_llama,
    tiny_seq2seq,
    tiny_tokenizer,
)


def test_patched_peft_generate_equals_peft_forward(tmp_path: Path) -> None:
    """transformers 5.24 renamed the cache argument PEFT 0.21 injects its prefix through; the bench's shim makes
    PeftModel.generate honour the prefix again, token for token, for every adapter switched to by set_adapter."""
    model = tiny_llama(seed=0, initializer_range=0.5)
    references = {}
    for i, v in enumerate([4, 7]):
        references[f"task{i}"] = make_peft_prefix_model(model, num_virtual_tokens=v, seed=i)
        save_adapter(references[f"task{i}"], tmp_path / f"task{i}")
    peft_model = load_peft_model(model, {t: tmp_path / t for t in references})
    for task, reference in references.items():
        for prompt in ([5, 6, 7, 8], [9, 10]):
            assert peft_generate(peft_model, task, prompt, 8) == peft_greedy(reference, prompt, 8)
    assert len(peft_generate(peft_model, "task0", [5, 6], 12, ignore_eos=True)) == 12


def test_seq2seq_baselines_compute_what_peft_computes(tmp_path: Path) -> None:
    """The seed's method on an encoder-decoder model (PEFT's prompt cache through the model's generate) and the static
    ceiling (prefixes stacked in one EncoderDecoderCache) give PEFT's tokens, as the engine does."""
    model = tiny_seq2seq("t5")
    runner = ModelRunner(model, tiny_tokenizer())
    geometry = geometry_from_config(model.config)
    references = {f"task{i}": make_peft_seq2seq_model(model, 5, seed=i) for i in range(2)}
    for task, reference in references.items():
        save_adapter(reference, tmp_path / task)
    peft_model = load_peft_model(model, {t: tmp_path / t for t in references})
    prompts = {"task0": [5, 6, 7, 8, 2], "task1": [9, 10, 11, 2]}
    prefixes = {}
    for task, reference in references.items():
        expected = peft_seq2seq_greedy(reference, prompts[task], 6, decoder_start_token_id=0, eos_token_id=None)
        with_eos = peft_seq2seq_greedy(reference, prompts[task], 6, decoder_start_token_id=0)
        assert peft_generate(peft_model, task, prompts[task], 6) == with_eos
        embeddings = reference.prompt_encoder["default"].embedding.weight.detach()
        prefixes[task] = TaskPrefix(task, prompt_embeddings_to_kv(embeddings, geometry, dtype=torch.float32, device="cpu"), task)
        params = SamplingParams(max_new_tokens=6, ignore_eos=True)
        served = generate(runner, [GenerationRequest(prompts[task], prefixes[task], params)])[0].token_ids
        assert served == expected
    items = [WorkItem(task, prompts[task], 6) for task in references]
    assert _generate_batch(runner, items, prefixes, TokenClock()) > 0


def test_workload_is_seeded_and_in_range() -> None:
    tokenizer = tiny_tokenizer(128)
    first = make_workload(tokenizer, num_requests=20, num_tasks=3, prompt_tokens=(5, 9), new_tokens=(2, 4), seed=7)
    again = make_workload(tokenizer, num_requests=20, num_tasks=3, prompt_tokens=(5, 9), new_tokens=(2, 4), seed=7)
    assert first == again
    assert {w.task_id for w in first} == {"bench-task-0", "bench-task-1", "bench-task-2"}
    assert all(5 <= len(w.prompt_ids) <= 9 and 2 <= w.max_new_tokens <= 4 for w in first)


def _tiny_llama_config(tmp_path: Path) -> Path:
    """A `--random-init` config of a 2-layer GQA llama, small enough for the bench to run in seconds."""
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps({
        "model_type": "llama", "vocab_size": 128, "hidden_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 64,
    }))
    return config


def test_bench_command_writes_table_json_and_plot(tmp_path: Path, capsys) -> None:
    config = _tiny_llama_config(tmp_path)
    out = tmp_path / "out"
    code = cli.main([
        "bench", "--random-init", str(config), "--device", "cpu", "--clients", "4", "--concurrency", "1,4",
        "--tasks", "2", "--prompt-tokens", "4-6", "--new-tokens", "3-5", "--virtual-tokens", "3", "--out", str(out),
    ])
    assert code == 0
    payload = json.loads((out / "bench.json").read_text())
    systems = {(r["system"], r["concurrency"]) for r in payload["rows"]}
    assert {("per-task", 1), ("mixed", 1), ("no-prefix", 1), ("static", 1), ("peft", 4), ("mixed", 4)} <= systems
    for row in payload["rows"]:
        assert row["tokens_per_s"] > 0 and row["latency_p95_s"] >= row["latency_p50_s"] > 0
        expected_tokens = sum(r["generated_tokens"] for r in payload["runs"] if r["system"] == row["system"]
                              and r["concurrency"] == row["concurrency"])
        assert row["generated_tokens"] == expected_tokens
    assert all(value is not None for value in payload["ratios"].values())
    assert (out / "bench.png").read_bytes()[:4] == b"\x89PNG"
    assert "| mixed | 4 |" in (out / "bench.md").read_text()
    assert "mixed / peft @ 4" in capsys.readouterr().out


def test_bench_runs_an_encoder_decoder_model(tmp_path: Path) -> None:
    config = tmp_path / "tiny-t5.json"
    config.write_text(json.dumps({
        "model_type": "t5", "vocab_size": 128, "d_model": 32, "d_kv": 8, "d_ff": 64, "num_heads": 4, "num_layers": 2,
        "num_decoder_layers": 2, "decoder_start_token_id": 0, "pad_token_id": 0, "eos_token_id": 2,
    }))
    out = tmp_path / "out"
    code = cli.main([
        "bench", "--random-init", str(config), "--device", "cpu", "--clients", "4", "--concurrency", "4",
        "--tasks", "2", "--prompt-tokens", "4-6", "--new-tokens", "3-5", "--virtual-tokens", "3", "--out", str(out),
    ])
    assert code == 0
    payload = json.loads((out / "bench.json").read_text())
    assert {r["system"] for r in payload["rows"]} == {"peft", "static", "per-task", "mixed", "no-prefix"}
    assert all(r["tokens_per_s"] > 0 for r in payload["rows"])
    assert payload["ratios"]["mixed / peft @ 4"] is not None


def test_bench_rejects_unknown_systems(tmp_path: Path) -> None:
    assert cli.main(["bench", "--systems", "mixed,vllm", "--out", str(tmp_path)]) == 2


def test_scale_bench_imports_lists_and_serves_many_tasks(tmp_path: Path, capsys) -> None:
    """`bench --scale N`: every task is imported through POST /prefixes/bulk and listed page by page, and the three
    traffic shapes run over the stored tasks (with tiny tiers, so most prefixes come back from disk)."""
    config = _tiny_llama_config(tmp_path)
    out = tmp_path / "out"
    code = cli.main([
        "bench", "--random-init", str(config), "--device", "cpu", "--clients", "4", "--scale", "250",
        "--scale-batch", "100", "--scale-single-uploads", "5", "--scale-device-prefixes", "4", "--scale-host-prefixes", "8", "--prompt-tokens", "4-6",
        "--new-tokens", "3-3", "--virtual-tokens", "3", "--rounds", "2", "--out", str(out),
    ])
    assert code == 0
    payload = json.loads((out / "scale.json").read_text())
    assert payload["bulk_import"]["tasks"] == 250 and payload["bulk_import"]["requests"] == 3
    assert [(p["path"], p["limit"], p["pages"]) for p in payload["listing"]] == [
        ("/prefixes", 100, 3), ("/prefixes", 1000, 1), ("/v1/models", 100, 3)
    ]
    assert [r["system"] for r in payload["rows"]] == ["hot-8", "zipf-250", "cold-250"]
    assert all(r["generated_tokens"] == 3 * r["requests"] for r in payload["rows"])
    assert set(payload["ratios"]) == set(payload["ratio_ranges"]) == {"zipf-250 / hot-8", "cold-250 / hot-8"}
    runs = payload["runs"]  # two rounds, the loads in turns
    assert [(r["round"], r["system"]) for r in runs] == [
        (0, "hot-8"), (0, "zipf-250"), (0, "cold-250"), (1, "zipf-250"), (1, "cold-250"), (1, "hot-8")
    ]
    assert all(r["rounds"] == 2 for r in payload["rows"])
    assert "| POST /prefixes/bulk, 3 tars | 250 |" in (out / "scale.md").read_text()
    new_task = payload["new_task"]  # uploaded, served at once (a 404 or 5xx would have failed the run), deleted
    assert new_task["samples"] == 20 and new_task["new_first_token_ms"] > 0 and new_task["warm_first_token_ms"] > 0
    assert "| a task uploaded now" in (out / "scale.md").read_text()
    assert "cold-250" in capsys.readouterr().out


def test_cold_requests_go_to_tasks_never_requested_before() -> None:
    from service.bench.scale import HOT_TASKS, cold_workload
    from service.bench.workload import WorkItem, task_ids  # noqa: I001

    ids = task_ids(HOT_TASKS + 12)
    items = [WorkItem(None, [1, 2], 3) for _ in range(6)]
    first = {item.task_id for item in cold_workload(items, ids, seed=0)}
    second = {item.task_id for item in cold_workload(items, ids, seed=0, exclude=first)}
    assert len(first) == len(second) == 6 and not first & second and not (first | second) & set(ids[:HOT_TASKS])
    with pytest.raises(ValueError, match="too few tasks"):
        cold_workload(items, ids, seed=0, exclude=first | second)


def test_scale_tables_in_the_docs_are_the_recorded_run() -> None:
    """docs/benchmarks.md's import and listing tables of the ten-thousand-task run are scale.md's, line for line (its
    traffic table is checked against scale.json's rows with the other benchmark tables, in test_docs.py)."""
    root = Path(__file__).parents[1]
    recorded = (root / "benchmarks" / "results" / "scale-cpu" / "scale.md").read_text().splitlines()
    page = (root / "docs" / "benchmarks.md").read_text()
    section = page[page.index("## Ten thousand tasks"):]
    rows = [line for line in recorded if line.startswith(("| POST ", "| GET "))]
    assert len(rows) == 5
    for line in rows:
        assert line in section.splitlines(), line


def _benchmark_script(name: str):  # benchmarks/*.py are scripts, not package modules
    import importlib.util
    import sys

    path = Path(__file__).parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(name, module)
    spec.loader.exec_module(module)
    return module


def _ray_scale_script():
    return _benchmark_script("ray_scale")


def test_ray_scale_affinity_counts_each_repeated_tasks_requests_on_its_busiest_replica() -> None:
    """The Ray run's affinity is computed from /metrics' routed counters before and after a load: only that load's
    requests count, tasks asked once do not, and the share is per request, not per task."""
    ray_scale = _ray_scale_script()
    before = {("r0", "hot"): 5.0, ("r1", "cold"): 1.0}  # an earlier load's requests
    after = {("r0", "hot"): 11.0, ("r1", "hot"): 2.0, ("r1", "warm"): 2.0, ("r0", "cold"): 1.0, ("r1", "cold"): 1.0}
    asked = Counter({"hot": 8, "warm": 2, "cold": 1})
    placement = ray_scale.placement(before, after, asked)
    assert placement["repeated_tasks"] == 2 and placement["requests_of_repeated_tasks"] == 10
    assert placement["affinity"] == 0.8  # hot 6 of 8 on r0, warm 2 of 2 on r1
    assert placement["hottest"][0] == {"task": "hot", "requests": 8, "per_replica": [6, 2]}
    assert placement["per_replica"] == [7, 4]
    by_requests = placement["affinity_by_requests"]
    assert (by_requests["2-3"]["tasks"], by_requests["2-3"]["affinity"]) == (1, 1.0)  # warm
    assert (by_requests["4-9"]["tasks"], by_requests["4-9"]["affinity"]) == (1, 0.75)  # hot
    assert by_requests["10+"] == {"tasks": 0, "requests": 0, "affinity": None, "affinity_if_random": None}
    # A router ignoring tasks: two requests land on one replica half the time, so well under 1.0 and over 1/2.
    assert 0.5 < ray_scale.random_affinity([2, 2, 2, 2], 2) < 0.9
    assert ray_scale.random_affinity([3], 1) == 1.0


def test_ray_scale_zipf_draw_is_seeded_and_skewed() -> None:
    ray_scale = _ray_scale_script()
    ids = [f"task-{i}" for i in range(1000)]
    draw = ray_scale.zipf_tasks(ids, 500, 1.1, seed=3)
    assert draw == ray_scale.zipf_tasks(ids, 500, 1.1, seed=3) and draw != ray_scale.zipf_tasks(ids, 500, 1.1, seed=4)
    counts = Counter(draw).most_common()
    assert counts[0][1] >= 40 and len(counts) < 400  # the head is hot, the tail mostly unasked


def test_ray_scale_tables_in_the_docs_are_the_recorded_run() -> None:
    """docs/scale-out-ray.md's ten-thousand-task tables are the recorded ray-scale.md, line for line."""
    root = Path(__file__).parents[1]
    recorded = (root / "benchmarks" / "results" / "ray-scale-cpu" / "ray-scale.md").read_text().splitlines()
    page = (root / "docs" / "scale-out-ray.md").read_text()
    section = page[page.index("### Ten thousand tasks"):].splitlines()
    rows = [line for line in recorded if line.startswith("|")]
    assert len(rows) >= 10
    for line in rows:
        assert line in section, line


def test_profile_step_script_profiles_the_engines_own_step_and_the_reference(loaded) -> None:
    """benchmarks/profile_step.py drives the slot layout through the engine's schedule/execute API (it once broke
    silently when that API changed): on the tiny model, both profiles run and split the step into their parts."""
    from service.startup import check_model
    from tests.helpers import random_task_prefix

    profile_step = _benchmark_script("profile_step")
    runner = ModelRunner(loaded.model, loaded.tokenizer)
    check_model(runner, loaded.geometry)
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    prefixes = [random_task_prefix(loaded.model, f"task-{i}", 4, seed=i) for i in range(2)]
    requests = [GenerationRequest([5 + i, 6, 7, 8], prefixes[i % 2], params) for i in range(4)]
    slot = profile_step.profile_slot_step(runner, requests, steps=2, warmup=1)
    assert slot["rows"] == 4 and slot["kv_columns_at_end"][0] > 4
    assert set(slot["ms_per_step"]) == set(profile_step.CATEGORIES) and slot["profiled_step_ms"] > 0
    reference = profile_step.profile_hf_step(runner, rows=4, columns=8, steps=2, warmup=1)
    assert reference["rows"] == 4 and reference["profiled_step_ms"] > 0


def test_before_after_runs_each_trees_own_code_in_alternating_turns(tmp_path: Path, monkeypatch) -> None:
    """benchmarks/before_after.py: each round benches both trees (each importing its own `service`), the order
    alternates, and the summary is the median after/before ratio per system and concurrency."""
    before_after = _benchmark_script("before_after")
    trees = {}
    for name, speed in (("before", 100.0), ("after", 150.0)):
        package = tmp_path / name / "service"
        package.mkdir(parents=True)
        (package / "__init__.py").write_text("")
        (package / "__main__.py").write_text(
            "import json, sys, pathlib\n"
            "out = pathlib.Path(sys.argv[sys.argv.index('--out') + 1])\n"
            "assert sys.argv[1:3] == ['bench', '--systems'], sys.argv\n"
            f"rows = [{{'system': 'mixed', 'concurrency': 32, 'tokens_per_s': {speed}}}]\n"
            "(out / 'bench.json').write_text(json.dumps({'rows': rows}))\n"
        )
        trees[name] = tmp_path / name
    out = tmp_path / "result.json"
    monkeypatch.setattr(sys, "argv", [
        "before_after.py", "--before", str(trees["before"]), "--after", str(trees["after"]), "--rounds", "3",
        "--out", str(out), "--", "--systems", "mixed",
    ])  # fmt: skip
    assert before_after.main() == 0
    result = json.loads(out.read_text())
    assert [r["order"][0] for r in result["rounds"]] == ["before", "after", "before"]
    summary = result["summary"]["mixed"]["32"]
    assert summary["ratio_median"] == 1.5 and summary["before_tok_s"] == [100.0] * 3
