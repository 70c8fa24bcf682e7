"""Teacher distillation: the losses against their formulas, the teacher cache built once and
reused, and local training steps with ``loss.distill`` on (a teacher of another dimension)."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch

from codiemb.losses.distill import cosine_mse, distill_kl, distill_retrieval, distill_sts, margin_mse

WORDS = "cat dog man woman child car house tree water fire sun moon red blue green big small".split()


# --------------------------------------------------------------------------- losses vs direct formulas
def test_kl_matches_the_sum_per_row():
    g = torch.Generator().manual_seed(0)
    s, t = torch.rand(3, 5, generator=g), torch.rand(3, 5, generator=g)
    mask = torch.tensor([[1, 1, 0, 1, 1], [1, 1, 1, 1, 1], [0, 1, 1, 1, 0]], dtype=torch.bool)
    want = 0.0
    for r in range(3):
        cols = [c for c in range(5) if mask[r, c]]
        zs = [math.exp(float(s[r, c]) / 0.1) for c in cols]
        zt = [math.exp(float(t[r, c]) / 0.05) for c in cols]
        ps = [z / sum(zs) for z in zs]
        pt = [z / sum(zt) for z in zt]
        want += sum(a * math.log(a / b) for a, b in zip(pt, ps))
    got = distill_kl(s, t, student_temperature=0.1, teacher_temperature=0.05, mask=mask)
    assert float(got) == pytest.approx(want / 3, rel=1e-5)
    assert float(distill_kl(t, t, 0.05, 0.05)) == pytest.approx(0.0, abs=1e-7)  # same distribution: 0


def test_margin_mse_and_cosine_mse_match_direct_formulas():
    s = torch.tensor([[0.9, 0.2, 0.4], [0.1, 0.8, 0.3]])
    t = torch.tensor([[0.7, 0.5, 0.1], [0.3, 0.6, 0.6]])
    pos = torch.tensor([0, 1])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    triples = [((0.9 - 0.2) - (0.7 - 0.5)) ** 2, ((0.9 - 0.4) - (0.7 - 0.1)) ** 2, ((0.8 - 0.1) - (0.6 - 0.3)) ** 2]
    assert float(margin_mse(s, t, pos, mask)) == pytest.approx(sum(triples) / 3, rel=1e-6)
    assert float(cosine_mse(s, t, mask)) == pytest.approx(
        float(((s - t) ** 2)[mask].sum()) / 5, rel=1e-6)


def test_retrieval_term_is_in_batch_and_sts_term_per_pair():
    g = torch.Generator().manual_seed(1)
    q, p = torch.randn(2, 4, generator=g), torch.randn(2, 2, 4, generator=g)
    slots = torch.tensor([[True, True], [True, False]])
    qn, pn = torch.nn.functional.normalize(q, dim=-1), torch.nn.functional.normalize(p.reshape(4, 4), dim=-1)
    s = qn @ pn.T  # (2, 4): every query against every slot of the batch
    t = torch.rand(2, 4, generator=g)
    mask = slots.reshape(1, 4).expand(2, 4)
    assert float(distill_retrieval("kl", q, p, t, slots, 1)) == pytest.approx(float(distill_kl(s, t, mask=mask)), rel=1e-6)
    assert float(distill_retrieval("margin_mse", q, p, t, slots, 1)) == pytest.approx(
        float(margin_mse(s, t, torch.tensor([0, 2]), mask)), rel=1e-6)
    e1, e2, ts = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g), torch.rand(3, generator=g)
    cos = torch.nn.functional.cosine_similarity(e1, e2)
    assert float(distill_sts("cosine_mse", e1, e2, ts)) == pytest.approx(float(((cos - ts) ** 2).mean()), rel=1e-5)
    with pytest.raises(ValueError, match="does not apply"):
        distill_sts("margin_mse", e1, e2, ts)


# --------------------------------------------------------------------------- the cache and the loop
def _write_data(tmp_path):
    rng = random.Random(0)
    sts = tmp_path / "sts.jsonl"
    with open(sts, "w") as fh:
        for _ in range(40):
            fh.write(json.dumps({"sentence1": " ".join(rng.sample(WORDS, 4)), "sentence2": " ".join(rng.sample(WORDS, 4)),
                                 "score": round(rng.uniform(0, 5), 1)}) + "\n")
    ret = tmp_path / "ret.jsonl"
    with open(ret, "w") as fh:
        for i in range(32):
            q = " ".join(rng.sample(WORDS, 3))
            row = {"query": q, "positive": q + " " + rng.choice(WORDS)}
            if i % 2:
                row["negatives"] = [" ".join(rng.sample(WORDS, 4))]
            fh.write(json.dumps(row) + "\n")
    return sts, ret


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    from tests.conftest import build_tiny_bert

    return build_tiny_bert(tmp_path_factory.mktemp("teacher"), hidden=48, layers=1, heads=2, seed=7)


def _cfg(tmp_path, model_dir, teacher, form_ret="kl", form_sts="cosine_mse", **over):
    from codiemb.config import load_config

    sts, ret = _write_data(tmp_path)
    f = tmp_path / "cfg.yaml"
    f.write_text(f"""
