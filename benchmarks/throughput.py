"""Training throughput: our retrieval step against sentence-transformers' trainer, same batches.

    python benchmarks/throughput.py --model minilm --dataset scifact --batch-size 16 --steps 4 --pairs 5

Both sides train the same model (each its own copy, same starting weights) on the SAME batches
(same rows, same order, same batch size, same max lengths: queries 64 tokens, passages 256), on
the same hardware, in ONE process. The run alternates blocks, ours then the peer's, ``--pairs``
times, so a load change on the machine hits both sides. Each block runs ``--warmup`` steps that
are not timed, then ``--steps`` timed steps; samples/s = steps * batch / seconds.

- ours: the data pipeline's tokenize step runs once over all rows (``tokenize_batch``, as Ray
  Data's ``map_batches`` does; its one-time cost is printed), then each step pads the
  pre-tokenized ids to the batch maximum (``codiemb.train.fast_batches``), runs the encoder on
  queries and passages, multi-positive InfoNCE (``codiemb.losses.ir.info_nce``), backward,
  gradient clipping (1.0) and AdamW (fused where torch has it) with a linear schedule.
  ``--ours-tokenize per-step`` runs ``codiemb.train.loop.retrieval_loss`` instead (it tokenizes
  every step), and ``--ours-adamw foreach`` the non-fused AdamW: that is how each speed-up is measured.
- peer: ``SentenceTransformerTrainer`` with ``MultipleNegativesRankingLoss``, its default
  optimizer (AdamW, fused), ``max_grad_norm`` 1.0, linear schedule, its data loader and collator
  (tokenizing each step, queries at 64 tokens and passages at 256 through the collator's
  per-column ``max_length``), fed the same rows in the same order by a sequential batch sampler.
  A block's timing runs from the end of its last warm-up step to the end of its last step
  (``on_step_end``), so the trainer's setup is excluded and its per-step overhead is included.

The last line reads ``ratio ours/peer samples/s: X.XX``, the median over the pairs of the
per-pair ratio.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform as _platform
import random
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "platform") not in sys.path:
    sys.path.insert(0, str(REPO / "platform"))

import torch  # noqa: E402
from sentence_transformers.base.sampler import DefaultBatchSampler  # noqa: E402
from torch.utils.data import SequentialSampler  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

DATASETS = {
    "scifact": {"path": "train/qp/scifact/scifact_train_pairs_nodev.jsonl", "negatives": 0},
    "snli": {"path": "train/nli/snli/snli_dev_test_triplets.jsonl", "negatives": 1},
}
DEFAULT_DATA_ROOT = REPO.parent / "shared" / "data"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="minilm", help="model alias or local folder (default: minilm)")
    p.add_argument("--dataset", default="scifact", choices=sorted(DATASETS))
    p.add_argument("--data-root", default=str(DEFAULT_DATA_ROOT))
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=4, help="timed steps per block")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps at the start of every block (>= 1)")
    p.add_argument("--pairs", type=int, default=5, help="blocks per side, interleaved ours, peer, ours, ...")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    p.add_argument("--query-max-length", type=int, default=64)
    p.add_argument("--passage-max-length", type=int, default=256)
    p.add_argument("--bucket", type=int, default=1,
                   help="length bucketing window in batches for the shared batch plan (1: plain shuffle)")
    p.add_argument("--ours-tokenize", choices=["pretok", "per-step"], default="pretok")
    p.add_argument("--ours-adamw", choices=["fused", "foreach"], default="fused")
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-rows", type=int, default=None, help="read at most this many rows")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    if args.warmup < 1:
        p.error("--warmup must be >= 1 (the peer's timing starts at the end of a warm-up step)")
    if args.steps < 1 or args.pairs < 1 or args.batch_size < 2:
        p.error("--steps and --pairs must be >= 1 and --batch-size >= 2")
    return args


# --------------------------------------------------------------------------- data
def load_rows(dataset: str, data_root: str | Path, max_rows: int | None = None) -> list[dict]:
    """Validated retrieval records (``query``, ``positives``, ``negatives``) via the project's reader."""
    from codiemb.data.local import read_records

    path = Path(data_root) / DATASETS[dataset]["path"]
    return read_records(path, "retrieval", max_rows=max_rows).records


