"""Training data: JSONL files of `{"prompt", "completion"}` or `{"text", "label"}` records, checked line by line.

A `{"text", "label"}` record becomes a prompt through a template (default `Text : {text} Label :`, in the style of
the PEFT twitter_complaints example). When the filled-in prompt ends in a word, the label is learnt with a leading
space (" positive"), the way the tokenizer sees a word that follows another; when the template ends in whitespace the
label is learnt as written. Either way the client sends the filled-in template, verbatim, as `inputs`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.prefix_format import json_type
from service.training.errors import DataError

logger = logging.getLogger(__name__)

DEFAULT_TEMPLATE = "Text : {text} Label :"
TEXT_PLACEHOLDER = "{text}"
_MAX_REPORTED_PROBLEMS = 20


@dataclass(frozen=True)
class Example:
    prompt: str  # exactly what a client sends as `inputs`
    completion: str  # what the model should generate (compared with surrounding whitespace stripped)
    line: int = 0  # 1-based line in the source file; 0 when built in memory
    templated: bool = False  # built from a {"text", "label"} record through the template

    @property
    def answer(self) -> str:
        """The completion as exact-match compares it."""
        return self.completion.strip()


def validate_template(template: str) -> str:
    if TEXT_PLACEHOLDER not in template:
        raise DataError(f"template {template!r} must contain {TEXT_PLACEHOLDER}")
    return template


def serving_template(template: str) -> str:
    """The training template as a served task's prompt_template: `{text}` becomes the `{inputs}` slot."""
    return template.replace(TEXT_PLACEHOLDER, "{inputs}", 1)


def apply_template(template: str, text: str, label: str) -> Example:
    """The (prompt, completion) pair a `{"text", "label"}` record stands for."""
    # str.replace, not str.format: texts and templates may contain other braces.
    prompt = template.replace(TEXT_PLACEHOLDER, text)
    completion = label if prompt[-1:].isspace() else " " + label
    return Example(prompt=prompt, completion=completion)


def load_examples(path: Path | str, template: str = DEFAULT_TEMPLATE) -> list[Example]:
    """Read a JSONL file; raise DataError listing each bad line by number (blank lines are skipped)."""
    path = Path(path)
    validate_template(template)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, expected a JSONL file") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror or exc}") from None

    examples: list[Example] = []
    problems: list[str] = []
    lines = raw.split(b"\n")
    for number, line_bytes in enumerate(lines, start=1):
        if not line_bytes.strip():
            continue
        try:
            # utf-8-sig on the first line only: tolerate the BOM some editors write.
            line = line_bytes.decode("utf-8-sig" if number == 1 else "utf-8")
            examples.append(_parse_record(line, number, template))
        except UnicodeDecodeError as exc:
            problems.append(f"line {number}: not UTF-8 text ({exc.reason} at byte {exc.start})")
        except _LineError as exc:
            problems.append(f"line {number}: {exc}")
        if len(problems) >= _MAX_REPORTED_PROBLEMS:
            problems.append("... (stopped after the first errors)")
            break

    if problems:
        raise DataError(f"{path}: {_count(problems)} bad line(s):\n  " + "\n  ".join(problems))
    if not examples:
        what = "the file is empty" if not raw else "it has only blank lines"
        raise DataError(f"{path}: no examples ({what}); expected one JSON object per line")
    logger.info("read %d examples from %s", len(examples), path)
    return examples


def write_examples(path: Path | str, records: Iterable[dict[str, Any]]) -> int:
    """Write records as JSONL (UTF-8, one object per line); return how many."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with path.open("w", encoding="utf-8") as out:
        for record in records:
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
            count += 1
    return count


class _LineError(Exception):
    pass


_FORMATS = 'expected {"prompt": ..., "completion": ...} or {"text": ..., "label": ...}'


def _parse_record(line: str, number: int, template: str) -> Example:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise _LineError(f"invalid JSON ({exc.msg} at column {exc.colno})") from None
    except (RecursionError, ValueError) as exc:
        raise _LineError(f"invalid JSON ({str(exc)[:100] or type(exc).__name__})") from None
    if not isinstance(record, dict):
        raise _LineError(f"{_FORMATS}, got a JSON {json_type(record)}")

    if "prompt" in record or "completion" in record:
        prompt = _string_field(record, "prompt")
        completion = _string_field(record, "completion")
        if not completion.strip():
            raise _LineError('"completion" is blank; there would be nothing to learn')
        return Example(prompt=prompt, completion=completion, line=number)
    if "text" in record or "label" in record:
        text = _string_field(record, "text")
        label = record.get("label")
        # Integer class ids are common in classification data; they are learnt as their decimal text.
        if isinstance(label, int) and not isinstance(label, bool):
            label = str(label)
        elif label is None:
            raise _LineError(f'missing field "label" ({_FORMATS})')
        elif not isinstance(label, str):
            raise _LineError(f'"label" must be a string or an integer, got a JSON {json_type(label)}')
        if not label.strip():
            raise _LineError('"label" is blank')
        example = apply_template(template, text, label.strip())
        return Example(prompt=example.prompt, completion=example.completion, line=number, templated=True)
    keys = sorted(record)[:10]
    raise _LineError(f"{_FORMATS}, got keys {keys}")


def _string_field(record: dict[str, Any], name: str) -> str:
    if name not in record or record[name] is None:
        raise _LineError(f'missing field "{name}" ({_FORMATS})')
    value = record[name]
    if not isinstance(value, str):
        raise _LineError(f'"{name}" must be a string, got a JSON {json_type(value)}')
    if name in ("prompt", "text") and not value.strip():
        raise _LineError(f'"{name}" is blank')
    return value


def _count(problems: list[str]) -> str:
    real = [p for p in problems if p.startswith("line ")]
    return f"{len(real)}{'+' if len(real) < len(problems) else ''}"
