"""The no-duplicates option of the task-batch sampler: rows that share a positive (or whose
positive is another row's negative) never meet in one global batch, while the plan (steps per
task), the random access by step and resume stay exactly as without it."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from codiemb.data.hashing import text_hash
from codiemb.data.nodup import find_offenders
from codiemb.data.sampler import TaskBatchSampler
from codiemb.errors import ConfigError


def _shared_rows(n: int = 96, groups: int = 24, seed: int = 0) -> list[list[str]]:
    """Rows [query, positive, negative]: 4 rows per positive; a third of the negatives are another
    group's positive."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        neg = f"pos {int(rng.integers(groups))}" if i % 3 == 0 else f"neg {i}"
        rows.append([f"query {i}", f"pos {i % groups}", neg])
    return rows


def _hashes(rows: list[list[str]]) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.zeros(len(rows) + 1, np.int64)
    offsets[1:] = np.cumsum([len(r) for r in rows])
    return offsets, np.asarray([text_hash(t) for r in rows for t in r], np.int64)


def _dups(rows, batch_rows) -> int:
    """Texts held by more than one row of the batch."""
    seen: dict[str, set[int]] = {}
    for r in batch_rows:
        for t in set(rows[r]):
            seen.setdefault(t, set()).add(r)
    return sum(len(v) > 1 for v in seen.values())


def _sampler(rows, nodup: bool, **kw) -> TaskBatchSampler:
    args = dict(world_size=2, epochs=3, seed=7, policy="temperature", temperature=2.0)
    args.update(kw)
    sizes = {"ir": len(rows), "sts": 50}
    return TaskBatchSampler(sizes, {"ir": 4, "sts": 5}, row_hashes={"ir": _hashes(rows)} if nodup else None, **args)


@pytest.mark.parametrize("drop_last", [True, False])
def test_no_batch_holds_a_duplicate_and_steps_per_task_stay_exact(caplog, drop_last):
    rows = _shared_rows()
    with caplog.at_level(logging.INFO, logger="codiemb.data.sampler"):
        on = _sampler(rows, True, drop_last=drop_last)
        ir_steps = [s for s, (name, _) in enumerate(on.plan()) if name == "ir"]
        batches_on = [on.global_rows(s)[1] for s in ir_steps]
    off = _sampler(rows, False, drop_last=drop_last)
    batches_off = [off.global_rows(s)[1] for s in ir_steps]
    assert off.plan() == on.plan() and off.steps_per_task() == on.steps_per_task()  # same schedule
    assert sum(_dups(rows, b) > 0 for b in batches_off) > 0  # the plain batches do hold duplicates
    assert all(_dups(rows, b) == 0 for b in batches_on)
    assert all(len(b) == 8 for b in batches_on)  # G = 4 x 2 ranks, every step
    # each epoch still uses every row at most once (drop_last) / every row (no drop_last)
    nb = on.batches_per_epoch["ir"]
    for e in range(3):
        used = [r for b in batches_on[e * nb:(e + 1) * nb] for r in b]
        if drop_last:
            assert len(set(used)) == len(used) == nb * 8
        else:
            assert set(used) == set(range(len(rows)))
    summary = on.swap_summary()["ir"]
    assert summary["epochs"] == 3 and summary["batches"] == 3 * nb and summary["unresolved"] == 0
    # a batch that held a duplicate needed a swap, unless a swap for another batch already took its counterpart
    assert 0 < summary["swapped"] <= sum(_dups(rows, b) > 0 for b in batches_off)
    assert any("needed a swap" in m for m in caplog.messages)
    # the other task is untouched
    sts_steps = [s for s, (name, _) in enumerate(on.plan()) if name == "sts"]
    assert [on.global_rows(s) for s in sts_steps] == [off.global_rows(s) for s in sts_steps]


def test_rows_are_a_pure_function_of_seed_and_step_and_resume_is_exact():
    rows = _shared_rows()
    a = _sampler(rows, True)
    full = list(a.iter_rank(1))
    b = _sampler(rows, True)
    assert [b.batch(s, 1) for s in reversed(range(len(b)))][::-1] == [(n, r) for _, n, r in full]  # any order
    c = _sampler(rows, True)
    k = len(c) // 2
    c.load_state_dict({**a.state_dict(), "step": k})
    assert list(c.iter_rank(1)) == full[k:]
    assert a.state_dict()["no_duplicates"] == ["ir"]
    with pytest.raises(ConfigError, match="no_duplicates"):
        _sampler(rows, False).load_state_dict(a.state_dict())


