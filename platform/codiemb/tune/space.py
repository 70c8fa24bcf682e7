"""Search spaces: ``tune.space`` in the config -> a Ray Tune ``param_space`` (which OptunaSearch
converts to Optuna distributions), and a trial's sampled config -> merge arguments or config overrides.

A space entry is ``name: spec`` where spec is one of::

    {type: uniform,    low: 0.0, high: 2.0}      # float, uniform
    {type: loguniform, low: 1e-3, high: 1.0}     # float, log-uniform (low > 0)
    {type: int,        low: 1, high: 8}          # integer, both ends included
    {type: choice,     values: [ties, delta_guided]}
    0.5                                          # a constant (any non-mapping value)

Merge search (search 1) names: ``method``; ``weight_<i>`` the weight of ``merge.models[i]``; any
parameter of a merge method (``lam``, ``gamma``, ``density``, ``drop_p``, ``granularity``, ``t``,
``outliers``, ``normalize``, ...; self_positioning: ``steps``, ``lr``, ``mu``, ...). Each trial
passes a method only the parameters it takes (the space is flat, so e.g. ``density`` is sampled
but unused when the method is ``delta_guided``).

Loss search (search 2) names are dotted config paths, e.g. ``loss.sts.rank_kl``,
``loss.retrieval.temperature``, ``loss.task_weights.sts``, ``sampler.temperature``.
"""

from __future__ import annotations

import copy
import logging
from typing import Any, Mapping

from codiemb.errors import ConfigError

log = logging.getLogger(__name__)

SPEC_TYPES = ("uniform", "loguniform", "int", "choice")
WEIGHT_PREFIX = "weight_"

#: The merge space used when ``tune.space`` is empty.
DEFAULT_MERGE_SPACE: dict[str, Any] = {
    "method": {"type": "choice", "values": ["delta_guided", "ties", "task_arithmetic", "dare"]},
    "lam": {"type": "uniform", "low": 0.5, "high": 1.5},
    "gamma": {"type": "uniform", "low": 0.0, "high": 3.0},
    "granularity": {"type": "choice", "values": ["element", "row", "tensor"]},
    "density": {"type": "uniform", "low": 0.1, "high": 1.0},
}


def _check_spec(name: str, spec: Mapping[str, Any]) -> None:
    where = f"tune.space.{name}"
    kind = spec.get("type")
    if kind not in SPEC_TYPES:
        raise ConfigError(f"{where}: type must be one of {', '.join(SPEC_TYPES)}, got {kind!r}")
    allowed = {"type", "values"} if kind == "choice" else {"type", "low", "high"}
    extra = sorted(set(spec) - allowed)
    if extra:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(extra)} for type {kind}")
    if kind == "choice":
        values = spec.get("values")
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}: choice needs a non-empty list 'values'")
        return
    if "low" not in spec or "high" not in spec:
        raise ConfigError(f"{where}: {kind} needs 'low' and 'high'")
    low, high = spec["low"], spec["high"]
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)):
        raise ConfigError(f"{where}: low and high must be numbers, got {low!r}, {high!r}")
    if kind == "int" and not (float(low).is_integer() and float(high).is_integer()):
        raise ConfigError(f"{where}: int bounds must be integers, got {low!r}, {high!r}")
    if not low < high:
        raise ConfigError(f"{where}: needs low < high, got low={low}, high={high}")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"{where}: loguniform needs low > 0, got {low}")


def build_param_space(space: Mapping[str, Any]) -> dict[str, Any]:
    """``tune.space`` -> Ray Tune's ``param_space`` (``tune.uniform`` etc.; constants stay as they are)."""
    from ray import tune

    out: dict[str, Any] = {}
    for name, spec in space.items():
        if not isinstance(spec, Mapping):
            out[name] = spec
            continue
        _check_spec(name, spec)
        kind = spec["type"]
        if kind == "uniform":
            out[name] = tune.uniform(float(spec["low"]), float(spec["high"]))
        elif kind == "loguniform":
            out[name] = tune.loguniform(float(spec["low"]), float(spec["high"]))
        elif kind == "int":
            out[name] = tune.randint(int(spec["low"]), int(spec["high"]) + 1)  # randint excludes high
        else:
            out[name] = tune.choice(list(spec["values"]))
    if not any(isinstance(s, Mapping) for s in space.values()):
        raise ConfigError("tune.space has nothing to search (every entry is a constant)")
    return out


