"""Distillation losses: the student's similarities pulled towards a teacher's (issue 16, item 1).

The teacher is never run in the training step: its embeddings of every training text are
computed once (``data/teacher.py``) and the step turns them into teacher similarities over the
step's own candidates. Only similarities are compared, never vectors, so the teacher may have
another dimension than the student. Three forms (``loss.distill.form``):

- ``kl``: KL between the teacher's and the student's softmax distributions over each query's
  candidates, each side with its own temperature. Hinton et al., "Distilling the Knowledge in a
  Neural Network" (arXiv 1503.02531); for retrieval as FlagEmbedding's knowledge distillation
  (BGE M3, arXiv 2402.03216, §3.2) and sentence-transformers' ``DistillKLDivLoss``.
- ``margin_mse``: MSE between the student's and the teacher's margins s(q, p) − s(q, c) for a
  positive p and the other candidates c. Hofstätter et al., "Improving Efficient Neural Ranking
  Models with Cross-Architecture Knowledge Distillation" (arXiv 2010.02666); sentence-transformers'
  ``MarginMSELoss``.
- ``cosine_mse``: MSE between the student's and the teacher's cosine scores of the same pairs
  (sentence-transformers' ``MSELoss`` on scores / ``CosineSimilarityLoss`` with teacher labels).

Multi-teacher: the loop averages the serving teachers' similarity matrices with their weights
before the loss (the plain teacher average, the baseline of multi-teacher distillation, e.g. Wu
et al., "One Teacher is Enough? Pre-trained Language Model Distillation from Multiple Teachers",
Findings of ACL 2021); every function here takes one teacher matrix.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from codiemb.losses.distributed import upcast


def _masked(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return x if mask is None else x.masked_fill(~mask, float("-inf"))


def distill_kl(student: torch.Tensor, teacher: torch.Tensor, student_temperature: float = 0.05,
               teacher_temperature: float = 0.05, mask: torch.Tensor | None = None) -> torch.Tensor:
    r"""KL(p_t ‖ p_s) averaged over rows.

    ``student``, ``teacher``: (R, C) similarities of R queries (rows) to C candidates; ``mask``
    (R, C) or (C,) bool, False for a candidate that is not there (left out of both softmaxes).

        p_t = softmax(t / τ_t),  p_s = softmax(s / τ_s)
        L   = (1/R) Σ_r Σ_c p_t[r, c] (log p_t[r, c] − log p_s[r, c])

    No τ² factor (Hinton's) is applied: with cosine similarities and τ ≈ 0.05 it would shrink the
    loss 400×; the config's weight scales the term instead. A row with one candidate gives 0.
    """
    s, t = upcast(student), upcast(teacher).to(upcast(student).dtype)
    if mask is not None and mask.dim() == 1:
        mask = mask.unsqueeze(0).expand_as(s)
    log_ps = F.log_softmax(_masked(s / student_temperature, mask), dim=-1)
    log_pt = F.log_softmax(_masked(t / teacher_temperature, mask), dim=-1)
    pt = log_pt.exp()
    terms = pt * (log_pt - log_ps)
    if mask is not None:
        terms = terms.masked_fill(~mask, 0.0)  # 0 · (−inf − −inf) would be NaN
    return terms.sum(dim=-1).mean()


def margin_mse(student: torch.Tensor, teacher: torch.Tensor, positive: torch.Tensor,
               mask: torch.Tensor | None = None) -> torch.Tensor:
    r"""MarginMSE over every (query, positive, other candidate) triple.

    ``student``, ``teacher``: (R, C) similarities; ``positive``: (R,) long, the column of row r's
    positive; ``mask``: (R, C) bool of the candidates that are there. For every other present
    candidate c of row r (its hard negatives and, in a batch matrix, the other rows' passages):

        L = mean_{r, c ≠ pos_r} ((s[r, pos_r] − s[r, c]) − (t[r, pos_r] − t[r, c]))²

    Returns a graph-connected 0 when no triple exists.
    """
    s, t = upcast(student), upcast(teacher).to(upcast(student).dtype)
    rows = torch.arange(s.shape[0], device=s.device)
    keep = torch.ones_like(s, dtype=torch.bool) if mask is None else mask.clone()
    keep[rows, positive] = False
    if not bool(keep.any()):
        return s.sum() * 0.0
    ds = s[rows, positive].unsqueeze(1) - s
    dt = t[rows, positive].unsqueeze(1) - t
    return ((ds - dt) ** 2)[keep].mean()


def cosine_mse(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    r"""L = mean over the present entries of (s − t)²: cosine-score regression onto the teacher."""
    s, t = upcast(student), upcast(teacher).to(upcast(student).dtype)
    d = (s - t) ** 2
    if mask is None:
        return d.mean()
    if not bool(mask.any()):
        return s.sum() * 0.0
    return d[mask.expand_as(d)].mean()


def similarity_matrix(q: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Cosine similarities (B, K) of queries (B, D) to candidates (K, D)."""
    return F.normalize(upcast(q), dim=-1) @ F.normalize(upcast(c), dim=-1).T


def distill_retrieval(form: str, q: torch.Tensor, passages: torch.Tensor, teacher_scores: torch.Tensor,
                      slots: torch.Tensor, num_positives: int, student_temperature: float = 0.05,
                      teacher_temperature: float = 0.05) -> torch.Tensor:
    r"""The distillation term of one retrieval batch.

    ``q`` (B, D) and ``passages`` (B, P, D) are the student's (P = m + n slots a row, m positives
    first); ``teacher_scores`` (B, B·P) the teacher's cosine of every query to every slot of the
    batch (row-major: column b·P + j is row b's slot j); ``slots`` (B, P) bool, the filled ones.
    The candidates of a query are all the batch's filled slots (in-batch, like the InfoNCE); the
    positive is its own first slot.
    """
    b, p, _ = passages.shape
    s = similarity_matrix(q, passages.reshape(b * p, -1))
    mask = slots.reshape(1, b * p).to(s.device).expand(b, b * p)
    t = teacher_scores.to(s.device)
    if form == "kl":
        return distill_kl(s, t, student_temperature, teacher_temperature, mask)
    if form == "margin_mse":
        pos = torch.arange(b, device=s.device) * p
        return margin_mse(s, t, pos, mask)
    if form == "cosine_mse":
        return cosine_mse(s, t, mask)
    raise ValueError(f"unknown distillation form {form!r}")


def distill_sts(form: str, e1: torch.Tensor, e2: torch.Tensor, teacher_scores: torch.Tensor,
                student_temperature: float = 0.05, teacher_temperature: float = 0.05) -> torch.Tensor:
    r"""The distillation term of one STS batch: the pairs' cosines s_i = s(e1_i, e2_i) against the
    teacher's t_i (B,). ``cosine_mse``: mean (s_i − t_i)²; ``kl``: one distribution over the
    batch's pairs, KL(softmax(t/τ_t) ‖ softmax(s/τ_s)) (RankKL with the teacher's scores)."""
    s = (F.normalize(upcast(e1), dim=-1) * F.normalize(upcast(e2), dim=-1)).sum(-1)
    t = teacher_scores.to(s.device)
    if form == "cosine_mse":
        return cosine_mse(s, t)
    if form == "kl":
        return distill_kl(s.unsqueeze(0), t.unsqueeze(0), student_temperature, teacher_temperature)
    raise ValueError(f"distillation form {form!r} does not apply to STS pairs (use cosine_mse or kl)")
