"""Matryoshka / 2D Matryoshka wrappers: truncation contract, weighting, layer sampling, KL."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from codiemb.config import StsLossConfig
from codiemb.losses.ir import info_nce
from codiemb.losses.matryoshka import layer_kl, matryoshka, matryoshka_2d
from codiemb.losses.sts import sts_loss


def probe(a, b, y, *, c=None, scale=1.0):
    """A loss that reveals what it received: Σa·1 + 10·Σb + 100·Σy (+1000·Σc), times scale."""
    out = a.sum() + 10 * b.sum() + 100 * y.sum()
    if c is not None:
        out = out + 1000 * c.sum()
    return out * scale


def test_truncates_embedding_tensors_only_and_weights_sum():
    a = torch.arange(12.0).reshape(2, 6)  # rows [0..5], [6..11]
    b = torch.ones(2, 3, 6)
    y = torch.tensor([1.0, 2.0])  # 1-D: never truncated
    c = torch.ones(2, 6)  # keyword embedding: truncated too
    other = torch.ones(2, 4)  # last dim != full: passed as is
    loss = matryoshka(probe, dims=[6, 2], weights=[1.0, 0.5])(a, b, y, c=c, scale=1.0)
    # d=6: Σa=66, Σb=36, Σy=3, Σc=12 ; d=2: Σa=0+1+6+7=14, Σb=12, Σc=4
    d6 = 66 + 10 * 36 + 100 * 3 + 1000 * 12
    d2 = 14 + 10 * 12 + 100 * 3 + 1000 * 4
    assert loss.item() == pytest.approx(d6 + 0.5 * d2)
    seen = []
    matryoshka(lambda x, z: seen.append((tuple(x.shape), tuple(z.shape))) or x.sum(), [6, 3])(a, other)
    assert seen == [((2, 6), (2, 4)), ((2, 3), (2, 4))]


def test_matches_manual_prefix_sum_for_info_nce_with_gradients():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(4, 8, generator=g, dtype=torch.float64, requires_grad=True)
    p = torch.randn(4, 3, 8, generator=g, dtype=torch.float64, requires_grad=True)
    wrapped = matryoshka(info_nce, dims=[8, 4, 2], weights=[1.0, 0.7, 0.2])
    got = wrapped(q, p, 1, temperature=0.1, gather=False)
    gq, gp = torch.autograd.grad(got, (q, p))
    ref = sum(w * info_nce(q[:, :d], p[..., :d], 1, temperature=0.1, gather=False) for d, w in [(8, 1.0), (4, 0.7), (2, 0.2)])
    rq, rp = torch.autograd.grad(ref, (q, p))
    assert got.item() == pytest.approx(ref.item(), rel=1e-12)
    torch.testing.assert_close(gq, rq)
    torch.testing.assert_close(gp, rp)


def test_tuple_losses_keep_parts_per_dim():
    g = torch.Generator().manual_seed(1)
    e1, e2 = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    y = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0, 5.0])
    cfg = StsLossConfig(mid_nce=0.0)
    total, parts = matryoshka(sts_loss, [8, 4])(e1, e2, y, cfg)
    t8, _ = sts_loss(e1, e2, y, cfg)
    t4, p4 = sts_loss(e1[:, :4], e2[:, :4], y, cfg)
    assert total.item() == pytest.approx(t8.item() + t4.item(), rel=1e-6)
    assert parts["dim4"] == pytest.approx(t4.item(), rel=1e-6)
    assert parts["pearson@4"] == pytest.approx(p4["pearson"], rel=1e-6)
    assert parts["total"] == pytest.approx(total.item(), rel=1e-6)


def test_bad_dims_raise():
    with pytest.raises(ValueError, match="exceed"):
        matryoshka(probe, [16])(torch.ones(2, 8), torch.ones(2, 8), torch.ones(2))
    with pytest.raises(ValueError, match="weights"):
        matryoshka(probe, [4, 2], [1.0])
    with pytest.raises(ValueError, match="positive"):
        matryoshka(probe, [])


def ref_kl(x: np.ndarray, t: np.ndarray, T: float) -> float:
    px = np.exp(x / T) / np.exp(x / T).sum(-1, keepdims=True)
    pt = np.exp(t / T) / np.exp(t / T).sum(-1, keepdims=True)
    return float((pt * (np.log(pt) - np.log(px))).sum() / x.shape[0] * T)


def test_layer_kl_matches_numpy_and_detaches_teacher():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    kl = layer_kl(x, t, 0.3)
    assert kl.item() == pytest.approx(ref_kl(x.detach().numpy(), t.detach().numpy(), 0.3), rel=1e-10)
    kl.backward()
    assert t.grad is None and x.grad is not None


def _layers(n_layers=4, B=3, D=6, seed=5):
    g = torch.Generator().manual_seed(seed)
    return {
        l: (torch.randn(B, D, generator=g, dtype=torch.float64), torch.randn(B, D, generator=g, dtype=torch.float64))
        for l in range(n_layers)
    }


def test_2d_adds_sampled_layer_weighted_and_kl():
    layers = _layers()
    y = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    fn = matryoshka_2d(probe, dims=[6, 3], kl_weight=0.5, kl_temperature=0.3)
    got = fn(layers, y, generator=torch.Generator().manual_seed(11))
    # the same draw the wrapper makes: earlier layers [0, 1, 2], first of a seeded randperm
    chosen = [0, 1, 2][torch.randperm(3, generator=torch.Generator().manual_seed(11))[0].item()]
    M = matryoshka(probe, [6, 3])
    last = M(*layers[3], y)
    prior = M(*layers[chosen], y) / (1 + chosen)
    kl = np.mean([ref_kl(layers[chosen][i].numpy(), layers[3][i].numpy(), 0.3) for i in range(2)])
    assert got.item() == pytest.approx((last + prior).item() + 0.5 * kl, rel=1e-10)


def test_2d_sampling_is_seeded_and_covers_earlier_layers():
    layers = _layers(n_layers=4)
    y = torch.ones(3, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    cfg = StsLossConfig(mid_nce=0.0)
    fn = matryoshka_2d(lambda a, b, yy: sts_loss(a, b, yy, cfg), dims=[6])
    seen = [fn(layers, y, generator=g)[1]["layer"] for _ in range(60)]
    assert set(seen) == {0.0, 1.0, 2.0}  # never the last layer, every earlier one
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    a = [fn(layers, y, generator=g1)[1]["layer"] for _ in range(10)]
    b = [fn(layers, y, generator=g2)[1]["layer"] for _ in range(10)]
    assert a == b


def test_2d_only_last_layer_and_teacher_gets_no_kl_gradient():
    layers = {l: tuple(t.clone().requires_grad_() for t in ts) for l, ts in _layers(n_layers=2).items()}
    y = torch.ones(3, dtype=torch.float64)
    # only the KL term: last/prior weights 0
    fn = matryoshka_2d(probe, [6], last_layer_weight=0.0, prior_layers_weight=0.0, kl_weight=1.0)
    fn(layers, y).backward()
    assert all(t.grad is None or torch.count_nonzero(t.grad) == 0 for t in layers[1])
    assert all(torch.count_nonzero(t.grad) > 0 for t in layers[0])
    single = matryoshka_2d(probe, [6])({7: layers[1]}, y)
    assert single.item() == pytest.approx(probe(*layers[1], y).item())
    assert math.isfinite(single.item())
