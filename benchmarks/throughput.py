"""Training throughput: our retrieval step against sentence-transformers' trainer, same batches.

    python benchmarks/throughput.py --model minilm --dataset scifact --batch-size 16 --steps 4 --pairs 5

Both sides train the same model (each its own copy, same starting weights) on the SAME batches
(same rows, same order, same batch size, same max lengths: queries 64 tokens, passages 256), on
the same hardware, in ONE process, interleaved step by step: the peer's trainer runs, and after
each of its steps a callback runs our step on the same batch, so a load change on the machine
hits both sides alike. The first ``--warmup`` steps of each side are not timed; then every
``--steps`` steps form a pair, whose samples/s are steps * batch / seconds for each side.

- ours: the training loop's own retrieval step, ``codiemb.train.loop.retrieval_loss``, with a real
  config (``train.retrieval_forward`` = ``--ours-attn``, default ``auto``: what ``codiemb train``
  does), then backward, gradient clipping (1.0) and the loop's optimizer (``make_adamw``: AdamW,
  fused where torch has it) with a linear schedule. On the unpadded path the loop tokenizes the
  dataset once (its one-time cost is printed) and each step packs queries and passages into ONE
  unpadded sequence (``codiemb.train.unpadded``: no compute on padding); ``--ours-attn padded``
  is the loop's padded path (``Encoder.tokenize`` every step, two forwards padded to the batch
  maximum). Same rows, same positives/negatives, same rng calls as in training.
  ``--ours-adamw foreach`` the non-fused AdamW: that is how each speed-up is measured.
- peer: ``SentenceTransformerTrainer`` with ``MultipleNegativesRankingLoss``, its default
  optimizer (AdamW, fused), ``max_grad_norm`` 1.0, linear schedule, its data loader and collator
  (tokenizing each step, queries at 64 tokens and passages at 256 through the collator's
  per-column ``max_length``), fed the same rows in the same order by a sequential batch sampler.
  A peer step is timed from the return of our previous step to the peer's ``on_step_end``: its
  data loading, collation, forward, backward, optimizer and logging are in, its setup is out.

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
    p.add_argument("--steps", type=int, default=4, help="timed steps per pair")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps at the start (>= 1)")
    p.add_argument("--pairs", type=int, default=5, help="pairs of --steps timed steps (the ratio's median runs over them)")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    p.add_argument("--query-max-length", type=int, default=64)
    p.add_argument("--passage-max-length", type=int, default=256)
    p.add_argument("--bucket", type=int, default=1,
                   help="length bucketing window in batches for the shared batch plan (1: plain shuffle)")
    p.add_argument("--ours-adamw", choices=["fused", "foreach"], default="fused",
                   help="fused: the loop's optimizer (make_adamw); foreach: the non-fused AdamW, for comparison")
    p.add_argument("--ours-varlen", choices=["batched", "reference"], default="batched",
                   help="the unpadded path's CPU attention: length-grouped padded SDPA (default) or one SDPA per text")
    p.add_argument("--ours-attn", choices=["auto", "unpadded", "padded"], default="auto",
                   help="train.retrieval_forward of the loop's retrieval step: auto (what training does), "
                        "unpadded (tokenized once, queries and passages packed, no compute on padding) or "
                        "padded (tokenize every step, pad to the batch maximum)")
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
    """The training loop's retrieval step (``loop.retrieval_loss``) + its optimizer, kept across the run."""

    def __init__(self, model: str, rows: list[dict], n_neg: int, opts, device: torch.device):
        from codiemb.config import config_from_dict
        from codiemb.model.encoder import Encoder
        from codiemb.train.fast_batches import make_adamw
        from codiemb.train.loop import DistContext, TaskData, retrieval_forward, store_of

        self.opts, self.device, self.rows, self.n_neg = opts, device, rows, n_neg
        lengths = {"query": opts.query_max_length, "passage": opts.passage_max_length}
        self.cfg = config_from_dict({
            "run": {"seed": opts.seed},
            "model": {"name": str(model), "max_length": lengths},
            "loss": {"retrieval": {"positives": 1, "negatives": n_neg}},
            "train": {"lr": opts.lr, "weight_decay": 0.01, "grad_clip": 1.0, "bf16": False,
                      "retrieval_forward": opts.ours_attn},
        })
        cfg = self.cfg
        self.encoder = Encoder.load(cfg.model.name, pooling=cfg.model.pooling, normalize=cfg.model.normalize,
                                    device=device)
        self.encoder.train()
        self.td = TaskData(name=opts.dataset, task="retrieval", records=rows, batch_size=opts.batch_size,
                           num_positives=1, num_negatives=n_neg)
        self.ctx = DistContext(device=device)
        self.forward = retrieval_forward(cfg, self.encoder, self.td, device)
        t0 = time.perf_counter()
        store_of(self.td, self.encoder, cfg)  # as train() does before its first step (its shards)
        self.pretokenize_s = time.perf_counter() - t0
        if self.forward == "unpadded":
            from codiemb.train.unpadded import resolve_backend

            self.forward = f"unpadded ({resolve_backend('auto', device)})"
        self.optimizer = make_adamw(self.encoder, cfg.train.lr, cfg.train.weight_decay, device,
                                    fused=None if opts.ours_adamw == "fused" else False)
        self.optimizer_name = "AdamW(fused)" if self.optimizer.defaults.get("fused") else "AdamW(foreach)"
        total = opts.pairs * (opts.warmup + opts.steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda u: max(0.0, 1.0 - u / total))
        self.params = [p for p in self.encoder.parameters() if p.requires_grad]

    def step(self, idx: list[int], step_no: int) -> int:
        """One optimizer step on rows ``idx`` (the loop's step); returns the non-pad tokens it encoded."""
        from codiemb.train.loop import retrieval_loss

        cfg = self.cfg
        rng = random.Random(cfg.run.seed * 1_000_003 + step_no * 101)  # the loop's per-step rng (rank 0)
        loss, _, tokens = retrieval_loss(self.encoder, None, self.td, cfg, self.ctx, rng, idx=idx)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, cfg.train.grad_clip)
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

    def train(self, batches: list[list[int]], callback: TrainerCallback) -> int:
        """One ``trainer.train()`` over ``batches`` in order; returns the non-pad tokens it encoded."""
        from datasets import Dataset
        from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
        from sentence_transformers.sentence_transformer import losses
        from sentence_transformers.sentence_transformer.data_collator import SentenceTransformerDataCollator

        opts = self.opts
        flat = [i for b in batches for i in b]
        ds = Dataset.from_dict(self.columns(flat))
        args = SentenceTransformerTrainingArguments(
            output_dir=self.tmp.name, per_device_train_batch_size=opts.batch_size, max_steps=len(batches),
            learning_rate=opts.lr, weight_decay=0.01, warmup_steps=0, lr_scheduler_type="linear",
            max_grad_norm=1.0, save_strategy="no", report_to="none", disable_tqdm=True, seed=opts.seed,
            use_cpu=self.device.type == "cpu", batch_sampler=SequentialBatchSampler, dataloader_drop_last=True,
            bf16=bool(getattr(opts, "bf16", False)),
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
                                             data_collator=collator, callbacks=[callback])
        trainer.train()
        self.optimizer_name = type(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer")
                                   else trainer.optimizer).__name__ + f"({args.optim.value})"
        return seen[0]

    def block(self, batches: list[list[int]], first_step: int = 0) -> dict:
        """A block of its own (the GPU benchmark): warm-up steps, then timed steps."""
        clock = StepClock(self.device)
        tokens = self.train(batches, clock)
        w = self.opts.warmup
        if len(clock.times) != len(batches):
            raise RuntimeError(f"peer ran {len(clock.times)} steps, expected {len(batches)}")
        dt = clock.times[-1] - clock.times[w - 1]
        n = sum(len(b) for b in batches[w:])
        return {"seconds": dt, "samples": n, "all_tokens": tokens}


