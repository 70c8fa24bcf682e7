"""``codiemb tune CONFIG`` / ``jobs/tune.py``: run the search that ``tune.search`` names.

- ``merge``: merge coefficients (``tune/merge_search.py``), seconds per trial;
- ``loss``: loss weights and sampler temperature, a TorchTrainer per trial, ASHA (``tune/loss_search.py``).
"""

from __future__ import annotations

import json
import logging

from codiemb.config import Config, load_config
from codiemb.errors import ConfigError
from codiemb.tune.common import SweepResult

log = logging.getLogger(__name__)


def run_search(cfg: Config) -> SweepResult:
    if cfg.tune is None:
        raise ConfigError("config has no 'tune' section")
    if cfg.tune.search == "merge":
        from codiemb.tune.merge_search import run_merge_search

        return run_merge_search(cfg)
    from codiemb.tune.loss_search import run_loss_search

    return run_loss_search(cfg)


def summary(result: SweepResult) -> str:
    lines = [f"{result.search} search: {result.n_trials} trials ({result.n_errors} failed) in {result.wall_s:.0f} s",
             f"experiment: {result.experiment_path}"]
    if result.best_trial:
        lines.append(f"best trial {result.best_trial}: " + json.dumps(result.best_config, default=str))
        lines.append("best dev: " + "  ".join(f"{k}={v:.2f}" for k, v in result.best_metrics.items()))
    if result.output_dir:
        lines.append(f"model: {result.output_dir}")
    if result.results_csv:
        lines.append(f"table: {result.results_csv}")
    if result.pareto_png:
        lines.append(f"pareto: {result.pareto_png}")
    return "\n".join(lines)


def main(config_path: str | None, overrides: list[str] | None = None) -> int:
    """The ``codiemb tune`` command body. Returns 0 when at least one trial finished, else 1."""
    cfg = load_config(config_path, overrides)
    result = run_search(cfg)
    print(summary(result))
    return 0 if result.best_trial else 1
