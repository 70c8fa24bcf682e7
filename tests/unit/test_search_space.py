"""Search spaces from ``tune.space``, trial configs -> merge arguments / config overrides,
objectives and the Pareto front. No Ray cluster: only ``ray.tune``'s sampling domains."""

from __future__ import annotations

import math

import pytest

from codiemb.config import config_from_dict
from codiemb.errors import ConfigError


def test_space_entries_become_tune_domains_with_the_right_bounds():
    from ray.tune.search.sample import Categorical, Float, Integer, LogUniform

    from codiemb.tune.space import build_param_space

    space = build_param_space({
        "lam": {"type": "uniform", "low": 0.5, "high": 1.5},
        "lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2},
        "steps": {"type": "int", "low": 2, "high": 4},
        "method": {"type": "choice", "values": ["ties", "delta_guided"]},
        "seed": 3,
    })
    assert isinstance(space["lam"], Float) and (space["lam"].lower, space["lam"].upper) == (0.5, 1.5)
    assert isinstance(space["lr"].get_sampler(), LogUniform)
    assert isinstance(space["steps"], Integer) and (space["steps"].lower, space["steps"].upper) == (2, 5)
    assert isinstance(space["method"], Categorical) and space["method"].categories == ["ties", "delta_guided"]
    assert space["seed"] == 3
    # int bounds are inclusive: randint(2, 5) samples 2, 3, 4 and never 5
    samples = set(space["steps"].sample(size=300))
    assert samples == {2, 3, 4}


def test_optuna_sees_the_same_distributions():
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    from codiemb.tune.space import build_param_space

    dists = OptunaSearch.convert_search_space(build_param_space({
        "gamma": {"type": "uniform", "low": 0.0, "high": 3.0},
        "granularity": {"type": "choice", "values": ["element", "row"]},
        "weight_1": {"type": "loguniform", "low": 0.1, "high": 10.0},
    }))
    assert dists["gamma"] == optuna.distributions.FloatDistribution(0.0, 3.0)
    assert dists["granularity"] == optuna.distributions.CategoricalDistribution(["element", "row"])
    assert dists["weight_1"] == optuna.distributions.FloatDistribution(0.1, 10.0, log=True)


@pytest.mark.parametrize("spec, message", [
    ({"type": "normal", "low": 0, "high": 1}, "type must be one of"),
    ({"type": "uniform", "low": 1, "high": 1}, "needs low < high"),
    ({"type": "uniform", "low": 0}, "needs 'low' and 'high'"),
    ({"type": "loguniform", "low": 0, "high": 1}, "loguniform needs low > 0"),
    ({"type": "int", "low": 0.5, "high": 3}, "int bounds must be integers"),
    ({"type": "choice", "values": []}, "non-empty list"),
    ({"type": "uniform", "low": 0, "high": 1, "step": 2}, "unknown key(s) step"),
])
def test_bad_specs_are_config_errors_naming_the_entry(spec, message):
    from codiemb.tune.space import build_param_space

    with pytest.raises(ConfigError) as exc:
        build_param_space({"lam": spec})
    assert str(exc.value).startswith("tune.space.lam:") and message in str(exc.value)


def test_merge_space_names_are_checked_against_the_methods_and_models():
    from codiemb.tune.space import DEFAULT_MERGE_SPACE, check_merge_space

    check_merge_space(DEFAULT_MERGE_SPACE, 2)
    check_merge_space({"weight_1": {"type": "uniform", "low": 0, "high": 1}, "mu": 0.01}, 2)
    with pytest.raises(ConfigError, match=r"tune.space.weight_2: merge.models has 2 models"):
        check_merge_space({"weight_2": {"type": "uniform", "low": 0, "high": 1}}, 2)
    with pytest.raises(ConfigError, match="no merge method takes 'gama'"):
        check_merge_space({"gama": 1.0}, 2)
    with pytest.raises(ConfigError, match="unknown merge method 'tie'"):
        check_merge_space({"method": {"type": "choice", "values": ["tie"]}}, 2)


