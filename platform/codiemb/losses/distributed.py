"""Cross-worker gathering for losses whose negatives span the global batch (DESIGN §4).

``gather_with_grad`` concatenates a tensor from every rank with the autograd-aware
``torch.distributed.nn.functional.all_gather``. Its backward sums, over all ranks, the gradient
each rank's loss sends to a rank's slice (a reduce-scatter with SUM; gloo emulates it with
all-to-all + sum). Gradient convention used by every loss in this package: the loop AVERAGES parameter gradients
over ranks (what torch DDP does), and each rank's loss L_r is chosen so that the global loss is
L = (1/W) Σ_r L_r. Then the gradient reaching rank r's rows is Σ_s ∂L_s/∂(rows of r) (the gather's
backward sums), and the averaged parameter gradient is (1/W) Σ_r Σ_s ∂L_s/∂θ|_r = ∂L/∂θ, exactly
that of one process holding the W·B rows. Two ways to pick L_r:

* every rank computes the SAME L over the whole gathered batch (L_r = L): the terms that are not
  a sum over rows (Pearson, CoSENT's log-sum over all pairs, RankKL, PRO);
* rank r computes only its own rows' share (L_r = the local rows' terms, scaled so the mean over
  ranks is L): ``info_nce`` (local queries × all gathered candidates) and MidNCE. Such a loss
  returns ``mean_value_over_ranks(L_r)`` so its VALUE is L on every rank (logging does not depend
  on the rank) while its gradient stays that of L_r.

Both give the same gradients (per rank, and averaged). So "W workers × B == 1 worker × W·B: same
loss, same gradients" holds with gradient averaging. (Summing gradients over ranks instead would
give W times the single-process gradient.)
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist


def world_info() -> tuple[int, int]:
    """(rank, world_size) of the default process group; (0, 1) when torch.distributed is off."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from all ranks along dim 0, keeping the autograd graph.

    Every rank must pass a tensor of the same shape (same per-rank batch). With no process group
    or a single rank, returns ``x`` itself. The result is ordered by rank: rows of rank 0 first.
    """
    rank, world = world_info()
    if world <= 1:
        return x
    from torch.distributed.nn.functional import all_gather

    with warnings.catch_warnings():  # torch >= 2.10 marks it deprecated; it is still the public autograd gather
        warnings.filterwarnings("ignore", message=".*all_gather is deprecated", category=FutureWarning)
        parts = all_gather(x.contiguous())
    return torch.cat([_ContiguousGrad.apply(p) for p in parts], dim=0)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous. The gather's backward sends each
    part's gradient with gloo's all_to_all, which reads a non-contiguous tensor (e.g. the gradient
    of a transposed use of the gathered tensor) in the wrong memory order: wrong gradients, no error."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (labels, scores: no gradient needed) from all ranks along dim 0."""
    rank, world = world_info()
    if world <= 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def mean_value_over_ranks(local: torch.Tensor) -> torch.Tensor:
    """A scalar whose value is the mean of ``local`` over ranks and whose gradient is ``local``'s.

    ``local + (mean − local).detach()``: one scalar all-reduce, no autograd through it. For a loss
    computed on this rank's rows only, so the value is the global loss everywhere.
    """
    rank, world = world_info()
    if world <= 1:
        return local
    mean = local.detach().clone()
    dist.all_reduce(mean, op=dist.ReduceOp.SUM)
    mean /= world
    return local + (mean - local.detach())


def upcast(x: torch.Tensor) -> torch.Tensor:
    """Losses compute in at least float32: half/bfloat16 inputs are upcast, float64 stays float64."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