class Interleave(TrainerCallback):
    """Runs OUR step on the same batch right after each peer step, and times both.

    The peer's step k is timed from the moment our step k-1 returned to the peer's ``on_step_end``
    (its data loading, collation, forward, backward, clipping, optimizer and logging of the
    previous step); ours from call to return. The peer's first step has no start mark: it is a
    warm-up step.
    """

    def __init__(self, ours: "Ours", batches: list[list[int]], device: torch.device):
        self.ours, self.batches, self.device = ours, batches, device
        self.peer_s: list[float | None] = []
        self.ours_s: list[float] = []
        self.ours_tokens: list[int] = []
        self._mark: float | None = None

    def on_step_end(self, args, state, control, **kwargs):
        _sync(self.device)
        now = time.perf_counter()
        self.peer_s.append(now - self._mark if self._mark is not None else None)
        k = state.global_step - 1
        t0 = time.perf_counter()
        self.ours_tokens.append(self.ours.step(self.batches[k], k))
        _sync(self.device)
        self.ours_s.append(time.perf_counter() - t0)
        self._mark = time.perf_counter()


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
    """Interleave ours and the peer step by step; return per-pair numbers and the median ratio."""
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
    plan = batch_plan(lengths, opts.batch_size, opts.warmup + opts.pairs * opts.steps, bucket=opts.bucket,
                      seed=opts.seed)
    inter = Interleave(ours, plan, device)
    peer_tokens = peer.train(plan, inter)
    if len(inter.ours_s) != len(plan):
        raise RuntimeError(f"peer ran {len(inter.ours_s)} steps, expected {len(plan)}")
    pairs = []
    w, n = opts.warmup, opts.steps
    for k in range(opts.pairs):
        sl = slice(w + k * n, w + (k + 1) * n)
        samples = sum(len(b) for b in plan[sl])
        ours_s, peer_s, tokens = sum(inter.ours_s[sl]), sum(inter.peer_s[sl]), sum(inter.ours_tokens[sl])
        pairs.append({"pair": k + 1, "ours_samples_per_s": samples / ours_s, "peer_samples_per_s": samples / peer_s,
                      "ours_s": ours_s, "peer_s": peer_s, "samples": samples, "nonpad_tokens": tokens,
                      "ours_tokens_per_s": tokens / ours_s, "peer_tokens_per_s": tokens / peer_s})  # same tokens
        pairs[-1]["ratio"] = pairs[-1]["ours_samples_per_s"] / pairs[-1]["peer_samples_per_s"]
        print(f"pair {k + 1}: ours {pairs[-1]['ours_samples_per_s']:.2f}  peer {pairs[-1]['peer_samples_per_s']:.2f}"
              f"  ratio {pairs[-1]['ratio']:.2f}", flush=True)
    same_tokens = sum(inter.ours_tokens) == peer_tokens
    import sentence_transformers
    import transformers

    return {
        "pairs": pairs, "same_tokens": same_tokens, "ours_all_tokens": sum(inter.ours_tokens),
        "peer_all_tokens": peer_tokens, "step_seconds": {"ours": inter.ours_s, "peer": inter.peer_s}, "median_ratio": statistics.median(p["ratio"] for p in pairs),
        "ours_pretokenize_s": ours.pretokenize_s, "rows": len(rows),
        "ours_optimizer": ours.optimizer_name,
        "ours_attn": ours.forward, "peer_optimizer": peer.optimizer_name,
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
        f"/p{o['passage_max_length']}  {o['warmup']} warm-up steps, then {o['pairs']} pairs of {o['steps']} timed steps",
        f"env {json.dumps(res['env'])}",
        f"ours: codiemb.train.loop.retrieval_loss, train.retrieval_forward={o['ours_attn']} -> {res['ours_attn']}"
        f", optimizer={res['ours_optimizer']}"
        + (f"  (one-time tokenization of {res['rows']} rows: {res['ours_pretokenize_s']:.2f} s)"
           if res["ours_attn"].startswith("unpadded") else "  (tokenizes every step)"),
        f"peer: SentenceTransformerTrainer + MultipleNegativesRankingLoss, optimizer={res['peer_optimizer']}",
        "same batches check (non-pad tokens fed to the encoder over all steps, ours == peer): "
        + ("yes" if res["same_tokens"] else f"NO: {res['ours_all_tokens']} != {res['peer_all_tokens']}"),
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
    from codiemb.train import unpadded

    unpadded.CPU_BACKEND = opts.ours_varlen
    res = run(opts)
    if opts.json:
        Path(opts.json).parent.mkdir(parents=True, exist_ok=True)
        Path(opts.json).write_text(json.dumps(res, indent=1) + "\n")
    print(format_report(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
