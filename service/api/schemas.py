"""Pydantic request/response schemas of the HTTP API (TGI-style /generate, PEFT-native /prefixes)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from service.requests import SamplingParams

TASK_ID_REGEX = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"

StopSequence = Annotated[str, Field(min_length=1)]

FinishReasonLiteral = Literal["length", "eos_token", "stop_sequence", "cancelled"]


# Request bodies are validated strictly: `true` is not an integer, "yes" is not a boolean, "3" is not a number (lax
# coercion silently turned `max_new_tokens: true` into 1), and NaN/Infinity are not numbers at all.
STRICT_BODY = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class GenerateParameters(BaseModel):
    """TGI's whole parameter set. What the engine does is honoured; the rest is declared so that a client sending
    its neutral value (huggingface_hub and LangChain send several) works, and `unsupported()` names any other value:
    a 422 rather than a silently ignored setting."""

    model_config = STRICT_BODY

    max_new_tokens: int | None = Field(default=None, ge=1, description="Defaults to the server's setting.")
    do_sample: bool = Field(
        default=False,
        description="Sample instead of greedy decoding. As in TGI, setting temperature, top_k, top_p or seed also "
        "samples, whatever do_sample says.",
    )
    temperature: float | None = Field(default=None, gt=0.0, le=100.0, description="Sampling temperature (1.0 if unset).")
    top_k: int | None = Field(default=None, ge=1)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=100.0, description="1.0 (none) if unset.")
    stop: list[StopSequence] = Field(
        default_factory=list, description="Stop when any of these is generated (count and length are limited)."
    )
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    details: bool = Field(
        default=False,
        description="Also return each generated token (id, text, special; logprob is null: not computed) and TGI's "
        "`prefill` (empty). The summary details are always returned.",
    )
    return_full_text: bool | None = Field(
        default=None, description="Prepend `inputs` (as sent, before any prompt template) to generated_text."
    )
    # Declared for TGI's clients; only the neutral value is accepted (see `unsupported`).
    best_of: int | None = Field(default=None, ge=1, description="Only 1 is supported.")
    decoder_input_details: bool = Field(default=False, description="Only false is supported.")
    frequency_penalty: float | None = Field(default=None, description="Only 0 is supported (use repetition_penalty).")
    grammar: dict[str, Any] | None = Field(default=None, description="Not supported: omit it.")
    top_n_tokens: int | None = Field(default=None, ge=0, description="Only 0 is supported.")
    truncate: int | None = Field(
        default=None, ge=1, description="Not supported: prompts are never truncated (over the limit is a 422)."
    )
    typical_p: float | None = Field(default=None, gt=0.0, le=1.0, description="Only 1.0 (off) is supported.")
    watermark: bool = Field(default=False, description="Only false is supported.")
    adapter_id: str | None = Field(default=None, description="Only the task being generated with is accepted.")

    @property
    def samples(self) -> bool:
        """TGI's rule: a sampling parameter only makes sense when sampling, so giving one turns sampling on (greedy
        decoding would ignore it silently, and `details.seed` would be null)."""
        return self.do_sample or any(v is not None for v in (self.temperature, self.top_k, self.top_p, self.seed))

    def unsupported(self, task_id: str) -> list[tuple[str, str]]:
        """(parameter, why) for every parameter set to something the engine does not do."""
        problems: list[tuple[str, str]] = []
        if self.best_of not in (None, 1):
            problems.append(("best_of", f"best_of={self.best_of} (only 1 is supported)"))
        if self.decoder_input_details:
            problems.append(("decoder_input_details", "decoder_input_details=true (prompt logprobs are not computed)"))
        if self.frequency_penalty not in (None, 0):
            problems.append(
                ("frequency_penalty", f"frequency_penalty={self.frequency_penalty} (use repetition_penalty)")
            )
        if self.grammar is not None:
            problems.append(("grammar", "grammar (constrained decoding is not supported; omit it)"))
        if self.top_n_tokens not in (None, 0):
            problems.append(("top_n_tokens", f"top_n_tokens={self.top_n_tokens} (logprobs are not computed)"))
        if self.truncate is not None:
            problems.append(("truncate", f"truncate={self.truncate} (prompts are never truncated; omit it)"))
        if self.typical_p not in (None, 1.0):
            problems.append(("typical_p", f"typical_p={self.typical_p} (typical sampling is not supported; omit it)"))
        if self.watermark:
            problems.append(("watermark", "watermark=true (not supported)"))
        if self.adapter_id not in (None, task_id):
            shown = self.adapter_id if len(self.adapter_id) <= 100 else self.adapter_id[:100] + "..."
            problems.append(
                ("adapter_id", f"adapter_id='{shown}' (the task is chosen by the URL or task_id: '{task_id}')")
            )
        return problems

    def to_sampling(self, default_max_new_tokens: int) -> SamplingParams:
        return SamplingParams(
            max_new_tokens=self.max_new_tokens or default_max_new_tokens,
            do_sample=self.samples,
            temperature=self.temperature if self.temperature is not None else 1.0,
            top_k=self.top_k,
            top_p=self.top_p,
            repetition_penalty=self.repetition_penalty if self.repetition_penalty is not None else 1.0,
            stop=tuple(self.stop),
            seed=self.seed,
        )


class GenerateInputs(BaseModel):
    """What every TGI-style generation body holds; the task comes from `task_id` (/generate) or the URL (/tasks)."""

    model_config = STRICT_BODY

    inputs: str = Field(
        min_length=1, description="The text; filled into the task's prompt_template when it has one (see raw_prompt)."
    )
    parameters: GenerateParameters = Field(default_factory=GenerateParameters)
    raw_prompt: bool = Field(
        default=False, description="Send `inputs` to the model as they are, without the task's prompt_template."
    )


class GenerateRequest(GenerateInputs):
    task_id: str = Field(pattern=TASK_ID_REGEX, description="Which task's prefix to generate with.")


class TaskGenerateRequest(GenerateInputs):
    """TGI's `POST /` body: `stream` picks the JSON of /generate or the events of /generate_stream."""

    stream: bool = Field(default=False, description="true: server-sent events, as /generate_stream.")


