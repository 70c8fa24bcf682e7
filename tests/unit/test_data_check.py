"""``codiemb data check`` as a user runs it: one line per problem, counts, exit status, no traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

GOOD = {"sentence1": "A man plays a flute.", "sentence2": "A man is playing a flute.", "score": 4.2}
# (line number, raw line, expected reason); the other lines are good
PROBLEMS = [
    (2, b'{"sentence1": "A cat.", "score": 2.0}', "missing field 'sentence2'"),
    (4, b'{"sentence1": "   ", "sentence2": "A dog.", "score": 1.0}', "field 'sentence1' is empty"),
    (5, b'{"sentence1": "A cat.", "sentence2": "A dog.", "score": 7}', "score 7 is outside the range [0, 5]"),
    (6, b'{"sentence1": "A cat.", "sentence2": "A dog.", "score": NaN}', "score is NaN"),
    (8, b'{"sentence1": "A caf\xe9.", "sentence2": "A dog.", "score": 1.0}',
     "line is not valid UTF-8 (byte 0xe9 at offset 20)"),
]
N_LINES = 9


def write_file(path):
    bad = {line: raw for line, raw, _ in PROBLEMS}
    lines = [bad.get(i, json.dumps(GOOD).encode()) for i in range(1, N_LINES + 1)]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def codiemb(*args, cwd=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "codiemb.cli", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=60)


@pytest.fixture
def bad_file(tmp_path):
    return write_file(tmp_path / "sts_bad.jsonl")


def test_check_prints_one_line_per_problem_and_fails(bad_file):
    proc = codiemb("data", "check", str(bad_file), "--task", "sts")
    assert proc.returncode == 1
    assert "Traceback" not in proc.stdout + proc.stderr
    assert proc.stderr.splitlines() == [f"{bad_file}:{line}: {reason}" for line, _, reason in PROBLEMS]
    assert proc.stdout.splitlines() == [f"read={N_LINES} valid={N_LINES - len(PROBLEMS)} quarantined={len(PROBLEMS)}"]


def test_check_limits_printed_errors(bad_file):
    proc = codiemb("data", "check", str(bad_file), "--task", "sts", "--max-errors", "2")
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [f"{bad_file}:2: missing field 'sentence2'",
                                        f"{bad_file}:4: field 'sentence1' is empty", "... 3 more"]


def test_check_with_quarantine_writes_rows_and_succeeds(bad_file, tmp_path):
    qfile = tmp_path / "q" / "bad.jsonl"
    proc = codiemb("data", "check", str(bad_file), "--task", "sts", "--quarantine", str(qfile))
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    counts = dict(kv.split("=") for kv in proc.stdout.split())
    assert int(counts["read"]) == int(counts["valid"]) + int(counts["quarantined"]) == N_LINES
    assert int(counts["quarantined"]) == len(PROBLEMS)
    rows = [json.loads(line) for line in qfile.read_text(encoding="utf-8").splitlines()]
    assert [(r["file"], r["line"], r["reason"]) for r in rows] == [(str(bad_file), ln, rs) for ln, _, rs in PROBLEMS]
    # running it again replaces the file instead of appending
    codiemb("data", "check", str(bad_file), "--task", "sts", "--quarantine", str(qfile))
    assert len(qfile.read_text(encoding="utf-8").splitlines()) == len(PROBLEMS)


def test_check_with_quarantine_fails_when_no_row_is_valid(tmp_path):
    path = tmp_path / "all_bad.jsonl"
    path.write_bytes(PROBLEMS[0][1] + b"\n" + PROBLEMS[2][1] + b"\n")
    proc = codiemb("data", "check", str(path), "--task", "sts", "--quarantine", str(tmp_path / "q.jsonl"))
    assert proc.returncode == 1
    assert proc.stdout == "read=2 valid=0 quarantined=2\n"
    assert len((tmp_path / "q.jsonl").read_text().splitlines()) == 2


def test_check_clean_file_and_custom_range(tmp_path):
    path = tmp_path / "ok.jsonl"
    path.write_text(json.dumps({**GOOD, "score": 0.9}) + "\n")
    proc = codiemb("data", "check", str(path), "--task", "sts", "--score-range", "0", "1")
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "read=1 valid=1 quarantined=0\n", "")
    proc = codiemb("data", "check", str(path), "--task", "sts", "--score-range", "0", "0.5")
    assert proc.returncode == 1
    assert proc.stderr == f"{path}:1: score 0.9 is outside the range [0, 0.5]\n"


def test_check_missing_file_is_one_line_error(tmp_path):
    proc = codiemb("data", "check", str(tmp_path / "missing.jsonl"), "--task", "retrieval")
    assert proc.returncode == 2
    assert proc.stderr == f"codiemb: error: {tmp_path / 'missing.jsonl'}: file not found\n"
