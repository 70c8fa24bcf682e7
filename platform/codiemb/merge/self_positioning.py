"""Self Positioning: learn merge coefficients and a scale on a small probe set, weights frozen.

Self Positioning (arXiv 2410.15035; DESIGN §4 "Merging"): keep θ0 and every task vector
Δk = θk − θ0 frozen and parameterise the merged model as

    θ(a, λ) = θ0 + λ·V(a),    V(a) = Σk ak Δk

then optimise only (a, λ) — K + 1 scalars — with Adam on a balanced probe set, minimising

    J(a, λ) = probe_loss(θ(a, λ)) + μ·λ,     0 <= μ < 0.05,

where the μ·λ term keeps the merged model close to θ0 unless the probe pays for moving away.

Our choices (documented here because the DESIGN leaves them open):

- ``coefficients="softmax"`` (default): a = softmax(α), α ∈ R^K, α = 0 at the start. V(a) stays
  in the convex hull of the task vectors, so a is the *direction* and λ alone the *step length*
  that μ·λ regularises. The start point (a = 1/K, λ = ``init_lam`` = 1) is exactly the uniform
  soup. ``coefficients="plain"``: a is optimised directly (start 1/K, any sign/sum).
- λ is kept >= 0 by projection (clamped after every step), so μ·λ is a real penalty.
- the module runs in eval mode (no dropout) while probing, its training flag is restored after;
  RNG use inside the probe is seeded by ``seed`` without touching the global RNG state.
- the returned point is the best J seen over the ``steps + 1`` evaluations (start included); with
  a stochastic probe (``embedding_probe(batch_size=...)``: a fresh minibatch per evaluation) the
  J values are not comparable, and ``select="last"`` returns the last point instead.
- ``granularity="layer"`` (AdaMerging's layer-wise variant, arXiv 2310.02575, in Self Positioning's
  parameterisation): one (a, λ) per parameter group — the embeddings, each transformer layer
  (``...layer.N...``), and the rest — so a layer can take more of one task vector than another;
  the penalty is μ·mean(λ). The start point is still the uniform soup.

No weight is copied per step: the merged parameters are built as tensors on the fly and handed to
``torch.func.functional_call(module, params, args, kwargs)``; the module's own weights are never
modified.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call

from codiemb.errors import UserError
from codiemb.merge.methods import check_compatible

log = logging.getLogger(__name__)

Forward = Callable[..., Any]
ProbeLoss = Callable[[Forward], Tensor]


@dataclass
class SelfPositionResult:
    """The learned point and its merged state dict (base keys and dtypes)."""

    coefficients: list[float]          # a (softmax-normalised by default)
    lam: float                         # λ
    state_dict: dict[str, Tensor]      # θ0 + λ Σk ak Δk, cast to the base dtypes
    history: list[float]               # J = probe_loss + μ·λ at every evaluation (steps + 1 values)
    probe_loss: float = math.nan       # probe loss (without μ·λ) at the returned point
    probe_history: list[float] = field(default_factory=list)  # probe loss at every evaluation
    groups: dict[str, dict[str, Any]] = field(default_factory=dict)  # layer granularity: group -> a, λ


_LAYER = re.compile(r"(?:^|\.)layers?\.(\d+)\.")


def parameter_group(key: str) -> str:
    """The layer-wise group of a state-dict key: ``layer.N`` for transformer layer N,
    ``embeddings``, or ``other`` (pooler, final norms, heads)."""
    m = _LAYER.search(key)
    if m:
        return f"layer.{int(m.group(1))}"
    return "embeddings" if "embeddings" in key else "other"


def _embedding(out: Any) -> Tensor:
    """The embedding tensor of an encoder output: a tensor, or a dict's "embedding" entry."""
    if isinstance(out, Tensor):
        return out
    if isinstance(out, Mapping):
        for key in ("embedding", "sentence_embedding"):
            if key in out:
                return out[key]
    raise TypeError(f"cannot find an embedding in the encoder output of type {type(out).__name__}")


