"""The self-pretrained seq2seq base model: corpus, tokenizer, mixture, saved directory and the two seq2seq tasks.

Fast: tiny corpora and a few optimizer steps; the real pretraining run is not repeated here.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, PreTrainedTokenizerFast

from experiments.seq2seq_base import (
    DEFAULT_MIXTURE,
    EOS_ID,
    EVENT_WORDS,
    PAD_ID,
    REPORT_FILE,
    SEQ2SEQ_TASKS,
    TRIP_WORDS,
    UNK_ID,
    PretrainingMixture,
    build_seq2seq_base,
    collate,
    exact_match_rate,
    generate_corpus,
    get_seq2seq_task,
    greedy_answers,
    make_optimizer,
    new_model,
    sentinel,
    sentinel_ids,
    span_corruption_pair,
    tiny_t5_config,
    train_tokenizer,
    training_step,
)

SMALL_CORPUS = 300


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """One thread: on a busy 2-core machine OpenMP's spin-waiting made these tiny steps ~15x slower with two."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return train_tokenizer((s.text for s in generate_corpus(SMALL_CORPUS)), sentinels=8)


def test_corpus_is_deterministic_and_states_its_fields() -> None:
    corpus = generate_corpus(200, seed=0)
    assert corpus == generate_corpus(200, seed=0)
    assert corpus != generate_corpus(200, seed=1)
    assert {s.kind for s in corpus} >= {"action", "trip", "purchase", "meeting", "description", "birth", "scene"}
    for sentence in corpus:
        assert sentence.fields and all(value in sentence.text for value in sentence.fields.values()), sentence


def test_task_splits_are_deterministic_and_built_from_disjoint_words() -> None:
    assert set(SEQ2SEQ_TASKS) == {"trip-destination", "who-did-what"}
    for task in SEQ2SEQ_TASKS.values():
        train, heldout = task.records("train"), task.records("heldout")
        assert train == task.records("train") and heldout == task.records("heldout")
        assert (len(train), len(heldout)) == (task.train_size, task.heldout_size)
        assert not {r["prompt"] for r in train} & {r["prompt"] for r in heldout}
        for record in train + heldout:
            assert record["input"] in record["prompt"]
            assert record["prompt"] == task.prompt_template.replace("{inputs}", record["input"])
            assert record["completion"].startswith(" ") and 1 <= len(record["completion"].split()) <= 4
        assert get_seq2seq_task(task.task_id) is task
    for pools in (TRIP_WORDS, EVENT_WORDS):
        for key, heldout_part in pools["heldout"].items():
            assert heldout_part and pools["train"][key] and not set(heldout_part) & set(pools["train"][key]), key

    # No held-out answer contains a value a training answer uses.
    for task in SEQ2SEQ_TASKS.values():
        train_words = {w for r in task.records("train") for w in r["completion"].split()} - {"to", "the"}
        for record in task.records("heldout"):
            assert not set(record["completion"].split()) & train_words, record
    for record in SEQ2SEQ_TASKS["trip-destination"].records("heldout"):
        name, to, place = record["completion"].split()
        assert to == "to" and name in TRIP_WORDS["heldout"]["name"] and place in TRIP_WORDS["heldout"]["place"]
    for record in SEQ2SEQ_TASKS["who-did-what"].records("heldout"):
        agent, verb, the, thing = record["completion"].split()
        assert the == "the" and agent in EVENT_WORDS["heldout"]["name"] and verb in EVENT_WORDS["heldout"]["verb"]
        assert thing in EVENT_WORDS["heldout"]["object"]
    with pytest.raises(ValueError, match="unknown seq2seq task"):
        get_seq2seq_task("nope")


def test_tokenizer_round_trips_and_appends_eos(tokenizer: PreTrainedTokenizerFast) -> None:
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (PAD_ID, EOS_ID, UNK_ID)
    assert (tokenizer.pad_token, tokenizer.eos_token, tokenizer.unk_token) == ("<pad>", "</s>", "<unk>")
    prompts = [r["prompt"] for task in SEQ2SEQ_TASKS.values() for r in task.records("heldout")[:20]]
    texts = [s.text for s in generate_corpus(50, seed=7)] + prompts
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        assert ids[-1] == EOS_ID and EOS_ID not in ids[:-1] and UNK_ID not in ids
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == ids[:-1]
    sentinels = sentinel_ids(tokenizer)
    assert len(sentinels) == 8 and len(set(sentinels)) == 8 and min(sentinels) > UNK_ID
    assert tokenizer(f"the {sentinel(0)} lamp", add_special_tokens=False)["input_ids"][1] == sentinels[0]
    assert tokenizer.decode(tokenizer(f"the {sentinel(3)} lamp")["input_ids"], skip_special_tokens=True) == "the lamp"


