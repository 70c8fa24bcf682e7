"""Cross-worker gathering for losses whose negatives span the global batch (DESIGN §4).

``gather_with_grad`` concatenates a tensor from every rank with the autograd-aware
``torch.distributed.nn.functional.all_gather``. Its backward sums, over all ranks, the gradient
each rank's loss sends to a rank's slice (a reduce-scatter with SUM; gloo emulates it with
all-to-all + sum). Gradient convention used by every loss in this package:

* every rank computes the SAME loss L over the whole gathered (global) batch;
* after ``backward`` the local parameter gradient on rank r is therefore W · ∂L/∂θ|_(rank r's rows)
  (the W identical copies of L each send their gradient back to rank r);
* the loop AVERAGES parameter gradients over ranks (what torch DDP does): (1/W) Σ_r W ∂L/∂θ|_r
  = ∂L/∂θ, exactly the gradient of one process holding the W·B rows.

So "W workers × B == 1 worker × W·B: same loss, same gradients" holds with gradient averaging.
(Summing gradients over ranks instead would give W times the single-process gradient.)
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
        return torch.cat(all_gather(x.contiguous()), dim=0)


def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (labels, scores: no gradient needed) from all ranks along dim 0."""
    rank, world = world_info()
    if world <= 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def upcast(x: torch.Tensor) -> torch.Tensor:
    """Losses compute in at least float32: half/bfloat16 inputs are upcast, float64 stays float64."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
