"""Retrieval loss: multi-positive InfoNCE with hard negatives and cross-worker negatives.

CoDiEmb (arXiv 2508.11442), IR objective; follows the released code
TencentCloudADP/youtu-embedding, training/CoDiEmb/train/loss.py, ``ContrastiveLoss._loss_ir``
with ``ir_mode="all"`` (one cross-entropy per positive index, averaged over the positives).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from codiemb.losses.distributed import gather_no_grad, gather_with_grad, upcast


def info_nce(
    q: torch.Tensor,
    passages: torch.Tensor,
    num_positives: int,
    temperature: float = 0.02,
    gather: bool = True,
    return_stats: bool = False,
    mask: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, dict[str, int]]:
    r"""Multi-positive InfoNCE over the global batch.

    Args:
        q: (B, D) query embeddings of this rank.
        passages: (B, P, D); ``passages[:, :m]`` are the m = ``num_positives`` positives of each
            query, ``passages[:, m:]`` its n = P − m hard negatives.
        temperature: τ (CoDiEmb default 0.02).
        gather: concatenate q and passages from every rank first (``gather_with_grad``), so the
            candidates span the global batch of N = W·B queries. A no-op on one process.
        mask: optional (B, P) bool, False for an empty slot (a row with fewer positives or
            negatives than the dataset's fixed m and n). An empty candidate gets logit −∞ for
            every query; an empty positive slot j of query i drops the term of (i, j) from L_j,
            which then averages over the queries that have a j-th positive. With every slot
            filled this is exactly the unmasked loss.
        return_stats: also return ``{"global_batch": N, "candidates": N(1+n),
            "negatives_per_query": N(1+n) − 1}``.

    Embeddings are L2-normalised inside, so s(a, b) is the cosine similarity. For each positive
    index j the candidate set C_j holds, for every query k of the global batch, its j-th positive
    p_kj and its n negatives (N·(1+n) candidates); then

        L_j  = (1/N) Σ_i −log( exp(s(q_i, p_ij)/τ) / Σ_{c ∈ C_j} exp(s(q_i, c)/τ) )
        L_IR = (1/m) Σ_j L_j

    Every rank computes L_IR over the whole global batch (identical on all ranks). With the
    autograd all_gather (backward = sum over ranks) and gradients AVERAGED over ranks afterwards
    (DDP convention), parameter gradients equal those of one process holding all W·B rows; see
    ``codiemb.losses.distributed``.
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

    if mask is not None and tuple(mask.shape) != tuple(passages.shape[:2]):
        raise ValueError(f"info_nce: mask {tuple(mask.shape)} does not match passages {tuple(passages.shape[:2])}")
    if gather:
        q = gather_with_grad(q)
        passages = gather_with_grad(passages)
        if mask is not None:
            mask = gather_no_grad(mask.to(torch.uint8)).bool()
    q = F.normalize(upcast(q), dim=-1)
    p = F.normalize(upcast(passages), dim=-1)
    N, D = q.shape

    targets = torch.arange(N, device=q.device)
    neg_logits = q @ p[:, m:, :].reshape(N * n, D).T / temperature  # (N, N·n), shared by every j
    if mask is not None:
        mask = mask.to(q.device)
        neg_logits = neg_logits.masked_fill(~mask[:, m:].reshape(1, N * n), float("-inf"))
    total = q.new_zeros(())
    for j in range(m):
        pos_logits = q @ p[:, j, :].T / temperature  # (N, N): query i vs the j-th positive of every query
        if mask is None:
            logits = torch.cat([pos_logits, neg_logits], dim=1)
            total = total + F.cross_entropy(logits, targets)
            continue
        valid = mask[:, j]
        logits = torch.cat([pos_logits.masked_fill(~valid.reshape(1, N), float("-inf")), neg_logits], dim=1)
        per_query = F.cross_entropy(logits[valid], targets[valid], reduction="sum")
        total = total + per_query / valid.sum().clamp(min=1)
    loss = total / m
    if return_stats:
        stats = {"global_batch": N, "candidates": N * (1 + n), "negatives_per_query": N * (1 + n) - 1}
        return loss, stats
    return loss
