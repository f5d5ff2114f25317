"""One input path for every route (TGI /generate and /generate_stream, OpenAI /v1/completions and
/v1/chat/completions), in the single process and on the Ray Serve ingress: bytes → JSON → a checked
`GenerationRequest`.

Order matters, because every step costs more than the one before:
  1. cheap checks on what the client sent, before any tokenization: the parameter limits, and a bound on the prompt's
     characters (a prompt longer than `max_prompt_tokens` × the most characters one token can stand for cannot fit,
     whatever it tokenizes to; a task's prompt template adds its own characters, which count too);
  2. the prefix lookup (`registry.lookup` may reload a prefix from disk under the registry lock; it returns the
     task's prompt template of the same version), filling the task's template (service/templates.py), and
     tokenization (or chat-template rendering) in a small thread pool, never on the event loop;
  3. the limits that need token counts: prompt tokens, and prompt + prefix + new tokens against the model's context
     (encoder-decoder models: the prompt against the encoder's positions, prefix + start + new tokens against the
     decoder's).

Nothing here depends on FastAPI: errors are `ServiceError`s that each front end renders in its own shape.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from transformers import PreTrainedTokenizerBase

from service import templates
from service.errors import InvalidRequestError, ModelNotFoundError, RequestTooLongError, TaskNotFoundError
from service.model_loader import LoadedModel
from service.prefix import TaskPrefix
from service.registry import PrefixRegistry, validate_task_id
from service.requests import GenerationRequest, SamplingParams
from service.settings import Settings

logger = logging.getLogger(__name__)

# Python's json module recurses once per nesting level (so do json.dumps and other walks of a parsed value): well below
# the interpreter's recursion limit, and far beyond what a real request needs (a chat content part is 5 levels deep).
MAX_JSON_DEPTH = 64


@dataclass(frozen=True)
class FieldNames:
    """How the client's API names the prompt and the new-token count, so that errors use the client's words."""

    prompt: str = "inputs"
    max_tokens: str = "max_new_tokens"


TGI_FIELDS = FieldNames("inputs", "max_new_tokens")


@dataclass(frozen=True)
class ChatTurn:
    role: str
    content: str


# ------------------------------------------------------------------------------------------------ JSON bodies


def parse_json_body(raw: bytes) -> Any:
    """Parse a request body as JSON; every failure is a 422 that says what is wrong in the client's terms (the JSON
    parser's own messages, or an interpreter limit, would otherwise surface as "error parsing the body")."""
    if not raw.strip():
        raise InvalidRequestError("body: empty; expected a JSON object", field="body")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequestError(
            f"body: not valid UTF-8 ({exc.reason} at byte {exc.start}); JSON bodies must be UTF-8 encoded",
            field="body",
        ) from None
    # Before parsing: deep nesting makes the recursive parser (and any later recursive walk, e.g. json.dumps of an
    # echoed parameter) exhaust the interpreter's stack.
    if nesting_depth(raw) > MAX_JSON_DEPTH:
        raise InvalidRequestError(
            f"body: JSON nested more than {MAX_JSON_DEPTH} levels deep (arrays/objects inside each other); "
            f"at most {MAX_JSON_DEPTH} levels are accepted",
            field="body", limit=MAX_JSON_DEPTH,
        )
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidRequestError(
            f"body: invalid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}", field="body"
        ) from None
    except RecursionError:  # unreachable after the depth check; kept so no parser limit can become a 500
        raise InvalidRequestError("body: JSON nested too deeply", field="body") from None
    except ValueError as exc:  # an integer literal over Python's int-conversion digit limit (4300)
        raise InvalidRequestError(
            f"body: a number in the JSON is too long to parse ({str(exc).split(';')[0]})", field="body"
        ) from None


# A JSON string literal; possessive quantifiers keep the match linear whatever the input.
_JSON_STRING = re.compile(rb'"(?:[^"\\]++|\\.)*+"')
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def nesting_depth(raw: bytes) -> int:
    """How deep `[`/`{` nest outside string literals, at C speed (regex, translate, numpy): an 8 MiB body of
    brackets takes milliseconds, where walking the parsed value in Python took seconds."""
    if raw.count(b"[") + raw.count(b"{") <= MAX_JSON_DEPTH:
        return 0  # too few brackets to exceed the limit: the common case, decided by two C-level counts
    brackets = _JSON_STRING.sub(b"", raw).translate(None, _NOT_BRACKETS)
    if not brackets:
        return 0
    codes = np.frombuffer(brackets, dtype=np.uint8)
    steps = np.where((codes == ord("[")) | (codes == ord("{")), 1, -1)
    return int(np.cumsum(steps, dtype=np.int64).max())