def embedding_probe(
    ir: tuple[Mapping[str, Tensor], Mapping[str, Tensor]] | None = None,
    sts: tuple[Mapping[str, Tensor], Mapping[str, Tensor], Tensor] | None = None,
    *,
    temperature: float = 0.05,
    cosent_scale: float = 20.0,
    batch_size: int = 0,
    balance: str = "mean",
) -> ProbeLoss:
    """A balanced IR + STS probe loss for an encoder whose ``forward(features)`` returns embeddings.

    ``ir = (query_features, positive_features)``: B tokenized (query, positive) pairs; the loss is
    InfoNCE with in-batch negatives (``codiemb.losses.ir.info_nce`` with one positive, no gather,
    τ = ``temperature``). ``sts = (features1, features2, scores)``: the loss is CoSENT on the cosine
    similarities (``codiemb.losses.sts.cosent``, λ = ``cosent_scale``). With both given the probe
    is L = ½·L_IR + ½·L_STS; build the two probe sets with the same number of examples ("balanced:
    half IR, half STS").

    ``batch_size`` > 0: each call draws that many IR pairs and that many STS pairs at random
    (torch's RNG, which :func:`self_position` seeds), so a large probe costs one minibatch a step;
    0 uses the whole probe every call.

    ``balance="start"`` divides each task's loss by its value at the first call (the start point),
    so both tasks weigh the same in relative terms: CoSENT and InfoNCE have different scales, and a
    plain mean lets the larger one steer the coefficients. ``"mean"`` is the plain ½ + ½.

    Example::

        enc = Encoder.load("minilm")
        q = enc.tokenize(queries); p = enc.tokenize(passages)
        s1 = enc.tokenize(sent1); s2 = enc.tokenize(sent2)
        probe = embedding_probe(ir=(q, p), sts=(s1, s2, torch.tensor(scores)))
        result = self_position(enc, base_sd, [ir_sd, sts_sd], probe, steps=50, mu=0.01)
    """
    if ir is None and sts is None:
        raise UserError("embedding_probe needs an IR probe set, an STS probe set, or both")
    if balance not in ("mean", "start"):
        raise UserError(f"unknown probe balance '{balance}'; known: mean, start")
    start: list[Tensor] = []

    def pick(features: Mapping[str, Tensor], idx: Tensor | None) -> dict[str, Tensor]:
        if idx is None:
            return dict(features)
        out = {k: v[idx] for k, v in features.items()}
        if "attention_mask" in out:  # trim the columns no row of the minibatch uses
            width = int(out["attention_mask"].sum(dim=1).max())
            out = {k: (v[:, :width] if v.dim() == 2 else v) for k, v in out.items()}
        return out

    def rows(n: int) -> Tensor | None:
        return torch.randperm(n)[:batch_size] if 0 < batch_size < n else None

    def probe_loss(forward: Forward) -> Tensor:
        from codiemb.losses.ir import info_nce
        from codiemb.losses.sts import cosent, cosine

        losses = []
        if ir is not None:
            idx = rows(len(next(iter(ir[0].values()))))
            q = _embedding(forward(pick(ir[0], idx)))
            p = _embedding(forward(pick(ir[1], idx)))
            losses.append(info_nce(q, p[:, None, :], num_positives=1, temperature=temperature, gather=False))
        if sts is not None:
            idx = rows(len(sts[2]))
            e1 = _embedding(forward(pick(sts[0], idx)))
            e2 = _embedding(forward(pick(sts[1], idx)))
            scores = sts[2] if idx is None else sts[2][idx]
            losses.append(cosent(cosine(e1, e2), scores.to(e1.device), scale=cosent_scale))
        stacked = torch.stack(losses)
        if balance == "start":
            if not start:
                start.append(stacked.detach().clamp_min(1e-8))
            stacked = stacked / start[0]
        return stacked.mean()

    return probe_loss


def _module_device(module: nn.Module) -> torch.device:
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


