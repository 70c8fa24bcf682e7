"""The paper-style quality table: single-task models, naive and CoDiEmb joint training, their fusions,
and sentence-transformers' trainer on the same data, scored on STS-B test and SciFact nDCG@10.

    .venv/bin/python benchmarks/quality.py [--config configs/codiemb-minilm.yaml] [--out runs/quality] \
        [--rows ir-only,sts-only,naive-joint,codiemb-joint,peer] [--fusions uniform_soup,ties,...] \
        [--best FOLDER] [--set KEY=VALUE ...] [--write-benchmarks [--block NAME]]

Every row starts from the recipe in ``--config`` (all-MiniLM-L6-v2, STS-B train, SciFact train pairs
without the dev queries, 960 SNLI triplets; 3 epochs, lr 5e-5, linear decay, 10 % warm-up):

- ``ir-only``: the recipe's retrieval datasets only (SciFact + SNLI), InfoNCE.
- ``sts-only``: STS-B only, the recipe's STS loss.
- ``naive-joint``: every dataset poured into one retrieval set (STS-B pairs scored >= 4 of 5 become
  query/positive pairs), mixed batches of 32, one InfoNCE loss; mixing rows with and without hard
  negatives leaves none, as a one-loss mixed-batch setup does.
- ``codiemb-joint``: the recipe itself (single-task batches, task-specialised losses).
- ``peer``: ``SentenceTransformerTrainer`` with ``MultipleNegativesRankingLoss`` (SciFact, SNLI with
  its hard negative) + ``CoSENTLoss`` (STS-B), one dataset per batch, the same rows, epochs, lr,
  schedule and weight decay; batch 32 for every dataset (ST has one batch size) and its
  ``proportional`` multi-dataset sampler, which, like ours, draws every batch of every dataset once per
  epoch (``--peer-sampler round_robin`` stops each epoch at the smallest dataset: 225 of ~700 steps).
- fusions of ``ir-only`` and ``sts-only`` (``codiemb.merge``): uniform soup, task arithmetic (λ 1),
  TIES (density 0.2), delta-guided (γ 1), Self Positioning (probe: the recipe's training rows, never
  dev/test; 32 per task, one (a, λ)), its layer-wise variant ``self_positioning_layer`` (one (a, λ)
  per transformer layer, a 512-per-task probe seen 16 + 16 at a time, the last point), the same with
  each task's probe loss divided by its start value (``..._balanced``), and ``--best`` (e.g. the
  merge search's best folder).

Each trained row runs in its own process (``codiemb train --local`` for ours) and is kept under
``--out``: a rerun skips rows whose model exists and reuses cached scores, so the command resumes.
Selection happened on the dev splits; the dev columns are printed beside the test columns.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from score_dev_test import score  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ROWS = ["ir-only", "sts-only", "naive-joint", "codiemb-joint", "peer"]
SP_LAYER_PARAMS = {"granularity": "layer", "steps": 120, "batch_size": 16, "select": "last", "lr": 0.05}
SP_LAYER_PROBE = 512
# name -> (label, merge method, its parameters, Self Positioning's probe size per task; None: the config's)
FUSIONS = {"uniform_soup": ("uniform soup (IR-only + STS-only)", "uniform_soup", {}, None),
           "task_arithmetic": ("task arithmetic λ=1 (IR-only + STS-only)", "task_arithmetic", {"lam": 1.0}, None),
           "ties": ("TIES density 0.2 (IR-only + STS-only)", "ties", {"density": 0.2}, None),
           "delta_guided": ("delta-guided γ=1 (IR-only + STS-only)", "delta_guided", {"gamma": 1.0}, None),
           "self_positioning": ("Self Positioning (IR-only + STS-only)", "self_positioning", {}, None),
           "self_positioning_layer": ("Self Positioning, layer-wise (IR-only + STS-only)", "self_positioning",
                                      SP_LAYER_PARAMS, SP_LAYER_PROBE),
           "self_positioning_layer_balanced": ("Self Positioning, layer-wise, balanced probe (IR-only + STS-only)",
                                               "self_positioning", {**SP_LAYER_PARAMS, "balance": "start"},
                                               SP_LAYER_PROBE)}
LABELS = {"ir-only": "IR-only (codiemb, SciFact + SNLI)", "sts-only": "STS-only (codiemb, STS-B)",
          "naive-joint": "naive joint (mixed batches, one InfoNCE)",
          "codiemb-joint": "CoDiEmb joint (single-task batches, task losses)",
          "peer": "sentence-transformers trainer (MNRL + CoSENT)"}
NAIVE_MIN_SCORE = 4.0  # of 5: STS-B pairs at or above it count as paraphrase positives


def _row_config(name: str, base, out: Path):
    """The recipe in ``base`` cut or reshaped for one row (a fresh copy)."""
    from codiemb.config import DatasetConfig

    cfg = base.model_copy(deep=True)
    cfg.run.name = f"quality-{name}"
    sets = cfg.data.datasets
    if name == "ir-only":
        cfg.data.datasets = [d for d in sets if d.task == "retrieval"]
    elif name == "sts-only":
        cfg.data.datasets = [d for d in sets if d.task == "sts"]
    elif name == "naive-joint":
        path = _naive_jsonl(base, out / "naive-joint-data.jsonl")
        cfg.data.datasets = [DatasetConfig(name="mixed", task="retrieval", path=str(path), batch_size=32)]
    elif name != "codiemb-joint":
        raise ValueError(name)
    return cfg


def _naive_jsonl(cfg, dest: Path) -> Path:
    """One retrieval file from every dataset of the recipe (the same rows the recipe reads)."""
    from codiemb.data.local import read_records
    from codiemb.paths import data_dir

    root = data_dir(cfg.data.root)
    dest.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(dest, "w", encoding="utf-8") as fh:
        for ds in cfg.data.datasets:
            recs = read_records(root / ds.path, ds.task, score_range=ds.score_range, max_rows=ds.max_rows).records
            for r in recs:
                if ds.task == "sts":
                    lo, hi = ds.score_range or (0.0, 5.0)
                    if r["score"] < lo + (hi - lo) * NAIVE_MIN_SCORE / 5.0:
                        continue
                    row = {"query": r["sentence1"], "positive": r["sentence2"]}
                else:
                    row = {"query": r["query"], "positives": r["positives"], "negatives": r["negatives"]}
                fh.write(json.dumps(row) + "\n")
                n += 1
    print(f"naive-joint data: {n} rows -> {dest}", flush=True)
    return dest


def _train_ours(name: str, base, out: Path) -> float:
    import yaml

    cfg = _row_config(name, base, out)
    cfg_path = out / f"{name}.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    cmd = [str(Path(sys.executable).with_name("codiemb")), "train", str(cfg_path), "--local", "--no-tracking",
           "--output", str(out / name)]
    env = dict(os.environ, CODIEMB_SKIP_DEV="1", HF_HUB_OFFLINE="1")
    t0 = time.perf_counter()
    with open(out / f"{name}.log", "w") as log:
        subprocess.run(cmd, check=True, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    return time.perf_counter() - t0


def _train_peer(config: str, out: Path, sampler: str, overrides: list[str]) -> float:
    """sentence-transformers' own trainer on the recipe's rows, in a child process (clean threads)."""
    cmd = [sys.executable, __file__, "--_peer", str(out / "peer"), "--config", config, "--peer-sampler", sampler,
           *[f"--set={o}" for o in overrides]]
    t0 = time.perf_counter()
    with open(out / "peer.log", "w") as log:
        subprocess.run(cmd, check=True, env=dict(os.environ, HF_HUB_OFFLINE="1"), stdout=log,
                       stderr=subprocess.STDOUT, cwd=REPO)
    return time.perf_counter() - t0


def peer_main(dest: str, config: str, sampler: str, overrides: list[str] | None = None) -> None:
    from datasets import Dataset, DatasetDict
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.sentence_transformer import losses
    from sentence_transformers.sentence_transformer.training_args import MultiDatasetBatchSamplers

    from codiemb.config import load_config
    from codiemb.data.local import read_records
    from codiemb.paths import data_dir, resolve_model

    cfg = load_config(config, overrides)
    root = data_dir(cfg.data.root)
    model = SentenceTransformer(str(resolve_model(cfg.model.name)), device="cpu")
    model.max_seq_length = cfg.model.max_length.passage
    sets, loss = {}, {}
    for ds in cfg.data.datasets:
        recs = read_records(root / ds.path, ds.task, score_range=ds.score_range, max_rows=ds.max_rows).records
        if ds.task == "sts":
            lo, hi = ds.score_range or (0.0, 5.0)
            sets[ds.name] = Dataset.from_dict({"sentence1": [r["sentence1"] for r in recs],
                                               "sentence2": [r["sentence2"] for r in recs],
                                               "score": [(r["score"] - lo) / (hi - lo) for r in recs]})
            loss[ds.name] = losses.CoSENTLoss(model)
        else:
            cols = {"anchor": [r["query"] for r in recs], "positive": [r["positives"][0] for r in recs]}
            if all(r["negatives"] for r in recs):
                cols["negative"] = [r["negatives"][0] for r in recs]
            sets[ds.name] = Dataset.from_dict(cols)
            loss[ds.name] = losses.MultipleNegativesRankingLoss(model)
    t = cfg.train
    args = SentenceTransformerTrainingArguments(
        output_dir=str(Path(dest).with_suffix(".trainer")), num_train_epochs=t.epochs, per_device_train_batch_size=32,
        learning_rate=t.lr, warmup_ratio=t.warmup_ratio, lr_scheduler_type=t.schedule, weight_decay=t.weight_decay,
        max_grad_norm=t.grad_clip, seed=cfg.run.seed, save_strategy="no", report_to="none", use_cpu=True,
        multi_dataset_batch_sampler=MultiDatasetBatchSamplers(sampler), disable_tqdm=True, logging_steps=50)
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=DatasetDict(sets), loss=loss)
    trainer.train()
    print(f"peer steps: {trainer.state.global_step}", flush=True)
    model.save(dest)


def _fuse(method: str, params: dict, ir: Path, sts: Path, base, out: Path, probe_size: int | None = None) -> Path:
    """One merge of the two single-task models; Self Positioning probes the recipe's training rows."""
    from codiemb.config import MergeConfig, MergeModelConfig
    from codiemb.merge.run import load_inputs, merge_in_memory, write_merged

    cfg = base.model_copy(deep=True)
    cfg.merge = MergeConfig(method=method, base_model=base.model.name,
                            models=[MergeModelConfig(model=str(ir)), MergeModelConfig(model=str(sts))],
                            **({"probe_size": probe_size} if probe_size else {}))
    inputs = load_inputs(cfg)
    sd, extra = merge_in_memory(method, inputs, params=params, cfg=cfg)
    return write_merged(inputs, sd, out, {"method": method, "parameters": params, **extra})


