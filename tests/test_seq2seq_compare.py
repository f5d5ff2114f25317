"""The seq2seq-compare experiment (`python -m experiments.seq2seq_compare`) end to end on a barely pretrained tiny T5: every arm trains, is stored
through an upload's validation, and is scored on held-out data; the report names what it compared."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from experiments.seq2seq_base import build_seq2seq_base
from experiments.seq2seq_compare import main as compare_main

pytestmark = pytest.mark.slow


def test_compare_runs_every_arm_and_writes_the_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = tmp_path / "base"
    build_seq2seq_base(base, steps=2, corpus_size=300, vocab_size=300, batch_size=4, threads=1)
    out = tmp_path / "out"
    code = compare_main([
        "--base", str(base), "--tasks", "travel-mode", "--steps", "2",
        "--num-virtual-tokens", "2", "--encoder-virtual-tokens", "3", "--batch-size", "4", "--limit", "8", "--out", str(out),
    ])  # fmt: skip
    assert code == 0
    payload = json.loads((out / "seq2seq-compare.json").read_text())
    arms = [(r["task_id"], r["arm"]) for r in payload["results"]]
    assert arms == [("travel-mode", a) for a in ("zero-shot", "decoder", "decoder-long", "encoder+decoder")]
    by_arm = {r["arm"]: r for r in payload["results"]}
    assert all(r["total"] == 8 for r in payload["results"])
    # The full prefix trains more parameters than V decoder tokens alone (its encoder prefix's own MLP).
    assert by_arm["encoder+decoder"]["trainable_params"] > by_arm["decoder"]["trainable_params"]
    assert all(by_arm[a]["heldout_loss"] > 0 for a in ("decoder", "decoder-long", "encoder+decoder"))
    assert payload["base_model"]["steps"] == 2
    assert "full prefix (V + Ve)" in capsys.readouterr().out


def test_label_tasks_are_seeded_and_their_splits_disjoint() -> None:
    import re

    from experiments.seq2seq_compare import _LABEL_WORDS, LABEL_TASKS

    train_words = set(_LABEL_WORDS["train"]["name"]) | set(_LABEL_WORDS["train"]["place"])
    for task in LABEL_TASKS.values():
        train, heldout = task.records("train"), task.records("heldout")
        assert train == task.records("train") and len(train) == 400 and len(heldout) == 100
        assert not {r["prompt"] for r in train} & {r["prompt"] for r in heldout}
        for record in heldout:  # no held-out sentence names a training name or place
            assert not set(re.findall(r"[A-Za-z]+", record["prompt"])) & train_words, record
        assert {r["completion"] for r in heldout} <= {r["completion"] for r in train}


def test_compare_refuses_unknown_tasks(tmp_path: Path) -> None:
    assert compare_main(["--base", str(tmp_path), "--tasks", "nope"]) == 2


def test_prefix_serve_no_longer_has_the_experiment(capsys: pytest.CaptureFixture[str]) -> None:
    # The experiment left the package: `prefix-serve examples` keeps only the shipped example tasks' commands.
    from service import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["examples", "seq2seq-compare", "--help"])
    assert exit_info.value.code == 2 and "invalid choice: 'seq2seq-compare'" in capsys.readouterr().err
