"""`prefix-serve bench` with llama.cpp as a peer: the same requests on both sides, the server's life cycle, rounds.

CI has no llama.cpp build: these tests run the bench against a fake llama-server (tests/scripts/fake_llama_server.py)
that speaks /health and /completion, so the system's code path runs on CPU everywhere."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import pytest
import torch

from service import cli
from service.batch import generate
from service.bench.llama_cpp import convert_to_gguf
from service.bench.workload import task_ids, write_text_prefixes
from service.geometry import geometry_from_config
from service.prefix import TaskPrefix, prompt_embeddings_to_kv
from service.requests import GenerationRequest, SamplingParams
from service.runner import ModelRunner
from tests.helpers import tiny_llama, tiny_tokenizer

FAKE_SERVER = Path(__file__).parent / "scripts" / "fake_llama_server.py"
TINY_CONFIG = {
    "model_type": "llama", "vocab_size": 128, "hidden_size": 32, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 64,
}  # fmt: skip


def _executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def _fake_binary(tmp_path: Path) -> Path:
    return _executable(tmp_path / "llama-server", f'#!/bin/sh\nexec {sys.executable} {FAKE_SERVER} "$@"\n')


def _bench(tmp_path: Path, *extra: str) -> int:
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY_CONFIG))
    return cli.main([
        "bench", "--random-init", str(config), "--device", "cpu", "--clients", "4", "--concurrency", "4",
        "--tasks", "2", "--prompt-tokens", "4-6", "--new-tokens", "3-5", "--virtual-tokens", "3",
        "--out", str(tmp_path / "out"), *extra,
    ])  # fmt: skip


def test_text_task_computes_what_its_text_in_front_of_the_prompt_computes(tmp_path: Path) -> None:
    """The bench's peer is sent task text + prompt; here the task is stored: both must be the same work."""
    model = tiny_llama(seed=0, initializer_range=0.5)
    tokenizer = tiny_tokenizer()
    geometry = geometry_from_config(model.config)
    runner = ModelRunner(model, tokenizer)
    adapters, token_ids = write_text_prefixes(
        tmp_path, model, tokenizer, geometry, num_tasks=2, num_virtual_tokens=5, model_name="tiny", seed=0
    )
    assert set(adapters) == set(token_ids) == set(task_ids(2))
    assert token_ids["bench-task-0"] != token_ids["bench-task-1"]
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    for task, ids in token_ids.items():
        assert len(ids) == 5
        from safetensors.torch import load_file

        embeddings = load_file(str(adapters[task] / "adapter_model.safetensors"))["prompt_embeddings"]
        prefix = TaskPrefix(task, prompt_embeddings_to_kv(embeddings, geometry, dtype=torch.float32, device="cpu"), task)
        prompt = [7, 8, 9, 10]
        stored = generate(runner, [GenerationRequest(prompt, prefix, params)])[0].token_ids
        in_prompt = generate(runner, [GenerationRequest(ids + prompt, None, params)])[0].token_ids
        assert stored == in_prompt