def batch_plan(lengths: list[int], batch_size: int, n_batches: int, *, bucket: int = 1,
               seed: int = 0) -> list[list[int]]:
    """``n_batches`` full batches of row indices (epochs repeat with a new seed if needed).

    ``lengths`` (tokens per row) drive length bucketing when ``bucket`` > 1.
    """
    from codiemb.train.fast_batches import bucketed_order

    n_rows = len(lengths)
    if n_rows < batch_size:
        raise SystemExit(f"only {n_rows} rows, fewer than one batch of {batch_size}")
    plan: list[list[int]] = []
    epoch = 0
    while len(plan) < n_batches:
        plan += [b for b in bucketed_order(lengths, batch_size, bucket_size=bucket, seed=seed + epoch)
                 if len(b) == batch_size]
        epoch += 1
    return plan[:n_batches]


# --------------------------------------------------------------------------- our side
class Ours:
    """Our encoder + retrieval step, kept across blocks (one run, as in training)."""

    def __init__(self, model: str, rows: list[dict], n_neg: int, opts, device: torch.device):
        from codiemb.model.encoder import Encoder
        from codiemb.train.fast_batches import PretokenizedRetrieval, make_adamw

        self.opts, self.device, self.rows, self.n_neg = opts, device, rows, n_neg
        self.encoder = Encoder.load(model, device=device)
        self.encoder.train()
        lengths = {"query": opts.query_max_length, "passage": opts.passage_max_length}
        t0 = time.perf_counter()
        self.pretok = PretokenizedRetrieval.build(self.encoder.tokenizer, rows, lengths, num_positives=1,
                                                  num_negatives=n_neg) if opts.ours_tokenize == "pretok" else None
        self.pretokenize_s = time.perf_counter() - t0 if self.pretok is not None else 0.0
        self.optimizer = make_adamw(self.encoder, opts.lr, 0.01, device, fused=opts.ours_adamw == "fused")
        self.optimizer_name = "AdamW(fused)" if self.optimizer.defaults.get("fused") else "AdamW(foreach)"
        total = opts.pairs * (opts.warmup + opts.steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda u: max(0.0, 1.0 - u / total))
        self.params = [p for p in self.encoder.parameters() if p.requires_grad]
        if self.pretok is None:
            from codiemb.config import config_from_dict
            from codiemb.train.loop import DistContext, TaskData

            self.cfg = config_from_dict({"model": {"name": str(model), "max_length": lengths},
                                         "loss": {"retrieval": {"negatives": n_neg}}})
            self.td = TaskData(name=opts.dataset, task="retrieval", records=rows, batch_size=opts.batch_size,
                               num_positives=1, num_negatives=n_neg)
            self.ctx = DistContext(device=device)

    def step(self, idx: list[int], step_no: int) -> int:
        """One optimizer step on rows ``idx``; returns the non-pad tokens it encoded."""
        from codiemb.losses.ir import info_nce

        rng = random.Random(self.opts.seed * 1_000_003 + step_no * 101)
        if self.pretok is not None:
            qf, pf = self.pretok.batch(idx, rng)
            if self.device.type != "cpu":
                qf = {k: v.to(self.device, non_blocking=True) for k, v in qf.items()}
                pf = {k: v.to(self.device, non_blocking=True) for k, v in pf.items()}
            q = self.encoder(qf)["embedding"]
            p = self.encoder(pf)["embedding"].view(len(idx), 1 + self.n_neg, -1)
            loss = info_nce(q, p, 1, temperature=0.02, gather=False)
            tokens = int(qf["attention_mask"].sum()) + int(pf["attention_mask"].sum())
        else:
            from codiemb.train.loop import retrieval_loss

            loss, _, tokens = retrieval_loss(self.encoder, [self.rows[i] for i in idx], self.td, self.cfg, self.ctx, rng)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return tokens

    def block(self, batches: list[list[int]], first_step: int) -> dict:
        w = self.opts.warmup
        tokens = 0
        warm_tokens = sum(self.step(idx, first_step + k) for k, idx in enumerate(batches[:w]))
        _sync(self.device)
        t0 = time.perf_counter()
        for k, idx in enumerate(batches[w:]):
            tokens += self.step(idx, first_step + w + k)
        _sync(self.device)
        dt = time.perf_counter() - t0
        n = sum(len(b) for b in batches[w:])
        return {"seconds": dt, "samples": n, "tokens": tokens, "all_tokens": warm_tokens + tokens}