# ------------------------------------------------------------------------------------------------ the processor


class InputProcessor:
    """Builds engine requests for every front end. Thread-safe; one per served model."""

    def __init__(self, settings: Settings, model: LoadedModel, registry: PrefixRegistry) -> None:
        self.settings = settings
        self.model = model
        self.registry = registry
        self.tokenizer: PreTrainedTokenizerBase = model.tokenizer
        self.chars_per_token = settings.max_prompt_chars_per_token or longest_token_chars(self.tokenizer)
        self._special_tokens = special_token_strings(self.tokenizer)
        self._literal_tokenizer = literal_tokenizer(self.tokenizer)
        # A small dedicated pool: tokenizing a prompt at the character bound takes ~0.5 s of CPU here, and a burst of
        # them must queue rather than take every core from the engine.
        self._pool = ThreadPoolExecutor(max_workers=settings.input_threads, thread_name_prefix="prefix-serve-inputs")

    @property
    def max_prompt_chars(self) -> int:
        """Prompts with more characters than this cannot fit `max_prompt_tokens` (rejected before tokenizing)."""
        return self.settings.max_prompt_tokens * self.chars_per_token

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ---------------------------------------------------------------- entry points

    async def text_request(
        self,
        target: str,
        prompt: str,
        params: SamplingParams,
        *,
        fields: FieldNames = TGI_FIELDS,
        base_model_allowed: bool = False,
        request_id: str = "",
        raw_prompt: bool = False,
    ) -> GenerationRequest:
        """A plain prompt for `target`: a task id, or (OpenAI routes, `base_model_allowed`) the base model's name.
        The task's prompt template, if any, is filled with `prompt` unless `raw_prompt`."""
        self.check_params(params, fields)
        template = None if raw_prompt else self._peek_template(target)
        self._check_chars(templated_chars(template, len(prompt)), fields.prompt)
        self._check_target(target, base_model_allowed)
        return await self._off_loop(
            self._build_text, target, prompt, params, fields, base_model_allowed, request_id, raw_prompt
        )

    async def chat_request(
        self,
        target: str,
        turns: Sequence[ChatTurn],
        params: SamplingParams,
        *,
        fields: FieldNames,
        request_id: str = "",
        raw_prompt: bool = False,
    ) -> GenerationRequest:
        """Chat messages for `target` (a task id or the base model's name): rendered with the model's chat template,
        or, for a task with a prompt template (unless `raw_prompt`), that template filled with the last user
        message."""
        self.check_params(params, fields)
        turns = list(turns)
        template = None if raw_prompt else self._peek_template(target)
        self._check_chat_chars(target, turns, template, fields)
        self._check_target(target, base_model_allowed=True)
        return await self._off_loop(self._build_chat, target, turns, params, fields, request_id, raw_prompt)

    # ---------------------------------------------------------------- cheap checks (event loop)

    def check_params(self, params: SamplingParams, fields: FieldNames) -> None:
        settings = self.settings
        if params.max_new_tokens > settings.max_new_tokens_limit:
            raise InvalidRequestError(
                f"{fields.max_tokens}: at most {settings.max_new_tokens_limit}, got {params.max_new_tokens}",
                field=fields.max_tokens, limit=settings.max_new_tokens_limit,
            )
        if len(params.stop) > settings.max_stop_sequences:
            raise InvalidRequestError(
                f"stop: at most {settings.max_stop_sequences} stop sequences, got {len(params.stop)}",
                field="stop", limit=settings.max_stop_sequences,
            )
        too_long = [s for s in params.stop if len(s) > settings.max_stop_sequence_chars]
        if too_long:
            raise InvalidRequestError(
                f"stop: each stop sequence may have at most {settings.max_stop_sequence_chars} characters, "
                f"got one of {len(too_long[0])}",
                field="stop", limit=settings.max_stop_sequence_chars,
            )

    def _check_chat_chars(self, target: str, turns: list[ChatTurn], template: str | None, fields: FieldNames) -> None:
        """The character bound of what will be tokenized: the filled template, or every turn in the chat template
        (which the model must have)."""
        if template is not None:
            self._check_chars(templated_chars(template, len(last_user_message(target, turns))), fields.prompt)
            return
        if not getattr(self.tokenizer, "chat_template", None):
            raise InvalidRequestError(
                f"the base model '{self.model.name}' has no chat template, so /v1/chat/completions cannot format "
                "messages; use /v1/completions with a prompt you format yourself",
                field="messages",
            )
        self._check_chars(sum(len(t.content) + len(t.role) for t in turns), fields.prompt)

    def _peek_template(self, target: str) -> str | None:
        """The task's prompt template now (lock-free), for the cheap checks; the pool takes the one of the version it
        generates with from `registry.lookup`."""
        if target not in self.registry:
            return None
        try:
            return self.registry.record(target).prompt_template
        except TaskNotFoundError:  # deleted since: the target check answers it
            return None

    def _check_chars(self, chars: int, field: str) -> None:
        if chars > self.max_prompt_chars:
            raise InvalidRequestError(
                f"{field}: {chars} characters cannot fit the limit of {self.settings.max_prompt_tokens} prompt tokens "
                f"(one token stands for at most {self.chars_per_token} characters, so at most {self.max_prompt_chars} "
                "characters are accepted)",
                field=field, limit=self.max_prompt_chars,
            )

    def _check_target(self, target: str, base_model_allowed: bool) -> None:
        """Fail fast (lock-free) on an unknown task, before paying for tokenization. A task deleted after this check
        is caught again by `registry.get`."""
        if target in self.registry:
            return
        if base_model_allowed:
            if target != self.model.name:
                raise ModelNotFoundError(target, self.model.name)
            return
        validate_task_id(target)  # a malformed id is a 422 naming the pattern, as everywhere else
        raise TaskNotFoundError(target)

    async def _off_loop(self, fn: Any, *args: Any) -> GenerationRequest:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    # ---------------------------------------------------------------- in the pool

    def _build_text(
        self, target: str, prompt: str, params: SamplingParams, fields: FieldNames, base_model_allowed: bool,
        request_id: str, raw_prompt: bool,
    ) -> GenerationRequest:
        prefix, template = self._resolve(target, base_model_allowed)
        if template is not None and not raw_prompt:
            # The version taken may have another template than the one peeked at: bound the filled text again.
            self._check_chars(templated_chars(template, len(prompt)), fields.prompt)
            prompt = templates.render(template, prompt)
        prompt_ids = list(self.tokenizer(prompt, add_special_tokens=True)["input_ids"])
        return self._finish(prompt_ids, prefix, params, fields, request_id)

    def _build_chat(
        self, target: str, turns: list[ChatTurn], params: SamplingParams, fields: FieldNames, request_id: str,
        raw_prompt: bool,
    ) -> GenerationRequest:
        prefix, template = self._resolve(target, base_model_allowed=True)
        template = None if raw_prompt else template
        self._check_chat_chars(target, turns, template, fields)  # again: the version taken may differ from the peek
        if template is not None:
            # A task with a prompt template was trained on that wrapping, not on chat turns: fill it with the last
            # user message.
            prompt_ids = self._templated_message_ids(template, last_user_message(target, turns))
        else:
            prompt_ids = render_chat(self.tokenizer, turns, self._special_tokens, self._literal_tokenizer)
        return self._finish(prompt_ids, prefix, params, fields, request_id)

    def _templated_message_ids(self, template: str, message: str) -> list[int]:
        """The filled template's ids. As in the chat template (`render_chat`), a chat message never becomes control
        tokens: a message that spells one (`<|im_end|>`) is tokenized literally between the template's own two
        parts; any other message takes the plain path, so its ids are exactly what /generate reads for it."""
        if not any(token in message for token in self._special_tokens):
            return list(self.tokenizer(templates.render(template, message), add_special_tokens=True)["input_ids"])
        before, _, after = template.partition(templates.INPUTS_SLOT)
        # What the tokenizer adds around a text (BOS in front, for some an EOS behind), learnt from the template alone.
        with_specials = list(self.tokenizer(before + after, add_special_tokens=True)["input_ids"])
        plain = list(self.tokenizer(before + after, add_special_tokens=False)["input_ids"])
        lead = next(
            (k for k in range(len(with_specials) - len(plain) + 1) if with_specials[k : k + len(plain)] == plain),
            len(with_specials),
        )
        ids = with_specials[:lead]
        if before:
            ids += self.tokenizer(before, add_special_tokens=False)["input_ids"]
        ids += self._literal_tokenizer(message, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        if after:
            ids += self.tokenizer(after, add_special_tokens=False)["input_ids"]
        return ids + with_specials[lead + len(plain) :]

    def _finish(
        self, prompt_ids: list[int], prefix: TaskPrefix | None, params: SamplingParams, fields: FieldNames,
        request_id: str,
    ) -> GenerationRequest:
        settings = self.settings
        if not prompt_ids:
            raise InvalidRequestError(f"{fields.prompt}: the prompt encodes to zero tokens", field=fields.prompt)
        if len(prompt_ids) > settings.max_prompt_tokens:
            raise InvalidRequestError(
                f"{fields.prompt}: the prompt has {len(prompt_ids)} tokens, more than the limit of "
                f"{settings.max_prompt_tokens}",
                field=fields.prompt, limit=settings.max_prompt_tokens,
            )
        virtual_tokens = prefix.num_virtual_tokens if prefix is not None else 0
        if self.model.geometry.is_encoder_decoder:
            self._check_seq2seq_context(len(prompt_ids), virtual_tokens, params.max_new_tokens, fields)
            return GenerationRequest(prompt_ids=prompt_ids, prefix=prefix, params=params, request_id=request_id)
        total = len(prompt_ids) + virtual_tokens + params.max_new_tokens
        limit = self.model.max_context
        if total > limit:
            raise RequestTooLongError(
                f"{fields.prompt} ({len(prompt_ids)} tokens) + prefix ({virtual_tokens} virtual tokens) + "
                f"{fields.max_tokens} ({params.max_new_tokens}) = {total} exceeds the model's context of {limit} tokens",
                prompt_tokens=len(prompt_ids),
                num_virtual_tokens=virtual_tokens,
                max_new_tokens=params.max_new_tokens,
                max_context=limit,
            )
        return GenerationRequest(prompt_ids=prompt_ids, prefix=prefix, params=params, request_id=request_id)

    def _check_seq2seq_context(
        self, prompt_tokens: int, virtual_tokens: int, max_new_tokens: int, fields: FieldNames
    ) -> None:
        """Encoder and decoder have positions of their own: each side against its own limit, the error naming it.
        The encoder places the prompt (an encoder prefix takes no positions: BART's prompt starts at 0 whatever the
        prefix); the decoder places the prefix, the start token and the new tokens (PEFT: the start token at V)."""
        geometry = self.model.geometry
        if not geometry.bounded_positions:
            return  # T5: relative positions set no limit; max_prompt_tokens, max_new_tokens and the KV budget still do
        limit = geometry.max_positions
        if prompt_tokens > limit:
            raise RequestTooLongError(
                f"encoder: {fields.prompt} ({prompt_tokens} tokens) exceeds the encoder's {limit} positions "
                "(the decoder's positions are separate)",
                side="encoder", prompt_tokens=prompt_tokens, max_context=limit,
            )
        decoder_tokens = virtual_tokens + 1 + max_new_tokens
        if decoder_tokens > limit:
            raise RequestTooLongError(
                f"decoder: prefix ({virtual_tokens} virtual tokens) + decoder start token (1) + {fields.max_tokens} "
                f"({max_new_tokens}) = {decoder_tokens} exceeds the decoder's {limit} positions "
                "(the prompt goes to the encoder, whose positions are separate)",
                side="decoder", num_virtual_tokens=virtual_tokens, max_new_tokens=max_new_tokens, max_context=limit,
            )

    def _resolve(self, target: str, base_model_allowed: bool) -> tuple[TaskPrefix | None, str | None]:
        """The task's prefix now (a later replace or delete won't touch this request) and the prompt template of
        that same version, or (None, None) for the base model. A task shadows a base model of the same name."""
        if base_model_allowed and target not in self.registry:
            if target == self.model.name:
                return None, None
            raise ModelNotFoundError(target, self.model.name)
        prefix, record = self.registry.lookup(target)  # a delete since the check above answers 404 here
        return prefix, record.prompt_template


def templated_chars(template: str | None, inputs_chars: int) -> int:
    """Characters of `template` filled with a text of `inputs_chars` characters (the text alone without one)."""
    if template is None:
        return inputs_chars
    return len(template) - len(templates.INPUTS_SLOT) + inputs_chars


def last_user_message(target: str, turns: Sequence[ChatTurn]) -> str:
    """What a task's prompt template is filled with on the chat route."""
    for turn in reversed(turns):
        if turn.role == "user":
            return turn.content
    raise InvalidRequestError(
        f"messages: task '{target}' has a prompt_template, which is filled with the last user message, but there "
        "is no message with role 'user' (send one, or raw_prompt=true to use the chat template)",
        field="messages",
    )


# ------------------------------------------------------------------------------------------------ tokenizer facts


def longest_token_chars(tokenizer: PreTrainedTokenizerBase) -> int:
    """An upper bound on the characters one token can stand for: the longest vocabulary entry, in characters of its
    stored form. Byte-level BPE stores one character per byte (≥ the characters it decodes to), SentencePiece one
    character per character ("▁" for a space) or `<0xNN>` for a byte, WordPiece adds "##": each over-counts, never
    under-counts, so a prompt rejected by this bound could not have fit."""
    vocab = tokenizer.get_vocab()
    longest = max(1, max((len(piece) for piece in vocab), default=1))
    # Tokenizers that split on whitespace and drop it (word-level, WordPiece) or collapse runs of it (SentencePiece)
    # spend no token on the spaces between words: there a token may stand for its piece plus the whitespace before
    # it. Allow that much; a prompt with longer runs of spaces than this can be refused early on such tokenizers
    # (MAX_PROMPT_CHARS_PER_TOKEN overrides the bound).
    if not tokenizer(" " * WHITESPACE_ALLOWANCE, add_special_tokens=False)["input_ids"]:
        return longest + WHITESPACE_ALLOWANCE
    return longest


WHITESPACE_ALLOWANCE = 64  # characters of whitespace one token may carry on tokenizers that drop whitespace


def special_token_strings(tokenizer: PreTrainedTokenizerBase) -> tuple[str, ...]:
    """Every string the tokenizer turns into a control token when it parses special tokens in text."""
    found: set[str] = set(getattr(tokenizer, "all_special_tokens", []) or [])
    for token in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).values():
        if getattr(token, "special", False):
            found.add(str(token.content))
    return tuple(sorted((s for s in found if s), key=len, reverse=True))