def test_bench_runs_llama_cpp_on_the_same_requests_in_alternating_rounds(tmp_path: Path, capsys) -> None:
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    code = _bench(tmp_path, "--systems", "mixed,llama.cpp", "--rounds", "2", "--llama-server",
                  str(_fake_binary(tmp_path)), "--llama-gguf", str(gguf))  # fmt: skip
    assert code == 0
    payload = json.loads((tmp_path / "out" / "bench.json").read_text())
    rows = {r["system"]: r for r in payload["rows"]}
    assert set(rows) == {"mixed", "llama.cpp"}
    runs = payload["runs"]
    assert sorted((r["system"], r["round"]) for r in runs) == [("llama.cpp", 0), ("llama.cpp", 1), ("mixed", 0),
                                                               ("mixed", 1)]  # fmt: skip
    # Alternating order: mixed first in round 0, llama.cpp first in round 1.
    assert [r["system"] for r in runs] == ["mixed", "llama.cpp", "llama.cpp", "mixed"]
    # Every timed run says how busy other jobs kept the machine (None only where /proc cannot tell).
    assert all("other_cores_busy" in r and "other_cores_busy_before" in r and r["own_cpu_s"] >= 0 for r in runs)
    for row in rows.values():
        assert row["rounds"] == 2 and row["tokens_per_s_range"][0] <= row["tokens_per_s"] <= row["tokens_per_s_range"][1]
    # Both sides generated the same number of tokens: every request's max_new_tokens.
    per_round = {s: [r["generated_tokens"] for r in runs if r["system"] == s] for s in rows}
    assert per_round["mixed"] == per_round["llama.cpp"] and per_round["mixed"][0] > 0
    assert payload["ratios"]["mixed / llama.cpp @ 4"] is not None
    assert len(payload["ratio_ranges"]["mixed / llama.cpp @ 4"]) == 2
    assert payload["llama_cpp"]["greedy_agreement"].endswith("/4 identical")
    assert "| llama.cpp | 4 |" in (tmp_path / "out" / "bench.md").read_text()

    lines = [json.loads(line) for line in (tmp_path / "model.gguf.requests.jsonl").read_text().splitlines()]
    started, requests = lines[0], lines[1:]
    argv = started["argv"]
    assert argv[argv.index("--parallel") + 1] == "4" and "--cont-batching" in argv
    assert argv[argv.index("-t") + 1] == str(torch.get_num_threads())
    with pytest.raises(ProcessLookupError):  # stopped when the bench ended
        os.kill(started["pid"], 0)
    timed = [r for r in requests if r["n_predict"] >= 3]  # the warm-up asks for 2 tokens, the agreement check 8
    assert timed and all(r["temperature"] == 0 and r["ignore_eos"] and r["cache_prompt"] for r in requests)
    # Each prompt is one of the two task texts (3 tokens) followed by a 4-6 token prompt.
    task_texts = {tuple(r["prompt"][:3]) for r in timed}
    assert len(task_texts) == 2 and all(4 <= len(r["prompt"]) - 3 <= 6 for r in timed)


@pytest.mark.parametrize("flags, message", [
    ([], "needs --llama-server"),
    (["--llama-server", "BINARY"], "needs --llama-gguf"),
    (["--llama-server", "BINARY", "--llama-gguf", "missing.gguf"], "does not exist"),
    (["--llama-server", "BINARY", "--llama-gguf", "missing.gguf", "--llama-convert", "SCRIPT"],
     "--random-init models have no directory"),
])  # fmt: skip
def test_llama_cpp_flags_are_checked_before_any_model_loads(tmp_path: Path, capsys, flags: list[str], message: str) -> None:
    binary = _fake_binary(tmp_path)
    script = _executable(tmp_path / "convert.py", "")
    flags = [str(binary) if f == "BINARY" else str(script) if f == "SCRIPT" else
             str(tmp_path / f) if f.endswith(".gguf") else f for f in flags]  # fmt: skip
    assert _bench(tmp_path, "--systems", "mixed,llama.cpp", *flags) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_conversion_writes_the_gguf_once_and_only_when_the_script_succeeds(tmp_path: Path) -> None:
    script = tmp_path / "convert.py"
    script.write_text(
        "import sys\n"
        "args = sys.argv[1:]\n"
        "if 'fail' in args[0]: sys.exit('cannot convert')\n"
        "open(args[args.index('--outfile') + 1], 'w').write(args[args.index('--outtype') + 1] + ' ' + args[0])\n"
    )
    out = tmp_path / "gguf" / "model-bf16.gguf"
    assert convert_to_gguf(script, tmp_path / "model", "bf16", out) == out
    assert out.read_text() == f"bf16 {tmp_path / 'model'}"
    convert_to_gguf(script, tmp_path / "other", "bf16", out)  # exists: reused, not converted again
    assert out.read_text() == f"bf16 {tmp_path / 'model'}"
    failed = tmp_path / "gguf" / "failed.gguf"
    with pytest.raises(RuntimeError, match="cannot convert"):
        convert_to_gguf(script, tmp_path / "fail", "f32", failed)
    assert list(failed.parent.iterdir()) == [out]  # no partial file left behind
    with pytest.raises(ValueError, match="q4_0"):
        convert_to_gguf(script, tmp_path / "model", "q4_0", tmp_path / "q.gguf")