# --------------------------------------------------------------------------- merge search
def check_merge_space(space: Mapping[str, Any], n_models: int) -> None:
    """Fail early, in one line, on names no merge method takes and weights of models that do not exist."""
    from codiemb.merge.methods import MERGE_METHODS
    from codiemb.merge.run import SELF_POSITIONING, SELF_POSITIONING_PARAMS, method_names

    known = set(SELF_POSITIONING_PARAMS) | {p for m in MERGE_METHODS.values() for p in m.params} | {"method"}
    known.discard("score_fn")
    for name, spec in space.items():
        if name.startswith(WEIGHT_PREFIX):
            idx = name[len(WEIGHT_PREFIX):]
            if not idx.isdigit() or int(idx) >= n_models:
                raise ConfigError(f"tune.space.{name}: merge.models has {n_models} models (weight_0 .. "
                                  f"weight_{n_models - 1})")
        elif name not in known:
            raise ConfigError(f"tune.space.{name}: no merge method takes '{name}'; known: {', '.join(sorted(known))}")
    methods = space.get("method")
    values = methods.get("values", []) if isinstance(methods, Mapping) else [methods] if methods else []
    for m in values:
        if m not in MERGE_METHODS and m != SELF_POSITIONING:
            raise ConfigError(f"tune.space.method: unknown merge method '{m}'; known: {', '.join(method_names())}")
        if m == "greedy_soup":
            raise ConfigError("tune.space.method: greedy_soup has no coefficients to search")


def merge_trial_args(trial: Mapping[str, Any], default_method: str, weights: list[float],
                     base_params: Mapping[str, Any] | None = None) -> tuple[str, list[float], dict[str, Any]]:
    """A trial's sampled config -> (method, per-model weights, the parameters that method takes).

    Starts from ``merge.method`` / the models' weights / ``merge.parameters`` and overrides them
    with the trial's values.
    """
    from codiemb.merge.methods import MERGE_METHODS
    from codiemb.merge.run import SELF_POSITIONING_PARAMS

    method = str(trial.get("method", default_method))
    w = list(weights)
    for name, value in trial.items():
        if name.startswith(WEIGHT_PREFIX):
            w[int(name[len(WEIGHT_PREFIX):])] = float(value)
    takes = set(SELF_POSITIONING_PARAMS) if method not in MERGE_METHODS else set(MERGE_METHODS[method].params)
    params = {k: v for k, v in {**(base_params or {}), **trial}.items()
              if k in takes and k != "method" and not k.startswith(WEIGHT_PREFIX)}
    return method, w, params


# --------------------------------------------------------------------------- loss search
def set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    """``tree["a"]["b"]["c"] = value`` for ``key = "a.b.c"``, creating mappings on the way."""
    node = tree
    parts = key.split(".")
    for p in parts[:-1]:
        if node.get(p) is None:
            node[p] = {}
        node = node[p]
        if not isinstance(node, dict):
            raise ConfigError(f"tune.space.{key}: '{p}' is not a mapping in the config")
    node[parts[-1]] = value


def apply_trial(config_tree: Mapping[str, Any], trial: Mapping[str, Any]):
    """A copy of the config tree with the trial's dotted keys set, validated (a ``Config``)."""
    from codiemb.config import config_from_dict

    tree = copy.deepcopy(dict(config_tree))
    for key, value in trial.items():
        set_dotted(tree, key, value)
    return config_from_dict(tree, "tune trial")


def check_loss_space(config_tree: Mapping[str, Any], space: Mapping[str, Any]) -> None:
    """Every name must be a config path that validates with a value from its range."""
    probe = {}
    for name, spec in space.items():
        if not isinstance(spec, Mapping):
            probe[name] = spec
        elif spec.get("type") == "choice":
            probe[name] = spec["values"][0]
        else:
            probe[name] = spec.get("low")
    try:
        apply_trial(config_tree, probe)
    except ConfigError as exc:
        raise ConfigError(f"tune.space does not fit the config: {exc}") from None