# --------------------------------------------------------------------------- the peer
class Peer:
    """sentence-transformers' trainer with MNRL; a fresh trainer per block, the same model throughout."""

    def __init__(self, model: str, rows: list[dict], n_neg: int, opts, device: torch.device):
        from sentence_transformers import SentenceTransformer

        from codiemb.paths import resolve_model

        self.opts, self.rows, self.n_neg, self.device = opts, rows, n_neg, device
        self.model = SentenceTransformer(resolve_model(model), device=str(device))
        self.model.max_seq_length = max(opts.query_max_length, opts.passage_max_length)
        self.tmp = tempfile.TemporaryDirectory(prefix="st-throughput-")
        self.optimizer_name = "?"

    def columns(self, idx: list[int]) -> dict[str, list[str]]:
        cols = {"anchor": [self.rows[i]["query"] for i in idx],
                "positive": [self.rows[i]["positives"][0] for i in idx]}
        if self.n_neg:
            cols["negative"] = [self.rows[i]["negatives"][0] for i in idx]
        return cols

    def block(self, batches: list[list[int]], first_step: int) -> dict:
        from datasets import Dataset
        from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
        from sentence_transformers.sentence_transformer import losses
        from sentence_transformers.sentence_transformer.data_collator import SentenceTransformerDataCollator
        opts = self.opts
        flat = [i for b in batches for i in b]
        ds = Dataset.from_dict(self.columns(flat))
        clock = StepClock(self.device)
        args = SentenceTransformerTrainingArguments(
            output_dir=self.tmp.name, per_device_train_batch_size=opts.batch_size, max_steps=len(batches),
            learning_rate=opts.lr, weight_decay=0.01, warmup_steps=0, lr_scheduler_type="linear",
            max_grad_norm=1.0, save_strategy="no", report_to="none", disable_tqdm=True, seed=opts.seed,
            use_cpu=self.device.type == "cpu", batch_sampler=SequentialBatchSampler, dataloader_drop_last=True,
        )
        roles = {"anchor": "query", "positive": "document", "negative": "document"}
        seen = [0]

        def preprocess(*a, **k):  # the model's own preprocess; counts the non-pad tokens it hands on
            out = self.model.preprocess(*a, **k)
            seen[0] += int(out["attention_mask"].sum())
            return out

        collator = SentenceTransformerDataCollator(
            preprocess_fn=preprocess, router_mapping=roles,
            max_length={"query": opts.query_max_length, "document": opts.passage_max_length})
        trainer = SentenceTransformerTrainer(model=self.model, args=args, train_dataset=ds,
                                             loss=losses.MultipleNegativesRankingLoss(self.model),
                                             data_collator=collator, callbacks=[clock])
        trainer.train()
        self.optimizer_name = type(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer")
                                   else trainer.optimizer).__name__ + f"({args.optim.value})"
        w = opts.warmup
        if len(clock.times) != len(batches):
            raise RuntimeError(f"peer ran {len(clock.times)} steps, expected {len(batches)}")
        dt = clock.times[-1] - clock.times[w - 1]
        n = sum(len(b) for b in batches[w:])
        return {"seconds": dt, "samples": n, "all_tokens": seen[0]}


class StepClock(TrainerCallback):
    """Time stamps at the end of every trainer step (after the optimizer step)."""

    def __init__(self, device: torch.device):
        self.device, self.times = device, []

    def on_step_end(self, args, state, control, **kwargs):
        _sync(self.device)
        self.times.append(time.perf_counter())


class SequentialBatchSampler(DefaultBatchSampler):
    """The rows in dataset order (the benchmark's batch plan), batch by batch."""

    def __init__(self, dataset, **kwargs):
        super().__init__(SequentialSampler(dataset), **kwargs)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------- the run
