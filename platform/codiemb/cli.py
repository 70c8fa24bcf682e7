"""The ``codiemb`` command. Each subcommand is a thin wrapper over a library function.

Errors a user can cause (``UserError``) print one line on stderr and exit 2, without a traceback.
Training stopped by SIGTERM (``train/stop.py``) prints one line and exits 143; rerunning resumes.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Callable

from codiemb.errors import ConfigError, UserError
from codiemb.train.stop import EXIT_CODE as STOPPED_EXIT_CODE
from codiemb.train.stop import TrainingStopped

Handler = Callable[[argparse.Namespace], int]


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.lr=3e-5 (repeatable)")


# --------------------------------------------------------------------------- config
def cmd_config_show(args: argparse.Namespace) -> int:
    from codiemb.config import load_config

    cfg = load_config(args.config, args.overrides)
    print(json.dumps(cfg.to_dict(), indent=2) if args.json else cfg.to_yaml(), end="" if not args.json else "\n")
    return 0


# --------------------------------------------------------------------------- data
def cmd_model_fetch(args: argparse.Namespace) -> int:
    from codiemb.paths import download_hub_model

    print(download_hub_model(args.hub_id))
    return 0


def cmd_data_check(args: argparse.Namespace) -> int:
    from codiemb.data.check import run_check

    return run_check(
        args.path,
        task=args.task,
        score_range=tuple(args.score_range) if args.score_range else None,
        quarantine=args.quarantine,
        max_errors=args.max_errors,
    )


def cmd_data_mine_negatives(args: argparse.Namespace) -> int:
    from codiemb.data.local import read_records
    from codiemb.data.negatives import corpus_source, load_teacher, mine_hard_negatives, parse_ranks, write_jsonl_atomic
    from codiemb.model.encoder import Encoder
    from codiemb.paths import resolve_data_path  # as in configs: a relative path may be under the data folder

    ranks = parse_ranks(args.ranks)
    records = read_records(resolve_data_path(args.pairs, args.data_dir), "retrieval").records
    corpus = corpus_source(resolve_data_path(args.corpus, args.data_dir))
    encoder = Encoder.load(args.model)
    teacher = (load_teacher(args.teacher, batch_size=args.batch_size, query_max_length=args.query_max_length,
                            doc_max_length=args.doc_max_length) if args.teacher else None)
    stats: dict = {}
    rows = mine_hard_negatives(encoder, records, corpus, num=args.num, ranks=ranks, seed=args.seed,
                               batch_size=args.batch_size, query_max_length=args.query_max_length,
                               doc_max_length=args.doc_max_length, max_score_ratio=args.max_score_ratio,
                               absolute_margin=args.absolute_margin, teacher=teacher, scores=not args.no_scores,
                               index=args.index, stats=stats)
    write_jsonl_atomic(rows, args.out)
    print(json.dumps({"out": str(args.out), "rows": len(rows), "corpus": stats["unique_documents"],
                      "negatives": sum(len(r["negatives"]) for r in rows), "candidates": stats["candidates"],
                      "filtered": stats["filtered"], "short_rows": stats["short_rows"]}))
    return 0


def cmd_data_fetch_mteb(args: argparse.Namespace) -> int:
    from codiemb.evaluate.mteb_tasks import fetch_task_data

    for name in args.tasks:
        print(f"{name}: {fetch_task_data(name)} in the Hugging Face datasets cache")
    return 0


def cmd_data_augment(args: argparse.Namespace) -> int:
    from codiemb.data.augment import augment
    from codiemb.paths import resolve_data_path  # as in configs: a relative path may be under the data folder

    def res(paths):
        return [resolve_data_path(p, args.data_dir) for p in paths]

    if not args.local:
        from codiemb.train.ray_trainer import init_ray

        init_ray()
    summary = augment(res(args.inputs), args.out, teacher=args.teacher, samplers=args.samplers.split(","), k=args.k,
                      anchors=args.anchors, max_texts=args.max_texts, max_pairs=args.max_pairs,
                      labelled=res(args.labelled), exclude_texts=res(args.exclude_texts), model=args.model,
                      how=args.map, score_range=tuple(args.score_range), teacher_range=tuple(args.teacher_range),
                      seed=args.seed, batch_size=args.batch_size, max_length=args.max_length,
                      use_ray=not args.local, concurrency=args.concurrency, index=args.index)
    print(json.dumps(summary))
    return 0


# --------------------------------------------------------------------------- evaluate
def _token_prepending_arg(pairs: list[str] | None):
    """``--token-prepending [KEY=VALUE ...]`` -> a validated ``model.token_prepending`` block (None: not given)."""
    if pairs is None:
        return None
    import yaml

    from codiemb.config import TokenPrependingConfig, config_from_dict

    block: dict = {"enabled": True}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in TokenPrependingConfig.model_fields or key == "enabled":
            raise ConfigError(f"--token-prepending {pair!r}: expected KEY=VALUE with KEY one of "
                              + ", ".join(k for k in TokenPrependingConfig.model_fields if k != "enabled"))
        block[key] = yaml.safe_load(value) if key != "template" else value
    return config_from_dict({"model": {"token_prepending": block}}, "--token-prepending").model.token_prepending


def cmd_evaluate(args: argparse.Namespace) -> int:
    from codiemb.evaluate.report import markdown_table
    from codiemb.evaluate.suites import evaluate_model

    if args.mteb is not None:
        return _evaluate_mteb(args)
    if args.mteb_data or args.prompts:
        raise ConfigError("--mteb-data and --prompt go with --mteb")
    retrieval = {"index": args.index, "storage": args.index_storage, "chunk_size": args.chunk_size,
                 "use_ray": args.ray}
    results = evaluate_model(args.model, suite=args.suite or "default", data_dir=args.data_dir,
                             batch_size=args.batch_size, show_progress=not args.json, retrieval_options=retrieval,
                             token_prepending=_token_prepending_arg(args.token_prepending))
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(markdown_table(results))
    return 0


def _key_values(items: list[str], flag: str) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{flag} expects KEY=VALUE, got {item!r}")
        out[key.strip()] = value
    return out


def _evaluate_mteb(args: argparse.Namespace) -> int:
    from codiemb.evaluate.mteb_tasks import mteb_table, run_mteb

    if args.suite is not None:
        raise ConfigError("--suite and --mteb are two benchmarks: pick one")
    results = run_mteb(args.model, args.mteb, data_dir=args.data_dir,
                       local_data=_key_values(args.mteb_data, "--mteb-data"),
                       prompts=_key_values(args.prompts, "--prompt"), batch_size=args.batch_size,
                       show_progress=not args.json and not os.environ.get("CODIEMB_NO_PROGRESS"))
    print(json.dumps(results, indent=2) if args.json else mteb_table(results))
    return 0


# --------------------------------------------------------------------------- report
def cmd_report(args: argparse.Namespace) -> int:
    from codiemb.evaluate.geometry import geometry_png, geometry_report, geometry_table, sample_tasks

    samples = sample_tasks(args.data_dir, split=args.split, sts_pairs=args.sts_pairs, ir_pairs=args.ir_pairs,
                           seed=args.seed)
    reports = [geometry_report(m, samples, batch_size=args.batch_size, max_length=args.max_length)
               for m in args.models]
    png = geometry_png(reports, args.png)
    print(json.dumps(reports, indent=2) if args.json else geometry_table(reports) + f"\nhistograms: {png}")
    return 0


# --------------------------------------------------------------------------- train
def cmd_train(args: argparse.Namespace) -> int:
    from codiemb.config import load_config

    cfg = load_config(args.config, args.overrides)
    if args.output:
        cfg.train.output = args.output
    if args.no_tracking:
        cfg.tracking.enabled = False
    from codiemb.tracking.train_run import train_tracked

    with _routed(args, cfg, "train") as log_path:
        result, run_id = train_tracked(cfg, local=args.local, resume=not args.no_resume)
    lines = [f"mlflow run: {run_id} ({cfg.tracking.uri})"] if run_id else []
    lines += [f"model: {result.model_dir}",
              f"steps: {result.steps} {json.dumps(result.steps_per_task)}  samples/s: {result.samples_per_s:.1f}  "
              f"wall: {result.wall_s:.0f}s"]
    if result.dev:
        lines.append("dev: " + "  ".join(f"{k}={v:.2f}" for k, v in result.dev.items()))
    _print_and_log("\n".join(lines), log_path)
    return 0


# --------------------------------------------------------------------------- merge / tune
def cmd_merge(args: argparse.Namespace) -> int:
    from codiemb.merge.run import main as merge_main

    return merge_main(args.config, args.overrides, output=args.output, evaluate=args.evaluate)


def cmd_tune(args: argparse.Namespace) -> int:
    from codiemb.config import load_config
    from codiemb.tune.driver import run_search, summary

    cfg = load_config(args.config, args.overrides)
    with _routed(args, cfg, "tune") as log_path:
        result = run_search(cfg)
    _print_and_log(summary(result), log_path)
    return 0 if result.best_trial else 1


# --------------------------------------------------------------------------- pipeline / quickstart
def pipeline_text(result, cfg) -> str:
    """What the pipeline prints at the end: the gate's decision (on dev), then the test report."""
    from codiemb.evaluate.report import markdown_table

    lines = [f"model folder: {result.model_dir}"]
    if result.registered:
        lines.append(f"registered:   {result.registered['uri']}  (alias challenger)")
    if result.gate:
        lines.append(f"gate:         {result.gate['decision']} on suite `{result.gate['suite']}`: {result.gate['reason']}")
        if result.gate.get("promoted") or result.gate.get("decision") == "unchanged":
            lines.append(f"champion:     models:/{result.registered['name']}@champion")
    if result.evaluation:
        after = "after the decision, " if result.gate else ""
        lines += ["", f"test ({after}reported only, never used to choose):", markdown_table(result.evaluation).rstrip()]
    if result.run_id:
        lines.append(f"mlflow run:   {result.run_id}")
    uri = cfg.tracking.uri
    if uri.startswith("sqlite:") or "://" not in uri or uri.startswith("file:"):
        lines.append(f"MLflow UI:    .venv/bin/mlflow ui --backend-store-uri {uri}   (then open http://127.0.0.1:5000)")
    else:
        lines.append(f"MLflow UI:    {uri}")
    lines.append(f"wall time:    {result.wall_s:.0f} s  " + " ".join(f"{k}={v:.0f}s" for k, v in result.stages_s.items()))
    return "\n".join(lines)


