"""``codiemb merge CONFIG``: merge models onto a base and write a sentence-transformers folder.

Reads the ``merge:`` block (shaped like mergekit's)::

    merge:
      method: delta_guided            # any name in merge.methods.MERGE_METHODS, or self_positioning
      base_model: minilm              # default: model.name
      models:
        - {model: runs/ir-specialist/model, weight: 1.0}
        - {model: runs/sts-specialist/model, weight: 1.0}
      parameters: {gamma: 1.0, lam: 1.0, granularity: element}
      output: runs/merged             # default: <storage.path>/<run.name>-merged
      evaluate: false                 # add fast dev scores (merge/evaluate_merge.py) to the report

and writes ``<output>/`` — the base's sentence-transformers layout (Transformer, Pooling,
Normalize modules, tokenizer, max_seq_length) with the merged weights, via ``Encoder.save`` — plus
``<output>/merge_report.json``: method, parameters, weights, inputs (with their sha256 of the
weights), seconds, and dev scores when asked.

``self_positioning`` (arXiv 2410.15035) learns the coefficients a and the scale λ on a balanced
probe: ``merge.probe_size`` retrieval pairs (query, first positive) sampled from the config's
retrieval datasets and as many STS pairs from its STS datasets — training data only, never a dev
or test split. Its parameters: steps, lr, mu, init_lam, coefficients, temperature, seed,
granularity (``model``: one a and λ; ``layer``: one per transformer layer), batch_size (a random
minibatch of the probe per step; 0 = all of it) and select (``best`` J seen, or ``last``).

Library code: torch + the project's modules only (no Ray, no MLflow); :func:`main` logs to MLflow
when ``tracking.enabled``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from codiemb.config import Config
from codiemb.errors import ConfigError, UserError
from codiemb.merge.methods import MERGE_METHODS, check_compatible, merge_state_dicts

log = logging.getLogger(__name__)

SELF_POSITIONING = "self_positioning"
SELF_POSITIONING_PARAMS = {"steps": 50, "lr": 0.05, "mu": 0.01, "init_lam": 1.0, "coefficients": "softmax",
                           "temperature": 0.05, "seed": 0, "granularity": "model", "batch_size": 0,
                           "select": "best", "balance": "mean"}
REPORT_FILE = "merge_report.json"


@dataclass
class MergeInputs:
    """The loaded base encoder, its state dict, and the models' state dicts (same keys)."""

    encoder: Any  # codiemb.model.encoder.Encoder holding the base weights
    base: dict[str, Tensor]
    models: list[dict[str, Tensor]]
    names: list[str]
    weights: list[float]
    base_name: str


@dataclass
class MergeResult:
    output_dir: str
    report: dict
    state_dict: dict[str, Tensor] = field(repr=False, default_factory=dict)


def method_names() -> list[str]:
    return sorted([*MERGE_METHODS, SELF_POSITIONING])


def _cpu_state(encoder) -> dict[str, Tensor]:
    return {k: v.detach().cpu().clone() for k, v in encoder.state_dict().items()}


def load_inputs(cfg: Config) -> MergeInputs:
    """Load the base encoder and every model of ``cfg.merge``; check that they can be merged."""
    from codiemb.model.encoder import Encoder

    m = cfg.merge
    if m is None:
        raise ConfigError("config has no 'merge' section")
    if not m.models:
        raise ConfigError("merge.models is empty: list the models to merge")
    if m.method not in MERGE_METHODS and m.method != SELF_POSITIONING:
        raise ConfigError(f"merge.method '{m.method}' is unknown; known: {', '.join(method_names())}")
    base_name = m.base_model or cfg.model.name
    encoder = Encoder.load(base_name, trust_remote_code=cfg.model.trust_remote_code)
    base = _cpu_state(encoder)
    models, names = [], []
    for entry in m.models:
        other = Encoder.load(entry.model, trust_remote_code=cfg.model.trust_remote_code)
        models.append(_cpu_state(other))
        names.append(entry.model)
        del other
    check_compatible(base, models, names)
    return MergeInputs(encoder, base, models, names, [float(e.weight) for e in m.models], base_name)