def run(opts) -> dict:
    """Interleave ours and the peer's blocks; return per-pair numbers and the median ratio."""
    import datasets
    import transformers

    for name in ("sentence_transformers", "transformers", "datasets", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    torch.manual_seed(opts.seed)
    device = torch.device(opts.device)
    n_neg = DATASETS[opts.dataset]["negatives"]
    rows = load_rows(opts.dataset, opts.data_root, opts.max_rows)
    # one positive and n_neg negatives per row, fixed up front, so both sides see the same passages
    rows = [{"query": r["query"], "positives": r["positives"][:1], "negatives": r["negatives"][:n_neg]}
            for r in rows if len(r["negatives"]) >= n_neg]
    ours = Ours(opts.model, rows, n_neg, opts, device)
    peer = Peer(opts.model, rows, n_neg, opts, device)
    # characters stand in for tokens, so every variant of ours gets the same plan
    lengths = [len(r["query"]) + len(r["positives"][0]) + sum(len(t) for t in r["negatives"][:n_neg]) for r in rows]
    per_block = opts.warmup + opts.steps
    plan = batch_plan(lengths, opts.batch_size, opts.pairs * per_block, bucket=opts.bucket, seed=opts.seed)
    pairs = []
    for k in range(opts.pairs):
        batches = plan[k * per_block: (k + 1) * per_block]
        a = ours.block(batches, k * per_block)
        b = peer.block(batches, k * per_block)
        pairs.append({"pair": k + 1, "ours_samples_per_s": a["samples"] / a["seconds"],
                      "peer_samples_per_s": b["samples"] / b["seconds"],
                      "ours_s": a["seconds"], "peer_s": b["seconds"], "samples": a["samples"],
                      "nonpad_tokens": a["tokens"], "ours_all_tokens": a["all_tokens"],
                      "peer_all_tokens": b["all_tokens"]})
        pairs[-1]["ratio"] = pairs[-1]["ours_samples_per_s"] / pairs[-1]["peer_samples_per_s"]
        pairs[-1]["ours_tokens_per_s"] = a["tokens"] / a["seconds"]
        pairs[-1]["peer_tokens_per_s"] = a["tokens"] / b["seconds"]  # same batches, same tokens
        print(f"pair {k + 1}: ours {pairs[-1]['ours_samples_per_s']:.2f}  peer {pairs[-1]['peer_samples_per_s']:.2f}"
              f"  ratio {pairs[-1]['ratio']:.2f}", flush=True)
    import sentence_transformers
    import transformers

    return {
        "pairs": pairs, "same_tokens": all(p["ours_all_tokens"] == p["peer_all_tokens"] for p in pairs), "median_ratio": statistics.median(p["ratio"] for p in pairs),
        "ours_pretokenize_s": ours.pretokenize_s, "rows": len(rows),
        "ours_optimizer": ours.optimizer_name, "peer_optimizer": peer.optimizer_name,
        "env": {"torch": torch.__version__, "transformers": transformers.__version__,
                "sentence_transformers": sentence_transformers.__version__, "threads": torch.get_num_threads(),
                "cpu": _platform.processor() or _platform.machine(), "device": str(device),
                "cpus_visible": os.cpu_count()},
        "options": {k: v for k, v in vars(opts).items()},
    }


def format_report(res: dict) -> str:
    o = res["options"]
    lines = [
        f"model {o['model']}  dataset {o['dataset']}  batch {o['batch_size']}  max_length q{o['query_max_length']}"
        f"/p{o['passage_max_length']}  steps {o['steps']} timed + {o['warmup']} warm-up per block  pairs {o['pairs']}",
        f"env {json.dumps(res['env'])}",
        f"ours: tokenize={o['ours_tokenize']} optimizer={res['ours_optimizer']}"
        f"  (one-time pre-tokenization of {res['rows']} rows: {res['ours_pretokenize_s']:.2f} s)",
        f"peer: SentenceTransformerTrainer + MultipleNegativesRankingLoss, optimizer={res['peer_optimizer']}",
        "same batches check (non-pad tokens fed to the encoder, every step of every block, ours == peer): "
        + ("yes" if res["same_tokens"] else "NO: " + ", ".join(
            f"{p['ours_all_tokens']}!={p['peer_all_tokens']}" for p in res["pairs"])),
        "",
        "| pair | ours samples/s | peer samples/s | ratio | ours non-pad tok/s | peer non-pad tok/s |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for p in res["pairs"]:
        lines.append(f"| {p['pair']} | {p['ours_samples_per_s']:.2f} | {p['peer_samples_per_s']:.2f} | "
                     f"{p['ratio']:.2f} | {p['ours_tokens_per_s']:.0f} | {p['peer_tokens_per_s']:.0f} |")
    lines.append("")
    lines.append(f"ratio ours/peer samples/s: {res['median_ratio']:.2f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    print("command: " + shlex.join(["python", "benchmarks/throughput.py", *argv]), flush=True)
    opts = parse_args(argv)
    res = run(opts)
    if opts.json:
        Path(opts.json).parent.mkdir(parents=True, exist_ok=True)
        Path(opts.json).write_text(json.dumps(res, indent=1) + "\n")
    print(format_report(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
