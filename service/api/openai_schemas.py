"""Pydantic schemas of the OpenAI-compatible API (/v1/models, /v1/completions, /v1/chat/completions).

Requests follow OpenAI's field names and types so the official clients work unchanged. Parameters the service does
not implement are still declared (so a client that sends their neutral value, e.g. `presence_penalty: 0`, works);
the route rejects a non-neutral value with a 422 that names it instead of silently ignoring it. Anything not declared
here is rejected by `extra="forbid"` (422 naming the field). Two vLLM-style extensions are accepted (send them with
the client's `extra_body`): `top_k` and `repetition_penalty`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from service.api.schemas import STRICT_BODY, StopSequence

OpenAIFinishReason = Literal["stop", "length"]


class StreamOptions(BaseModel):
    model_config = STRICT_BODY

    include_usage: bool = Field(default=False, description="Send a last chunk (empty `choices`) carrying `usage`.")


class SamplingFields(BaseModel):
    """What /v1/completions and /v1/chat/completions share."""

    model_config = STRICT_BODY

    model: str = Field(
        min_length=1, max_length=256, description="A task id (GET /v1/models lists them) or the base model's name."
    )
    max_tokens: int | None = Field(default=None, ge=1, description="Defaults to the server's default_max_new_tokens.")
    temperature: float | None = Field(
        default=None, ge=0.0, le=2.0, description="0 = greedy. Absent = 1.0 (OpenAI's default): sampling."
    )
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: int | None = Field(default=None, description="Only 1 is supported.")
    stop: StopSequence | list[StopSequence] | None = Field(
        default=None, description="Up to 16 sequences; generation ends before the first one, which is not returned."
    )
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0, description="Only 0 is supported.")
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0, description="Only 0 is supported.")
    logit_bias: dict[str, float] | None = Field(default=None, description="Only an empty map is supported.")
    user: str | None = Field(default=None, description="Accepted and ignored (an end-user identifier).")
    # Extensions (vLLM/TGI): send via the client's `extra_body`.
    top_k: int | None = Field(default=None, ge=1, description="Extension: sample from the k likeliest tokens.")
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=100.0, description="Extension (TGI/vLLM).")
    raw_prompt: bool = Field(
        default=False,
        description="Extension: ignore the task's prompt_template (completions: send the prompt as is; chat: format "
        "the messages with the model's chat template).",
    )

    def stop_sequences(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class CompletionRequest(SamplingFields):
    prompt: str | list[str] = Field(description="One prompt (a list must hold exactly one string).")
    echo: bool | None = Field(default=None, description="Only false is supported.")
    logprobs: int | None = Field(default=None, description="Not supported: omit it.")
    best_of: int | None = Field(default=None, description="Only 1 is supported.")
    suffix: str | None = Field(default=None, description="Not supported: omit it.")


class TextContentPart(BaseModel):
    model_config = STRICT_BODY

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = STRICT_BODY

    role: str = Field(min_length=1, max_length=64, description="system, user, assistant... as the chat template knows.")
    content: str | list[TextContentPart] | None = None
    name: str | None = Field(
        default=None, description="Not supported (the chat template would drop it): a non-null name is a 422."
    )

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1, description="Newer name for max_tokens.")
    logprobs: bool | None = Field(default=None, description="Only false is supported.")
    top_logprobs: int | None = Field(default=None, description="Not supported: omit it.")
    tools: list[dict[str, Any]] | None = Field(default=None, description="Not supported: omit it.")
    tool_choice: str | dict[str, Any] | None = Field(default=None, description="Only 'none' is supported.")
    response_format: dict[str, Any] | None = Field(default=None, description="Only {'type': 'text'} is supported.")


class Usage(BaseModel):
    prompt_tokens: int = Field(description="Prompt tokens, without the task prefix's virtual tokens.")
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: OpenAIFinishReason | None
    logprobs: None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: OpenAIFinishReason
    logprobs: None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: dict[str, str] = Field(
        description='{"role": "assistant", "content": ""} first, then {"content": ...}, last {}.'
    )
    finish_reason: OpenAIFinishReason | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "prefix-serve"
    parent: str | None = Field(description="The base model for a task; null for the base model itself.")
    root: str
    prompt_template: str | None = Field(default=None, description="Extension: the task's template ({inputs} slot).")
    description: str | None = Field(default=None, description="Extension: the task's description.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard] = Field(description="One page: the base model first (on the first page), then tasks by id.")
    first_id: str | None = Field(default=None, description="The page's first id (null when the page is empty).")
    last_id: str | None = Field(default=None, description="The page's last id: pass it as `after` for the next page.")
    has_more: bool = Field(default=False, description="Whether ids follow last_id.")
