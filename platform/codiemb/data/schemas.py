"""Normalized training records and the one row validator every reader uses (DESIGN §3).

Plain Python (no Ray, no pyarrow): the local reader, the Ray Data reader and ``codiemb data
check`` all call :func:`parse_line` and :func:`validate_row`, so a row is judged the same way on
every path.

Records after validation:

- ``retrieval``: ``{"query": str, "positives": [str, ...] (>= 1), "negatives": [str, ...],
  "instruction": str | None, "passage_instruction": str | None}`` (the query's and the passages'
  instruction prefixes). A string ``positive`` is accepted as ``positives: [it]``.
- ``sts``: ``{"sentence1": str, "sentence2": str, "score": float}`` (plus ``"instruction": str``,
  the prefix of both sentences, when the row has one) with the score inside the dataset's declared ``score_range``
  (default ``(0, 5)``, STS-B), bounds included.
- ``unsupervised``: ``{"texts": [str, ...]}`` (>= 1): the row's ``text_fields`` (default
  ``["text"]``; ``["sentence1", "sentence2"]`` reads an STS file as unlabeled text, its score
  ignored), each one training text (plus ``"instruction"`` when the row has one).

Extra fields are ignored. A row that does not fit raises :class:`RowError` whose ``reason`` is
one short phrase (the readers prefix it with ``FILE:LINE:``).
"""

from __future__ import annotations

import json
import math
from typing import Any

TASKS = ("retrieval", "sts", "unsupervised")
DEFAULT_TEXT_FIELDS = ("text",)
DEFAULT_SCORE_RANGE = (0.0, 5.0)

#: The text fields of each task (what the tokenizer sees).
TEXT_FIELDS = {"retrieval": ("query", "positives", "negatives"), "sts": ("sentence1", "sentence2"),
               "unsupervised": DEFAULT_TEXT_FIELDS}


class RowError(Exception):
    """One bad row. ``reason`` is a short human phrase, e.g. ``missing field 'score'``."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def parse_line(raw: bytes | str, first_line: bool = False) -> dict:
    """Decode one JSONL line to a dict; non-UTF-8 bytes, invalid JSON or a non-object raise RowError."""
    if isinstance(raw, (bytes, bytearray)):
        try:
            text = bytes(raw).decode("utf-8")
        except UnicodeDecodeError as exc:
            bad = raw[exc.start]
            raise RowError(f"line is not valid UTF-8 (byte 0x{bad:02x} at offset {exc.start})") from None
    else:
        text = raw
    if first_line:
        text = text.lstrip("\ufeff")  # a UTF-8 byte-order mark on the first line
    try:
        row = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RowError(f"invalid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(row, dict):
        raise RowError(f"row must be a JSON object, got {_type_name(row)}")
    return row


def validate_row(task: str, row: dict, score_range: tuple[float, float] | None = None,
                 text_fields: tuple[str, ...] | list[str] | None = None) -> dict:
    """Return the normalized record for ``task`` or raise :class:`RowError` with the reason.

    ``text_fields``: the text fields of an ``unsupervised`` row (default ``("text",)``)."""
    if task == "retrieval":
        return _retrieval(row)
    if task == "sts":
        return _sts(row, check_score_range(score_range))
    if task == "unsupervised":
        return _unsupervised(row, tuple(text_fields or DEFAULT_TEXT_FIELDS))
    raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")


def check_score_range(score_range: tuple[float, float] | list | None) -> tuple[float, float]:
    """The dataset's declared score range as two finite floats, low < high (default (0, 5))."""
    if score_range is None:
        return DEFAULT_SCORE_RANGE
    try:
        low, high = (float(v) for v in score_range)
    except (TypeError, ValueError):
        raise ValueError(f"score_range must be two numbers [low, high], got {score_range!r}") from None
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise ValueError(f"score_range must be finite with low < high, got {score_range!r}")
    return low, high


# --------------------------------------------------------------------------- helpers
def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "bool", int: "int", float: "float", str: "string", list: "list", dict: "object"}.get(
        type(value), type(value).__name__
    )


def _text(row: dict, name: str) -> str:
    if name not in row or row[name] is None:
        raise RowError(f"missing field '{name}'")
    return _check_text(row[name], f"field '{name}'")


def _check_text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise RowError(f"{what} must be a string, got {_type_name(value)}")
    if not value.strip():
        raise RowError(f"{what} is empty")
    return value


def _text_list(value: Any, name: str) -> list[str]:
    if not isinstance(value, list):
        raise RowError(f"field '{name}' must be a list of strings, got {_type_name(value)}")
    return [_check_text(v, f"{name}[{i}]") for i, v in enumerate(value)]


def _retrieval(row: dict) -> dict:
    query = _text(row, "query")
    has_list = row.get("positives") is not None
    has_one = row.get("positive") is not None
    if has_list and has_one:
        raise RowError("both 'positive' and 'positives' are given; use one")
    if has_one:
        positives = [_check_text(row["positive"], "field 'positive'")]
    elif has_list:
        positives = _text_list(row["positives"], "positives")
        if not positives:
            raise RowError("field 'positives' is empty (needs at least one)")
    else:
        raise RowError("missing field 'positives' (or 'positive')")
    negatives = [] if row.get("negatives") is None else _text_list(row["negatives"], "negatives")
    return {"query": query, "positives": positives, "negatives": negatives, "instruction": _instruction(row),
            "passage_instruction": _instruction(row, "passage_instruction")}


def _instruction(row: dict, name: str = "instruction") -> str | None:
    """An optional instruction prefix field: a string (blank means none)."""
    value = row.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise RowError(f"field '{name}' must be a string, got {_type_name(value)}")
    return value if value.strip() else None


def _sts(row: dict, score_range: tuple[float, float]) -> dict:
    s1 = _text(row, "sentence1")
    s2 = _text(row, "sentence2")
    if "score" not in row or row["score"] is None:
        raise RowError("missing field 'score'")
    score = row["score"]
    if isinstance(score, bool) or not isinstance(score, (int, float)):
        raise RowError(f"field 'score' must be a number, got {_type_name(score)}")
    score = float(score)
    if math.isnan(score):
        raise RowError("score is NaN")
    if math.isinf(score):
        raise RowError(f"score is {'+' if score > 0 else '-'}infinite")
    low, high = score_range
    if not low <= score <= high:
        raise RowError(f"score {score:g} is outside the range [{low:g}, {high:g}]")
    rec = {"sentence1": s1, "sentence2": s2, "score": score}
    instruction = _instruction(row)
    if instruction is not None:
        rec["instruction"] = instruction
    return rec


def _unsupervised(row: dict, fields: tuple[str, ...]) -> dict:
    rec = {"texts": [_text(row, f) for f in fields]}
    instruction = _instruction(row)
    if instruction is not None:
        rec["instruction"] = instruction
    return rec