def test_batches_without_duplicates_are_left_as_they_are():
    rows = [[f"q{i}", f"p{i}", f"n{i}"] for i in range(64)]
    on, off = _sampler(rows, True), _sampler(rows, False)
    assert [on.global_rows(s) for s in range(len(on))] == [off.global_rows(s) for s in range(len(off))]
    assert on.swap_summary()["ir"]["swapped"] == 0


def test_an_impossible_batch_keeps_its_rows_and_is_counted():
    rows = [[f"q{i}", "the same positive"] for i in range(40)]
    s = _sampler(rows, True, world_size=1, epochs=1, policy="proportional")
    off = _sampler(rows, False, world_size=1, epochs=1, policy="proportional")
    assert s.steps_per_task() == off.steps_per_task()
    batches = [s.global_rows(k)[1] for k, (n, _) in enumerate(s.plan()) if n == "ir"]
    assert all(len(b) == 4 for b in batches)
    assert s.swap_summary()["ir"]["unresolved"] == len(batches) == s.batches_per_epoch["ir"]


def test_find_offenders_ignores_a_row_repeating_its_own_text():
    rows = [["q0", "a", "a"], ["q1", "b", "c"], ["q2", "c", "d"], ["q3", "e", "f"]]
    off, val = _hashes(rows)
    batches = np.array([[0, 1], [2, 3]])
    assert find_offenders(batches, off, val).tolist() == []
    batches = np.array([[0, 3], [1, 2]])
    assert find_offenders(batches, off, val).tolist() == [3]  # row 2 (slot 1 of batch 1) repeats "c"


def test_shard_rows_carry_token_id_hashes(tiny_model_dir):
    from transformers import AutoTokenizer

    from codiemb.data.shards import ShardStore

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    # rows 0 and 2 share a positive; row 3's negative is row 1's positive
    rec = [{"query": f"cat {w}", "positives": [f"the {p} house"], "negatives": [n], "instruction": None}
           for w, p, n in (("runs", "big", "a red tree"), ("eats", "small", "a blue tree"),
                           ("sees", "big", "a green tree"), ("reads", "green", "the small house"))]
    store = ShardStore.from_records(tok, "retrieval", rec, {"query": 16, "passage": 16, "sts": 16})
    offsets, values = store.row_hashes()
    assert offsets.tolist() == [0, 3, 6, 9, 12]
    per_row = [values[offsets[i]:offsets[i + 1]] for i in range(4)]
    assert per_row[0][1] == per_row[2][1] and per_row[0][1] != per_row[1][1]  # same positive text, same hash
    assert per_row[3][2] == per_row[1][1] and len({int(r[0]) for r in per_row}) == 4
    s = TaskBatchSampler({"ir": 4}, {"ir": 2}, epochs=4, seed=1, row_hashes={"ir": store.row_hashes})
    for step in range(len(s)):
        b = s.global_rows(step)[1]
        texts = [set(values[offsets[r]:offsets[r + 1]].tolist()) for r in b]
        assert not (texts[0] & texts[1]) and sorted(b) not in ([0, 2], [1, 3])
    assert s.swap_summary()["ir"]["unresolved"] == 0


def test_the_cost_benchmark_runs_and_leaves_no_duplicate(load_benchmark, tmp_path):
    bench = load_benchmark("sampler_nodup")
    out = bench.main(["--rows", "3000", "--batch-size", "32", "--pool", "0.5", "--json", str(tmp_path / "b.json")])
    assert out["batches"] == 3000 // 32 and out["batches_with_duplicates_without"] > 0
    assert out["batches_with_duplicates_with"] == 0
    assert 0 < out["batches_swapped"] <= out["batches_with_duplicates_without"]


def test_find_offenders_in_chunks_equals_one_pass():
    rng = np.random.default_rng(0)
    n = 4000
    offsets, values = np.arange(0, 3 * n + 1, 3), rng.integers(0, 3000, 3 * n)
    batches = rng.permutation(n).reshape(-1, 16)
    whole = find_offenders(batches, offsets, values)
    assert whole.size > 0 and np.array_equal(find_offenders(batches, offsets, values, rows_per_chunk=50), whole)
