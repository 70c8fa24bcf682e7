"""info_nce against a plain Python-loop reference in float64 (loss and gradients)."""

from __future__ import annotations

import math

import pytest
import torch

from codiemb.losses.ir import info_nce


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum() / (a.norm() * b.norm())


def loop_reference(q: torch.Tensor, passages: torch.Tensor, m: int, tau: float) -> torch.Tensor:
    """L = (1/m) Σ_j (1/B) Σ_i −log softmax over {p_kj, negatives of every k} at p_ij — one term at a time."""
    B, P, _ = passages.shape
    total = 0.0
    for j in range(m):
        for i in range(B):
            candidates = []  # list of (is_target, logit)
            for k in range(B):
                candidates.append((k == i, _cos(q[i], passages[k, j]) / tau))
                for t in range(m, P):
                    candidates.append((False, _cos(q[i], passages[k, t]) / tau))
            logits = torch.stack([c[1] for c in candidates])
            target = [c[0] for c in candidates].index(True)
            total = total + (torch.logsumexp(logits, 0) - logits[target])
    return total / (B * m)


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(7)
    B, m, n, D = 4, 2, 3, 6
    q = torch.randn(B, D, generator=g, dtype=torch.float64)
    p = torch.randn(B, m + n, D, generator=g, dtype=torch.float64)
    return q, p, m, n


def test_two_positives_three_negatives_match_loop(batch):
    q, p, m, _ = batch
    q1, p1 = q.clone().requires_grad_(), p.clone().requires_grad_()
    q2, p2 = q.clone().requires_grad_(), p.clone().requires_grad_()
    got = info_nce(q1, p1, num_positives=m, temperature=0.05, gather=False)
    ref = loop_reference(q2, p2, m, 0.05)
    assert got.item() == pytest.approx(ref.item(), rel=1e-10)
    got.backward()
    ref.backward()
    torch.testing.assert_close(q1.grad, q2.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(p1.grad, p2.grad, rtol=1e-9, atol=1e-12)


def test_float32_matches_float64_reference(batch):
    q, p, m, _ = batch
    got = info_nce(q.float(), p.float(), num_positives=m, temperature=0.02, gather=False)
    ref = loop_reference(q, p, m, 0.02)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(ref.item(), rel=1e-4)


def test_single_positive_no_negatives_is_in_batch_cross_entropy():
    # hand-checkable case: B=2, D=2, orthogonal passages, cosine = ±1 / 0
    q = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    p = torch.tensor([[[3.0, 0.0]], [[0.0, 1.0]]], dtype=torch.float64)  # (B=2, P=1, D)
    tau = 0.5
    # query 0: logits [1/τ, 0], query 1: logits [0, 1/τ]  -> both −log(e^2 / (e^2 + 1))
    expected = -math.log(math.exp(2) / (math.exp(2) + 1))
    assert info_nce(q, p, num_positives=1, temperature=tau, gather=False).item() == pytest.approx(expected, rel=1e-12)


def test_embeddings_are_normalised_inside(batch):
    q, p, m, _ = batch
    a = info_nce(q, p, m, gather=False)
    b = info_nce(3.0 * q, 0.5 * p, m, gather=False)
    assert a.item() == pytest.approx(b.item(), rel=1e-10)


def test_stats_count_negatives(batch):
    q, p, m, n = batch
    loss, stats = info_nce(q, p, m, gather=True, return_stats=True)  # no process group: local batch
    B = q.shape[0]
    assert stats == {"global_batch": B, "candidates": B * (1 + n), "negatives_per_query": B * (1 + n) - 1,
                     "local_queries": B, "logits_shape": (B, B * (1 + n))}
    assert loss.item() == pytest.approx(info_nce(q, p, m, gather=False).item(), rel=1e-12)


def test_bad_shapes_and_positive_counts_raise(batch):
    q, p, m, _ = batch
    with pytest.raises(ValueError, match="num_positives"):
        info_nce(q, p, num_positives=6)
    with pytest.raises(ValueError, match="num_positives"):
        info_nce(q, p, num_positives=0)
    with pytest.raises(ValueError, match="expects"):
        info_nce(q, p[:, 0], num_positives=1)
    with pytest.raises(ValueError, match="disagree"):
        info_nce(q[:3], p, num_positives=1)
