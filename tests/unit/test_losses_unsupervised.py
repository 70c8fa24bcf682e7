"""Unsupervised contrastive task: SimCSE, WhitenedCSE, DebCSE (losses/unsupervised.py) and the
``task: unsupervised`` dataset kind.

Every formula is checked against a direct computation in plain numpy / Python loops on small
tensors; gradients flow; W=2 gloo ranks × B rows equal 1 process × 2B rows (loss and averaged
gradients, as tests/unit/test_gather.py); a tiny ``--local`` train runs each method end to end.
"""

from __future__ import annotations

import gc
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from codiemb.losses import unsupervised as U
from codiemb.losses.matryoshka import matryoshka

TAU = 0.05


def _np_norm(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _np_infonce(a, c, tau):
    """(1/B) Σ_i −log softmax_j(cos(a_i, c_j)/τ)[i], by loops."""
    a, c = _np_norm(a), _np_norm(c)
    total = 0.0
    for i in range(len(a)):
        logits = [float(a[i] @ c[j]) / tau for j in range(len(c))]
        m = max(logits)
        total += -(logits[i] - m - math.log(sum(math.exp(x - m) for x in logits)))
    return total / len(a)


def _np_sgw(x, perm, k, eps):
    """Shuffled group whitening by hand: shuffle, ZCA per group (numpy eigh), unshuffle."""
    n, d = x.shape
    xs = x[:, perm]
    out = np.zeros_like(xs)
    for s in range(0, d, k):
        g = xs[:, s:s + k]
        c = g - g.mean(0, keepdims=True)
        cov = c.T @ c / n + eps * np.eye(g.shape[1])
        lam, u = np.linalg.eigh(cov)
        out[:, s:s + k] = c @ (u @ np.diag(lam ** -0.5) @ u.T)
    res = np.zeros_like(out)
    res[:, perm] = out
    return res


def _data(b=6, d=8, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    z1 = torch.randn(b, d, generator=g, dtype=dtype)
    return z1, z1 + 0.3 * torch.randn(b, d, generator=g, dtype=dtype)


# --------------------------------------------------------------------------- SimCSE
def test_simcse_matches_loops():
    z1, z2 = _data()
    got = U.simcse_loss(z1, z2, TAU, gather=False)
    assert got.item() == pytest.approx(_np_infonce(z1.numpy(), z2.numpy(), TAU), rel=1e-10)


# --------------------------------------------------------------------------- WhitenedCSE
@pytest.mark.parametrize("k", [3, 4, 8])  # 8 = 3+3+2 groups with a smaller last group when k=3
def test_shuffled_group_whitening_matches_numpy(k):
    x = torch.randn(20, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(2))
    got = U.shuffled_group_whitening(x, k, perm=perm, eps=1e-6).numpy()
    np.testing.assert_allclose(got, _np_sgw(x.numpy(), perm.numpy(), k, 1e-6), rtol=1e-8, atol=1e-10)
    # each group (in shuffled order) has identity covariance over the batch
    xs = got[:, perm.numpy()]
    for s in range(0, 8, k):
        g = xs[:, s:s + k]
        np.testing.assert_allclose(g.T @ g / len(g), np.eye(g.shape[1]), atol=1e-4)


def test_whitenedcse_matches_reference():
    g = torch.Generator().manual_seed(3)
    views = torch.randn(3, 10, 8, generator=g, dtype=torch.float64)
    got = U.whitenedcse_loss(views, TAU, group_size=4, eps=1e-6, generator=torch.Generator().manual_seed(9),
                             gather=False)
    perms = torch.Generator().manual_seed(9)  # the same draws, in view order
    white = [_np_sgw(views[p].numpy(), torch.randperm(8, generator=perms).numpy(), 4, 1e-6) for p in range(3)]
    want = sum(_np_infonce(white[0], white[p], TAU) for p in (1, 2))
    assert got.item() == pytest.approx(want, rel=1e-8)


def test_whitening_grad_option_changes_only_the_backward():
    views = torch.randn(2, 12, 6, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    grads = []
    for grad in (False, True):
        v = views.clone().requires_grad_(True)
        loss = U.whitenedcse_loss(v, TAU, 3, 1e-5, grad=grad, generator=torch.Generator().manual_seed(0),
                                  gather=False)
        loss.backward()
        grads.append((loss.item(), v.grad.clone()))
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-12)
    assert not torch.allclose(grads[0][1], grads[1][1])


# --------------------------------------------------------------------------- DebCSE
def _surface(b, h=16, seed=5):
    rng = np.random.default_rng(seed)
    bags1 = (rng.random((b, h)) < 0.4).astype(np.float32)
    bags2 = bags1 * (rng.random((b, h)) < 0.8)
    bags1[:, 0] = bags2[:, 0] = 1  # no empty bag
    return U.SurfaceFeatures(torch.tensor(bags1.sum(1)), torch.tensor(bags2.sum(1)), torch.tensor(bags1),
                             torch.tensor(bags2))


def _np_u(la, ba, lb, bb, alpha):
    inter = float((ba * bb).sum())
    union = float(ba.sum() + bb.sum() - inter)
    return alpha * inter / max(union, 1.0) + (1 - alpha) * min(la, lb) / max(la, lb, 1.0)


def _np_ipw(u_row, keep_row, bins, max_w):
    b = [min(int(math.floor(x * bins)), bins - 1) for x in u_row]
    kept = [j for j, k in enumerate(keep_row) if k]
    counts = {}
    for j in kept:
        counts[b[j]] = counts.get(b[j], 0) + 1
    w = [0.0] * len(u_row)
    if not kept:
        return w
    for j in kept:
        w[j] = min(len(kept) / (len(counts) * counts[b[j]]), max_w)
    s = sum(w)
    return [x * len(kept) / s for x in w]


def test_surface_similarity_and_propensity_weights_match_loops():
    s = _surface(7)
    u = U.surface_similarity(s.lengths1, s.bags1, s.lengths2, s.bags2, 0.3).numpy()
    for i in range(7):
        for j in range(7):
            want = _np_u(s.lengths1[i].item(), s.bags1[i].numpy(), s.lengths2[j].item(), s.bags2[j].numpy(), 0.3)
            assert u[i, j] == pytest.approx(want, abs=1e-12)
    keep = torch.rand(7, 7, generator=torch.Generator().manual_seed(0)) < 0.7
    w = U.propensity_weights(torch.tensor(u), keep, 4, 2.0).numpy()
    for i in range(7):
        np.testing.assert_allclose(w[i], _np_ipw(u[i], keep[i].tolist(), 4, 2.0), rtol=1e-10, atol=1e-12)
        assert w[i].sum() == pytest.approx(int(keep[i].sum()))


def _np_debcse(z1, z2, s, tau, thr, bins, alpha, max_w):
    a, c = _np_norm(z1), _np_norm(z2)
    n = len(a)
    L1, L2, B1, B2 = (t.numpy() for t in (s.lengths1, s.lengths2, s.bags1, s.bags2))
    u_pos = [_np_u(L1[i], B1[i], L2[i], B2[i], alpha) for i in range(n)]
    v = _np_ipw(u_pos, [True] * n, bins, max_w)
    total = 0.0
    for i in range(n):
        sim = [float(a[i] @ c[j]) for j in range(n)]
        keep = [j != i and sim[j] < thr for j in range(n)]
        u = [_np_u(L1[i], B1[i], L2[j], B2[j], alpha) for j in range(n)]
        w = _np_ipw(u, keep, bins, max_w)
        denom = math.exp(sim[i] / tau) + sum(w[j] * math.exp(sim[j] / tau) for j in range(n) if keep[j])
        total += v[i] * -(sim[i] / tau - math.log(denom))
    return total / n


@pytest.mark.parametrize("thr", [1.0, 0.3])  # 0.3: some negatives are taken for false negatives
def test_debcse_matches_loops(thr):
    z1, z2 = _data(b=8, d=6, seed=6)
    s = _surface(8)
    got, stats = U.debcse_loss(z1, z2, s, TAU, thr, bins=3, alpha=0.5, max_weight=3.0, gather=False,
                               return_stats=True)
    assert got.item() == pytest.approx(_np_debcse(z1.numpy(), z2.numpy(), s, TAU, thr, 3, 0.5, 3.0), rel=1e-9)
    assert (stats["kept_negatives"] < 1.0) == (thr < 1.0)


def test_debcse_uniform_surface_and_no_filter_is_simcse():
    """One surface bin, no false-negative filter: every weight 1, the loss is SimCSE's."""
    z1, z2 = _data(b=5, d=4, seed=7)
    s = _surface(5)
    got = U.debcse_loss(z1, z2, s, TAU, 1.1, bins=1, gather=False)
    assert got.item() == pytest.approx(U.simcse_loss(z1, z2, TAU, gather=False).item(), rel=1e-10)


# --------------------------------------------------------------------------- gradients, Matryoshka
def _all_losses(z1, z2, views, s, gather=False):
    return {"simcse": U.simcse_loss(z1, z2, TAU, gather=gather),
            "whitenedcse": U.whitenedcse_loss(views, TAU, 4, 1e-5, generator=torch.Generator().manual_seed(1),
                                              gather=gather),
            "debcse": U.debcse_loss(z1, z2, s, TAU, 0.9, bins=3, gather=gather)}


def test_gradients_flow():
    head = torch.nn.Linear(5, 8)
    x = torch.randn(3, 6, 5, generator=torch.Generator().manual_seed(2))
    for name in ("simcse", "whitenedcse", "debcse"):
        head.zero_grad()
        e = head(x)
        loss = _all_losses(e[0], e[1], e, _surface(6))[name]
        loss.backward()
        assert torch.isfinite(loss) and head.weight.grad.abs().sum() > 0, name


def test_matryoshka_wraps_each_loss():
    z1, z2 = _data(b=6, d=8)
    s = _surface(6)
    m = matryoshka(lambda a, b: U.debcse_loss(a, b, s, TAU, 0.9, gather=False), [8, 4])(z1, z2)
    want = U.debcse_loss(z1, z2, s, TAU, 0.9, gather=False) + U.debcse_loss(z1[:, :4], z2[:, :4], s, TAU, 0.9,
                                                                              gather=False)
    assert m.item() == pytest.approx(want.item(), rel=1e-12)
    views = torch.stack([z1, z2])
    mw = matryoshka(lambda v: U.whitenedcse_loss(v, TAU, 2, generator=torch.Generator().manual_seed(0),
                                                 gather=False), [8, 4])(views)
    assert torch.isfinite(mw)


# --------------------------------------------------------------------------- 2 gloo ranks == 1 process
WORLD, B = 2, 4


def _inputs():
    g = torch.Generator().manual_seed(11)
    return torch.randn(3, WORLD * B, 5, generator=g, dtype=torch.float64), _surface(WORLD * B, seed=3)


def _run(rows: slice, gather: bool):
    x, s = _inputs()
    torch.manual_seed(0)
    head = torch.nn.Linear(5, 8).double()  # float64: whitening amplifies float32 rounding of the summed grads
    local = U.SurfaceFeatures(*(t[rows] for t in (s.lengths1, s.lengths2, s.bags1, s.bags2)))
    out = {}
    for name in ("simcse", "whitenedcse", "debcse"):
        head.zero_grad()
        e = head(x[:, rows])
        loss = _all_losses(e[0], e[1], e, local, gather=gather)[name]
        loss.backward()
        out[name] = (loss.detach(), [p.grad.clone() for p in head.parameters()])
    return out


def _worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        out = _run(slice(rank * B, (rank + 1) * B), gather=True)
        for _, grads in out.values():
            for g in grads:
                dist.all_reduce(g, op=dist.ReduceOp.SUM)
                g /= WORLD
        torch.save(out, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.barrier()
        gc.collect()
        dist.destroy_process_group()


def test_two_workers_equal_one_worker(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    single = _run(slice(0, WORLD * B), gather=False)
    for r in range(WORLD):
        got = torch.load(tmp_path / f"rank{r}.pt", weights_only=False)
        for name, (loss, grads) in single.items():
            torch.testing.assert_close(got[name][0], loss, rtol=1e-9, atol=1e-12, msg=f"{name} loss rank {r}")
            for g, want in zip(got[name][1], grads):
                torch.testing.assert_close(g, want, rtol=1e-7, atol=1e-9, msg=f"{name} grad rank {r}")


# --------------------------------------------------------------------------- data + loop
def test_rows_and_shards(tiny_model_dir):
    from codiemb.data.schemas import RowError, validate_row
    from codiemb.data.shards import encode_rows
    from codiemb.data.tokenize import load_tokenizer

    assert validate_row("unsupervised", {"text": "a cat"}) == {"texts": ["a cat"]}
    rec = validate_row("unsupervised", {"sentence1": "a cat", "sentence2": "a dog", "score": 9}, None,
                       ["sentence1", "sentence2"])
    assert rec == {"texts": ["a cat", "a dog"]}  # the score is not read (9 is outside any STS range)
    with pytest.raises(RowError, match="missing field 'text'"):
        validate_row("unsupervised", {"sentence1": "x"})
    with pytest.raises(RowError, match="is empty"):
        validate_row("unsupervised", {"text": "  "})
    tok = load_tokenizer(str(tiny_model_dir))
    enc = encode_rows(tok, "unsupervised", [rec, {"texts": ["the sun"]}], {"sts": 16}, lines=[3, 4])
    assert enc.rows == 3 and enc.arrays["line"].tolist() == [3, 3, 4]
    from codiemb.data.shards import shard_stats

    assert shard_stats("unsupervised", enc.arrays)["source_rows"] == 2


def test_delete_tokens_keeps_specials_and_prefix():
    from codiemb.train.loop import delete_tokens

    ids = np.arange(10)
    out = delete_tokens(ids, 3, 0.99, random.Random(0))
    assert out[:3].tolist() == [0, 1, 2] and out[-1] == 9 and 4 <= len(out) < 10


@pytest.mark.parametrize("method", ["simcse", "whitenedcse", "debcse"])
def test_local_train_end_to_end(tiny_model_dir, tmp_path, method):
    from codiemb import cli

    rows = [{"sentence1": f"the {a} {v} a {b}", "sentence2": f"a {b} {v} the {a}", "score": 2.5}
            for a, b, v in zip(["cat", "dog", "man", "woman", "child", "car"],
                               ["tree", "house", "sun", "moon", "water", "fire"],
                               ["sees", "likes", "eats", "reads", "hears", "plays"])]
    data = tmp_path / "stsb.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({
        "run": {"name": "u"}, "model": {"name": str(tiny_model_dir), "max_length": {"sts": 16}},
        "data": {"datasets": [{"name": "text", "task": "unsupervised", "path": str(data), "batch_size": 4,
                               "text_fields": ["sentence1", "sentence2"]}]},
        "loss": {"unsupervised": {"method": method, "group_size": 4}, "matryoshka": {"dims": [32, 16]}},
        "train": {"max_steps": 2, "log_every": 1, "checkpoint_every": 0, "eval_at_end": False},
        "storage": {"path": str(tmp_path / "runs")}}))
    assert cli.main(["train", str(cfg), "--local", "--no-tracking"]) == 0
    out = tmp_path / "runs" / "u"
    assert (out / "model").is_dir()
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and all(math.isfinite(m["loss/text"]) for m in metrics)