run: {{name: d, seed: 1}}
model: {{name: {model_dir}, max_length: {{query: 16, passage: 16, sts: 16}}}}
data:
  shards: {tmp_path / 'shards'}
  datasets:
    - {{name: sts, task: sts, path: {sts}, score_range: [0, 5], batch_size: 8}}
    - {{name: ret, task: retrieval, path: {ret}, batch_size: 8}}
loss:
  retrieval: {{temperature: 0.05, negatives: 1}}
  distill:
    teachers: [{{model: {teacher}, tasks: [sts, retrieval]}}]
    form: {{retrieval: {form_ret}, sts: {form_sts}}}
    weights: {{retrieval: 1.0, sts: 2.0}}
train: {{epochs: 1, lr: 1.0e-3, checkpoint_every: 0, log_every: 1}}
""")
    return load_config(f, [f"{k}={v}" for k, v in over.items()])


def test_teacher_vectors_built_once_then_reused(tmp_path, tiny_model_dir, teacher_dir, monkeypatch):
    from codiemb.data import teacher as teacher_mod
    from codiemb.model.encoder import Encoder
    from codiemb.train.loop import load_task_data

    cfg = _cfg(tmp_path, tiny_model_dir, teacher_dir)
    tasks, counts = load_task_data(cfg)
    by = {t.name: t for t in tasks}
    scores = by["ret"].teachers[0][0]
    assert scores.dim == 48 and len(scores) == len(by["ret"].store) == 32
    # the stored vector of row 3's positive is the teacher's own embedding of that text
    enc = Encoder.load(str(teacher_dir))
    row = json.loads((tmp_path / "ret.jsonl").read_text().splitlines()[3])
    want = enc.encode([row["positive"]], max_length=16, normalize=True)[0].numpy()
    got = scores.vectors([3], np.array([[1]]))[0, 0]
    assert np.allclose(got, want, atol=2e-3)
    assert counts["ret"]["teachers"] == [scores.set_dir]

    calls = []
    monkeypatch.setattr(teacher_mod.TeacherShardScorer, "score",
                        lambda self, name: calls.append(name) or pytest.fail("scored again"))
    tasks2, counts2 = load_task_data(cfg)
    assert not calls and counts2["ret"]["teachers"] == counts["ret"]["teachers"]
    assert {t.name: t.teachers[0][0].set_dir for t in tasks2} == {t.name: t.teachers[0][0].set_dir for t in tasks}


@pytest.mark.parametrize("form_ret,form_sts", [("kl", "cosine_mse"), ("margin_mse", "kl"), ("cosine_mse", "cosine_mse")])
def test_local_training_with_distill(tmp_path, tiny_model_dir, teacher_dir, form_ret, form_sts):
    from codiemb.train.loop import train

    cfg = _cfg(tmp_path, tiny_model_dir, teacher_dir, form_ret, form_sts, **{"train.max_steps": 4})
    res = train(cfg, output_dir=tmp_path / "out")
    assert res.steps == 4
    rows = [json.loads(l) for l in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    seen = {k for r in rows for k in r if k.endswith("/distill")}
    assert seen, rows  # the distill term was computed and logged
    assert all(math.isfinite(r[k]) and r[k] >= 0 for r in rows for k in seen if k in r)


def test_distill_changes_the_update_and_weight_zero_does_not(tmp_path, nodrop_model_dir, teacher_dir):
    """The distill term reaches the gradients: with it on, the trained weights differ from a run
    with its weights at 0, and weights 0 equal the run without loss.distill."""
    from safetensors.torch import load_file

    from codiemb.train.loop import train

    def weights_after(sub, **over):
        d = tmp_path / sub
        d.mkdir()
        cfg = _cfg(d, nodrop_model_dir, teacher_dir, **{"train.max_steps": 3, **over})
        train(cfg, output_dir=d / "out")
        return load_file(str(d / "out" / "model" / "model.safetensors"))

    on = weights_after("on")
    zero = weights_after("zero", **{"loss.distill.weights": "{retrieval: 0.0, sts: 0.0}"})
    off = weights_after("off", **{"loss.distill": "null"})
    assert any(not torch.equal(on[k], zero[k]) for k in on)
    assert all(torch.equal(zero[k], off[k]) for k in zero)


def test_unserved_dataset_is_a_config_error(tmp_path, tiny_model_dir, teacher_dir):
    from codiemb.errors import ConfigError
    from codiemb.train.loop import load_task_data

    cfg = _cfg(tmp_path, tiny_model_dir, teacher_dir, **{"loss.distill.teachers.0.tasks": "[sts]"})
    with pytest.raises(ConfigError, match="dataset 'ret'.*no teacher serves it"):
        load_task_data(cfg)


def test_config_rejects_margin_mse_for_sts_and_an_empty_teacher_list():
    from codiemb.config import load_config
    from codiemb.errors import ConfigError

    with pytest.raises(ConfigError, match="margin_mse needs"):
        load_config(None, ["loss.distill={teachers: [{model: mpnet}], form: {sts: margin_mse}}"])
    with pytest.raises(ConfigError, match="loss.distill.teachers"):
        load_config(None, ["loss.distill={teachers: []}"])
    from tests.conftest import REPO

    cfg = load_config(REPO / "configs" / "codiemb-minilm-distill.yaml")
    d = cfg.loss.distill
    assert [(t.model, t.tasks) for t in d.teachers] == [("mpnet", ["sts"]), ("runs/ir-scifact-hn1-r95/model", ["scifact"])]
    assert d.form == {"sts": "kl", "scifact": "margin_mse"} and d.weights == {"sts": 0.2, "scifact": 10.0}
    from codiemb.train.distill import dataset_setting

    assert dataset_setting(cfg, "scifact", "retrieval") == (10.0, "margin_mse")
    assert dataset_setting(cfg, "snli", "retrieval")[0] == 0.0  # SNLI batches are not distilled


def test_sigterm_during_teacher_scoring_stops_before_the_first_step(tmp_path, tiny_model_dir, teacher_dir,
                                                                    monkeypatch):
    """A real SIGTERM during the teacher's one-off scoring stops at the next block (not after the
    whole scoring, as before: a scheduler's grace period ends in SIGKILL); no teacher set is left
    that reads as complete, and the rerun scores and trains as usual."""
    import os
    import signal

    from codiemb.train import fast_batches, stop
    from codiemb.train.loop import load_task_data

    cfg = _cfg(tmp_path, tiny_model_dir, teacher_dir)
    cfg.loss.distill.teachers[0].batch_size = 4  # several blocks per shard
    real_pad, sent = fast_batches.pad_ids, []

    def pad_and_sigterm(*a, **kw):
        if not sent:
            sent.append(1)
            os.kill(os.getpid(), signal.SIGTERM)
        return real_pad(*a, **kw)

    monkeypatch.setattr(fast_batches, "pad_ids", pad_and_sigterm)
    try:
        with stop.sigterm_stops_training():
            with pytest.raises(stop.TrainingStopped, match="during teacher scoring of .*before the first step"):
                load_task_data(cfg)
    finally:
        stop._requested.clear()  # a later train() in this process must not see the flag
    assert sent and not list((tmp_path / "shards" / "teachers").glob("*/manifest.json"))
    monkeypatch.setattr(fast_batches, "pad_ids", real_pad)
    tasks, _ = load_task_data(cfg)
    assert all(t.teachers and len(t.teachers[0][0]) == len(t.store) for t in tasks)
