"""STS losses: order-aware objectives on cosine similarities (DESIGN §4).

CoDiEmb (arXiv 2508.11442) trains STS with L = L_MidNCE + 0.5·L_PRO + 2·L_Pearson + 5·L_RankKL;
the released code is TencentCloudADP/youtu-embedding, training/CoDiEmb/train/loss.py
(``PearsonCorrelationLoss``, ``RankKLDivergenceLoss``, ``PROLoss``, ``ContrastiveLoss`` with
``task_type="sts"``) and train/model.py (how they are combined). CoSENT is Su (2022), as in
sentence-transformers' ``CoSENTLoss``.

Every function takes s = cosine similarities (B,) and y = gold scores (B,). Tied gold scores
never form a pair (CoSENT, PRO) and share their average rank (RankKL). A loss with nothing to
compare returns a zero that is still connected to the graph (``backward`` works, gradient 0).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from codiemb.losses.distributed import gather_no_grad, gather_with_grad, mean_value_over_ranks, upcast, world_info

if TYPE_CHECKING:  # pragma: no cover
    from codiemb.config import StsLossConfig


def _zero(*tensors: torch.Tensor) -> torch.Tensor:
    """A scalar 0 that keeps the graph of ``tensors`` (so backward/DDP see every parameter)."""
    return sum(t.sum() for t in tensors) * 0.0


def cosent(s: torch.Tensor, y: torch.Tensor, scale: float = 20.0) -> torch.Tensor:
    r"""CoSENT: L = log(1 + Σ_{(i,j): y_i > y_j} exp(λ (s_j − s_i))), λ = ``scale``.

    Su, "CoSENT" (2022); same formula as sentence-transformers ``CoSENTLoss`` (scale 20) and the
    released ``CoSentLoss`` (λ = 1/0.05). Pairs with equal y contribute nothing.
    """
    s = upcast(s).view(-1)
    y = y.to(s.dtype).view(-1)
    diff = scale * (s[None, :] - s[:, None])  # diff[i, j] = λ (s_j − s_i)
    ordered = y[:, None] > y[None, :]
    terms = torch.cat([s.new_zeros(1), diff[ordered]])
    return torch.logsumexp(terms, dim=0)


def pearson_loss(s: torch.Tensor, y: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    r"""L = 1 − ρ(s, y), ρ the Pearson correlation over the batch (population moments).

    Released ``PearsonCorrelationLoss``. Zero (graph kept) when y is constant or B < 2.
    """
    s = upcast(s).view(-1)
    y = y.to(s.dtype).view(-1)
    if y.numel() < 2 or bool(y.min() == y.max()):
        return _zero(s)
    sc = s - s.mean()
    yc = y - y.mean()
    rho = (sc * yc).sum() / (sc.norm() * yc.norm()).clamp_min(eps)
    return 1.0 - rho


def average_ranks_desc(y: torch.Tensor) -> torch.Tensor:
    """0-based rank of each y in DESCENDING order, ties get their average rank.

    Equals ``scipy.stats.rankdata(-y, method="average") - 1`` (what the released code uses).
    """
    y = y.view(-1)
    greater = (y[None, :] > y[:, None]).sum(dim=1).to(torch.float64)
    equal = (y[None, :] == y[:, None]).sum(dim=1).to(torch.float64)
    return greater + (equal - 1.0) / 2.0


def rank_kl(s: torch.Tensor, y: torch.Tensor, temperature: float = 0.05) -> torch.Tensor:
    r"""RankKL: KL(softmax(ỹ/T) ‖ softmax(s/T)) / n.

    r = average 0-based rank of −y (ties averaged), ỹ = (n − 1 − r)/(n − 1) ∈ [0, 1] (the best
    pair gets 1, the worst 0). The KL sum is divided by n, as the released
    ``RankKLDivergenceLoss`` does (``F.kl_div(..., reduction="batchmean")`` on a 1-D list divides
    by its length); CoDiEmb's weight 5 is tuned for that scale. Zero (graph kept) when n < 2.
    """
    s = upcast(s).view(-1)
    n = s.numel()
    if n < 2:
        return _zero(s)
    r = average_ranks_desc(y.view(-1))
    ideal = ((n - 1 - r) / (n - 1)).to(s.dtype)
    target = F.softmax(ideal / temperature, dim=0)
    log_pred = F.log_softmax(s / temperature, dim=0)
    return (target * (target.log() - log_pred)).sum() / n


def pro(s: torch.Tensor, y: torch.Tensor, temperature: float = 0.05) -> torch.Tensor:
    r"""PRO (Preference Ranking Optimisation) adapted to STS, as in the released ``PROLoss``.

    ŝ = s/T. Sort the pairs by y (descending). For each k whose tail has pairs with a strictly
    lower score, N_k = {t : y_k > y_t}, w_t = y_k − y_t and w_k = max_{t ∈ N_k} w_t
    (= y_k − min y; the released code's choice), and

        ℓ_k = −log( exp(w_k ŝ_k) / (exp(w_k ŝ_k) + Σ_{t ∈ N_k} exp(w_t ŝ_t)) )

    L = mean of ℓ_k over those k. Ties (y_t = y_k) are never in N_k. Because w depends on the
    scale of y, pass scores normalised to [0, 1] (``sts_loss`` does). Zero (graph kept) when all
    y are equal.
    """
    s_hat = upcast(s).view(-1) / temperature
    y = y.to(s_hat.dtype).view(-1)
    w = y[:, None] - y[None, :]  # w[k, t] = y_k − y_t
    neg = w > 0  # t ∈ N_k (strictly lower gold score; the sort order is implied)
    rows = neg.any(dim=1)
    if not bool(rows.any()):
        return _zero(s_hat)
    w_k = w.masked_fill(~neg, float("-inf")).amax(dim=1)[rows]
    logit_k = w_k * s_hat[rows]
    logits_neg = (w * s_hat[None, :]).masked_fill(~neg, float("-inf"))[rows]
    denom = torch.logsumexp(torch.cat([logit_k[:, None], logits_neg], dim=1), dim=1)
    return (denom - logit_k).mean()


def mid_nce(
    a: torch.Tensor, b: torch.Tensor, y: torch.Tensor, threshold: float, temperature: float = 0.05,
    *, offset: int = 0, num_valid: float | None = None,
) -> torch.Tensor:
    r"""MidNCE: in-batch InfoNCE on middle-layer embeddings of the pairs with y ≥ threshold.

    Released ``ContrastiveLoss(task_type="sts")`` applied to the middle hidden layer
    (model.py ``encode_with_multi_layer_loss``: hidden_states[n // 2]). With V = {i : y_i ≥ threshold}:

        L = (1/|V|) Σ_{i ∈ V} −log( exp(s(a_i, b_i)/τ) / Σ_{j=1..B} exp(s(a_i, b_j)/τ) )

    cosine s (normalised inside); every b_j of the batch is a candidate. Zero (graph kept) when
    no pair qualifies.

    Rank-local form (``sts_loss(gather=True)``): ``a`` and ``y`` are this rank's rows, ``b`` the
    gathered candidates, ``offset`` the index of a's first row in ``b``, and ``num_valid`` the
    divisor in place of the local |V| (the global |V| / W, so the mean over ranks is the global L).
    """
    a = F.normalize(upcast(a), dim=-1)
    b = F.normalize(upcast(b), dim=-1)
    valid = y.view(-1) >= threshold
    if not bool(valid.any()) or num_valid == 0:
        return _zero(a, b)
    logits = a[valid] @ b.T / temperature  # (|V_local|, candidates): only the rows that count
    targets = torch.arange(offset, offset + a.shape[0], device=a.device)[valid]
    if num_valid is None:
        return F.cross_entropy(logits, targets)
    return F.cross_entropy(logits, targets, reduction="sum") / num_valid


def cosine(e1: torch.Tensor, e2: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine similarity (B,) of two (B, D) embedding batches."""
    return (F.normalize(upcast(e1), dim=-1) * F.normalize(upcast(e2), dim=-1)).sum(dim=-1)


def sts_loss(
    e1: torch.Tensor,
    e2: torch.Tensor,
    y: torch.Tensor,
    weights: "StsLossConfig",
    mid1: torch.Tensor | None = None,
    mid2: torch.Tensor | None = None,
    score_range: tuple[float, float] = (0.0, 5.0),
    gather: bool = False,
) -> tuple[torch.Tensor, dict[str, float]]:
    r"""Weighted STS objective: L = w_cosent·CoSENT + w_pearson·(1−ρ) + w_rank_kl·RankKL + w_pro·PRO + w_mid_nce·MidNCE.

    Args:
        e1, e2: (B, D) final embeddings of sentence1 / sentence2; s = cosine(e1, e2).
        y: (B,) gold scores in ``score_range``; normalised to ŷ = (y − lo)/(hi − lo) ∈ [0, 1]
            before every term (the released code trains on [0, 1] scores: PRO's weights and the
            MidNCE threshold ``weights.mid_nce_threshold`` are on that scale; CoSENT, Pearson and
            RankKL do not depend on it).
        weights: a ``codiemb.config.StsLossConfig`` (weights, temperatures, scale, threshold).
            A weight of 0 skips its term (not computed, not reported).
        mid1, mid2: (B, D') middle-layer embeddings; required when ``weights.mid_nce`` > 0.
        gather: every term runs over the global batch (same gradient convention as ``info_nce``,
            see ``codiemb.losses.distributed``). Only what a term needs crosses ranks: the B
            cosines s (autograd all_gather; not the B×D embeddings), y, and for MidNCE the
            candidates mid2. CoSENT, Pearson, RankKL and PRO are not sums over rows, so every
            rank computes them whole (O(N²) scalars); MidNCE runs on the local rows against all
            gathered candidates (B_valid × N logits) and its value is the global one on every rank.

    Returns:
        (total, parts): ``parts`` holds each computed term's UNWEIGHTED value and ``"total"``.
    """
    lo, hi = float(score_range[0]), float(score_range[1])
    if not hi > lo:
        raise ValueError(f"sts_loss: score_range must be (low, high) with high > low, got {score_range}")
    use_mid = weights.mid_nce != 0
    if use_mid and (mid1 is None or mid2 is None):
        raise ValueError("sts_loss: loss.sts.mid_nce > 0 needs the middle-layer embeddings mid1 and mid2")
    rank, world = world_info() if gather else (0, 1)
    b_local = e1.shape[0]
    s = cosine(e1, e2)
    if world > 1:
        s = gather_with_grad(s)
        y = gather_no_grad(y)
    y_norm = (y.to(s.dtype).view(-1) - lo) / (hi - lo)

    def mid_term() -> torch.Tensor:
        if world <= 1:
            return mid_nce(mid1, mid2, y_norm, weights.mid_nce_threshold, weights.mid_nce_temperature)
        y_mine = y_norm[rank * b_local:(rank + 1) * b_local]
        num_valid = int((y_norm >= weights.mid_nce_threshold).sum()) / world
        local = mid_nce(mid1, gather_with_grad(mid2), y_mine, weights.mid_nce_threshold,
                        weights.mid_nce_temperature, offset=rank * b_local, num_valid=num_valid)
        return mean_value_over_ranks(local)

    terms = {
        "cosent": lambda: cosent(s, y_norm, weights.cosent_scale),
        "pearson": lambda: pearson_loss(s, y_norm),
        "rank_kl": lambda: rank_kl(s, y_norm, weights.rank_kl_temperature),
        "pro": lambda: pro(s, y_norm, weights.pro_temperature),
        "mid_nce": mid_term,
    }
    total = _zero(s)
    parts: dict[str, float] = {}
    for name, fn in terms.items():
        w = float(getattr(weights, name))
        if w == 0.0:
            continue
        value = fn()
        parts[name] = float(value.detach())
        total = total + w * value
    parts["total"] = float(total.detach())
    return total, parts