def test_trial_config_becomes_method_weights_and_only_the_params_the_method_takes():
    from codiemb.merge.methods import merge_state_dicts
    from codiemb.tune.space import merge_trial_args

    trial = {"method": "ties", "lam": 0.9, "gamma": 2.0, "density": 0.4, "granularity": "row", "weight_1": 0.25}
    method, weights, params = merge_trial_args(trial, "delta_guided", [1.0, 1.0], {"seed": 7, "lam": 1.0})
    assert method == "ties" and weights == [1.0, 0.25]
    assert params == {"lam": 0.9, "density": 0.4}  # gamma/granularity belong to delta_guided; ties has no seed

    method, weights, params = merge_trial_args({**trial, "method": "delta_guided"}, "ties", [1.0, 1.0])
    assert params == {"lam": 0.9, "gamma": 2.0, "granularity": "row"}
    # the arguments are accepted by the merge registry as they are
    import torch

    base = {"w": torch.zeros(2, 2)}
    models = [{"w": torch.ones(2, 2)}, {"w": -torch.ones(2, 2)}]
    out = merge_state_dicts(method, base, models, weights, **params)
    assert out["w"].shape == (2, 2)

    method, _, params = merge_trial_args({"steps": 3, "lam": 2.0}, "self_positioning", [1.0, 1.0])
    assert method == "self_positioning" and params == {"steps": 3}


def test_loss_trial_sets_dotted_config_paths_and_validates():
    from codiemb.tune.space import apply_trial, check_loss_space

    tree = {"run": {"name": "x"}, "loss": {"sts": {"pearson": 2.0}}}
    cfg = apply_trial(tree, {"loss.sts.rank_kl": 3.5, "sampler.temperature": 4.0, "loss.task_weights.sts": 0.5})
    assert cfg.loss.sts.rank_kl == 3.5 and cfg.loss.sts.pearson == 2.0
    assert cfg.sampler.temperature == 4.0 and cfg.loss.task_weights == {"sts": 0.5}
    assert tree == {"run": {"name": "x"}, "loss": {"sts": {"pearson": 2.0}}}  # not modified
    check_loss_space(tree, {"loss.sts.rank_kl": {"type": "uniform", "low": 0.0, "high": 5.0}})
    with pytest.raises(ConfigError, match="unknown key 'loss.sts.rank_kll'"):
        check_loss_space(tree, {"loss.sts.rank_kll": {"type": "uniform", "low": 0.0, "high": 5.0}})


def test_objective_is_the_weighted_mean_of_the_metrics_present():
    from codiemb.tune.common import objective_value, with_objective

    assert objective_value({"sts_spearman": 80.0, "retrieval_ndcg_at_10": 60.0}, {"sts": 0.5, "retrieval": 0.5}) == 70.0
    assert objective_value({"sts_spearman": 80.0, "retrieval_ndcg_at_10": 60.0}, {"sts": 3, "retrieval": 1}) == 75.0
    assert objective_value({"sts_spearman": 80.0}, {"sts": 0.5, "retrieval": 0.5}) == 80.0
    assert math.isnan(objective_value({}, {"sts": 1}))
    assert with_objective({"sts_spearman": 1, "pool": "x"}, {"sts": 1})["objective"] == 1.0
    with pytest.raises(ConfigError, match="unknown key"):
        objective_value({}, {"ir": 1.0})


def test_pareto_front_and_best_selection():
    from codiemb.tune.common import pareto_front, select_best

    pts = [(80, 60), (82, 55), (79, 61), (78, 59), (82, 55), (81, 50)]
    assert pareto_front(pts) == [True, True, True, False, True, False]
    rows = [{"trial_id": f"t{i}", "status": "TERMINATED", "sts_spearman": a, "retrieval_ndcg_at_10": b,
             "objective": (a + b) / 2} for i, (a, b) in enumerate(pts)]
    rows.append({"trial_id": "bad", "status": "ERROR"})
    weighted = config_from_dict({"tune": {"objective": "weighted"}})
    assert select_best(rows, weighted)["trial_id"] == "t0"  # 70.0 is the best mean
    # a dominated point with the best weighted score is not chosen under the Pareto objective
    rows.append({"trial_id": "skew", "status": "TERMINATED", "sts_spearman": 79.5, "retrieval_ndcg_at_10": 58.0,
                 "objective": 99.0})
    pareto = config_from_dict({"tune": {"objective": "pareto"}})
    assert select_best(rows, weighted)["trial_id"] == "skew"
    assert select_best(rows, pareto)["trial_id"] == "t0"


