"""STS losses against independent float64 references (loops, numpy/scipy), ties included."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import pearsonr, rankdata

from codiemb.config import StsLossConfig
from codiemb.losses.sts import average_ranks_desc, cosent, cosine, mid_nce, pearson_loss, pro, rank_kl, sts_loss

# gold scores with ties (two 3.0s, two 5.0s) on the STS-B 0..5 scale
Y_TIED = torch.tensor([3.0, 0.5, 5.0, 3.0, 1.0, 5.0, 2.2, 4.1], dtype=torch.float64)


@pytest.fixture
def pairs():
    g = torch.Generator().manual_seed(3)
    e1 = torch.randn(8, 5, generator=g, dtype=torch.float64)
    e2 = torch.randn(8, 5, generator=g, dtype=torch.float64)
    mid1 = torch.randn(8, 4, generator=g, dtype=torch.float64)
    mid2 = torch.randn(8, 4, generator=g, dtype=torch.float64)
    return e1, e2, mid1, mid2


def _cos_np(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


# ----------------------------------------------------------------------------- references
def ref_cosent(s, y, lam):
    terms = [0.0] + [lam * (s[j] - s[i]) for i in range(len(s)) for j in range(len(s)) if y[i] > y[j]]
    mx = max(terms)
    return mx + math.log(sum(math.exp(t - mx) for t in terms))


def ref_rank_kl(s, y, T):
    n = len(s)
    r = rankdata(-np.asarray(y), method="average") - 1
    ideal = (n - 1 - r) / (n - 1)
    p = np.exp(ideal / T) / np.exp(ideal / T).sum()
    logq = s / T - np.log(np.exp(s / T).sum())
    return float((p * (np.log(p) - logq)).sum() / n)


def ref_pro(s, y, T, eps=1e-12):
    """The released PROLoss loop, transcribed: sort desc, per k softmax over [w_k ŝ_k, w_t ŝ_t]."""
    order = sorted(range(len(y)), key=lambda i: -y[i])
    ys = [y[i] for i in order]
    ss = [s[i] / T for i in order]
    losses = []
    for k in range(len(ys) - 1):
        tail = [t for t in range(k + 1, len(ys)) if ys[k] - ys[t] > eps]
        if not tail:
            continue
        w = [ys[k] - ys[t] for t in tail]
        wk = max(w)
        logits = [wk * ss[k]] + [wt * ss[t] for wt, t in zip(w, tail)]
        mx = max(logits)
        lse = mx + math.log(sum(math.exp(v - mx) for v in logits))
        losses.append(lse - logits[0])
    return sum(losses) / len(losses) if losses else 0.0


def ref_mid_nce(a, b, y, thr, T):
    vals = []
    for i in range(len(y)):
        if y[i] < thr:
            continue
        logits = [_cos_np(a[i], b[j]) / T for j in range(len(y))]
        mx = max(logits)
        vals.append(mx + math.log(sum(math.exp(v - mx) for v in logits)) - logits[i])
    return sum(vals) / len(vals)


# ----------------------------------------------------------------------------- single losses
def test_cosent_matches_loop_and_sentence_transformers(pairs):
    e1, e2, _, _ = pairs
    s = cosine(e1, e2)
    got = cosent(s, Y_TIED, scale=20.0)
    assert got.item() == pytest.approx(ref_cosent(s.tolist(), Y_TIED.tolist(), 20.0), rel=1e-10)
    st = pytest.importorskip("sentence_transformers.sentence_transformer.losses.cosent")
    st_loss = st.CoSENTLoss(torch.nn.Identity(), scale=20.0).compute_loss_from_embeddings([e1, e2], Y_TIED)
    assert got.item() == pytest.approx(st_loss.item(), rel=1e-10)


def test_pearson_matches_scipy(pairs):
    e1, e2, _, _ = pairs
    s = cosine(e1, e2)
    expected = 1.0 - pearsonr(s.numpy(), Y_TIED.numpy()).statistic
    assert pearson_loss(s, Y_TIED).item() == pytest.approx(expected, rel=1e-10)
    # affine invariance in y: normalised scores give the same loss
    assert pearson_loss(s, Y_TIED / 5).item() == pytest.approx(expected, rel=1e-10)


def test_average_ranks_match_scipy():
    assert average_ranks_desc(Y_TIED).tolist() == (rankdata(-Y_TIED.numpy(), method="average") - 1).tolist()
    # by hand: 5.0,5.0 share ranks 0,1 -> 0.5; 4.1 -> 2; 3.0,3.0 share 3,4 -> 3.5; 2.2 -> 5; 1.0 -> 6; 0.5 -> 7
    assert average_ranks_desc(Y_TIED).tolist() == [3.5, 7.0, 0.5, 3.5, 6.0, 0.5, 5.0, 2.0]


def test_rank_kl_matches_numpy_reference_with_ties(pairs):
    e1, e2, _, _ = pairs
    s = cosine(e1, e2)
    got = rank_kl(s, Y_TIED, temperature=0.05)
    assert got.item() == pytest.approx(ref_rank_kl(s.numpy(), Y_TIED.numpy(), 0.05), rel=1e-9)
    # only the order of y matters
    assert rank_kl(s, Y_TIED ** 3, 0.05).item() == pytest.approx(got.item(), rel=1e-12)


def test_pro_matches_released_loop_with_ties(pairs):
    e1, e2, _, _ = pairs
    s = cosine(e1, e2)
    y = Y_TIED / 5
    got = pro(s, y, temperature=0.05)
    assert got.item() == pytest.approx(ref_pro(s.tolist(), y.tolist(), 0.05), rel=1e-10)


def test_pro_by_hand_three_items():
    # y = [1, 0.5, 0]; s = [0.2, 0.1, 0.3]; T = 1.
    # k=0: tail {1,2}, w = [0.5, 1], w_k = 1 -> logits [0.2, 0.05, 0.3]
    # k=1: tail {2},  w = [0.5],     w_k = 0.5 -> logits [0.05, 0.15]
    s = torch.tensor([0.2, 0.1, 0.3], dtype=torch.float64)
    y = torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64)
    l0 = math.log(math.exp(0.2) + math.exp(0.05) + math.exp(0.3)) - 0.2
    l1 = math.log(math.exp(0.05) + math.exp(0.15)) - 0.05
    assert pro(s, y, temperature=1.0).item() == pytest.approx((l0 + l1) / 2, rel=1e-12)


def test_all_tied_scores_give_zero_with_graph(pairs):
    e1, e2, _, _ = pairs
    x = e1.clone().requires_grad_()
    s = cosine(x, e2)
    y = torch.full((8,), 2.5, dtype=torch.float64)
    for fn in (cosent, pearson_loss, pro):
        loss = fn(s, y)
        assert loss.item() == 0.0
        (g,) = torch.autograd.grad(loss, x, retain_graph=True)
        assert torch.count_nonzero(g) == 0
    # RankKL with all ties: target uniform; loss is KL(uniform || softmax(s/T))/n, still defined
    expected = ref_rank_kl(s.detach().numpy(), y.numpy(), 0.05)
    assert rank_kl(s, y).item() == pytest.approx(expected, rel=1e-9)


def test_mid_nce_matches_loop_and_zero_when_nothing_qualifies(pairs):
    _, _, m1, m2 = pairs
    y = Y_TIED / 5
    got = mid_nce(m1, m2, y, threshold=0.8, temperature=0.05)
    assert got.item() == pytest.approx(ref_mid_nce(m1.numpy(), m2.numpy(), y.numpy(), 0.8, 0.05), rel=1e-10)
    a = m1.clone().requires_grad_()
    zero = mid_nce(a, m2, y, threshold=1.5)
    assert zero.item() == 0.0
    zero.backward()
    assert a.grad is not None and torch.count_nonzero(a.grad) == 0


# ----------------------------------------------------------------------------- combination
def test_sts_loss_weighted_sum_and_parts(pairs):
    e1, e2, m1, m2 = pairs
    cfg = StsLossConfig(cosent=0.3, pearson=2.0, rank_kl=5.0, pro=0.5, mid_nce=1.0, mid_nce_threshold=0.8)
    total, parts = sts_loss(e1, e2, Y_TIED, cfg, mid1=m1, mid2=m2, score_range=(0, 5))
    s = _cos_np(e1.numpy(), e2.numpy())
    yn = (Y_TIED / 5).numpy()
    ref = {
        "cosent": ref_cosent(s.tolist(), yn.tolist(), 20.0),
        "pearson": 1.0 - pearsonr(s, yn).statistic,
        "rank_kl": ref_rank_kl(s, yn, 0.05),
        "pro": ref_pro(s.tolist(), yn.tolist(), 0.05),
        "mid_nce": ref_mid_nce(m1.numpy(), m2.numpy(), yn, 0.8, 0.05),
    }
    for k, v in ref.items():
        assert parts[k] == pytest.approx(v, rel=1e-9), k
    expected = 0.3 * ref["cosent"] + 2 * ref["pearson"] + 5 * ref["rank_kl"] + 0.5 * ref["pro"] + ref["mid_nce"]
    assert total.item() == pytest.approx(expected, rel=1e-9)
    assert parts["total"] == pytest.approx(expected, rel=1e-9)


def test_sts_loss_skips_zero_weights_and_needs_mid_embeddings(pairs):
    e1, e2, _, _ = pairs
    cfg = StsLossConfig(cosent=0.0, pearson=1.0, rank_kl=0.0, pro=0.0, mid_nce=0.0)
    total, parts = sts_loss(e1, e2, Y_TIED, cfg)
    assert set(parts) == {"pearson", "total"}
    assert total.item() == pytest.approx(parts["pearson"], rel=1e-12)
    with pytest.raises(ValueError, match="mid1"):
        sts_loss(e1, e2, Y_TIED, StsLossConfig())
    with pytest.raises(ValueError, match="score_range"):
        sts_loss(e1, e2, Y_TIED, cfg, score_range=(5, 5))


def test_sts_loss_normalises_by_score_range(pairs):
    e1, e2, m1, m2 = pairs
    cfg = StsLossConfig(cosent=1.0)
    a, pa = sts_loss(e1, e2, Y_TIED, cfg, mid1=m1, mid2=m2, score_range=(0, 5))
    b, pb = sts_loss(e1, e2, Y_TIED / 5, cfg, mid1=m1, mid2=m2, score_range=(0, 1))
    assert a.item() == pytest.approx(b.item(), rel=1e-12)
    # PRO's weights depend on the scale: the raw 0..5 scores would give another value
    s = cosine(e1, e2)
    assert pa["pro"] == pytest.approx(pro(s, Y_TIED / 5).item(), rel=1e-12)
    assert abs(pa["pro"] - pro(s, Y_TIED).item()) > 1e-3
