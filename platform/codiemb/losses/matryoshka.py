"""Elastic embeddings: Matryoshka and 2D Matryoshka wrappers around any loss (DESIGN §4).

* Matryoshka Representation Learning — Kusupati et al., NeurIPS 2022, arXiv 2205.13147:
  L = Σ_{d ∈ dims} c_d · loss(embeddings[..., :d]).
* 2D Matryoshka Sentence Embeddings (2DMSE) — Li et al. 2024, arXiv 2402.14776; shaped like
  sentence-transformers' ``Matryoshka2dLoss`` = ``AdaptiveLayerLoss(MatryoshkaLoss(loss))``:
  the Matryoshka loss on the last layer, plus the Matryoshka loss on a randomly sampled earlier
  layer l weighted 1/(1+l), plus a KL term pulling that layer's embeddings towards the last
  layer's (the last layer is the teacher and gets no gradient from the KL).

Contract shared by both wrappers (the wrapped ``loss_fn`` is any loss of this package, e.g.
``info_nce(q, passages, m)`` or ``sts_loss(e1, e2, y, weights, mid1=..., mid2=...)``):

* The FULL dimension is the last dim of the first positional tensor with ndim ≥ 2.
* Every tensor argument (positional or keyword) with ndim ≥ 2 whose last dim equals the full
  dimension is an embedding tensor and is truncated to ``[..., :d]``; anything else (1-D score
  tensors, ints, configs) is passed through unchanged. The losses normalise inside, so the
  truncated prefixes are compared by cosine, as MRL does.
* If ``loss_fn`` returns a tensor, the wrapper returns a tensor; if it returns
  ``(loss, parts: dict[str, float])`` the wrapper returns ``(total, parts)`` with the inner parts
  suffixed ``@<d>`` (and ``@L<l>`` for the sampled layer) plus its own entries.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from codiemb.losses.distributed import upcast


def _full_dim(args: Sequence[Any]) -> int:
    for a in args:
        if isinstance(a, torch.Tensor) and a.dim() >= 2:
            return int(a.shape[-1])
    raise ValueError("matryoshka: no embedding tensor (ndim >= 2) among the positional arguments")


def _truncate(x: Any, full: int, d: int) -> Any:
    if isinstance(x, torch.Tensor) and x.dim() >= 2 and x.shape[-1] == full:
        return x[..., :d]
    return x


def _split(out: Any) -> tuple[torch.Tensor, dict[str, float] | None]:
    if isinstance(out, tuple):
        return out[0], dict(out[1])
    return out, None


def matryoshka(
    loss_fn: Callable[..., Any], dims: Sequence[int], weights: Sequence[float] | None = None
) -> Callable[..., Any]:
    r"""Wrap ``loss_fn`` so it is summed over embedding prefixes: L = Σ_k c_k · loss_fn(x[..., :d_k]).

    Args:
        loss_fn: the loss; called once per d with the same arguments, embeddings truncated
            (see the module docstring for which arguments count as embeddings).
        dims: prefix sizes, e.g. [384, 256, 128, 64]; each must be ≤ the full dimension.
        weights: c_k, one per dim (default all 1, as in MRL and sentence-transformers).

    Returns ``wrapped(*args, **kwargs)``; its parts (tuple-returning losses) add ``dim<d>`` =
    the unweighted loss at prefix d and ``"total"``.
    """
    dims = [int(d) for d in dims]
    if not dims or any(d <= 0 for d in dims):
        raise ValueError(f"matryoshka: dims must be positive integers, got {dims}")
    coef = [1.0] * len(dims) if weights is None else [float(w) for w in weights]
    if len(coef) != len(dims):
        raise ValueError(f"matryoshka: {len(dims)} dims but {len(coef)} weights")

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        full = _full_dim(args)
        too_big = [d for d in dims if d > full]
        if too_big:
            raise ValueError(f"matryoshka: dims {too_big} exceed the embedding dimension {full}")
        total: torch.Tensor | None = None
        parts: dict[str, float] = {}
        returns_parts = False
        for d, c in zip(dims, coef):
            out = loss_fn(*[_truncate(a, full, d) for a in args], **{k: _truncate(v, full, d) for k, v in kwargs.items()})
            loss, sub = _split(out)
            total = c * loss if total is None else total + c * loss
            parts[f"dim{d}"] = float(loss.detach())
            if sub is not None:
                returns_parts = True
                parts.update({f"{k}@{d}": v for k, v in sub.items()})
        assert total is not None
        if returns_parts:
            parts["total"] = float(total.detach())
            return total, parts
        return total

    return wrapped


def layer_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 0.3) -> torch.Tensor:
    r"""KL(softmax(t/T) ‖ softmax(x/T)) · T over the embedding dimension, mean over rows.

    2DMSE's alignment of an earlier layer x to the last layer t (sentence-transformers
    ``AdaptiveLayerLoss``: ``F.kl_div(log_softmax(x/T), softmax(t/T).detach(), "batchmean") · T``).
    The teacher is detached. Tensors of any rank are flattened to (rows, D).
    """
    x = upcast(student).reshape(-1, student.shape[-1])
    t = upcast(teacher.detach()).reshape(-1, teacher.shape[-1])
    return F.kl_div(F.log_softmax(x / temperature, dim=-1), F.softmax(t / temperature, dim=-1), reduction="batchmean") * temperature


def matryoshka_2d(
    loss_fn: Callable[..., Any],
    dims: Sequence[int],
    weights: Sequence[float] | None = None,
    *,
    n_layers_per_step: int = 1,
    last_layer_weight: float = 1.0,
    prior_layers_weight: float = 1.0,
    kl_weight: float = 1.0,
    kl_temperature: float = 0.3,
) -> Callable[..., Any]:
    r"""2D Matryoshka (Li et al. 2024, arXiv 2402.14776) around ``loss_fn``.

    With M = ``matryoshka(loss_fn, dims, weights)``, L the last layer and S a set of
    ``n_layers_per_step`` earlier layers sampled uniformly without replacement each call:

        loss = a_last · M(layer L) + Σ_{l ∈ S} [ a_prior · M(layer l) / ((1 + l) · |S|)
                                                 + kl_weight · mean_e KL_T(e_l ‖ e_L) ]

    (the weighting of sentence-transformers' ``Matryoshka2dLoss`` with ``layer_weighting="linear"``;
    KL_T is ``layer_kl``, averaged over the embedding tensors e of the call, at full dimension).

    Returns ``wrapped(layers, *args, generator=None, **kwargs)``:

    * ``layers``: ``Mapping[int, Sequence[Tensor]]`` — 0-based transformer layer index → the
      pooled embedding tensors of that layer, in ``loss_fn``'s positional order (e.g.
      ``{l: (q_l, passages_l)}`` for ``info_nce``, ``{l: (e1_l, e2_l)}`` for ``sts_loss``). The
      largest key is the last layer; every smaller key is a candidate earlier layer (the loop may
      pass all layers or only some).
    * ``*args, **kwargs``: the rest of ``loss_fn``'s arguments (scores, num_positives, config…),
      identical for every layer.
    * ``generator``: a ``torch.Generator`` for the layer sampling (seeded by the loop, so a run
      is reproducible and every rank samples the same layer when they share the seed).

    A tuple-returning ``loss_fn`` yields ``(total, parts)`` with ``layer`` (the sampled layer),
    ``kl``, and the per-layer Matryoshka parts suffixed ``@L<l>``.
    """
    inner = matryoshka(loss_fn, dims, weights)
    if n_layers_per_step < 1:
        raise ValueError(f"matryoshka_2d: n_layers_per_step must be >= 1, got {n_layers_per_step}")

    def wrapped(
        layers: Mapping[int, Sequence[torch.Tensor]], *args: Any, generator: torch.Generator | None = None, **kwargs: Any
    ) -> Any:
        if not layers:
            raise ValueError("matryoshka_2d: no layers given")
        last = max(layers)
        final = tuple(layers[last])
        loss, parts = _split(inner(*final, *args, **kwargs))
        total = last_layer_weight * loss
        out_parts: dict[str, float] = {}
        if parts is not None:
            out_parts.update({f"{k}@L{last}": v for k, v in parts.items()})
        earlier = sorted(k for k in layers if k < last)
        if earlier:
            order = torch.randperm(len(earlier), generator=generator).tolist()
            chosen = [earlier[i] for i in order[: min(n_layers_per_step, len(earlier))]]
            kl_total = 0.0
            for l in chosen:
                emb = tuple(layers[l])
                if len(emb) != len(final):
                    raise ValueError(f"matryoshka_2d: layer {l} has {len(emb)} tensors, the last layer {len(final)}")
                l_loss, l_parts = _split(inner(*emb, *args, **kwargs))
                total = total + prior_layers_weight * l_loss / ((1 + l) * len(chosen))
                if kl_weight:
                    kl = sum(layer_kl(x, t, kl_temperature) for x, t in zip(emb, final)) / len(emb)
                    total = total + kl_weight * kl
                    kl_total += float(kl.detach())
                if l_parts is not None:
                    out_parts.update({f"{k}@L{l}": v for k, v in l_parts.items()})
            out_parts["layer"] = float(chosen[0])
            out_parts["kl"] = kl_total
        if parts is not None:
            out_parts["total"] = float(total.detach())
            return total, out_parts
        return total

    return wrapped
