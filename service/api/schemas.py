"""Pydantic request/response schemas of the HTTP API (TGI-style /generate, PEFT-native /prefixes)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from service.requests import SamplingParams

TASK_ID_REGEX = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"

StopSequence = Annotated[str, Field(min_length=1)]

FinishReasonLiteral = Literal["length", "eos_token", "stop_sequence", "cancelled"]


# Request bodies are validated strictly: `true` is not an integer, "yes" is not a boolean, "3" is not a number (lax
# coercion silently turned `max_new_tokens: true` into 1), and NaN/Infinity are not numbers at all.
STRICT_BODY = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class GenerateParameters(BaseModel):
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
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=100.0)
    stop: list[StopSequence] = Field(
        default_factory=list, description="Stop when any of these is generated (count and length are limited)."
    )
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)

    @property
    def samples(self) -> bool:
        """TGI's rule: a sampling parameter only makes sense when sampling, so giving one turns sampling on (greedy
        decoding would ignore it silently, and `details.seed` would be null)."""
        return self.do_sample or any(v is not None for v in (self.temperature, self.top_k, self.top_p, self.seed))

    def to_sampling(self, default_max_new_tokens: int) -> SamplingParams:
        return SamplingParams(
            max_new_tokens=self.max_new_tokens or default_max_new_tokens,
            do_sample=self.samples,
            temperature=self.temperature if self.temperature is not None else 1.0,
            top_k=self.top_k,
            top_p=self.top_p,
            repetition_penalty=self.repetition_penalty,
            stop=tuple(self.stop),
            seed=self.seed,
        )


class GenerateRequest(BaseModel):
    model_config = STRICT_BODY

    task_id: str = Field(pattern=TASK_ID_REGEX, description="Which task's prefix to generate with.")
    inputs: str = Field(
        min_length=1, description="The text; filled into the task's prompt_template when it has one (see raw_prompt)."
    )
    parameters: GenerateParameters = Field(default_factory=GenerateParameters)
    raw_prompt: bool = Field(
        default=False, description="Send `inputs` to the model as they are, without the task's prompt_template."
    )


class GenerateDetails(BaseModel):
    finish_reason: FinishReasonLiteral
    generated_tokens: int
    prompt_tokens: int
    seed: int | None = None


class GenerateResponse(BaseModel):
    generated_text: str
    details: GenerateDetails


class StreamToken(BaseModel):
    id: int
    text: str
    special: bool


class StreamEvent(BaseModel):
    token: StreamToken | None
    generated_text: str | None = None
    details: GenerateDetails | None = None


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
    prefixes: list[PrefixState]


class HealthResponse(BaseModel):
    status: Literal["ok"]
    model: str
    device: str
    dtype: str
    prefixes: int


class ErrorResponse(BaseModel):
    error: str
    type: str