def _scored(label: str, folder: str, cache: Path, wall: float | None) -> dict:
    r = json.loads(cache.read_text()) if cache.exists() else None
    if r is None or r.get("model") != str(folder):  # never reuse the scores of another folder (--best moves)
        r = score(folder)
        cache.write_text(json.dumps(r, indent=1))
    r.update(label=label, wall=wall)
    print(f"{label}: dev {r['stsb_dev']:.2f} / {r['scifact_dev']:.2f} | test {r['stsb_test']:.2f} / "
          f"{r['scifact_test']:.2f} (mean {r['mean_test']:.2f})", flush=True)
    return r


def format_table(rows: list[dict]) -> str:
    lines = ["| model | STS-B dev | SciFact dev nDCG@10 | STS-B test | SciFact test nDCG@10 | mean test | train wall |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        wall = "–" if r.get("wall") is None else f"{r['wall']:.0f} s"
        dev = (f"{r['stsb_dev']:.2f} | {r['scifact_dev']:.2f}")
        lines.append(f"| {r['label']} | {dev} | {r['stsb_test']:.2f} | {r['scifact_test']:.2f} | "
                     f"{r['mean_test']:.2f} | {wall} |")
    return "\n".join(lines)


def verdict(by: dict[str, dict]) -> list[str]:
    """The acceptance checks of the quality table, computed from the scores (never asserted blindly)."""
    out = []
    if {"codiemb-joint", "peer"} <= by.keys():
        j, p = by["codiemb-joint"], by["peer"]
        out.append(f"CoDiEmb joint vs peer, mean test: {j['mean_test']:.2f} vs {p['mean_test']:.2f} "
                   f"({'ahead' if j['mean_test'] >= p['mean_test'] else 'behind'} by {abs(j['mean_test'] - p['mean_test']):.2f})")
    if {"codiemb-joint", "ir-only", "sts-only"} <= by.keys():
        j = by["codiemb-joint"]
        for task, key in (("STS-B", "stsb_test"), ("SciFact", "scifact_test")):
            best = max(by["ir-only"][key], by["sts-only"][key])
            out.append(f"CoDiEmb joint vs the better single-task model on {task}: {j[key]:.2f} vs {best:.2f} "
                       f"(gap {best - j[key]:+.2f}; the goal is a gap of at most 0.50)")
    return out


def markers(block: str = "quality") -> tuple[str, str]:
    """The comment lines around a generated table: ``quality`` (the default) or ``quality-NAME``."""
    name = "quality" if block == "quality" else f"quality-{block}"
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def write_benchmarks(text: str, path: Path = REPO / "BENCHMARKS.md", block: str = "quality") -> None:
    start, end = markers(block)
    doc = path.read_text()
    chunk = f"{start}\n{text}\n{end}"
    if start in doc:
        head, rest = doc.split(start, 1)
        doc = head + chunk + rest.split(end, 1)[1]
    else:
        doc = doc.rstrip("\n") + "\n\n## Quality table (`benchmarks/quality.py`)\n\n" + chunk + "\n"
    path.write_text(doc)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/codiemb-minilm.yaml")
    ap.add_argument("--out", default="runs/quality")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a value of --config for every row, e.g. sampler.policy=proportional")
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--fusions", default=",".join(FUSIONS))
    ap.add_argument("--best", help="a merged folder to add as the search's best (e.g. from jobs/tune.py)")
    ap.add_argument("--peer-sampler", default="proportional", choices=["proportional", "round_robin"])
    ap.add_argument("--no-base", action="store_true", help="leave the base model's row out")
    ap.add_argument("--write-benchmarks", action="store_true", help="replace the quality block in BENCHMARKS.md")
    ap.add_argument("--block", default="quality", help="which marked block of BENCHMARKS.md --write-benchmarks replaces")
    ap.add_argument("--_peer", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a._peer:
        return peer_main(a._peer, a.config, a.peer_sampler, a.set)

    from codiemb.config import load_config

    base = load_config(a.config, a.set)
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    walls_path = out / "walls.json"
    walls = json.loads(walls_path.read_text()) if walls_path.exists() else {}
    rows = []
    if not a.no_base:
        rows.append(_scored("all-MiniLM-L6-v2 (base)", base.model.name, out / "base.score.json", None))
    by: dict[str, dict] = {}
    for name in [r for r in a.rows.split(",") if r]:
        folder = out / name / ("model" if name != "peer" else "")
        if not (folder / "modules.json").exists():
            print(f"training {name} ...", flush=True)
            walls[name] = _train_peer(a.config, out, a.peer_sampler, a.set) if name == "peer" else _train_ours(name, base, out)
            walls_path.write_text(json.dumps(walls, indent=1))
            print(f"trained {name} in {walls[name]:.0f} s", flush=True)
        by[name] = _scored(LABELS[name], str(folder), out / f"{name}.score.json", walls.get(name))
        rows.append(by[name])
    if {"ir-only", "sts-only"} <= by.keys():
        for method in [m for m in a.fusions.split(",") if m]:
            label, merge_method, params, probe_size = FUSIONS[method]
            folder = out / f"fusion-{method}"
            if not (folder / "modules.json").exists():
                _fuse(merge_method, params, out / "ir-only/model", out / "sts-only/model", base, folder, probe_size)
            rows.append(_scored(label, str(folder), out / f"fusion-{method}.score.json", None))
    if a.best:
        rows.append(_scored("merge search's best", str(Path(a.best).resolve()), out / "best.score.json", None))

    table = format_table(rows)
    notes = verdict(by)
    cmd = "python benchmarks/quality.py " + shlex.join(sys.argv[1:])
    text = "\n".join([f"```bash\n.venv/bin/{cmd.strip()}\n```", "", table, "", *[f"- {n}" for n in notes]])
    print(text)
    (out / "quality.md").write_text(text + "\n")
    if a.write_benchmarks:
        write_benchmarks(text, block=a.block)


if __name__ == "__main__":
    main()
