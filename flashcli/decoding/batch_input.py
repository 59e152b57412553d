"""`generate --batch` input: one prompt per line, or JSON Lines of
{"id": ..., "prompt": ..., and optionally "max_tokens", "temperature", "top_k", "top_p", "seed",
"chat"}. The file is JSON Lines when its first non-blank line starts with "{".

A line that cannot run (not UTF-8, malformed JSON, no prompt, an empty one, an option of the
wrong type) becomes a Line with an `error`, in its place: it never stops the others.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

OPTIONS = {  # per-prompt option -> (check, what it must be)
    "max_tokens": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "temperature": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
    "top_k": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "top_p": (lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1]"),
    "seed": (lambda v: _is_int(v), "an integer"),
    "chat": (lambda v: isinstance(v, bool), "true or false"),
}


@dataclass
class Line:
    index: int  # 0-based place in the input
    id: object  # the line's "id", else its line number (1-based)
    prompt: str | None = None
    options: dict = field(default_factory=dict)
    error: str | None = None

    def error_object(self) -> dict:
        return {"id": self.id, "error": self.error}


def parse(data: bytes) -> list[Line]:
    """The lines of a --batch input, in order (a last newline ends the last line)."""
    raw = data.split(b"\n")
    if raw and raw[-1] == b"":
        raw.pop()
    first = next((b.strip() for b in raw if b.strip()), b"")
    json_lines = first.startswith(b"{")
    lines = []
    for index, b in enumerate(raw):
        number = index + 1
        try:
            text = b.rstrip(b"\r").decode("utf-8")
        except UnicodeDecodeError as e:
            lines.append(Line(index, number, error=f"line {number}: not UTF-8 text (byte {e.start})"))
            continue
        lines.append(_json_line(index, number, text) if json_lines else _text_line(index, number, text))
    return lines


def _text_line(index: int, number: int, text: str) -> Line:
    if not text.strip():
        return Line(index, number, error=f"line {number}: empty prompt")
    return Line(index, number, text)


def _json_line(index: int, number: int, text: str) -> Line:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        return Line(index, number, error=f"line {number}: malformed JSON ({e.msg}, column {e.colno})")
    if not isinstance(obj, dict):
        return Line(index, number, error=f"line {number}: not a JSON object")
    line = Line(index, obj.get("id", number))
    unknown = sorted(set(obj) - set(OPTIONS) - {"id", "prompt"})
    prompt = obj.get("prompt")
    if unknown:
        line.error = f"line {number}: unknown field {unknown[0]!r} (known: id, prompt, {', '.join(OPTIONS)})"
    elif not isinstance(prompt, str):
        line.error = f'line {number}: no "prompt" string'
    elif not prompt.strip():
        line.error = f"line {number}: empty prompt"
    else:
        for name, value in obj.items():
            if name in OPTIONS and not OPTIONS[name][0](value):
                line.error = f'line {number}: "{name}" must be {OPTIONS[name][1]}, not {json.dumps(value)}'
                break
    if line.error is None:
        line.prompt = prompt
        line.options = {k: v for k, v in obj.items() if k in OPTIONS}
    return line


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)
