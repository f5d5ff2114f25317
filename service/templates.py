"""Task prompt templates: the wrapping a task was trained with, stored beside its prefix and applied per request.

A template is a string with exactly one `{inputs}` slot, e.g. `Review : {inputs} Sentiment :`. The routes fill it with
the request's text (`/generate` and `/generate_stream`: `inputs`; `/v1/completions`: `prompt`; `/v1/chat/completions`:
the last user message, instead of the model's chat template) unless the request sets `raw_prompt: true`. Only the
literal `{inputs}` is special: other braces in a template or in the inputs are kept as they are.
"""

from __future__ import annotations

from service.errors import InvalidPrefixError

INPUTS_SLOT = "{inputs}"


def validate_template(template: str | None, *, max_chars: int, field: str = "prompt_template") -> str | None:
    """Return the template (None or "" = no template -> None) or raise a 422 naming the problem."""
    if template is None or template == "":
        return None
    if not isinstance(template, str):
        raise InvalidPrefixError(field, f"a string with one {INPUTS_SLOT}", type(template).__name__)
    _check_text(template, field, max_chars)
    count = template.count(INPUTS_SLOT)
    if count != 1:
        raise InvalidPrefixError(
            field, f"exactly one {INPUTS_SLOT} slot", f"{count}",
            message=f"{field}: must contain exactly one {INPUTS_SLOT} slot (where the request's text goes), "
            f"found {count}",
        )  # fmt: skip
    return template


def validate_description(description: str | None, *, max_chars: int, field: str = "description") -> str | None:
    """Return the description (None or blank -> None) or raise a 422."""
    if description is None or not description.strip():
        return None
    _check_text(description, field, max_chars)
    return description.strip()


def _check_text(value: str, field: str, max_chars: int) -> None:
    """A 422 when a stored text field is too long or holds a NUL character."""
    if len(value) > max_chars:
        raise InvalidPrefixError(
            field, f"at most {max_chars} characters", f"{len(value)} characters",
            message=f"{field}: at most {max_chars} characters, got {len(value)}",
        )  # fmt: skip
    refuse_nul(value, field)


def refuse_nul(value: str, field: str) -> None:
    """The one NUL rule for every text a task stores (its text, template and description): refused with a 422 naming
    the field and the character offset. NUL is no instruction, and C-string consumers (logs, terminals, tools that
    read task.json) truncate at it."""
    offset = value.find("\x00")
    if offset >= 0:
        raise InvalidPrefixError(
            field, "text without NUL characters", f"a NUL character at offset {offset}",
            message=f"{field}: a NUL character at offset {offset}; the text, prompt_template and description may not "
            "contain NUL",
        )  # fmt: skip


def render(template: str | None, inputs: str, *, raw: bool = False) -> str:
    """The prompt for `inputs`: the template with its slot filled, or `inputs` unchanged when the task has no
    template or the request asked for the raw prompt."""
    if template is None or raw:
        return inputs
    return template.replace(INPUTS_SLOT, inputs, 1)
