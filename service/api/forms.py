"""The upload form (POST /prefixes), parsed by rules of its own before FastAPI sees it.

Starlette's parsers decode a form field that is not UTF-8 as Latin-1 (mojibake the client never sent), and answer a
field over their 1 MiB part limit with a bare parse error. Here, as the body streams in:
  - the text fields (`TEXT_FIELDS`) must be UTF-8, else a 422 naming the field and the byte offset
    (`service.prefix_format.decode_utf8`, the rule adapter_config.json follows too);
  - each text field has a byte bound, and a field past it is a 413 naming its limit, the moment the bound is passed
    (a text: more UTF-8 bytes than `max_text_task_tokens` x the longest token's characters x 4 cannot fit);
  - a `text` sent as a file part (`curl -F text=@prompt.txt`) is read like the field.
The parsed form is left where FastAPI's own `request.form()` finds it, so the route's parameters come from it.
"""

from __future__ import annotations

from contextlib import aclosing
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import unquote_plus, unquote_to_bytes

from starlette.datastructures import FormData, Headers
from starlette.exceptions import HTTPException
from starlette.formparsers import FormParser, MultiPartException, MultiPartParser
from starlette.requests import Request

from service.errors import PayloadTooLargeError
from service.prefix_format import decode_utf8

if TYPE_CHECKING:
    from service.api.state import ServiceState

# Fields that are text, read into memory and decoded by the UTF-8 rule; adapter_config and adapter_model are files.
TEXT_FIELDS = frozenset({"task_id", "replace", "text", "prompt_template", "description"})
DEFAULT_FIELD_BYTES = 1024 * 1024  # Starlette's part limit, kept for the short fields
UTF8_MAX_BYTES_PER_CHAR = 4
PERCENT_ENCODED_BYTES_PER_BYTE = 3  # urlencoded: a byte is at most "%XX"


@dataclass(frozen=True)
class UploadFormLimits:
    """Byte bounds of the upload form's text fields (as UTF-8, before any percent-encoding)."""

    text_tokens: int  # max_text_task_tokens
    chars_per_token: int  # the prompts' bound: the tokenizer's longest vocabulary entry (service.inputs)

    @classmethod
    def of(cls, state: ServiceState) -> UploadFormLimits:
        return cls(text_tokens=state.settings.max_text_task_tokens, chars_per_token=state.inputs.chars_per_token)

    @property
    def text_chars(self) -> int:
        return self.text_tokens * self.chars_per_token

    def field_bytes(self, name: str) -> int:
        if name == "text":  # any longer text has more characters than a text task can hold: certainly refused
            return self.text_chars * UTF8_MAX_BYTES_PER_CHAR
        return DEFAULT_FIELD_BYTES

    def too_large(self, name: str) -> PayloadTooLargeError:
        limit = self.field_bytes(name)
        if name == "text":
            message = (
                f"text: more than {limit} bytes; a task made from text holds at most {self.text_tokens} tokens "
                f"(max_text_task_tokens), and one token stands for at most {self.chars_per_token} characters, so at "
                f"most {self.text_chars} characters ({limit} bytes of UTF-8) are accepted"
            )
        else:
            message = f"{name[:64]}: more than {limit} bytes, the limit of this form field"
        return PayloadTooLargeError(message, field=name[:64], limit=limit)


class _UploadMultiPartParser(MultiPartParser):
    """multipart/form-data with the rules above. Hooks Starlette's parser callbacks (starlette 1.x, pinned by the
    lock files)."""

    def __init__(self, headers: Headers, limits: UploadFormLimits, stream: object) -> None:
        # Starlette's own part check must never fire before ours, which names the field and its limit.
        largest = max(DEFAULT_FIELD_BYTES, limits.field_bytes("text"))
        super().__init__(headers, stream, max_part_size=largest)  # type: ignore[arg-type]
        self.limits = limits

    def on_headers_finished(self) -> None:
        super().on_headers_finished()
        part = self._current_part
        if part.file is not None and part.field_name == "text":  # a text file part: read it as the field
            part.file.file.close()
            self._files_to_close_on_error.pop()
            part.file = None

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        part = self._current_part
        if part.file is None and len(part.data) + (end - start) > self.limits.field_bytes(part.field_name):
            raise self.limits.too_large(part.field_name)
        super().on_part_data(data, start, end)

    def on_part_end(self) -> None:
        part = self._current_part
        if part.file is None and part.field_name in TEXT_FIELDS:
            self.items.append((part.field_name, decode_utf8(bytes(part.data), part.field_name)))
        else:  # a file, or a field the route refuses by name anyway
            super().on_part_end()


class _UploadUrlencodedParser(FormParser):
    """application/x-www-form-urlencoded (a text task without files) with the same rules, on the decoded bytes."""

    def __init__(self, headers: Headers, limits: UploadFormLimits, stream: object) -> None:
        super().__init__(headers, stream)  # type: ignore[arg-type]
        self.limits = limits

    def _name(self) -> str:
        return unquote_plus(self._field_name.decode("latin-1"))

    def on_field_data(self, data: bytes, start: int, end: int) -> None:
        name = self._name()  # the name precedes the value in the stream
        if len(self._field_value) + (end - start) > self.limits.field_bytes(name) * PERCENT_ENCODED_BYTES_PER_BYTE:
            raise self.limits.too_large(name)
        self._field_value += data[start:end]

    def on_field_end(self) -> None:
        self._current_fields += 1
        if self._current_fields > self.max_fields:
            raise MultiPartException(f"Too many fields. Maximum number of fields is {self.max_fields}.")
        name = self._name()
        if name in TEXT_FIELDS:
            value = decode_utf8(unquote_to_bytes(bytes(self._field_value).replace(b"+", b" ")), name)
        else:  # a field the route refuses by name: Starlette's own decoding
            value = unquote_plus(self._field_value.decode("latin-1"))
        self._items.append((name, value))


async def parse_upload_form(request: Request, limits: UploadFormLimits) -> FormData:
    """Parse the request's form by the upload's rules and cache it where `request.form()` returns it. A malformed
    body is Starlette's 400, which the app answers as a 422 saying the form could not be parsed."""
    media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    try:
        async with aclosing(request.stream()) as stream:
            if media == "multipart/form-data":
                form = await _UploadMultiPartParser(request.headers, limits, stream).parse()
            else:
                form = await _UploadUrlencodedParser(request.headers, limits, stream).parse()
    except MultiPartException as exc:
        raise HTTPException(status_code=400, detail=exc.message) from None
    request._form = form  # what Request.form() returns from now on (FastAPI's body reader included)
    return form