# --------------------------------------------------------------------------- the probe
def build_probe(cfg: Config, encoder, size: int, seed: int = 0) -> dict[str, Any]:
    """A balanced probe: ``size`` (query, positive) pairs from the retrieval datasets and ``size``
    STS pairs from the STS datasets of ``cfg.data`` (training data), sampled with ``seed``.

    Returns ``{"ir": (query_features, positive_features) | None, "sts": (f1, f2, scores) | None,
    "counts": {...}}``, ready for :func:`codiemb.merge.self_positioning.embedding_probe`.
    """
    from codiemb.train.fast_batches import pad_ids, with_pool_mask
    from codiemb.train.loop import load_task_data, store_of

    if not cfg.data.datasets:
        raise ConfigError("self_positioning needs training data for its probe: data.datasets is empty")
    with tempfile.TemporaryDirectory(prefix="codiemb-probe-") as qdir:
        tasks, _ = load_task_data(cfg, quarantine_dir=qdir)  # the token shards (reused when built)
    rng = random.Random(seed)
    ir = _RowsOf([t for t in tasks if t.task == "retrieval"])
    sts = _RowsOf([t for t in tasks if t.task == "sts"])
    probe: dict[str, Any] = {"ir": None, "sts": None, "counts": {}}
    if len(ir):
        picks = [ir[k] for k in rng.sample(range(len(ir)), min(size, len(ir)))]
        rows = [store_of(t, encoder, cfg).retrieval_row(i) for t, i in picks]
        pad = store_of(picks[0][0], encoder, cfg).pad_id
        probe["ir"] = (with_pool_mask(pad_ids([r[0] for r in rows], pad), [r[3] for r in rows]),
                       pad_ids([r[1][0] for r in rows], pad))
        probe["counts"]["ir"] = len(rows)
    if len(sts):
        picks = [sts[k] for k in rng.sample(range(len(sts)), min(size, len(sts)))]
        rows = [(store_of(t, encoder, cfg).sts_row(i), t.score_range) for t, i in picks]
        pad = store_of(picks[0][0], encoder, cfg).pad_id
        # scores normalised to [0, 1] by each dataset's range: CoSENT only uses their order
        scores = torch.tensor([(r[2] - lo) / ((hi - lo) or 1.0) for r, (lo, hi) in rows], dtype=torch.float32)
        probe["sts"] = (pad_ids([r[0] for r, _ in rows], pad), pad_ids([r[1] for r, _ in rows], pad), scores)
        probe["counts"]["sts"] = len(rows)
    return probe


class _RowsOf:
    """(TaskData, row id) of the k-th row over several datasets, without listing them (row k of the
    concatenation, as ``rng.sample`` over the concatenated rows would index it)."""

    def __init__(self, tasks):
        self.tasks = tasks
        self.starts = [0]
        for t in tasks:
            self.starts.append(self.starts[-1] + len(t))

    def __len__(self) -> int:
        return self.starts[-1]

    def __getitem__(self, k: int):
        import bisect

        j = bisect.bisect_right(self.starts, k) - 1
        return self.tasks[j], k - self.starts[j]


# --------------------------------------------------------------------------- merging
def merge_in_memory(method: str, inputs: MergeInputs, weights: Sequence[float] | None = None,
                    params: Mapping[str, Any] | None = None, cfg: Config | None = None,
                    probe: Mapping[str, Any] | None = None) -> tuple[dict[str, Tensor], dict]:
    """Merge ``inputs`` with ``method`` and ``params``; returns (state dict, extra report fields).

    ``self_positioning`` needs ``probe`` (see :func:`build_probe`) or ``cfg`` to build one.
    """
    params = dict(params or {})
    weights = list(inputs.weights if weights is None else weights)
    if method == SELF_POSITIONING:
        from codiemb.merge.self_positioning import embedding_probe, self_position

        unknown = sorted(set(params) - set(SELF_POSITIONING_PARAMS))
        if unknown:
            raise UserError(f"merge method 'self_positioning' does not take {', '.join(unknown)}; "
                            f"it takes: {', '.join(sorted(SELF_POSITIONING_PARAMS))}")
        p = {**SELF_POSITIONING_PARAMS, **params}
        if probe is None:
            if cfg is None:
                raise UserError("self_positioning needs a probe set (the config's training data)")
            probe = build_probe(cfg, inputs.encoder, cfg.merge.probe_size if cfg.merge else 32, int(p["seed"]))
        loss = embedding_probe(ir=probe["ir"], sts=probe["sts"], temperature=float(p["temperature"]),
                               batch_size=int(p["batch_size"]), balance=str(p["balance"]))
        # start from the base weights: self_position reads the module's structure, not its values
        inputs.encoder.load_state_dict(inputs.base)
        res = self_position(inputs.encoder, inputs.base, inputs.models, loss, steps=int(p["steps"]),
                            lr=float(p["lr"]), mu=float(p["mu"]), init_lam=float(p["init_lam"]),
                            seed=int(p["seed"]), coefficients=str(p["coefficients"]),
                            granularity=str(p["granularity"]), select=str(p["select"]))
        extra = {"learned": {"coefficients": res.coefficients, "lam": res.lam, "probe_loss": res.probe_loss,
                             "probe_loss_start": res.probe_history[0] if res.probe_history else None,
                             **({"groups": res.groups} if res.groups else {})},
                 "probe": probe.get("counts", {}), "parameters": p}
        return res.state_dict, extra
    if method not in MERGE_METHODS:
        raise UserError(f"unknown merge method '{method}'; known: {', '.join(method_names())}")
    sd = merge_state_dicts(method, inputs.base, inputs.models, weights, **params)
    return sd, {}


def _sha256_file(path: Path) -> str | None:
    if not path.is_file():
        return None
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _weights_file(name: str) -> Path:
    from codiemb.paths import resolve_model

    return Path(resolve_model(name)) / "model.safetensors"


