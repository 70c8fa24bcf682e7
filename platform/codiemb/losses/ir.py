"""Retrieval loss: multi-positive InfoNCE with hard negatives and cross-worker negatives.

CoDiEmb (arXiv 2508.11442), IR objective; follows the released code
TencentCloudADP/youtu-embedding, training/CoDiEmb/train/loss.py, ``ContrastiveLoss._loss_ir``
with ``ir_mode="all"`` (one cross-entropy per positive index, averaged over the positives).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from codiemb.losses.distributed import gather_no_grad, gather_with_grad, mean_value_over_ranks, upcast, world_info


def info_nce(
    q: torch.Tensor,
    passages: torch.Tensor,
    num_positives: int,
    temperature: float = 0.02,
    gather: bool = True,
    return_stats: bool = False,
    mask: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, dict]:
    r"""Multi-positive InfoNCE over the global batch.

    Args:
        q: (B, D) query embeddings of this rank.
        passages: (B, P, D); ``passages[:, :m]`` are the m = ``num_positives`` positives of each
            query, ``passages[:, m:]`` its n = P − m hard negatives.
        temperature: τ (CoDiEmb default 0.02).
        gather: concatenate the passages from every rank first (``gather_with_grad``), so the
            candidates span the global batch of N = W·B queries. A no-op on one process.
        mask: optional (B, P) bool, False for an empty slot (a row with fewer positives or
            negatives than the dataset's fixed m and n; every rank passes one or none). An empty
            candidate gets logit −∞ for every query; an empty positive slot j of query i drops
            the term ℓ_ij, and L_j averages over the V_j queries of the global batch that have a
            j-th positive (each rank weighs its terms by W / V_j, so the mean over ranks is still
            L_IR). With every slot filled this is exactly the unmasked loss.
        return_stats: also return ``{"global_batch": N, "candidates": N(1+n),
            "negatives_per_query": N(1+n) − 1, "local_queries": B, "logits_shape": (B, N(1+n))}``.

    Embeddings are L2-normalised inside, so s(a, b) is the cosine similarity. For each positive
    index j the candidate set C_j holds, for every query k of the global batch, its j-th positive
    p_kj and its n negatives (N·(1+n) candidates); then

        L_j  = (1/N) Σ_i −log( exp(s(q_i, p_ij)/τ) / Σ_{c ∈ C_j} exp(s(q_i, c)/τ) )
        L_IR = (1/m) Σ_j L_j

    Each rank computes only the rows of ITS queries (B × N(1+n) logits per j, not N × N(1+n)):
    L_r = (1/m) Σ_j (1/B) Σ_{i on rank r} ℓ_ij, so L_IR = (1/W) Σ_r L_r. Queries are not
    gathered (no other rank needs them); passages are, with the autograd all_gather, whose
    backward sums over ranks what every L_s sends to rank r's passages. With gradients AVERAGED
    over ranks afterwards (the loop, like DDP), the parameter gradient is
    (1/W) Σ_r Σ_s ∂L_s/∂θ|_r = ∂L_IR/∂θ, that of one process holding all W·B rows — and even
    each rank's local gradient is what the former full-matrix version gave (W·∂L_IR/∂θ|_r).
    The returned value is L_IR on every rank (one scalar all-reduce: L_r plus the detached
    difference to the mean over ranks), so logged losses do not depend on the rank; its gradient
    is that of L_r.
    """
    if q.dim() != 2 or passages.dim() != 3:
        raise ValueError(f"info_nce expects q (B, D) and passages (B, P, D), got {tuple(q.shape)} and {tuple(passages.shape)}")
    if passages.shape[0] != q.shape[0] or passages.shape[-1] != q.shape[-1]:
        raise ValueError(f"info_nce: q {tuple(q.shape)} and passages {tuple(passages.shape)} disagree on B or D")
    m = int(num_positives)
    n_passages = passages.shape[1]
    if not 1 <= m <= n_passages:
        raise ValueError(f"info_nce: num_positives={m} but each query has {n_passages} passages")
    n = n_passages - m

    rank, world = world_info() if gather else (0, 1)
    B = q.shape[0]
    if mask is not None and tuple(mask.shape) != tuple(passages.shape[:2]):
        raise ValueError(f"info_nce: mask {tuple(mask.shape)} does not match passages {tuple(passages.shape[:2])}")
    local_mask = mask
    if world > 1:
        passages = gather_with_grad(passages)
        if mask is not None:
            mask = gather_no_grad(mask.to(torch.uint8)).bool()
    q = F.normalize(upcast(q), dim=-1)  # this rank's queries only
    p = F.normalize(upcast(passages), dim=-1)
    N, D = p.shape[0], p.shape[-1]

    targets = torch.arange(rank * B, (rank + 1) * B, device=q.device)  # each local query's own positive
    neg_logits = q @ p[:, m:, :].reshape(N * n, D).T / temperature  # (B, N·n), shared by every j
    if mask is not None:
        mask, local_mask = mask.to(q.device), local_mask.to(q.device)
        neg_logits = neg_logits.masked_fill(~mask[:, m:].reshape(1, N * n), float("-inf"))
    total = q.new_zeros(())
    logits = None
    for j in range(m):
        pos_logits = q @ p[:, j, :].T / temperature  # (B, N): local query i vs the j-th positive of every query
        if mask is None:
            logits = torch.cat([pos_logits, neg_logits], dim=1)
            total = total + F.cross_entropy(logits, targets)
            continue
        logits = torch.cat([pos_logits.masked_fill(~mask[:, j].reshape(1, N), float("-inf")), neg_logits], dim=1)
        valid = local_mask[:, j]
        terms = F.cross_entropy(logits[valid], targets[valid], reduction="sum")
        total = total + terms * world / mask[:, j].sum().clamp(min=1)  # W / V_j: mean over ranks = L_j
    loss = mean_value_over_ranks(total / m) if world > 1 else total / m
    if return_stats:
        stats = {"global_batch": N, "candidates": N * (1 + n), "negatives_per_query": N * (1 + n) - 1,
                 "local_queries": B, "logits_shape": tuple(logits.shape)}
        return loss, stats
    return loss
