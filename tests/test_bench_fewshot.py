"""`prefix-serve bench --few-shot` (service/bench/fewshot.py) end to end on a tiny random model."""

from __future__ import annotations

import json
from pathlib import Path

from service import cli


def test_few_shot_bench_compares_both_systems_in_one_run(tmp_path: Path, capsys) -> None:
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps({
        "model_type": "llama", "vocab_size": 128, "hidden_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 64, "initializer_range": 0.5,
    }))  # fmt: skip
    out = tmp_path / "out"
    code = cli.main([
        "bench", "--few-shot", "--few-shot-tokens", "60", "--random-init", str(config), "--device", "cpu",
        "--clients", "4", "--requests-per-client", "2", "--new-tokens", "3", "--out", str(out),
    ])  # fmt: skip
    assert code == 0  # 0 only when the two systems' greedy outputs are identical
    payload = json.loads((out / "fewshot.json").read_text())
    assert 0 < payload["block_tokens"] <= 60 and payload["greedy_identical"] == "4/4"
    rows = {r["system"]: r for r in payload["rows"]}
    assert set(rows) == {"few-shot-in-prompt", "text-task"}
    for row in rows.values():
        assert row["concurrency"] == 4 and row["requests"] == 8 and row["generated_tokens"] == 8 * 3
        assert row["ttft_p95_s"] >= row["ttft_p50_s"] > 0 and row["tokens_per_s"] > 0
    block = payload["block_tokens"]
    in_prompt, stored = (rows[s]["prompt_tokens_per_request"] for s in ("few-shot-in-prompt", "text-task"))
    assert in_prompt == stored + block
    assert "text-task" in (out / "fewshot.md").read_text()
    assert "greedy outputs identical: 4/4" in capsys.readouterr().out