def test_span_corruption_hides_spans_the_target_restores(tokenizer: PreTrainedTokenizerFast) -> None:
    sentinels = sentinel_ids(tokenizer)
    rng = random.Random(0)
    for sentence in generate_corpus(40, seed=3):
        ids = tokenizer(sentence.text, add_special_tokens=False)["input_ids"]
        source, target = span_corruption_pair(ids, sentinels, rng)
        assert source[-1] == EOS_ID and target[-1] == EOS_ID and target[0] == sentinels[0] and source[0] != sentinels[0]
        spans: dict[int, list[int]] = {}
        current = None
        for token in target[:-1]:
            if token in sentinels:
                current = token
                spans[current] = []
            else:
                spans[current].append(token)
        restored = [t for token in source[:-1] for t in (spans[token] if token in sentinels else [token])]
        assert restored == ids and all(spans[s] for s in list(spans)[:-1]) and spans[list(spans)[-1]] == []


def test_mixture_is_seeded_and_covers_every_objective(tokenizer: PreTrainedTokenizerFast) -> None:
    corpus = generate_corpus(SMALL_CORPUS)
    first = PretrainingMixture(corpus, tokenizer, seed=0).sample(64)
    assert first == PretrainingMixture(corpus, tokenizer, seed=0).sample(64)
    assert set(first[1]) == set(DEFAULT_MIXTURE)
    batch = collate(first[0][:4])
    assert batch["input_ids"].shape == batch["attention_mask"].shape
    assert (batch["labels"] == -100).any() or batch["labels"].shape[1] == max(len(t) for _, t in first[0][:4])


def test_loss_decreases_on_a_fixed_batch(tokenizer: PreTrainedTokenizerFast) -> None:
    model = new_model(tiny_t5_config(len(tokenizer), d_model=64, d_ff=128, num_layers=2, num_decoder_layers=2), 0)
    mixture = PretrainingMixture(generate_corpus(SMALL_CORPUS), tokenizer, seed=0)
    batch = collate(mixture.sample(8)[0])
    optimizer = make_optimizer(model, 3e-3)
    model.train()
    losses = [training_step(model, optimizer, batch) for _ in range(8)]
    assert losses[-1] < 0.8 * losses[0], losses


def test_build_writes_a_model_directory_that_loads_offline(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "base"
    tiny = {"steps": 3, "corpus_size": SMALL_CORPUS, "batch_size": 4, "sentinels": 8, "threads": 1}
    report = build_seq2seq_base(out, log_every=1, **tiny)
    assert report == json.loads((out / REPORT_FILE).read_text())
    assert report["steps"] == 3 and report["corpus_size"] == SMALL_CORPUS and report["params"] > 0
    assert report["final_loss"] > 0 and report["seconds"] > 0

    model = AutoModelForSeq2SeqLM.from_pretrained(out, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert model.config.model_type == "t5" and model.config.decoder_start_token_id == PAD_ID
    assert (model.generation_config.decoder_start_token_id, model.generation_config.eos_token_id) == (PAD_ID, EOS_ID)
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (PAD_ID, EOS_ID, UNK_ID)
    assert len(sentinel_ids(tokenizer)) == 8 and len(tokenizer) == model.config.vocab_size
    assert tokenizer("Anna met Ben.")["input_ids"][-1] == EOS_ID
    with safe_open(str(out / "model.safetensors"), framework="pt") as weights:
        assert all(weights.get_slice(name).get_dtype() == "F32" for name in weights.keys())

    prompts = [r["prompt"] for r in SEQ2SEQ_TASKS["trip-destination"].records("heldout")[:2]]
    answers = greedy_answers(model, tokenizer, prompts, max_new_tokens=4)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    assert 0.0 <= exact_match_rate(model, tokenizer, SEQ2SEQ_TASKS["who-did-what"], limit=3) <= 1.0

    # Seeded: the same arguments give the same training run.
    again = build_seq2seq_base(tmp_path / "again", **tiny)
    assert (again["first_loss"], again["final_loss"]) == (report["first_loss"], report["final_loss"])
