"""TaskBatchSampler: one task per global batch on every rank, disjoint slices, exact accounting, resume."""

from __future__ import annotations

from collections import Counter

import pytest

from codiemb.data.sampler import TaskBatchSampler
from codiemb.errors import ConfigError, DataError

SIZES = {"stsb": 100, "scifact": 50, "snli": 37}
BATCH = {"stsb": 4, "scifact": 5, "snli": 3}
# world 2 -> global batches 8, 10, 6 -> full batches per epoch 12, 5, 6
NB = {"stsb": 12, "scifact": 5, "snli": 6}


def make(**kw):
    args = dict(world_size=2, seed=0)
    args.update(kw)
    return TaskBatchSampler(SIZES, BATCH, **args)


@pytest.mark.parametrize("policy", ["proportional", "round_robin", "temperature"])
def test_one_dataset_per_step_same_on_all_ranks_disjoint_slices(policy):
    s = make(policy=policy, world_size=3, temperature=2.0, epochs=2.0)
    assert len(s) > 0
    for step in range(len(s)):
        batches = [s.batch(step, r) for r in range(3)]
        names = {name for name, _ in batches}
        assert len(names) == 1
        name = names.pop()
        assert name == s.plan()[step][0]
        rows = [set(r) for _, r in batches]
        assert all(len(r) == BATCH[name] for r in rows)  # full batch on every rank
        assert not (rows[0] & rows[1]) and not (rows[0] & rows[2]) and not (rows[1] & rows[2])
        assert all(0 <= i < SIZES[name] for r in rows for i in r)


def test_proportional_counts_and_each_row_once_per_epoch():
    s = make(policy="proportional", epochs=1.0)
    assert s.steps_per_task() == NB
    assert len(s) == sum(NB.values()) == 23
    used = {k: [] for k in SIZES}
    for step in range(len(s)):
        for r in range(2):
            name, rows = s.batch(step, r)
            used[name] += rows
    for k, rows in used.items():
        assert len(rows) == len(set(rows)) == NB[k] * BATCH[k] * 2  # no row twice; drop_last drops the rest


def test_fractional_epochs_and_steps_per_task_equal_plan_counts():
    s = make(policy="proportional", epochs=1.5)
    # floor(1.5 * nb): 18, 7, 9
    assert s.steps_per_task() == {"stsb": 18, "scifact": 7, "snli": 9}
    assert s.steps_per_task() == dict(Counter(name for name, _ in s.plan()))
    # second epoch of scifact starts at dataset-local counter 5 and uses a new permutation
    local = [c for name, c in s.plan() if name == "scifact"]
    assert local == list(range(7))
    for policy in ("round_robin", "temperature"):
        t = make(policy=policy, epochs=1.5, temperature=3.0)
        assert len(t) == len(s) == 34
        assert t.steps_per_task() == dict(Counter(name for name, _ in t.plan()))


def test_proportional_epoch_blocks_finish_each_epoch_before_the_next():
    s = make(policy="proportional", epochs=2.0)
    first_block = s.plan()[: sum(NB.values())]
    assert Counter(n for n, _ in first_block) == Counter(NB)
    # shuffled within the block, not grouped by dataset
    assert [n for n, _ in first_block] != sorted(n for n, _ in first_block)


def test_round_robin_cycles_in_order_and_restarts_exhausted_datasets():
    s = make(policy="round_robin", epochs=1.0)
    plan = s.plan()
    names = list(SIZES)
    assert [n for n, _ in plan] == [names[t % 3] for t in range(23)]
    scifact = [c for n, c in plan if n == "scifact"]
    assert scifact == list(range(8))  # nb=5: counters 5..7 are its second epoch
    # its second epoch is a fresh permutation of the same rows: batches 5.. are not the batches 0..
    sci_steps = [t for t, (n, _) in enumerate(plan) if n == "scifact"]
    first = s.global_rows(sci_steps[0])[1]
    sixth = s.global_rows(sci_steps[5])[1]
    assert first != sixth
    epoch1 = [i for t in sci_steps[5:] for i in s.global_rows(t)[1]]
    assert len(epoch1) == len(set(epoch1))  # within epoch 1, still no repeats