def write_merged(inputs: MergeInputs, state_dict: Mapping[str, Tensor], output: str | Path,
                 report: dict) -> Path:
    """Load ``state_dict`` into the base encoder and save it (with its pooling/normalize modules)
    as a sentence-transformers folder; write ``merge_report.json`` next to the weights."""
    inputs.encoder.load_state_dict(state_dict)
    path = inputs.encoder.save(output)
    (path / REPORT_FILE).write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    return path


def default_output(cfg: Config) -> Path:
    return Path(cfg.merge.output) if cfg.merge and cfg.merge.output else Path(cfg.storage.path) / f"{cfg.run.name}-merged"


def dev_set_for(cfg: Config, inputs: MergeInputs):
    """The fast dev set (``merge/evaluate_merge.py``) described by ``cfg.data.dev`` and ``cfg.tune.dev``."""
    from codiemb.config import TuneDevConfig
    from codiemb.merge.evaluate_merge import build_dev_set
    from codiemb.paths import resolve_data_path

    dev = cfg.data.dev
    if dev is None or (not dev.sts and not dev.retrieval):
        raise ConfigError("dev scoring needs data.dev (sts and/or retrieval)")
    td = cfg.tune.dev if cfg.tune is not None else TuneDevConfig()
    miners: list = []
    if td.miners in ("base", "all"):
        miners.append(inputs.base)
    if td.miners == "all":
        miners += inputs.models
    ml = cfg.model.max_length
    cache = td.cache_dir or str(Path(cfg.storage.path) / ".cache" / "devpool")
    return build_dev_set(
        inputs.encoder,
        sts_path=resolve_data_path(dev.sts, cfg.data.root) if dev.sts else None,
        beir_folder=resolve_data_path(dev.retrieval.beir, cfg.data.root) if dev.retrieval else None,
        qrels_split=dev.retrieval.qrels if dev.retrieval else "dev",
        miners=miners, sts_max_pairs=td.sts_max_pairs, bm25_candidates=td.bm25_candidates,
        dense_candidates=td.dense_candidates if miners else 0, mine_max_length=td.mine_max_length,
        sts_max_length=ml.sts, query_max_length=ml.query, doc_max_length=td.doc_max_length or ml.passage,
        batch_size=td.batch_size, cache_dir=cache if "://" not in cache else None, seed=cfg.run.seed,
    )


def run_merge(cfg: Config, output: str | Path | None = None, evaluate: bool | None = None) -> MergeResult:
    """Merge as ``cfg.merge`` says, write the folder and ``merge_report.json``; see the module docstring."""
    t0 = time.perf_counter()
    inputs = load_inputs(cfg)
    m = cfg.merge
    sd, extra = merge_in_memory(m.method, inputs, params=m.parameters, cfg=cfg)
    out = Path(output) if output else default_output(cfg)
    report: dict[str, Any] = {
        "method": m.method,
        "paper": MERGE_METHODS[m.method].paper_url if m.method in MERGE_METHODS else "https://arxiv.org/abs/2410.15035",
        "parameters": dict(m.parameters),
        "weights": inputs.weights,
        "base": {"model": inputs.base_name, "sha256": _sha256_file(_weights_file(inputs.base_name))},
        "inputs": [{"model": n, "weight": w, "sha256": _sha256_file(_weights_file(n))}
                   for n, w in zip(inputs.names, inputs.weights)],
        **extra,
    }
    if evaluate if evaluate is not None else m.evaluate:
        from codiemb.merge.evaluate_merge import score_state_dict

        dev = dev_set_for(cfg, inputs)
        report["dev"] = {**score_state_dict(inputs.encoder, dev, sd), "pool": dev.info}
    report["seconds"] = round(time.perf_counter() - t0, 2)
    path = write_merged(inputs, sd, out, report)
    log.info("merged %d models with %s into %s", len(inputs.models), m.method, path)
    return MergeResult(str(path), report, sd)


def main(config_path: str | None, overrides: list[str] | None = None, output: str | None = None,
         evaluate: bool | None = None) -> int:
    """The ``codiemb merge`` command body: merge, print the folder and dev scores, log to MLflow."""
    from codiemb.config import load_config

    cfg = load_config(config_path, overrides)
    if cfg.tracking.enabled:
        from codiemb.tracking.mlflow_run import start_run

        with start_run(cfg, run_name=f"{cfg.run.name}-merge", tags={"codiemb.kind": "merge"}) as tracker:
            result = run_merge(cfg, output=output, evaluate=evaluate)
            tracker.log_params({"merge.result.method": result.report["method"]})
            dev = result.report.get("dev") or {}
            tracker.log_metrics({f"dev/{k}": v for k, v in dev.items() if isinstance(v, (int, float))})
            tracker.log_artifact(str(Path(result.output_dir) / REPORT_FILE))
    else:
        result = run_merge(cfg, output=output, evaluate=evaluate)
    print(f"model: {result.output_dir}")
    dev = result.report.get("dev")
    if dev:
        print("dev: " + "  ".join(f"{k}={dev[k]:.2f}" for k in ("sts_spearman", "retrieval_ndcg_at_10") if k in dev))
    return 0
