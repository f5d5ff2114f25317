"""All runtime configuration in one place: environment variables (PREFIX_SERVE_*) overridden by CLI flags."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DeviceChoice = Literal["auto", "cpu", "cuda"]
DtypeChoice = Literal["auto", "float32", "bfloat16", "float16"]


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "prefix-serve"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PREFIX_SERVE_", extra="ignore")

    # Base model
    model: str | None = Field(
        default=None,
        description="Local Hugging Face model directory or .gguf file; empty = the embedded SmolLM2-135M-Instruct.",
    )
    device: DeviceChoice = "auto"
    dtype: DtypeChoice = "auto"
    cache_dir: Path = Field(default_factory=default_cache_dir, description="Where converted models are cached.")

    # Prefix store
    prefix_dir: Path = Field(default=Path("prefixes"), description="On-disk prefix store, one folder per task.")
    max_virtual_tokens: int = Field(default=256, ge=1, description="Largest accepted num_virtual_tokens (V).")
    max_prefix_bytes: int = Field(default=64 * 1024 * 1024, ge=1, description="Size cap of an uploaded safetensors.")
    max_config_bytes: int = Field(default=64 * 1024, ge=1, description="Size cap of an uploaded adapter_config.json.")

    max_prefixes: int = Field(
        default=20_000, ge=1,
        description="Most prefixes the store holds. Start-up reads only each task's small files (~0.16 ms and ~1 KB "
        "of index per task), so 10,000 tasks start in ~2 s; prefixes are read on first use, within the budgets below.",
    )
    max_text_task_tokens: int = Field(
        default=2048, ge=1,
        description="Longest text a task made from text may have (its V), in tokens; such a prefix is counted in the "
        "KV budget like any other. SmolLM2: ~46 KB of float32 K/V per token.",
    )
    max_template_chars: int = Field(default=4096, ge=16, description="Longest prompt_template of a task.")
    max_description_chars: int = Field(default=1000, ge=1, description="Longest description of a task.")
    prefix_device_budget_bytes: int = Field(
        default=512 * 1024 * 1024, ge=0,
        description="Prefix KV bytes kept on the device when no running request needs them (0 = no limit): in the slot "
        "layout the engine's prefix bank (each prefix once) forgets idle prefixes beyond it; in the padded layout "
        "the least recently used move to host memory. Prefixes of running requests are always kept.",
    )
    prefix_host_budget_bytes: int = Field(
        default=1024 * 1024 * 1024, ge=0,
        description="Prefix KV bytes kept in host memory (0 = no limit); the least recently used beyond it are read "
        "from disk again on their next use.",
    )

    # HTTP
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["json", "text"] = "json"
    max_body_bytes: int = Field(
        default=80 * 1024 * 1024, ge=1, description="Cap on an upload body (POST /prefixes, multipart)."
    )
    max_bulk_body_bytes: int = Field(
        default=16 * 1024 * 1024 * 1024, ge=1,
        description="Cap on a bulk import body (POST /prefixes/bulk, a tar), spooled to a temp file as it arrives.",
    )
    max_bulk_tasks: int = Field(default=10000, ge=1, description="Most task folders in one bulk import.")
    bulk_workers: int = Field(
        default=64, ge=1,
        description="Threads that validate and store the tasks of one bulk import side by side; their probe forwards "
        "are batched together (up to 64 rows), so more threads mean fewer, larger forwards.",
    )
    list_default_limit: int = Field(
        default=100, ge=1, description="Page size of GET /prefixes and GET /v1/models when no limit is given."
    )
    list_max_limit: int = Field(default=1000, ge=1, description="Largest accepted limit of a listing page (422 beyond).")
    max_json_body_bytes: int = Field(
        default=4 * 1024 * 1024, ge=1,
        description="Cap on every other request body (the JSON routes): refused with 413 before it is read whole. "
        "A prompt at the character bound (4096 tokens x 81 characters) fits even JSON-escaped.",
    )
    keep_alive_timeout_s: float = Field(
        default=75.0, gt=0,
        description="Idle keep-alive connections are closed after this long. Longer than the usual proxy/client idle "
        "timeouts (60 s), so the server never closes a connection a client is about to reuse.",
    )

    # Auth: keys as comma-separated lists or JSON arrays; a file holds lines `generate:KEY` / `admin:KEY`.
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list, description="Keys with the generate scope.")
    admin_api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list, description="Keys with admin scope.")
    api_keys_file: Path | None = None
    allow_unauthenticated: bool = Field(default=False, description="Allow binding beyond loopback without keys.")
    metrics_require_key: bool = Field(
        default=True,
        description="With keys configured, GET /metrics needs a generate key (its labels name tasks). False: open.",
    )

    # Metrics
    metrics_max_tasks: int = Field(
        default=100, ge=0,
        description="Most task ids with their own per-task metric series; further tasks are counted as task=\"_other\".",
    )

    # Batching and engine limits
    batching: Literal["mixed", "per-task"] = Field(
        default="mixed", description="mixed: continuous batching across tasks; per-task: one task per static batch."
    )
    batch_window_ms: float = Field(default=5.0, ge=0, description="per-task: how long a batch waits for its task.")
    max_running_rows: int = Field(default=32, ge=1, description="Most requests decoding at once.")
    max_prefill_rows: int = Field(
        default=16, ge=1, description="Padded layout (fallback models, per-task): most requests in one prefill."
    )
    step_token_budget: int = Field(
        default=128, ge=1,
        description="Slot layout: most tokens in one forward (every decoding row's next token + prompt chunks of "
        "new rows). Lower = steadier inter-token latency, higher = faster time to first token.",
    )
    max_kv_tokens: int = Field(
        default=32768, ge=1,
        description="KV memory budget in tokens: slot store (slots x longest reservation, padding included) + the "
        "prefix bank (each running task's prefix once). A request whose prefix + prompt + max_new_tokens exceeds "
        "it is refused; others wait until their KV fits.",
    )
    idle_token_budget: int | None = Field(
        default=None, ge=1,
        description="Slot layout: most prompt tokens in one forward while no row is decoding (unset: 8 x "
        "step_token_budget). It bounds how long one step takes, so how long a new request may wait behind another's "
        "prefill.",
    )
    max_waiting: int = Field(default=256, ge=1, description="Bounded queue; beyond it requests get 429.")
    request_timeout_s: float = Field(default=300.0, gt=0, description="Per-request deadline, queueing included.")

    # Request limits
    default_max_new_tokens: int = Field(default=20, ge=1)
    max_new_tokens_limit: int = Field(default=2048, ge=1)
    max_prompt_tokens: int = Field(default=4096, ge=1)
    max_prompt_chars_per_token: int | None = Field(
        default=None, ge=1,
        description="Prompts longer than max_prompt_tokens x this many characters are refused before tokenizing "
        "(texts of tasks made from text: max_text_task_tokens x this many). "
        "Unset: the longest vocabulary entry (81 for SmolLM2), which never refuses a prompt that would fit.",
    )
    input_threads: int = Field(default=2, ge=1, description="Threads that tokenize prompts and look up prefixes.")
    max_stop_sequences: int = Field(default=16, ge=0)
    max_stop_sequence_chars: int = Field(default=256, ge=1)

    # Scale-out on Ray Serve (`prefix-serve serve --replicas N`; needs the `ray` extra). See README "Scale out".
    replicas: int = Field(
        default=0, ge=0, description="Model replicas on Ray Serve; 0 = the single-process server (the default)."
    )
    ray_address: str | None = Field(
        default=None, description="Ray cluster to join (e.g. auto or ray://host:10001); empty = start a local one."
    )
    ray_num_cpus: int | None = Field(
        default=None, ge=1, description="CPUs of the local Ray cluster this command starts (default: all)."
    )
    ray_temp_dir: Path | None = Field(default=None, description="Temp/session folder of the local Ray cluster.")
    ray_cpus_per_replica: float = Field(default=1.0, ge=0, description="CPUs Ray reserves for each model replica.")
    ray_gpus_per_replica: float | None = Field(
        default=None, ge=0, description="GPUs per model replica (default: 1 when the Ray cluster has GPUs, else 0)."
    )
    ray_ingress_replicas: int = Field(default=1, ge=1, description="Replicas of the HTTP ingress (no model).")
    ray_prefixes_per_replica: int = Field(
        default=64, ge=1,
        description="Task versions each replica keeps loaded (its LRU; host copies in the slot layout, whose prefix bank "
        "holds the device copy).",
    )
    ray_affinity_imbalance: int = Field(
        default=2, ge=0,
        description="A request goes to a replica already holding its task's prefix unless that replica has more than "
        "this many requests in flight beyond the least loaded one; then to the least loaded (which loads it).",
    )
    ray_stats_interval_s: float = Field(
        default=1.0, gt=0, description="How often replicas report engine stats for /health and /metrics."
    )
    shared_prefix_store: bool = Field(
        default=False,
        description="Store mode for several processes on one prefix folder (cross-process lock, changes seen by all); "
        "always on under Ray.",
    )

    @field_validator("api_keys", "admin_api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [k.strip() for k in text.split(",") if k.strip()]
        return value

    @field_validator("api_keys", "admin_api_keys")
    @classmethod
    def _no_blank_keys(cls, keys: list[str]) -> list[str]:
        """A blank key would count as "auth configured" (and so pass the non-loopback bind check) although no
        request can present it: the header's token is stripped before comparing. Refuse it at start-up."""
        for key in keys:
            if not key.strip():
                raise ValueError("an API key is empty or only whitespace")
            if key != key.strip():
                raise ValueError("an API key has leading or trailing whitespace, which no request can send")
        return keys


def setting_default(name: str) -> Any:
    """A Settings field's default: where every engine budget's default is written once (EngineLimits and SlotLimits
    take theirs from here)."""
    return Settings.model_fields[name].default