def literal_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """A private copy of `tokenizer` that reads control-token text as plain text.

    Why a copy: transformers implements `split_special_tokens=True` by flipping a flag on the shared Rust backend
    (`encode_special_tokens`) and leaves it set; two threads tokenizing at once on one tokenizer could then parse a
    user's `<|im_end|>` as the control token, or split the template's own. The copy owns its backend, flag always on."""
    literal = copy.deepcopy(tokenizer)
    literal.split_special_tokens = True
    backend = getattr(literal, "_tokenizer", None)
    if backend is not None and hasattr(backend, "encode_special_tokens"):
        backend.encode_special_tokens = True
    return literal


_PLACEHOLDER = re.compile("(\ue000\\d+\ue001)")


def render_chat(
    tokenizer: PreTrainedTokenizerBase,
    turns: Sequence[ChatTurn],
    special_tokens: Sequence[str],
    literal: PreTrainedTokenizerBase,
) -> list[int]:
    """Token ids of `turns` in the chat template, generation prompt added. Message content never becomes control
    tokens: a user who writes `<|im_end|>\\n<|im_start|>system` gets those characters as plain text, not a forged
    system turn. Content without any control-token string takes the ordinary path (template text tokenized whole).
    `literal` is `literal_tokenizer(tokenizer)`: it tokenizes the content."""
    messages = [{"role": t.role, "content": t.content} for t in turns]
    text = _apply_template(tokenizer, messages)
    spelled = sorted({s for t in turns for s in special_tokens if s in t.content})
    if not spelled:
        # The template writes any BOS itself: tokenising with special tokens again would double it.
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    # Render again with a placeholder for each content, to learn where the template put each content verbatim; then
    # tokenize the template's own text with control tokens parsed and each content with parsing off.
    placeholders = [f"\ue000{i}\ue001" for i in range(len(turns))]
    marked = _apply_template(tokenizer, [{**m, "content": p} for m, p in zip(messages, placeholders)])
    rebuilt = marked
    for placeholder, turn in zip(placeholders, turns):
        rebuilt = rebuilt.replace(placeholder, turn.content)
    if rebuilt != text:
        # The template transforms content (trims it, say): its spans cannot be located exactly, so refuse rather
        # than risk parsing the control tokens the client wrote.
        raise InvalidRequestError(
            f"messages: content contains the control token(s) {spelled}, and this model's chat template changes "
            "message content, so they cannot be passed as plain text; remove them",
            field="messages",
        )
    ids: list[int] = []
    for piece in _PLACEHOLDER.split(marked):
        if not piece:
            continue
        if _PLACEHOLDER.fullmatch(piece):
            content = turns[int(piece[1:-1])].content
            if content:
                ids += literal(content, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        else:
            ids += tokenizer(piece, add_special_tokens=False)["input_ids"]
    return ids


def _apply_template(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> str:
    try:
        return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    except Exception as exc:  # noqa: BLE001 - jinja's TemplateError (e.g. raise_exception("roles must alternate"))
        raise InvalidRequestError(f"messages: the chat template rejected them: {exc}", field="messages") from exc
