"""Reading a JSONL training set for ``fastlora train``, with an error that names the line.

One JSON object per line, in one of TRL's formats (the same for every line):

- chat: ``{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", ...}]}``
- prompt/completion: ``{"prompt": "...", "completion": "..."}``, or both as lists of chat
  messages (TRL's conversational prompt/completion; the loss is on the completion only)
- text: ``{"text": "..."}`` (plain language modelling)

Other keys are ignored. Blank lines are skipped.
"""
from __future__ import annotations

import json
import pathlib

from .errors import FastloraError

ROLES = ("system", "user", "assistant", "tool", "developer")
FORMATS = {
    "messages": "chat messages",
    "prompt_completion": "prompt/completion strings",
    "conversational_prompt_completion": "prompt/completion chat messages",
    "text": "text",
}
_KEYS = {"messages": ("messages",), "prompt_completion": ("prompt", "completion"),
         "conversational_prompt_completion": ("prompt", "completion"), "text": ("text",)}
_EXPECTED = ('a "messages" list (chat), "prompt" and "completion" (strings or chat messages), '
             'or a "text" string')


class RowError(ValueError):
    """Why one row is malformed (without the line number, which the caller adds)."""


def _check_messages(messages, field: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise RowError(f'"{field}" must be a non-empty list of {{"role": ..., "content": ...}} '
                       f"objects, found {_short(messages)}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise RowError(f'"{field}"[{i}] must be an object with "role" and "content", found '
                           f"{_short(m)}")
        if m["role"] not in ROLES:
            raise RowError(f'"{field}"[{i}] has role {m["role"]!r}; expected one of '
                           f"{', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise RowError(f'"{field}"[{i}]["content"] must be a string, found '
                           f"{_short(m['content'])}")


def _short(value, limit: int = 60) -> str:
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def row_format(row) -> str:
    """The TRL format of one parsed row; raises ``RowError`` saying what is wrong with it."""
    if not isinstance(row, dict):
        raise RowError(f"expected a JSON object with {_EXPECTED}, found {_short(row)}")
    if "messages" in row:
        _check_messages(row["messages"], "messages")
        if not any(m["role"] == "assistant" for m in row["messages"]):
            raise RowError('"messages" has no "assistant" message, so there is nothing to learn')
        return "messages"
    if "prompt" in row or "completion" in row:
        missing = [k for k in ("prompt", "completion") if k not in row]
        if missing:
            raise RowError(f'has "{"prompt" if missing[0] == "completion" else "completion"}" '
                           f'but no "{missing[0]}"')
        prompt, completion = row["prompt"], row["completion"]
        if isinstance(prompt, str) and isinstance(completion, str):
            if not completion:
                raise RowError('"completion" is empty, so there is nothing to learn')
            return "prompt_completion"
        if isinstance(prompt, list) and isinstance(completion, list):
            _check_messages(prompt, "prompt")
            _check_messages(completion, "completion")
            return "conversational_prompt_completion"
        raise RowError('"prompt" and "completion" must both be strings or both be lists of chat '
                       f"messages, found {type(prompt).__name__} and {type(completion).__name__}")
    if "text" in row:
        if not isinstance(row["text"], str) or not row["text"]:
            raise RowError(f'"text" must be a non-empty string, found {_short(row["text"])}')
        return "text"
    raise RowError(f"no training fields: expected {_EXPECTED}; found keys "
                   f"{', '.join(map(repr, row)) or 'none'}")


def load_jsonl(path) -> tuple[list[dict], str]:
    """Parse and validate ``path``; returns (rows reduced to their training keys, format)."""
    path = pathlib.Path(path)
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise FastloraError(f"The dataset {path} {what}.",
                            "Pass a JSONL file (one JSON object per line) with --dataset, or "
                            "leave --dataset out to train on the embedded default dataset.")
    rows, fmt, fmt_line = [], None, 0
    with open(path, "rb") as f:
        if b"\0" in f.read(8192):
            raise _binary(path)
        f.seek(0)
        for number, raw in enumerate(f, start=1):
            line = _text(path, number, raw)
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise _line_error(path, number, f"it is not valid JSON ({e.msg} at column "
                                                f"{e.colno})") from None
            try:
                this = row_format(row)
            except RowError as e:
                raise _line_error(path, number, str(e)) from None
            if fmt is None:
                fmt, fmt_line = this, number
            elif this != fmt:
                raise _line_error(path, number, f"it is in the {FORMATS[this]} format but line "
                                                f"{fmt_line} is in the {FORMATS[fmt]} format; "
                                                f"use one format per file")
            rows.append({k: row[k] for k in _KEYS[this]})
    if not rows:
        raise FastloraError(f"The dataset {path} has no rows.",
                            f"Write one JSON object per line with {_EXPECTED}.")
    return rows, fmt


def _text(path, number: int, raw: bytes) -> str:
    """One line of the file as text; a binary or non-UTF-8 file is an input error."""
    if b"\0" in raw:
        raise _binary(path)
    try:
        return raw.decode("utf-8-sig" if number == 1 else "utf-8")
    except UnicodeDecodeError as e:
        raise FastloraError(f"The dataset {path} is not UTF-8 text: line {number} has the byte "
                            f"0x{raw[e.start]:02x} at position {e.start + 1}.",
                            "Save it as UTF-8 (e.g. iconv -f latin1 -t utf-8), one JSON object "
                            "per line.") from None


def _binary(path) -> FastloraError:
    return FastloraError(f"The dataset {path} is a binary file (it holds zero bytes), not JSONL "
                         f"text.", f"Pass a UTF-8 text file with one JSON object per line, each "
                                   f"with {_EXPECTED}.")


def _line_error(path, number: int, why: str) -> FastloraError:
    return FastloraError(f"The dataset {path} is malformed at line {number}: {why}.",
                         f"Each line must be one JSON object with {_EXPECTED}.")


def is_conversational(fmt: str) -> bool:
    return fmt in ("messages", "conversational_prompt_completion")