class GenerateDetails(BaseModel):
    finish_reason: FinishReasonLiteral
    generated_tokens: int
    prompt_tokens: int
    seed: int | None = None


class GeneratedToken(BaseModel):
    id: int
    text: str = Field(description="The text this token added (empty while a character is incomplete).")
    logprob: float | None = Field(default=None, description="Not computed: always null.")
    special: bool


class GenerateTokenDetails(GenerateDetails):
    """`details` when `parameters.details` is true: TGI's per-token fields as well."""

    prefill: list[GeneratedToken] = Field(default_factory=list, description="Always empty (no prompt logprobs).")
    tokens: list[GeneratedToken]


class GenerateResponse(BaseModel):
    generated_text: str
    details: GenerateTokenDetails | GenerateDetails


class StreamToken(BaseModel):
    id: int
    text: str
    special: bool


class StreamEvent(BaseModel):
    token: StreamToken | None
    generated_text: str | None = None
    details: GenerateDetails | None = None


class TaskEndpointInfo(BaseModel):
    """GET /tasks/{task_id}/info: the fields of TGI's /info that apply here, for this task, plus the task's own."""

    model_id: str = Field(description="The base model.")
    model_sha: str | None = None
    model_dtype: str
    model_device_type: str
    model_pipeline_tag: Literal["text-generation", "text2text-generation"]
    max_concurrent_requests: int = Field(description="Requests decoding plus waiting before a 429.")
    max_best_of: int
    max_stop_sequences: int
    max_input_tokens: int = Field(description="Most prompt tokens for this task (the prefix takes context too).")
    max_total_tokens: int = Field(description="Prompt + new tokens for this task: the context less the prefix.")
    max_batch_total_tokens: int = Field(description="The engine's KV budget in tokens.")
    max_batch_size: int
    max_client_batch_size: int
    validation_workers: int
    router: str
    version: str
    sha: str | None = None
    docker_label: str | None = None
    task_id: str
    num_virtual_tokens: int
    prefix_sha256: str
    prompt_template: str | None = None
    description: str | None = None


class TaskHealth(BaseModel):
    status: Literal["ok"]
    task_id: str


class PrefixInfo(BaseModel):
    task_id: str
    num_virtual_tokens: int
    bytes: int
    sha256: str
    created_at: str
    base_model_name_or_path: str | None = None
    prompt_template: str | None = Field(
        default=None, description="Requests are wrapped in this ({inputs} = the request's text) unless raw_prompt."
    )
    description: str | None = None
    source: Literal["adapter", "text"] = Field(
        default="adapter", description="adapter: uploaded PEFT files; text: computed from a text by this server."
    )


class PrefixState(PrefixInfo):
    tier: Literal["device", "host", "disk"] = Field(description="Where the prefix's KV lives now.")


class PrefixUploadResponse(PrefixInfo):
    warnings: list[str] = Field(default_factory=list)


class PrefixList(BaseModel):
    prefixes: list[PrefixState] = Field(description="One page, in task-id order.")
    next_cursor: str | None = Field(
        default=None, description="Pass as `cursor` for the next page; null on the last page."
    )


class BulkTaskResult(BaseModel):
    task_id: str
    status: Literal["created", "replaced", "error"]
    error: str | None = Field(default=None, description="Why the task was not stored (status error).")
    type: str | None = Field(default=None, description="The error's code, as a single upload's error `type`.")
    status_code: int | None = Field(default=None, description="The status a single upload would have answered.")
    sha256: str | None = None
    num_virtual_tokens: int | None = None


class BulkImportResponse(BaseModel):
    created: int
    replaced: int
    errors: int
    results: list[BulkTaskResult] = Field(description="One per task folder of the archive, in task-id order.")


class HealthResponse(BaseModel):
    status: Literal["ok"]
    model: str
    device: str
    dtype: str
    prefixes: int


class ErrorResponse(BaseModel):
    error: str
    type: str
