"""Row validation: one test per bad-input kind, plus the accepted forms (DESIGN §3)."""

from __future__ import annotations

import math

import pytest

from codiemb.data.schemas import RowError, parse_line, validate_row

STS_OK = {"sentence1": "A man plays.", "sentence2": "A man is playing.", "score": 3.8}
IR_OK = {"query": "what causes rain", "positives": ["clouds release water"], "negatives": ["the sun is hot"]}


def reason(task: str, row: dict, score_range=None) -> str:
    with pytest.raises(RowError) as exc:
        validate_row(task, row, score_range)
    assert exc.value.reason == str(exc.value)
    return exc.value.reason


# --------------------------------------------------------------------------- valid rows
def test_sts_row_normalized_and_extra_fields_dropped():
    rec = validate_row("sts", {**STS_OK, "score": 4, "genre": "news", "id": "0001"})
    assert rec == {"sentence1": "A man plays.", "sentence2": "A man is playing.", "score": 4.0}
    assert type(rec["score"]) is float


def test_sts_range_bounds_are_inclusive_and_declared_range_is_used():
    assert validate_row("sts", {**STS_OK, "score": 0})["score"] == 0.0
    assert validate_row("sts", {**STS_OK, "score": 5})["score"] == 5.0
    assert validate_row("sts", {**STS_OK, "score": -1.0}, score_range=(-1, 1))["score"] == -1.0
    assert "outside the range [-1, 1]" in reason("sts", {**STS_OK, "score": 1.5}, score_range=(-1, 1))


def test_retrieval_row_normalized():
    rec = validate_row("retrieval", {**IR_OK, "source": "x"})
    assert rec == {"query": "what causes rain", "positives": ["clouds release water"],
                   "negatives": ["the sun is hot"], "instruction": None, "passage_instruction": None}


def test_positive_string_form_becomes_a_one_item_list_and_negatives_default_empty():
    rec = validate_row("retrieval", {"query": "q", "positive": "p", "instruction": "Find the answer:"})
    assert rec == {"query": "q", "positives": ["p"], "negatives": [], "instruction": "Find the answer:",
                   "passage_instruction": None}


def test_passage_and_sts_instructions_per_row():
    rec = validate_row("retrieval", {"query": "q", "positive": "p", "passage_instruction": "Passage: "})
    assert rec["passage_instruction"] == "Passage: " and rec["instruction"] is None
    assert validate_row("sts", {**STS_OK, "instruction": "Similar: "})["instruction"] == "Similar: "
    assert "instruction" not in validate_row("sts", {**STS_OK, "instruction": "  "})  # blank: none
    assert reason("retrieval", {**IR_OK, "passage_instruction": 3}) == "field 'passage_instruction' must be a string, got int"
    assert reason("sts", {**STS_OK, "instruction": ["x"]}) == "field 'instruction' must be a string, got list"


# --------------------------------------------------------------------------- bad rows
@pytest.mark.parametrize("task,row,field", [
    ("sts", {"sentence1": "a", "score": 1.0}, "sentence2"),
    ("sts", {"sentence1": "a", "sentence2": "b"}, "score"),
    ("sts", {"sentence1": "a", "sentence2": "b", "score": None}, "score"),
    ("retrieval", {"positives": ["p"]}, "query"),
])
def test_missing_field(task, row, field):
    assert reason(task, row) == f"missing field '{field}'"


def test_missing_positives():
    assert reason("retrieval", {"query": "q"}) == "missing field 'positives' (or 'positive')"


@pytest.mark.parametrize("task,row,what", [
    ("sts", {**STS_OK, "sentence1": ""}, "field 'sentence1'"),
    ("sts", {**STS_OK, "sentence2": " \t\n"}, "field 'sentence2'"),
    ("retrieval", {**IR_OK, "query": "   "}, "field 'query'"),
    ("retrieval", {**IR_OK, "positives": ["ok", ""]}, "positives[1]"),
    ("retrieval", {**IR_OK, "negatives": [" "]}, "negatives[0]"),
])
def test_empty_text(task, row, what):
    assert reason(task, row) == f"{what} is empty"


def test_empty_positive_list():
    assert "at least one" in reason("retrieval", {**IR_OK, "positives": []})


@pytest.mark.parametrize("task,row,expected", [
    ("sts", {**STS_OK, "sentence1": 12}, "field 'sentence1' must be a string, got int"),
    ("sts", {**STS_OK, "score": "3.5"}, "field 'score' must be a number, got string"),
    ("sts", {**STS_OK, "score": True}, "field 'score' must be a number, got bool"),
    ("sts", {**STS_OK, "score": [3]}, "field 'score' must be a number, got list"),
    ("retrieval", {**IR_OK, "positives": "one doc"}, "field 'positives' must be a list of strings, got string"),
    ("retrieval", {**IR_OK, "negatives": [1]}, "negatives[0] must be a string, got int"),
    ("retrieval", {**IR_OK, "instruction": 3}, "field 'instruction' must be a string, got int"),
])
def test_wrong_type(task, row, expected):
    assert reason(task, row) == expected


def test_score_out_of_range():
    assert reason("sts", {**STS_OK, "score": 7}) == "score 7 is outside the range [0, 5]"
    assert reason("sts", {**STS_OK, "score": -0.5}) == "score -0.5 is outside the range [0, 5]"


def test_nan_and_infinite_scores():
    assert reason("sts", {**STS_OK, "score": math.nan}) == "score is NaN"
    assert reason("sts", {**STS_OK, "score": math.inf}, score_range=(0, 5)) == "score is +infinite"
    assert reason("sts", {**STS_OK, "score": -math.inf}) == "score is -infinite"


def test_nan_score_from_a_json_line():
    # Python's json accepts the non-standard NaN token; the validator must still reject it
    row = parse_line(b'{"sentence1": "a", "sentence2": "b", "score": NaN}')
    assert reason("sts", row) == "score is NaN"


def test_non_utf8_line():
    with pytest.raises(RowError) as exc:
        parse_line(b'{"sentence1": "caf\xe9", "sentence2": "b", "score": 1}')
    assert exc.value.reason == "line is not valid UTF-8 (byte 0xe9 at offset 18)"


def test_invalid_json():
    line = b'{"sentence1": "a", "sentence2": "b", "score": 1'
    assert len(line) == 47  # the object is never closed: the parser stops just past the end
    with pytest.raises(RowError) as exc:
        parse_line(line)
    assert exc.value.reason == "invalid JSON (Expecting ',' delimiter at column 48)"


def test_json_that_is_not_an_object():
    with pytest.raises(RowError, match="row must be a JSON object, got list"):
        parse_line(b'["a", "b", 1]')


def test_parse_line_decodes_utf8_and_strips_a_bom_on_the_first_line():
    assert parse_line('{"q": "é"}'.encode()) == {"q": "é"}
    assert parse_line(b'\xef\xbb\xbf{"q": 1}', first_line=True) == {"q": 1}


def test_both_positive_forms_is_ambiguous():
    assert "both 'positive' and 'positives'" in reason("retrieval", {**IR_OK, "positive": "p"})


def test_unknown_task_and_bad_range_are_programming_errors():
    with pytest.raises(ValueError, match="unknown task"):
        validate_row("nli", STS_OK)
    with pytest.raises(ValueError, match="low < high"):
        validate_row("sts", STS_OK, score_range=(5, 0))