def self_position(
    module: nn.Module,
    base: Mapping[str, Tensor],
    models: Sequence[Mapping[str, Tensor]],
    probe_loss: ProbeLoss,
    *,
    steps: int = 50,
    lr: float = 0.05,
    mu: float = 0.01,
    init_lam: float = 1.0,
    seed: int = 0,
    coefficients: str = "softmax",
    granularity: str = "model",
    select: str = "best",
) -> SelfPositionResult:
    """Optimise θ(a, λ) = θ0 + λ·Σk ak Δk on ``probe_loss`` + μ·λ with Adam (see module docstring).

    ``module`` is any ``nn.Module`` whose ``state_dict()`` keys include the base's keys (e.g. the
    training loop's encoder). ``probe_loss(forward)`` gets ``forward = lambda *a, **k:
    functional_call(module, merged_params, a, k)`` and returns a scalar loss; see
    :func:`embedding_probe` for the IR + STS probe.
    """
    if coefficients not in ("softmax", "plain"):
        raise UserError(f"unknown coefficients mode '{coefficients}'; known: softmax, plain")
    if granularity not in ("model", "layer"):
        raise UserError(f"unknown self positioning granularity '{granularity}'; known: model, layer")
    if select not in ("best", "last"):
        raise UserError(f"unknown self positioning select '{select}'; known: best, last")
    if not 0.0 <= float(mu) < 0.05:
        raise UserError(f"self positioning needs 0 <= mu < 0.05, got {mu}")
    if int(steps) < 0 or float(lr) <= 0 or float(init_lam) < 0:
        raise UserError(f"self positioning needs steps >= 0, lr > 0, init_lam >= 0; got {steps}, {lr}, {init_lam}")
    check_compatible(base, models)
    own = module.state_dict(keep_vars=True)
    missing = [k for k in base if k not in own]
    if missing:
        raise UserError(f"the module has no tensor '{missing[0]}' that the merge base has ({len(missing)} such)")

    device = _module_device(module)
    k = len(models)
    float_keys = [key for key, b in base.items() if torch.is_floating_point(b)]
    cdt = {key: (torch.float64 if base[key].dtype == torch.float64 else torch.float32) for key in float_keys}
    theta0 = {key: base[key].detach().to(device=device, dtype=cdt[key]) for key in float_keys}
    deltas = {key: torch.stack([m[key].detach().to(device=device, dtype=cdt[key]) for m in models]) - theta0[key]
              for key in float_keys}
    fixed = {key: b.detach().to(device) for key, b in base.items() if key not in theta0}
    run_dtype = {key: own[key].dtype for key in float_keys}

    names = sorted({parameter_group(key) for key in float_keys}) if granularity == "layer" else ["all"]
    group_of = {key: names.index(parameter_group(key)) if granularity == "layer" else 0 for key in float_keys}
    g = len(names)
    alpha = torch.zeros(g, k, device=device, dtype=torch.float64) if coefficients == "softmax" else \
        torch.full((g, k), 1.0 / k, device=device, dtype=torch.float64)
    alpha.requires_grad_(True)
    lam = torch.full((g,), float(init_lam), device=device, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([alpha, lam], lr=float(lr))

    def coef(al: Tensor) -> Tensor:
        return torch.softmax(al, dim=1) if coefficients == "softmax" else al

    def merged(a: Tensor, lm: Tensor) -> dict[str, Tensor]:
        params = dict(fixed)
        for key in float_keys:
            d, i = deltas[key], group_of[key]
            v = torch.tensordot(a[i].to(d.dtype), d, dims=1)
            params[key] = (theta0[key] + lm[i].to(d.dtype) * v).to(run_dtype[key])
        return params

    history: list[float] = []
    probes: list[float] = []
    best = (math.inf, math.nan, None, None)
    was_training = module.training
    module.eval()
    rng_devices = [device.index or 0] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=rng_devices):
            torch.manual_seed(int(seed))
            for step in range(int(steps) + 1):
                a = coef(alpha)
                params = merged(a, lam)

                def forward(*args: Any, _p: dict = params, **kwargs: Any) -> Any:
                    return functional_call(module, _p, args, kwargs)

                loss = probe_loss(forward)
                if loss.dim() != 0:
                    raise UserError(f"probe_loss must return a scalar, got shape {tuple(loss.shape)}")
                obj = loss.to(torch.float64) + float(mu) * lam.mean()
                j, pl = float(obj.detach()), float(loss.detach())
                if not math.isfinite(j):
                    raise UserError(f"self positioning: the probe loss is not finite at step {step} ({pl})")
                history.append(j)
                probes.append(pl)
                if j < best[0] or select == "last":
                    best = (j, pl, a.detach().clone(), lam.detach().clone())
                if step % 10 == 0 or step == steps:
                    log.info("self positioning step %d: J=%.5f probe=%.5f lam=%s a=%s", step, j, pl,
                             [round(x, 4) for x in lam.detach().tolist()],
                             [[round(x, 4) for x in row] for row in a.detach().tolist()])
                if step == steps:
                    break
                opt.zero_grad(set_to_none=True)
                obj.backward()
                opt.step()
                with torch.no_grad():
                    lam.clamp_(min=0.0)
    finally:
        module.train(was_training)

    _, best_probe, a_best, lam_best = best
    state: dict[str, Tensor] = {}
    with torch.no_grad():
        for key, b in base.items():
            if key in theta0:
                i = group_of[key]
                v = torch.tensordot(a_best[i].to(deltas[key].dtype), deltas[key], dims=1)
                state[key] = (theta0[key] + lam_best[i].to(v.dtype) * v).to(device=b.device, dtype=b.dtype)
            else:
                state[key] = b.clone()
    groups = {} if granularity == "model" else {
        name: {"coefficients": [float(x) for x in a_best[i]], "lam": float(lam_best[i])} for i, name in enumerate(names)}
    # model granularity: the one (a, λ); layer granularity: their means over the groups (see ``groups``)
    return SelfPositionResult(
        coefficients=[float(x) for x in a_best.mean(dim=0)], lam=float(lam_best.mean()), state_dict=state,
        history=history, probe_loss=best_probe, probe_history=probes, groups=groups,
    )