def _routed(args: argparse.Namespace, cfg, command: str):
    """Library output to ``<run folder>/console.log``, one line per stage on the terminal (codiemb.console)."""
    from codiemb import console
    from codiemb.tracking.train_run import output_root

    return console.routed(output_root(cfg), command, verbose=getattr(args, "verbose", False))


def _print_and_log(text: str, log_path) -> None:
    print(text)
    if log_path is not None:
        with open(log_path, "a", encoding="utf-8") as fh:
            fh.write(text + "\n")


def cmd_pipeline(args: argparse.Namespace) -> int:
    from codiemb.config import load_config
    from codiemb.pipeline import run_pipeline

    cfg = load_config(args.config, args.overrides)
    with _routed(args, cfg, "pipeline") as log_path:
        result = run_pipeline(cfg, local=args.local, resume=not args.no_resume)
    _print_and_log(pipeline_text(result, cfg), log_path)
    return 0


def quickstart_config_path():
    from pathlib import Path

    return Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml"


def cmd_quickstart(args: argparse.Namespace) -> int:
    from codiemb.config import load_config
    from codiemb.errors import ConfigError
    from codiemb.pipeline import run_pipeline

    path = quickstart_config_path()
    if not path.is_file():
        raise ConfigError(f"{path}: the quickstart config ships with the repository; run from a checkout")
    cfg = load_config(path, args.overrides)
    with _routed(args, cfg, "quickstart") as log_path:
        result = run_pipeline(cfg, local=args.local, resume=not args.no_resume)
    _print_and_log(pipeline_text(result, cfg), log_path)
    return 0


