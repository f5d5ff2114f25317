"""Shared test helpers: tiny random models and real PEFT prefix-tuning adapters made with `peft` itself."""

from __future__ import annotations

import copy
import io
import json
import math
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel, PrefixTuningConfig, get_peft_model
from safetensors.torch import save as save_safetensors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

from service.bench.workload import synthetic_tokenizer

# GQA: 4 query heads, 2 KV heads, head_dim 8 -> PEFT token_dim 16, prompt_embeddings width 2 * 2 * 16 = 64.
TINY_LLAMA_KWARGS: dict[str, Any] = dict(
    vocab_size=128,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=64,
)


def tiny_llama(seed: int = 0, **overrides: Any) -> LlamaForCausalLM:
    """A tiny random Llama with grouped-query attention, in eval mode."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**TINY_LLAMA_KWARGS, **overrides}))
    return model.eval()


def make_peft_prefix_model(
    model: PreTrainedModel,
    num_virtual_tokens: int,
    seed: int,
    prefix_projection: bool = False,
    *,
    base_model_name_or_path: str | None = None,
) -> PeftModel:
    """Wrap a copy of `model` in a PEFT prefix-tuning model whose prompt encoder is randomly initialised.

    PEFT's own init is small for the MLP path; here the embedding is N(0, 1) and the MLP layers are scaled so the
    resulting key/value prefix is ~unit scale too, large enough to change the model's output clearly.
    The PeftModel stays in training mode (inference_mode False), so `get_prompt` runs the MLP exactly as
    `save_pretrained` does.
    """
    base = copy.deepcopy(model)  # get_peft_model wraps in place; keep the caller's model untouched
    if base_model_name_or_path is not None:
        # PEFT takes base_model_name_or_path from the model's `name_or_path`, overriding the config's value.
        base.name_or_path = base_model_name_or_path
    config = PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=num_virtual_tokens, prefix_projection=prefix_projection
    )
    peft_model = get_peft_model(base, config)
    generator = torch.Generator().manual_seed(seed)
    encoder = peft_model.prompt_encoder["default"]
    with torch.no_grad():
        weight = encoder.embedding.weight
        weight.copy_(torch.randn(weight.shape, generator=generator))
        if prefix_projection:
            for index, module in enumerate(encoder.transform):
                if isinstance(module, torch.nn.Linear):
                    gain = 1.0 if index == 0 else 1.6  # ~unit output after tanh
                    std = gain / math.sqrt(module.in_features)
                    module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * std)
                    module.bias.copy_(torch.randn(module.bias.shape, generator=generator) * 0.1)
    return peft_model


def make_peft_prefix_adapter(
    model: PreTrainedModel,
    out_dir: Path,
    num_virtual_tokens: int,
    seed: int,
    prefix_projection: bool = False,
    *,
    base_model_name_or_path: str | None = None,
) -> Path:
    """Save a real PEFT prefix adapter (adapter_config.json + adapter_model.safetensors) into out_dir; return it."""
    out_dir = Path(out_dir)
    peft_model = make_peft_prefix_model(
        model, num_virtual_tokens, seed, prefix_projection, base_model_name_or_path=base_model_name_or_path
    )
    return save_adapter(peft_model, out_dir)


def save_adapter(peft_model: PeftModel, out_dir: Path) -> Path:
    """`save_pretrained` without network: with a base model name set, PEFT's default save_embedding_layers="auto"
    would look that name up on the Hub."""
    peft_model.save_pretrained(str(out_dir), save_embedding_layers=False)
    return Path(out_dir)


def read_adapter(adapter_dir: Path) -> tuple[bytes, bytes]:
    """(adapter_config.json bytes, adapter_model.safetensors bytes) of a saved adapter."""
    adapter_dir = Path(adapter_dir)
    return (
        (adapter_dir / "adapter_config.json").read_bytes(),
        (adapter_dir / "adapter_model.safetensors").read_bytes(),
    )


def edit_config(config_bytes: bytes, **changes: Any) -> bytes:
    """A copy of an adapter_config.json with fields changed; a value of `...` removes the field."""
    config = json.loads(config_bytes)
    for key, value in changes.items():
        if value is ...:
            config.pop(key, None)
        else:
            config[key] = value
    return json.dumps(config).encode("utf-8")


def safetensors_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    """Serialise tensors the way PEFT does (safetensors, metadata format=pt)."""
    return save_safetensors({k: v.contiguous() for k, v in tensors.items()}, metadata={"format": "pt"})


def pickle_bytes(obj: Any) -> bytes:
    """What a `torch.save` checkpoint (pickle in a zip) looks like, e.g. adapter_model.bin renamed to .safetensors."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def tiny_tokenizer(vocab_size: int = 128) -> PreTrainedTokenizerFast:
    """A real fast tokenizer for tiny models: "t5 t6 t7" <-> [5, 6, 7]; <pad>=0, <s>=1, </s>=2."""
    return synthetic_tokenizer(vocab_size)


# ---------------------------------------------------------------------------------------------------------------------
# Real servers on loopback


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def prefix_serve_command() -> list[str]:
    """The installed `prefix-serve` console script, else `python -m service`."""
    script = Path(sys.executable).with_name("prefix-serve")
    return [str(script)] if script.exists() else [sys.executable, "-m", "service"]


def sse_events(text: str) -> list[dict[str, Any]]:
    """The JSON payloads of a server-sent-events body's `data:` lines."""
    return [json.loads(line[len("data: ") :]) for line in text.splitlines() if line.startswith("data: ")]


class ThreadedServer:
    """The app under a real uvicorn server on a loopback port, in a daemon thread."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        self.app = app
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ThreadedServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


# ---------------------------------------------------------------------------------------------------------------------
# Processes


def pids_mentioning(text: str) -> list[int]:
    """Live processes whose command line contains `text` (e.g. a private Ray temp dir: only that cluster's)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(int(entry.name))
    return found


def prometheus_values(text: str, name: str) -> dict[frozenset[tuple[str, str]], float]:
    """{labels: value} of one metric in a Prometheus text exposition."""
    values: dict[frozenset[tuple[str, str]], float] = {}
    for line in text.splitlines():
        if not line.startswith(name) or line[len(name) : len(name) + 1] not in ("{", " "):
            continue
        head, _, value = line.rpartition(" ")
        labels: set[tuple[str, str]] = set()
        if "{" in head:
            for pair in head[head.index("{") + 1 : head.rindex("}")].split('",'):
                key, _, raw = pair.partition("=")
                labels.add((key.strip(), raw.strip().strip('"')))
        values[frozenset(labels)] = float(value)
    return values