def test_temperature_frequencies_follow_p_k():
    T = 2.0
    s = make(policy="temperature", temperature=T, max_steps=20000, seed=3)
    raw = {k: NB[k] ** (1 / T) for k in NB}
    z = sum(raw.values())
    p = {k: v / z for k, v in raw.items()}  # sqrt(12), sqrt(5), sqrt(6) normalised
    assert s.probabilities() == pytest.approx(p)
    counts = s.steps_per_task()
    assert len(s) == 20000
    for k in NB:
        assert counts[k] / 20000 == pytest.approx(p[k], abs=0.015)
    # T=1: proportional to the batches per epoch
    assert make(policy="temperature", temperature=1.0).probabilities()["stsb"] == pytest.approx(12 / 23)


def test_determinism_by_seed():
    a, b, c = make(policy="temperature", seed=5), make(policy="temperature", seed=5), make(policy="temperature", seed=6)
    assert a.plan() == b.plan()
    assert [a.batch(t, 1) for t in range(len(a))] == [b.batch(t, 1) for t in range(len(b))]
    assert a.plan() != c.plan() or a.batch(0, 0) != c.batch(0, 0)


def test_resume_from_state_dict_reproduces_the_rest():
    full = make(policy="temperature", epochs=2.0, seed=9)
    expected = list(full.iter_rank(rank=1))
    first = make(policy="temperature", epochs=2.0, seed=9)
    it = first.iter_rank(rank=1)
    done = [next(it) for _ in range(17)]
    state = first.state_dict()
    assert state["step"] == 17
    resumed = make(policy="temperature", epochs=2.0, seed=9)
    resumed.load_state_dict(state)
    rest = list(resumed.iter_rank(rank=1))
    assert done + rest == expected
    # random access by step index gives the same thing
    assert [resumed.batch(t, 1) for t in range(17, len(resumed))] == [(n, r) for _, n, r in rest]


def test_resume_refuses_a_different_schedule():
    state = make(policy="proportional", seed=1).state_dict()
    with pytest.raises(ConfigError, match="seed"):
        make(policy="proportional", seed=2).load_state_dict(state)
    with pytest.raises(ConfigError, match="world_size"):
        make(policy="proportional", seed=1, world_size=1).load_state_dict(state)


def test_too_small_dataset_and_bad_policy_are_user_errors():
    with pytest.raises(DataError, match="snli"):
        TaskBatchSampler({"snli": 5}, {"snli": 3}, world_size=2)
    with pytest.raises(ConfigError, match="policy"):
        make(policy="bogus")
    with pytest.raises(ConfigError, match="batch size"):
        TaskBatchSampler({"a": 10}, {}, world_size=1)


def test_drop_last_false_tops_up_the_last_batch():
    s = TaskBatchSampler({"a": 10}, {"a": 2}, world_size=2, drop_last=False)  # G=4: 3 batches, last 2 short
    assert len(s) == 3
    name, rows = s.global_rows(2)
    perm = s.global_rows(0)[1] + s.global_rows(1)[1]
    assert len(rows) == 4 and rows[2:] == perm[:2]
    assert sorted(perm + rows[:2]) == list(range(10))


def test_max_steps_extends_proportional_over_epochs():
    s = make(policy="proportional", max_steps=50)
    assert len(s) == 50
    assert s.steps_per_task() == dict(Counter(n for n, _ in s.plan()))
    assert Counter(n for n, _ in s.plan()[:23]) == Counter(NB)  # first epoch block complete


def test_with_one_dataset_every_policy_reads_the_same_batches():
    """A single-task row (STS-only) trains the same batches under the recipe's temperature sampler
    as under proportional (BENCHMARKS reuses the STS-only model across the two recipes on this)."""
    plans = [TaskBatchSampler({"stsb": 5749}, {"stsb": 32}, policy=p, temperature=1.5, epochs=3, seed=0)
             for p in ("proportional", "temperature")]
    assert len(plans[0]) == len(plans[1]) == 537  # 3 epochs · ⌊5749 / 32⌋ full batches
    assert all(plans[0].global_rows(i) == plans[1].global_rows(i) for i in range(537))
