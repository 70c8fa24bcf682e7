"""Unsupervised contrastive losses on single texts: SimCSE, WhitenedCSE, DebCSE (DESIGN §4).

Every function takes the embeddings of one batch of B texts on this rank (several views of each
text: dropout passes of the same encoder in train mode, the view order fixed by the loop) and
returns a scalar. With ``gather`` on several ranks the candidates span the global batch of
N = W·B texts (``losses.distributed``: the autograd all_gather), each rank's loss covers its own
anchors and its VALUE is the global loss (``mean_value_over_ranks``), so W workers × B rows give
the loss and the (rank-averaged) gradients of 1 worker × W·B rows. Embeddings are L2-normalised
inside: s(a, b) is the cosine similarity. Temperature τ = 0.05 (SimCSE's) by default.

* :func:`simcse_loss` — Gao, Yao, Chen, "SimCSE: Simple Contrastive Learning of Sentence
  Embeddings", EMNLP 2021 (arXiv 2104.08821), the unsupervised objective.
* :func:`shuffled_group_whitening` and :func:`whitenedcse_loss` — Zhuo et al., "WhitenedCSE:
  Whitening-based Contrastive Learning of Sentence Embeddings", ACL 2023 (arXiv 2305.17746);
  released code SupstarZh/WhitenedCSE (``whitenedcse/shuffled_group_whitening.py``, ``models.py``).
* :func:`debcse_loss` — Miao, Du, Zhang, "DebCSE: Rethinking Unsupervised Contrastive Sentence
  Embedding Learning in the Debiasing Perspective", CIKM 2023 (arXiv 2309.07396): inverse
  propensity weighting of positives and negatives by surface similarity, false negatives left
  out by semantic similarity. No code was released; the docstring says which formulation is ours.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from codiemb.losses.distributed import gather_no_grad, gather_with_grad, mean_value_over_ranks, upcast, world_info


def _world(gather: bool) -> tuple[int, int]:
    return world_info() if gather else (0, 1)


def _finish(local: torch.Tensor, world: int) -> torch.Tensor:
    return mean_value_over_ranks(local) if world > 1 else local


# --------------------------------------------------------------------------- SimCSE
def _anchors_and_views(z1: torch.Tensor, z2: torch.Tensor, gather: bool, name: str):
    """``(rank, world, B, a, c)``: this rank's B anchors ``z1`` and the second views ``z2`` of the
    global batch (gathered with gradients), both L2-normalised in float32 — what SimCSE and DebCSE share."""
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(f"{name} expects two (B, D) tensors, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    rank, world = _world(gather)
    cands = gather_with_grad(z2) if world > 1 else z2
    return rank, world, z1.shape[0], F.normalize(upcast(z1), dim=-1), F.normalize(upcast(cands), dim=-1)


def simcse_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.05, gather: bool = True) -> torch.Tensor:
    r"""Unsupervised SimCSE (Gao et al. 2021): the two dropout views of a text are its positive pair.

    z1, z2: (B, D), two forward passes of the same B texts (independent dropout masks). With
    h_i = z1_i, h_i' = z2_i over the global batch of N texts,

        L = (1/N) Σ_i −log( exp(s(h_i, h_i')/τ) / Σ_{j=1}^{N} exp(s(h_i, h_j')/τ) )

    (the paper's Eq. 4: the other texts' second views are the negatives). Rank r computes the
    terms of its B anchors against all N gathered second views.
    """
    rank, world, b, a, c = _anchors_and_views(z1, z2, gather, "simcse_loss")
    targets = torch.arange(rank * b, (rank + 1) * b, device=a.device)
    return _finish(F.cross_entropy(a @ c.T / temperature, targets), world)


# --------------------------------------------------------------------------- WhitenedCSE
def _zca(x: torch.Tensor, eps: float, grad: bool) -> torch.Tensor:
    """ZCA whitening over rows of each group: x (G, N, k) -> (x − μ) W, W = Σ^{-1/2} = U Λ^{-1/2} Uᵀ."""
    c = x - x.mean(dim=-2, keepdim=True)
    n, k = x.shape[-2], x.shape[-1]
    cov = c.transpose(-1, -2) @ c / n + eps * torch.eye(k, dtype=c.dtype, device=c.device)
    if not grad:
        cov = cov.detach()
    lam, u = torch.linalg.eigh(cov)
    w = u @ torch.diag_embed(lam.clamp_min(max(eps, 1e-12)).rsqrt()) @ u.transpose(-1, -2)
    return c @ w


def shuffled_group_whitening(x: torch.Tensor, group_size: int, generator: torch.Generator | None = None,
                             eps: float = 1e-5, grad: bool = False,
                             perm: torch.Tensor | None = None) -> torch.Tensor:
    r"""Shuffled group whitening (WhitenedCSE §3.2) of x (N, D) over its N rows.

    π a random permutation of the D channels (from ``generator``, or ``perm``); the shuffled
    channels x[:, π] are cut into consecutive groups of k = ``group_size`` (the last one may be
    smaller); each group g is ZCA-whitened over the batch,

        x̂_g = (x_g − μ_g) Σ_g^{-1/2},   Σ_g = (1/N) (x_g − μ_g)ᵀ (x_g − μ_g) + ε I,

    Σ^{-1/2} = U Λ^{-1/2} Uᵀ from the eigendecomposition (ZCA, the released ``engine='symeig'``),
    and the channels are put back in their original order (x̂[:, π] = the groups). Covariance over
    N (not N − 1) as the released code. ``grad=False`` treats Σ_g^{-1/2} as a constant in the
    backward (the released code rebuilds the covariance as a new leaf tensor, so no gradient flows
    through the eigendecomposition); the centring still carries gradient. ``grad=True``
    backpropagates through ``eigh`` too.
    """
    n, d = x.shape
    k = int(group_size)
    if k < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if perm is None:
        perm = torch.randperm(d, generator=generator)
    perm = perm.to(x.device)
    xs = upcast(x)[:, perm]
    g, full = d // k, (d // k) * k
    parts = []
    if g:
        grouped = xs[:, :full].reshape(n, g, k).transpose(0, 1)  # (G, N, k)
        parts.append(_zca(grouped, eps, grad).transpose(0, 1).reshape(n, full))
    if full < d:
        parts.append(_zca(xs[:, full:].unsqueeze(0), eps, grad).squeeze(0))
    white = torch.cat(parts, dim=1)
    return white[:, torch.argsort(perm)]


def whitenedcse_loss(views: torch.Tensor, temperature: float = 0.05, group_size: int = 6, eps: float = 1e-5,
                     grad: bool = False, generator: torch.Generator | None = None, gather: bool = True) -> torch.Tensor:
    r"""WhitenedCSE (Zhuo et al., ACL 2023): multi-positive contrastive loss on shuffled-group-whitened views.

    views: (P, B, D), P ≥ 2 dropout passes of the same B texts. Over the global batch of N texts,
    each view p is whitened with its OWN channel shuffle π_p (:func:`shuffled_group_whitening`,
    permutations drawn from ``generator`` in view order, the same on every rank), giving
    ĥ^p = SGW_{π_p}(h^p). View 0 is the anchor, views 1..P−1 are its P−1 positives, each
    contrasted against that view of the other texts (the released ``cl_forward``: loss1 + loss2
    for P = 3):

        L = Σ_{p=1}^{P−1} (1/N) Σ_i −log( exp(s(ĥ_i^0, ĥ_i^p)/τ) / Σ_{j=1}^{N} exp(s(ĥ_i^0, ĥ_j^p)/τ) )

    Choices (the paper leaves them open or the code differs from the text): (1) whitening statistics
    over the GLOBAL batch (every rank whitens the gathered batch, so W × B equals 1 × W·B);
    (2) no trainable projection: the released model whitens the pooled output first and then
    applies a dense + tanh head that evaluation drops; here the loss sees the whitened pooled
    embeddings directly and nothing but the encoder is trained (the saved model is the encoder);
    (3) the whitening matrix is a constant in the backward unless ``grad`` (as the released code);
    (4) the positives' terms are summed, not averaged (as the released code).
    """
    if views.dim() != 3 or views.shape[0] < 2:
        raise ValueError(f"whitenedcse_loss expects views (P >= 2, B, D), got {tuple(views.shape)}")
    rank, world = _world(gather)
    p_views, b, _ = views.shape
    allv = gather_with_grad(views.transpose(0, 1)).transpose(0, 1) if world > 1 else views  # (P, N, D)
    white = [F.normalize(shuffled_group_whitening(allv[p], group_size, generator, eps, grad), dim=-1)
             for p in range(p_views)]
    anchor = white[0][rank * b: (rank + 1) * b]
    targets = torch.arange(rank * b, (rank + 1) * b, device=anchor.device)
    total = anchor.new_zeros(())
    for p in range(1, p_views):
        total = total + F.cross_entropy(anchor @ white[p].T / temperature, targets)
    return _finish(total, world)


# --------------------------------------------------------------------------- DebCSE
@dataclass
class SurfaceFeatures:
    """Surface form of the two views of a batch (no gradient): lengths (B,) and bags of token ids
    (B, H) 0/1 multi-hot (ids hashed into H buckets), of view 1 and view 2. Not a tensor, so the
    Matryoshka wrappers pass it through unchanged."""

    lengths1: torch.Tensor
    lengths2: torch.Tensor
    bags1: torch.Tensor
    bags2: torch.Tensor

    def gathered(self, world: int) -> "SurfaceFeatures":
        if world <= 1:
            return self
        return SurfaceFeatures(*(gather_no_grad(t) for t in (self.lengths1, self.lengths2, self.bags1, self.bags2)))


def surface_similarity(len_a: torch.Tensor, bag_a: torch.Tensor, len_b: torch.Tensor, bag_b: torch.Tensor,
                       alpha: float = 0.5) -> torch.Tensor:
    r"""u(a, b) = α · |T_a ∩ T_b| / |T_a ∪ T_b| + (1 − α) · min(ℓ_a, ℓ_b) / max(ℓ_a, ℓ_b), all pairs (A, B).

    T the set of (hashed) token ids, ℓ the length in tokens: 1 for identical surface forms."""
    bag_a, bag_b = bag_a.double(), bag_b.double()
    inter = bag_a @ bag_b.T
    union = bag_a.sum(1, keepdim=True) + bag_b.sum(1)[None, :] - inter
    jacc = inter / union.clamp_min(1.0)
    la, lb = len_a.double()[:, None], len_b.double()[None, :]
    ratio = torch.minimum(la, lb) / torch.maximum(la, lb).clamp_min(1.0)
    return alpha * jacc + (1.0 - alpha) * ratio


def propensity_weights(u: torch.Tensor, keep: torch.Tensor, bins: int, max_weight: float) -> torch.Tensor:
    r"""Inverse-propensity weights per row of u (R, C) over the entries ``keep`` (R, C).

    The propensity of an entry is the share of row i's kept entries in its surface-similarity bin
    b = min(⌊u·bins⌋, bins − 1): p̂_ib = c_ib / n_i. Then w_ij = 1 / (K_i p̂_ib) = n_i / (K_i c_ib)
    with K_i the number of non-empty bins, clipped at ``max_weight`` and rescaled so Σ_j w_ij = n_i
    (mean weight 1: each non-empty bin gets the same total weight). Entries not kept weigh 0.
    """
    b = (u * bins).floor().clamp(0, bins - 1).long()
    onehot = F.one_hot(b, bins).to(torch.float64) * keep[..., None].to(torch.float64)  # (R, C, bins)
    counts = onehot.sum(dim=1)  # (R, bins)
    n = counts.sum(dim=1, keepdim=True)  # (R, 1)
    k = (counts > 0).sum(dim=1, keepdim=True).clamp_min(1)
    per_bin = torch.where(counts > 0, n / (k * counts.clamp_min(1.0)), torch.zeros_like(counts))
    w = torch.gather(per_bin, 1, b) * keep.to(torch.float64)
    w = w.clamp(max=max_weight)
    scale = n / w.sum(dim=1, keepdim=True).clamp_min(1e-12)
    return torch.where(n > 0, w * scale, w)


def debcse_loss(z1: torch.Tensor, z2: torch.Tensor, surface: SurfaceFeatures, temperature: float = 0.05,
                false_negative_threshold: float = 0.9, bins: int = 5, alpha: float = 0.5, max_weight: float = 10.0,
                gather: bool = True, return_stats: bool = False):
    r"""DebCSE (Miao et al. 2023), as formulated here: debiased positives and negatives by inverse propensity.

    The bias: SimCSE's positive is the text itself (same length, same tokens) and its in-batch
    negatives are almost all surface-DISsimilar, so length and token overlap alone separate them;
    negatives that are paraphrases are pushed away (false negatives). DebCSE selects positives and
    negatives by surface AND semantic similarity with inverse propensity weighting. Here:

    * positives: z2 is the second dropout view of a SURFACE-ALTERED copy (the loop deletes tokens
      with probability ``unsupervised.delete_prob``), so positives differ in length and tokens;
    * surface similarity u (:func:`surface_similarity`, token Jaccard and length ratio, from
      ``surface``), semantic similarity s = cosine (detached for the selection);
    * negatives of anchor i: j ≠ i with ŝ_ij < δ (``false_negative_threshold``; above it j is taken
      for a false negative and sampled out), each weighted w_ij = 1 / propensity of its surface
      bin among i's kept negatives (:func:`propensity_weights`): the rare surface-similar
      negatives count more, the many trivially different ones less;
    * positives: v_i = the same inverse-propensity weight of u_ii among the N positives of the
      global batch (mean 1): anchors whose positive looks unlike them count more.

        ℓ_i = −log( exp(s_ii/τ) / (exp(s_ii/τ) + Σ_{j ∈ K_i} w_ij exp(s_ij/τ)) ),   L = (1/N) Σ_i v_i ℓ_i

    with s_ij = s(z1_i, z2_j) over the global batch. Simplified against the paper: the propensity
    model is a histogram of surface similarity within the batch (not a learned propensity model),
    positives come from token deletion of the text itself (not sampled from the corpus with a
    teacher's semantic similarity), and word-frequency bias enters only through token overlap.
    """
    rank, world, b, a, c = _anchors_and_views(z1, z2, gather, "debcse_loss")
    n = c.shape[0]
    sim = a @ c.T  # (B, N)
    g = surface.gathered(world)
    mine = slice(rank * b, (rank + 1) * b)
    targets = torch.arange(rank * b, (rank + 1) * b, device=a.device)
    eye = F.one_hot(targets, n).bool()
    keep = (~eye) & (sim.detach() < false_negative_threshold)
    u_neg = surface_similarity(g.lengths1[mine], g.bags1[mine], g.lengths2, g.bags2, alpha).to(a.device)
    w = propensity_weights(u_neg, keep, bins, max_weight).to(sim.dtype)
    u_pos = torch.diagonal(surface_similarity(g.lengths1, g.bags1, g.lengths2, g.bags2, alpha)).to(a.device)
    v = propensity_weights(u_pos[None, :], torch.ones_like(u_pos[None, :], dtype=torch.bool), bins,
                           max_weight)[0, mine].to(sim.dtype)
    logits = sim / temperature
    pos = logits.gather(1, targets[:, None]).squeeze(1)
    neg = torch.where(keep, logits + torch.log(w.clamp_min(1e-30)), torch.full_like(logits, float("-inf")))
    ell = torch.logsumexp(torch.cat([pos[:, None], neg], dim=1), dim=1) - pos
    loss = _finish((v * ell).mean(), world)
    if return_stats:
        return loss, {"kept_negatives": float(keep.sum()) / max(1, b * (n - 1)),
                      "positive_surface": float(u_pos.mean())}
    return loss