def test_tracking_uri_and_paths_become_absolute(tmp_path, monkeypatch):
    from codiemb.tune.common import absolute_tracking_uri, trial_index

    monkeypatch.chdir(tmp_path)
    assert absolute_tracking_uri("sqlite:///mlflow.db") == f"sqlite:///{tmp_path}/mlflow.db"
    assert absolute_tracking_uri("sqlite:////abs/x.db") == "sqlite:////abs/x.db"
    assert absolute_tracking_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    assert absolute_tracking_uri("mlruns") == str(tmp_path / "mlruns")
    assert trial_index("/x/merge_trial_bd48acac_17_density=0.71,lam=1.04_2026-11-27_11-53-15") == 17
    assert trial_index("merge_trial_a1b2c_00016_17_lam=1") == 17


def test_searcher_uses_the_configured_sampler_and_objectives():
    import optuna

    from codiemb.tune.common import make_searcher

    s = make_searcher(config_from_dict({"tune": {"algorithm": "nsga2", "objective": "pareto", "num_samples": 8}}))
    assert s.metric == ["sts_spearman", "retrieval_ndcg_at_10"] and s.mode == ["max", "max"]
    assert isinstance(s._sampler, optuna.samplers.NSGAIISampler)
    s = make_searcher(config_from_dict({"tune": {"algorithm": "tpe"}}))
    assert s.metric == "objective" and s.mode == "max"
    assert isinstance(s._sampler, optuna.samplers.TPESampler)


def test_maximin_objective_is_the_worst_gap_to_the_best_specialist():
    from codiemb.tune.common import maximin_value, specialist_targets, with_objective

    reference = {"base": {"sts_spearman": 99.0, "retrieval_ndcg_at_10": 99.0},  # the base never sets a target
                 "model_0:ir": {"sts_spearman": 85.0, "retrieval_ndcg_at_10": 72.0},
                 "model_1:sts": {"sts_spearman": 88.0, "retrieval_ndcg_at_10": 66.0}}
    targets = specialist_targets(reference)
    assert targets == {"sts_spearman": 88.0, "retrieval_ndcg_at_10": 72.0}
    # +1 on STS cannot buy -2 on retrieval: the objective is the worse gap
    assert maximin_value({"sts_spearman": 89.0, "retrieval_ndcg_at_10": 70.0}, targets) == -2.0
    assert maximin_value({"sts_spearman": 87.5, "retrieval_ndcg_at_10": 72.5}, targets) == -0.5
    # maximin prefers the balanced b (gaps -0.1/-0.1) to a (+2/-2); the weighted mean prefers a (80.0 vs 79.9)
    a = with_objective({"sts_spearman": 90.0, "retrieval_ndcg_at_10": 70.0}, {"sts": 1, "retrieval": 1}, targets)
    b = with_objective({"sts_spearman": 87.9, "retrieval_ndcg_at_10": 71.9}, {"sts": 1, "retrieval": 1}, targets)
    assert b["objective"] > a["objective"]
    assert with_objective({"sts_spearman": 90.0, "retrieval_ndcg_at_10": 70.0}, {"sts": 1, "retrieval": 1})["objective"] \
        > with_objective({"sts_spearman": 87.9, "retrieval_ndcg_at_10": 71.9}, {"sts": 1, "retrieval": 1})["objective"]
    assert math.isnan(maximin_value({"sts_spearman": 90.0}, targets))
    with pytest.raises(ConfigError, match="reference"):
        maximin_value({"sts_spearman": 90.0}, {})


def test_maximin_is_refused_where_it_has_no_specialists(tmp_path):
    from codiemb.config import Config
    from codiemb.tune.loss_search import run_loss_search
    from codiemb.tune.merge_search import run_merge_search

    cfg = Config.model_validate({"tune": {"search": "loss", "objective": "maximin", "space": {"loss.sts.cosent": {"type": "uniform", "low": 0, "high": 1}}},
                                 "data": {"datasets": [{"name": "s", "task": "sts", "path": "x.jsonl", "score_range": [0, 5]}],
                                          "dev": {"sts": "sts/stsb/dev.jsonl"}}})
    with pytest.raises(ConfigError, match="maximin"):
        run_loss_search(cfg)
    cfg = Config.model_validate({"tune": {"objective": "maximin", "dev": {"reference": False}},
                                 "merge": {"method": "task_arithmetic", "base_model": "minilm", "models": [{"model": "a"}, {"model": "b"}]}})
    with pytest.raises(ConfigError, match="reference"):
        run_merge_search(cfg)
