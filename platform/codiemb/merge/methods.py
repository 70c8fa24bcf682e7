"""Model merging over state dicts: soups, task arithmetic, TIES, DARE, Breadcrumbs, SLERP, delta-guided.

Every function takes plain state dicts (``dict[str, Tensor]``) with the same keys as the base θ0
and returns a new state dict with those keys. Notation: θ0 the base, θk the K models to merge,
Δk = θk − θ0 their task vectors, wk per-model weights, λ a global scale.

Design (after mergekit's ``merge_methods/registry.py``): task arithmetic, TIES, DARE, DARE-TIES,
Breadcrumbs, the uniform soup and delta-guided fusion are ONE generalized task-arithmetic merge
(:func:`generalized_task_arithmetic`) composed from parts, applied per tensor:

1. sparsify each Δk        ``none`` | ``magnitude`` (TIES trim: keep the top-``density`` fraction by
                           |Δ|) | ``random`` (DARE: drop each entry with prob p = 1 − density and
                           rescale the survivors by 1/(1 − p)) | ``breadcrumbs`` (drop the largest
                           ``outliers`` fraction by |Δ|, keep the next ``density`` fraction)
2. weight each Δk          ``linear`` (scalar wk) | ``delta_guided`` (per element/row/tensor,
                           wk ∝ ck·|Δk|^γ, normalised to sum to 1 over k)
3. sign consensus          none | ``sum`` (TIES elect: s = sign(Σk wk Δk); keep only the entries of
                           Δk whose sign equals s)
4. mix                     m = Σk wk·maskk·Δk; with ``normalize``: m /= Σk wk·maskk (0 -> 1)
5. scale                   θ = θ0 + λ·m

SLERP (two models) and the greedy soup are separate functions in the same registry.

All arithmetic runs in float32 (float64 when the base tensor is float64) and the result is cast
back to each base tensor's dtype. Non-floating tensors (integer buffers such as ``position_ids``)
are copied from the base.

This module imports torch only (DESIGN §1 import rule).
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor

from codiemb.errors import UserError

log = logging.getLogger(__name__)

StateDict = dict[str, Tensor]

SPARSIFICATIONS = ("none", "magnitude", "random", "breadcrumbs")
CONSENSUS = (None, "sum")
WEIGHTINGS = ("linear", "delta_guided")
GRANULARITIES = ("element", "row", "tensor")


# --------------------------------------------------------------------------------------------
# validation and task vectors
# --------------------------------------------------------------------------------------------


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def check_compatible(base: Mapping[str, Tensor], models: Sequence[Mapping[str, Tensor]],
                     names: Sequence[str] | None = None) -> None:
    """Raise :class:`UserError` naming the first tensor where a model differs from the base.

    A model must hold exactly the base's keys, each with the base's shape. The message names the
    model (``names[i]`` or ``model i``) and the tensor: a missing key, an extra key, or a shape
    difference.
    """
    if not models:
        raise UserError("nothing to merge: the list of models is empty")
    if names is not None and len(names) != len(models):
        raise UserError(f"got {len(names)} model names for {len(models)} models")
    for i, sd in enumerate(models):
        who = f"model '{names[i]}'" if names is not None else f"model {i}"
        for key, t in base.items():
            if key not in sd:
                raise UserError(f"{who} cannot be merged: it lacks tensor '{key}' that the base has")
            if _shape(sd[key]) != _shape(t):
                raise UserError(
                    f"{who} cannot be merged: tensor '{key}' has shape {_shape(sd[key])}, "
                    f"the base has {_shape(t)}"
                )
        for key in sd:
            if key not in base:
                raise UserError(f"{who} cannot be merged: it has tensor '{key}' that the base lacks")


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _is_float(t: Tensor) -> bool:
    return torch.is_floating_point(t)


def task_vectors(base: Mapping[str, Tensor], models: Sequence[Mapping[str, Tensor]]) -> list[StateDict]:
    """Δk = θk − θ0 for every floating tensor of the base (float32, or float64 for a float64 base).

    Non-floating tensors (integer buffers) have no task vector and are left out of the result.
    """
    check_compatible(base, models)
    out: list[StateDict] = []
    for sd in models:
        deltas = {}
        for key, b in base.items():
            if _is_float(b):
                dt = _compute_dtype(b)
                deltas[key] = sd[key].to(dt) - b.to(dt)
        out.append(deltas)
    return out


def _check_weights(weights: Sequence[float] | None, k: int) -> list[float]:
    if weights is None:
        return [1.0] * k
    weights = [float(w) for w in weights]
    if len(weights) != k:
        raise UserError(f"got {len(weights)} merge weights for {k} models")
    if not all(math.isfinite(w) for w in weights):
        raise UserError(f"merge weights must be finite numbers, got {weights}")
    return weights


def _assemble(base: Mapping[str, Tensor], merged_float: Mapping[str, Tensor]) -> StateDict:
    """Cast merged floating tensors back to the base dtypes; copy non-floating tensors from the base."""
    out: StateDict = {}
    for key, b in base.items():
        out[key] = merged_float[key].to(b.dtype) if key in merged_float else b.clone()
    return out


# --------------------------------------------------------------------------------------------
# parts: sparsification, weighting, consensus
# --------------------------------------------------------------------------------------------


def _check_fraction(name: str, value: float, *, allow_zero: bool = False) -> float:
    value = float(value)
    lo_ok = value >= 0.0 if allow_zero else value > 0.0
    if not (lo_ok and value <= 1.0):
        raise UserError(f"merge parameter {name} must be in {'[0' if allow_zero else '(0'}, 1], got {value}")
    return value


def sparsify_magnitude(delta: Tensor, density: float) -> Tensor:
    """TIES trim (Yadav et al. 2023, https://arxiv.org/abs/2306.01708): keep the k = round(density·n)
    entries of largest |Δ| in this tensor, zero the rest."""
    n = delta.numel()
    k = int(round(density * n))
    if k >= n:
        return delta.clone()
    flat = delta.reshape(-1)
    out = torch.zeros_like(flat)
    if k > 0:
        idx = flat.abs().topk(k).indices
        out[idx] = flat[idx]
    return out.reshape(delta.shape)


def sparsify_breadcrumbs(delta: Tensor, density: float, outliers: float) -> Tensor:
    """Model Breadcrumbs (Davari & Belilovsky 2023, https://arxiv.org/abs/2312.06795): rank |Δ|,
    drop the round(outliers·n) largest entries (outliers) and keep the next round(density·n); zero
    the rest (the small ones)."""
    n = delta.numel()
    n_top = int(round(outliers * n))
    n_keep = min(int(round(density * n)), n - n_top)
    flat = delta.reshape(-1)
    out = torch.zeros_like(flat)
    if n_keep > 0:
        order = flat.abs().argsort(descending=True, stable=True)
        idx = order[n_top:n_top + n_keep]
        out[idx] = flat[idx]
    return out.reshape(delta.shape)


def sparsify_random(delta: Tensor, density: float, generator: torch.Generator) -> Tensor:
    """DARE (Yu et al. 2023, https://arxiv.org/abs/2311.03099): drop each entry with probability
    p = 1 − density and rescale survivors by 1/(1 − p), so E[result] = Δ."""
    if density >= 1.0:
        return delta.clone()
    keep = torch.rand(delta.shape, generator=generator, dtype=torch.float64) < density
    return delta * keep.to(device=delta.device, dtype=delta.dtype) / density


def _magnitude(delta: Tensor, granularity: str) -> Tensor:
    """|Δ| at the given granularity, broadcastable to Δ.

    element: |Δ| per entry. row: L2 norm over all dims but the first (one value per output row;
    a 1-D or 0-D tensor's rows are its single entries, so row == element there). tensor: the L2
    norm of the whole tensor.
    """
    if granularity == "element" or (granularity == "row" and delta.dim() <= 1):
        return delta.abs()
    if granularity == "row":
        return delta.reshape(delta.shape[0], -1).norm(dim=1).reshape((-1,) + (1,) * (delta.dim() - 1))
    return delta.norm().reshape((1,) * delta.dim())


def delta_guided_weights(deltas: Sequence[Tensor], gamma: float, granularity: str = "element",
                         prior: Sequence[float] | None = None) -> Tensor:
    """Delta-guided fusion weights (CoDiEmb, https://arxiv.org/abs/2508.11442; our definition, the
    paper releases no code): per location, wk = ck·|Δk|^γ / Σj cj·|Δj|^γ with ck the prior model
    weights (default 1).

    γ = 0 gives wk = ck/Σc (the uniform soup of task vectors when c = 1); larger γ trusts the model
    that moved a parameter most. |Δ| is taken per element, per row (L2 norm of the row) or per
    tensor (L2 norm), see :func:`_magnitude`. The magnitudes are divided by their max over k before
    the power (the ratio is unchanged, no underflow for large γ); where every |Δj| is 0 (0/0) the
    weights fall back to ck/Σc — those entries add nothing either way.
    Returns a tensor of shape (K, *broadcastable to Δ).
    """
    mags = torch.stack([_magnitude(d, granularity) for d in deltas])
    top = mags.amax(dim=0, keepdim=True)
    rel = torch.where(top > 0, mags / torch.where(top > 0, top, torch.ones_like(top)), torch.ones_like(mags))
    a = rel.pow(float(gamma)) if gamma != 0 else torch.ones_like(rel)
    c = torch.tensor(prior if prior is not None else [1.0] * len(deltas), dtype=a.dtype, device=a.device)
    a = a * c.reshape((-1,) + (1,) * (a.dim() - 1))
    total = a.sum(dim=0, keepdim=True)
    return a / total


def sign_consensus(weighted: Tensor) -> Tensor:
    """TIES elect (sum method): s = sign(Σk wk Δk) (0 counts as +); returns the mask sign(Δk) == s.

    Zero entries (e.g. trimmed ones) never agree, so they do not count in the disjoint mean.
    """
    elected = torch.where(weighted.sum(dim=0) >= 0, 1.0, -1.0).to(weighted.dtype)
    return weighted.sign() == elected


# --------------------------------------------------------------------------------------------
# the generalized task-arithmetic merge
# --------------------------------------------------------------------------------------------


def _resolve_density(density: float | None, drop_p: float | None, default: float) -> float:
    if drop_p is not None:
        drop_p = float(drop_p)
        if not 0.0 <= drop_p < 1.0:
            raise UserError(f"merge parameter drop_p must be in [0, 1), got {drop_p}")
        if density is not None and abs(float(density) - (1.0 - drop_p)) > 1e-9:
            raise UserError(f"merge parameters disagree: density={density} but drop_p={drop_p} (density = 1 - drop_p)")
        return 1.0 - drop_p
    return _check_fraction("density", default if density is None else density)


def generalized_task_arithmetic(
    base: Mapping[str, Tensor],
    models: Sequence[Mapping[str, Tensor]],
    weights: Sequence[float] | None = None,
    *,
    sparsification: str = "none",
    consensus: str | None = None,
    weighting: str = "linear",
    normalize: bool = False,
    lam: float = 1.0,
    density: float | None = None,
    drop_p: float | None = None,
    default_density: float = 1.0,
    outliers: float = 0.0,
    gamma: float = 1.0,
    granularity: str = "element",
    seed: int = 0,
) -> StateDict:
    """θ = θ0 + λ·mix(sparsify(Δ1..ΔK)) — see the module docstring for the five steps.

    ``density`` (or ``drop_p`` = 1 − density for DARE) is the kept fraction per tensor; ``seed``
    drives DARE's drop masks (one CPU generator, models then tensors in order: deterministic).
    """
    if sparsification not in SPARSIFICATIONS:
        raise UserError(f"unknown sparsification '{sparsification}'; known: {', '.join(SPARSIFICATIONS)}")
    if consensus not in CONSENSUS:
        raise UserError(f"unknown sign consensus '{consensus}'; known: none, sum")
    if weighting not in WEIGHTINGS:
        raise UserError(f"unknown weighting '{weighting}'; known: {', '.join(WEIGHTINGS)}")
    if granularity not in GRANULARITIES:
        raise UserError(f"unknown granularity '{granularity}'; known: {', '.join(GRANULARITIES)}")
    check_compatible(base, models)
    w = _check_weights(weights, len(models))
    keep = _resolve_density(density, drop_p, default_density) if sparsification != "none" else 1.0
    if sparsification == "breadcrumbs":
        _check_fraction("outliers", outliers, allow_zero=True)
    if weighting == "delta_guided":
        if float(gamma) < 0:
            raise UserError(f"merge parameter gamma must be >= 0, got {gamma}")
        if any(x < 0 for x in w) or sum(w) <= 0:
            raise UserError(f"delta_guided needs non-negative weights with a positive sum, got {w}")

    gen = torch.Generator().manual_seed(int(seed))
    tvs = task_vectors(base, models)
    merged: StateDict = {}
    for key, b in base.items():
        if not _is_float(b):
            continue
        deltas = [tv[key] for tv in tvs]
        if sparsification == "magnitude":
            deltas = [sparsify_magnitude(d, keep) for d in deltas]
        elif sparsification == "random":
            deltas = [sparsify_random(d, keep, gen) for d in deltas]
        elif sparsification == "breadcrumbs":
            deltas = [sparsify_breadcrumbs(d, keep, float(outliers)) for d in deltas]
        stacked = torch.stack(deltas)
        if weighting == "delta_guided":
            wt = delta_guided_weights(deltas, float(gamma), granularity, prior=w)
        else:
            wt = torch.tensor(w, dtype=stacked.dtype, device=stacked.device).reshape((-1,) + (1,) * b.dim())
        weighted = wt * stacked
        if consensus == "sum":
            mask = sign_consensus(weighted).to(stacked.dtype)
            mix = (weighted * mask).sum(dim=0)
            divisor = (wt * mask).sum(dim=0)
        else:
            mix = weighted.sum(dim=0)
            divisor = wt.sum(dim=0)
        if normalize:
            divisor = torch.where(divisor.abs() < 1e-12, torch.ones_like(divisor), divisor)
            mix = mix / divisor
        merged[key] = b.to(stacked.dtype) + float(lam) * mix
    return _assemble(base, merged)


# --------------------------------------------------------------------------------------------
# SLERP and the greedy soup
# --------------------------------------------------------------------------------------------


def slerp_tensors(t: float, a: Tensor, b: Tensor, eps: float = 1e-6) -> Tensor:
    """Spherical linear interpolation (Shoemake 1985) of two tensors viewed as flat vectors.

    Ω = arccos(⟨a/|a|, b/|b|⟩); slerp = sin((1−t)Ω)/sin Ω · a + sin(tΩ)/sin Ω · b. The angle comes
    from the normalised vectors, the interpolation uses the raw ones (as mergekit does). Falls back
    to lerp (1−t)·a + t·b when either vector is ~0 or |cos Ω| > 1 − eps (nearly (anti)parallel,
    sin Ω ≈ 0).
    """
    na, nb = a.norm(), b.norm()
    if na < eps or nb < eps:
        return (1 - t) * a + t * b
    cos = float(((a / na) * (b / nb)).sum().clamp(-1.0, 1.0))
    if abs(cos) > 1.0 - eps:
        return (1 - t) * a + t * b
    omega = math.acos(cos)
    s = math.sin(omega)
    return (math.sin((1 - t) * omega) / s) * a + (math.sin(t * omega) / s) * b


def slerp(base: Mapping[str, Tensor], models: Sequence[Mapping[str, Tensor]], weights: Sequence[float] | None = None,
          *, t: float = 0.5, lam: float = 1.0) -> StateDict:
    """θ = θ0 + λ·slerp(t, Δ1, Δ2), per tensor, between the task vectors of exactly two models."""
    if len(models) != 2:
        raise UserError(f"slerp merges exactly 2 models, got {len(models)}")
    if weights is not None:
        raise UserError("slerp takes the interpolation parameter t, not per-model weights")
    t = _check_fraction("t", t, allow_zero=True)
    d1, d2 = task_vectors(base, models)
    merged = {k: base[k].to(d1[k].dtype) + float(lam) * slerp_tensors(t, d1[k], d2[k]) for k in d1}
    return _assemble(base, merged)


def uniform_soup(base: Mapping[str, Tensor], models: Sequence[Mapping[str, Tensor]],
                 weights: Sequence[float] | None = None, *, lam: float = 1.0) -> StateDict:
    """Model soup (Wortsman et al. 2022, https://arxiv.org/abs/2203.05482): θ = Σk wk θk / Σk wk,
    the plain mean for w = 1 — equal to θ0 + λ·mean(Δk) with λ = 1."""
    w = _check_weights(weights, len(models))
    if sum(w) == 0:
        raise UserError(f"soup weights must not sum to 0, got {w}")
    return generalized_task_arithmetic(base, models, w, normalize=True, lam=lam)


def greedy_soup(base: Mapping[str, Tensor], models: Sequence[Mapping[str, Tensor]],
                score_fn: Callable[[StateDict], float]) -> tuple[StateDict, list[int]]:
    """Greedy soup (Wortsman et al. 2022, https://arxiv.org/abs/2203.05482, Recipe 1).

    Score every model alone (higher is better), sort descending, start the soup with the best,
    then try each next model: keep it if the uniform soup of the chosen set plus it scores >= the
    current soup. Returns the soup's state dict and the chosen model indices in the order added.
    """
    check_compatible(base, models)
    scores = [float(score_fn(_assemble(base, {k: v for k, v in m.items() if _is_float(base[k])}))) for m in models]
    order = sorted(range(len(models)), key=lambda i: -scores[i])
    chosen = [order[0]]
    soup = uniform_soup(base, [models[order[0]]])
    best = scores[order[0]]
    log.info("greedy soup: start with model %d (score %.4f)", order[0], best)
    for i in order[1:]:
        cand = uniform_soup(base, [models[j] for j in chosen + [i]])
        s = float(score_fn(cand))
        if s >= best:
            chosen.append(i)
            soup, best = cand, s
            log.info("greedy soup: add model %d (score %.4f)", i, s)
        else:
            log.info("greedy soup: skip model %d (score %.4f < %.4f)", i, s, best)
    return soup, chosen


def _greedy_soup_method(base, models, weights=None, *, score_fn=None) -> StateDict:
    if weights is not None:
        raise UserError("greedy_soup chooses its models by score; it takes no weights")
    if score_fn is None or not callable(score_fn):
        raise UserError("greedy_soup needs a score_fn(state_dict) -> float (higher is better)")
    return greedy_soup(base, models, score_fn)[0]


# --------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MergeMethod:
    """A named merge: ``fn(base, models, weights, **params)`` plus the parameters it accepts
    (with defaults) and the paper it follows."""

    name: str
    pretty_name: str
    paper_url: str
    fn: Callable[..., StateDict]
    params: Mapping[str, Any] = field(default_factory=dict)

    def __call__(self, base: Mapping[str, Tensor], models: Sequence[Mapping[str, Tensor]],
                 weights: Sequence[float] | None = None, **params: Any) -> StateDict:
        unknown = sorted(set(params) - set(self.params))
        if unknown:
            raise UserError(
                f"merge method '{self.name}' does not take {', '.join(unknown)}; "
                f"it takes: {', '.join(sorted(self.params)) or 'no parameters'}"
            )
        return self.fn(base, models, weights, **{**self.params, **params})


def _gta(name: str, pretty: str, url: str, *, sparsification: str = "none", consensus: str | None = None,
         weighting: str = "linear", normalize: bool = False, **defaults: Any) -> MergeMethod:
    fn = functools.partial(generalized_task_arithmetic, sparsification=sparsification, consensus=consensus,
                           weighting=weighting)
    params: dict[str, Any] = {"lam": 1.0, "normalize": normalize}
    if sparsification != "none":
        params.update(density=None)
    if sparsification == "random":
        params.update(drop_p=None, seed=0)
    if weighting == "delta_guided":
        params.update(gamma=1.0, granularity="element")
    params.update(defaults)
    return MergeMethod(name, pretty, url, fn, params)


_TA_URL = "https://arxiv.org/abs/2212.04089"
_TIES_URL = "https://arxiv.org/abs/2306.01708"
_DARE_URL = "https://arxiv.org/abs/2311.03099"
_SOUP_URL = "https://arxiv.org/abs/2203.05482"

MERGE_METHODS: dict[str, MergeMethod] = {m.name: m for m in [
    MergeMethod("uniform_soup", "Uniform soup", _SOUP_URL, uniform_soup, {"lam": 1.0}),
    MergeMethod("greedy_soup", "Greedy soup", _SOUP_URL, _greedy_soup_method, {"score_fn": None}),
    _gta("task_arithmetic", "Task arithmetic", _TA_URL),
    _gta("ties", "TIES", _TIES_URL, sparsification="magnitude", consensus="sum", normalize=True,
         default_density=0.2),
    _gta("dare", "DARE (linear)", _DARE_URL, sparsification="random", default_density=0.5),
    _gta("dare_ties", "DARE-TIES", _DARE_URL, sparsification="random", consensus="sum", default_density=0.5),
    _gta("breadcrumbs", "Model Breadcrumbs", "https://arxiv.org/abs/2312.06795", sparsification="breadcrumbs",
         default_density=0.9, outliers=0.01),
    _gta("breadcrumbs_ties", "Model Breadcrumbs with TIES", "https://arxiv.org/abs/2312.06795",
         sparsification="breadcrumbs", consensus="sum", default_density=0.9, outliers=0.01),
    _gta("delta_guided", "Delta-guided fusion (CoDiEmb)", "https://arxiv.org/abs/2508.11442",
         weighting="delta_guided"),
    MergeMethod("slerp", "SLERP of two task vectors", "https://en.wikipedia.org/wiki/Slerp", slerp,
                {"t": 0.5, "lam": 1.0}),
]}


def merge_state_dicts(method: str, base: Mapping[str, Tensor], models: Sequence[Mapping[str, Tensor]],
                      weights: Sequence[float] | None = None, **params: Any) -> StateDict:
    """Merge ``models`` onto ``base`` with the registered ``method`` (see :data:`MERGE_METHODS`).

    Common params: ``lam`` (λ), ``density`` / ``drop_p`` (TIES/DARE/Breadcrumbs kept fraction),
    ``seed`` (DARE), ``normalize``, ``gamma`` and ``granularity`` (delta_guided), ``t`` (slerp),
    ``outliers`` (breadcrumbs), ``score_fn`` (greedy_soup). Unknown names raise :class:`UserError`.
    """
    if method not in MERGE_METHODS:
        raise UserError(f"unknown merge method '{method}'; known: {', '.join(sorted(MERGE_METHODS))}")
    return MERGE_METHODS[method](base, models, weights, **params)