# --------------------------------------------------------------------------- registry
def cmd_register(args: argparse.Namespace) -> int:
    """Register a run's model: RUN is an MLflow run id, or a run folder (its model is logged first)."""
    from pathlib import Path

    import mlflow

    from codiemb.tracking.registry import log_model, register

    mlflow.set_tracking_uri(args.tracking_uri)
    run_id, folder = args.run, Path(args.run)
    if folder.is_dir():
        from codiemb.pipeline import PARENT_RUN_FILE
        from codiemb.tracking.registry import find_model_folder
        from codiemb.tracking.train_run import RUN_ID_FILE

        ids = [folder / PARENT_RUN_FILE, folder / RUN_ID_FILE]
        found = next((p for p in ids if p.is_file()), None)
        model = Path(args.model_dir) if args.model_dir else None
        if model is None:
            result_file = folder / "pipeline_result.json"
            model = Path(json.loads(result_file.read_text())["model_dir"]) if result_file.is_file() else None
        model = model or Path(find_model_folder(folder))
        if found is None:
            from codiemb.errors import UserError

            raise UserError(f"{folder}: no MLflow run id file ({', '.join(p.name for p in ids)})")
        run_id = found.read_text().strip()
        log_model(str(model), run_id=run_id)
    version = register(run_id, args.name)
    print(json.dumps({"name": args.name, "version": version, "alias": "challenger", "run_id": run_id}))
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    import mlflow

    from codiemb.tracking.registry import promote

    mlflow.set_tracking_uri(args.tracking_uri)
    decision = promote(args.name, args.version, suite=args.suite, margin=args.margin, data_dir=args.data_dir,
                       cache_dir=args.cache_dir)
    print(json.dumps(decision, indent=2, default=str))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="codiemb", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="full output on the terminal (Ray, Tune, libraries) and debug logging; "
                             "default: one line per stage, the rest in <run folder>/console.log "
                             "(also CODIEMB_VERBOSE=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("config", help="inspect a config")
    csub = p.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    ps = csub.add_parser("show", help="print the resolved config (defaults filled, overrides applied)")
    _config_args(ps)
    ps.add_argument("--json", action="store_true")
    ps.set_defaults(func=cmd_config_show)

    p = sub.add_parser("model", help="models: fetch a hub model into the local cache (the only command that downloads one)")
    msub = p.add_subparsers(dest="model_command", metavar="ACTION", required=True)
    pf = msub.add_parser("fetch", help="download a Hugging Face hub model into the local cache; model.name may then name it")
    pf.add_argument("hub_id", help="e.g. BAAI/bge-base-en-v1.5")
    pf.set_defaults(func=cmd_model_fetch)

    p = sub.add_parser("data", help="inspect data files")
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    pc = dsub.add_parser("check", help="validate a data file; print counts and the first errors")
    pc.add_argument("path", help="JSONL/Parquet file, BEIR folder, or s3:// URI")
    pc.add_argument("--task", choices=["sts", "retrieval"], required=True)
    pc.add_argument("--score-range", nargs=2, type=float, metavar=("LOW", "HIGH"),
                    help="sts score range (default 0 5)")
    pc.add_argument("--quarantine", metavar="FILE", help="write bad rows with their reason here (exit 0 if any valid row)")
    pc.add_argument("--max-errors", type=int, default=20, help="errors to print")
    pc.set_defaults(func=cmd_data_check)
    pm = dsub.add_parser("mine-negatives", help="add hard negatives to retrieval rows, mined from a corpus with a model")
    pm.add_argument("pairs", help="retrieval JSONL/Parquet (query, positives[, negatives]); relative: under the data folder")
    pm.add_argument("--corpus", required=True, help="BEIR folder, or a retrieval file whose passages form the corpus")
    pm.add_argument("--model", default="minilm", help="the encoder that ranks the corpus (default minilm)")
    pm.add_argument("--out", required=True, help="JSONL to write (atomically)")
    pm.add_argument("--num", type=int, default=3, help="negatives per row, counting those it has (default 3)")
    pm.add_argument("--ranks", default="10:100", help="rank window to sample from, 0-based LOW:HIGH (default 10:100)")
    pm.add_argument("--seed", type=int, default=0)
    pm.add_argument("--batch-size", type=int, default=64)
    pm.add_argument("--query-max-length", type=int, default=64)
    pm.add_argument("--doc-max-length", type=int, default=256)
    pm.add_argument("--data-dir", help="data folder for relative paths (default: $CODIEMB_DATA, else ../shared/data)")
    pm.add_argument("--max-score-ratio", type=float, default=None,
                    help="false-negative filter: drop candidates scoring above this fraction of the positive's "
                         "score (NV-Retriever: 0.95)")
    pm.add_argument("--absolute-margin", type=float, default=None,
                    help="false-negative filter: drop candidates scoring above the positive's score minus this")
    pm.add_argument("--teacher", default=None,
                    help="rescore the candidates with this model (a cross-encoder folder, or any encoder) "
                         "before filtering; the written scores are its scores")
    pm.add_argument("--no-scores", action="store_true",
                    help="do not write positive_scores / negative_scores with the rows")
    pm.add_argument("--index", choices=["faiss", "torch"], default="faiss", help="exact search backend (default faiss)")
    pm.set_defaults(func=cmd_data_mine_negatives)
    pa = dsub.add_parser("augment", help="silver STS pairs: sample similar pairs from unlabeled text (BM25 / the "
                                         "model's neighbours), score them with a teacher (Augmented SBERT)")
    pa.add_argument("inputs", nargs="+", metavar="TEXTS",
                    help="JSONL/Parquet of texts (a JSON string or {text} per line) or of pairs (sentence1, "
                         "sentence2: STS, SNLI); relative: under the data folder")
    pa.add_argument("--out", required=True, help="STS-style JSONL to write (atomically)")
    pa.add_argument("--teacher", required=True,
                    help="scores the pairs: a bi-encoder alias or folder (cosine), or a cross-encoder folder")
    pa.add_argument("--samplers", default="bm25", help="comma-separated: bm25, nn, random (default bm25)")
    pa.add_argument("--k", type=int, default=2, help="partners per anchor and sampler (default 2)")
    pa.add_argument("--anchors", type=int, default=None, help="texts that get partners: a seeded sample (default all)")
    pa.add_argument("--model", default=None, help="the encoder of the nn sampler (default minilm)")
    pa.add_argument("--labelled", action="append", default=[], metavar="FILE",
                    help="STS / pairs file whose pairs are dropped from the output (repeatable)")
    pa.add_argument("--exclude-texts", action="append", default=[], metavar="FILE",
                    help="drop every pair with a text of this file, e.g. dev and test splits (repeatable)")
    pa.add_argument("--max-pairs", type=int, default=None, help="keep a seeded sample of at most this many pairs")
    pa.add_argument("--max-texts", type=int, default=200_000,
                    help="distinct texts the pool may hold (kept in memory; default 200000)")
    pa.add_argument("--map", choices=["clip", "linear", "raw"], default="clip",
                    help="teacher score -> STS score: clip: LOW + (HIGH-LOW)*clamp(t,0,1) (default, cosines); "
                         "linear: the --teacher-range onto the --score-range; raw: as is")
    pa.add_argument("--score-range", nargs=2, type=float, default=[0.0, 5.0], metavar=("LOW", "HIGH"),
                    help="the output's score range (default 0 5, STS-B's)")
    pa.add_argument("--teacher-range", nargs=2, type=float, default=[-1.0, 1.0], metavar=("LOW", "HIGH"),
                    help="the teacher's score range for --map linear (default -1 1: a cosine)")
    pa.add_argument("--seed", type=int, default=0)
    pa.add_argument("--batch-size", type=int, default=64)
    pa.add_argument("--max-length", type=int, default=128, help="token limit of each sentence (default 128)")
    pa.add_argument("--index", choices=["faiss", "torch"], default="faiss", help="exact search backend of nn")
    pa.add_argument("--data-dir", help="data folder for relative paths (default: $CODIEMB_DATA, else ../shared/data)")
    pa.add_argument("--local", action="store_true", help="score in this process instead of Ray Data actors")
    pa.add_argument("--concurrency", type=int, default=1, help="teacher actors on Ray (default 1)")
    pa.set_defaults(func=cmd_data_augment)
    pf = dsub.add_parser("fetch-mteb", help="download MTEB tasks' data into the local Hugging Face datasets cache "
                         "(the only command that fetches data; `evaluate --mteb` never does)")
    pf.add_argument("tasks", nargs="+", metavar="TASK", help="mteb task names, e.g. STSBenchmark SciFact")
    pf.set_defaults(func=cmd_data_fetch_mteb)

    p = sub.add_parser("evaluate", help="score a model on a benchmark suite, or on MTEB tasks (--mteb)")
    p.add_argument("model", help="model alias (minilm), a sentence-transformers folder, or models:/NAME@ALIAS")
    p.add_argument("--suite", default=None, help="stsb, scifact, default (both; the default), or dev")
    p.add_argument("--mteb", nargs="+", metavar="TASK", default=None,
                   help="run these MTEB tasks through the mteb library (e.g. STSBenchmark SciFact); data from the "
                        "local HF datasets cache, else the data folder; nothing downloads")
    p.add_argument("--mteb-data", action="append", default=[], metavar="TASK=PATH",
                   help="read an MTEB STS / retrieval task from local files: a JSONL file or folder of "
                        "<split>.jsonl (STS), a BEIR folder (retrieval); relative: under the data folder")
    p.add_argument("--prompt", dest="prompts", action="append", default=[], metavar="KEY=TEXT",
                   help="instruction prefix for --mteb, in mteb's keys: TASK-query, TASK, TYPE-document, TYPE, "
                        "query, document (default: the model's own query / passage / sts instructions)")
    p.add_argument("--data-dir", default=None, help="data folder (else $CODIEMB_DATA, ./data, ../shared/data)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--json", action="store_true", help="print JSON instead of a markdown table")
    p.add_argument("--ray", action="store_true",
                   help="embed retrieval corpora with Ray Data on the cluster's workers (GPU actors where there are GPUs)")
    p.add_argument("--index", default="faiss", choices=["faiss", "torch"],
                   help="exact search: faiss IndexFlatIP (default) or chunked torch top-k")
    p.add_argument("--index-storage", default="float32", choices=["float32", "float16"],
                   help="corpus embeddings in the index (float16: half the memory)")
    p.add_argument("--chunk-size", type=int, default=16384, help="corpus documents read and embedded per chunk")
    p.add_argument("--token-prepending", nargs="*", metavar="KEY=VALUE", default=None,
                   help="decoders: Token Prepending on (last-token pooling), e.g. --token-prepending end_layer=7 "
                        "output_layer=-2; keys as model.token_prepending's")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("report", help="embedding geometry: anisotropy, effective rank, alignment, uniformity, histograms")
    p.add_argument("models", nargs="+", metavar="MODEL", help="model aliases, folders or models:/NAME@ALIAS")
    p.add_argument("--split", default="test", choices=["test", "dev"], help="STS-B / SciFact split to sample (default test)")
    p.add_argument("--sts-pairs", type=int, default=1000, help="STS-B pairs sampled (default 1000)")
    p.add_argument("--ir-pairs", type=int, default=300, help="SciFact (query, relevant doc) pairs sampled (default 300)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--png", default="geometry.png", help="histogram PNG to write (default geometry.png)")
    p.add_argument("--json", action="store_true", help="print JSON (with histograms) instead of the table")
    p.add_argument("--data-dir", default=None, help="data folder (else $CODIEMB_DATA, ./data, ../shared/data)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-length", type=int, default=None, help="token limit (default: the model's max_seq_length)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("train", help="train an encoder from a config (Ray workers; --local: one process, no Ray)")
    _config_args(p)
    p.add_argument("--local", action="store_true", help="run the plain-torch loop in this process, without Ray")
    p.add_argument("--output", help="output folder (default: <storage.path>/<run.name>)")
    p.add_argument("--no-resume", action="store_true", help="ignore existing checkpoints in the output folder")
    p.add_argument("--no-tracking", action="store_true", help="do not log to MLflow (same as --set tracking.enabled=false)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("merge", help="merge models (soups, task arithmetic, TIES, DARE, SLERP, delta-guided, Self Positioning)")
    _config_args(p)
    p.add_argument("--output", help="output folder (default: merge.output or <storage.path>/<run.name>-merged)")
    p.add_argument("--evaluate", action="store_true", default=None, help="add fast dev scores to merge_report.json")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("tune", help="Ray Tune + Optuna search over merge coefficients or loss weights")
    _config_args(p)
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("pipeline", help="train -> merge search -> evaluate -> register -> gate, as one MLflow run")
    _config_args(p)
    p.add_argument("--local", action="store_true", help="train in this process instead of on Ray workers")
    p.add_argument("--no-resume", action="store_true")
    p.set_defaults(func=cmd_pipeline)

    p = sub.add_parser("quickstart", help="the pipeline on configs/quickstart.yaml (local Ray, SQLite MLflow, minilm)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--local", action="store_true", help="train in this process instead of on Ray workers")
    p.add_argument("--no-resume", action="store_true")
    p.set_defaults(func=cmd_quickstart)

    import os

    default_uri = os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")
    p = sub.add_parser("register", help="register a run's model in the MLflow registry (alias challenger)")
    p.add_argument("run", help="MLflow run id, or a run folder (pipeline/train output) whose model is logged first")
    p.add_argument("--name", required=True, help="registered model name")
    p.add_argument("--model-dir", help="model folder to log (default: the run folder's final model)")
    p.add_argument("--tracking-uri", default=default_uri, help="default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db")
    p.set_defaults(func=cmd_register)

    p = sub.add_parser("promote", help="the promotion gate: move 'champion' to the challenger if it is better")
    p.add_argument("name", help="registered model name")
    p.add_argument("--version", help="version to gate (default: the challenger alias)")
    p.add_argument("--suite", default="dev", help="a dev suite: dev (default), stsb-dev or scifact-dev; never test")
    p.add_argument("--margin", type=float, default=0.1, help="points (x100 metrics) the challenger must win by")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--cache-dir", default=None, help="cache corpus embeddings here (e.g. runs/.cache/embeddings)")
    p.add_argument("--tracking-uri", default=default_uri)
    p.set_defaults(func=cmd_promote)

    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"codiemb: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("codiemb: interrupted", file=sys.stderr)
        return 130
    except TrainingStopped as exc:  # SIGTERM: checkpoint written at exc.step (train/stop.py)
        print(f"codiemb: {exc}", file=sys.stderr)
        return STOPPED_EXIT_CODE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
